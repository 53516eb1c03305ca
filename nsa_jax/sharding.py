"""The device mesh and every sharding rule of training, in one place (logical axes as in MaxText).

Each parameter declares its logical axes where it is created (`with_axes` on its initializer, `param`; e.g.
`layers.linear(..., kernel_axes=("embed", "heads"))`), as nnx variable metadata under `AXES_KEY`;
`param_logical_axes` reads them back. Activations use the names "batch", "sequence", ... Logical names map
to mesh axes through `LOGICAL_RULES`, which a training config can override (`config.sharding_rules`,
merged by `logical_rules`):

- batch -> (data, fsdp): data parallel + ZeRO-3 style fully sharded parameters (FSDP);
- embed (parameter rows) -> (fsdp, sequence): parameters, gradients and Adam moments are sharded over the
  context-parallel devices too (they would otherwise hold copies); heads / kv_heads / mlp / vocab -> tensor
  (Megatron tensor parallel);
- sequence -> sequence: context parallelism. Activations are sharded along the token axis between layers;
  the attention core runs head-parallel (`nsa_jax/head_parallel.py`: all-to-all to [batch, heads], whole
  sequences per device, as DeepSpeed-Ulysses), over as many of (tensor, sequence) as divide the KV heads, and
  split by query tokens over the rest (each device its chunk of queries against the all-gathered k, v).
- patches -> (data, fsdp, sequence): the vision tower's pixel rows, in one chunk of whole frames per device
  (`device_batch.vision_input`); frames attend only within themselves, so the tower needs no communication.

A mesh axis is dropped from a dimension it does not divide (that dimension is then replicated over it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "sequence": ("sequence",),
    "embed": ("fsdp", "sequence"),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "patches": ("data", "fsdp", "sequence"),
}

# The logical names of parameter dimensions: the rules a config may override. batch / sequence / patches
# stay as above: the head-parallel attention and the batch placement assume them.
PARAM_AXES = ("vocab", "embed", "heads", "kv_heads", "mlp")

# The nnx variable metadata key holding a parameter's logical axes (one name or None per dimension). A
# project key, not flax's sharding metadata: that one's name changed across flax versions, and flax places
# variables by it when a mesh is active, which logical names cannot be.
AXES_KEY = "logical_axes"

Axes = tuple[str | None, ...]


def with_axes(init: Callable, axes: Sequence[str | None]) -> Callable:
    """An initializer whose nnx.Param carries these logical axes (`AXES_KEY`)."""
    return nnx.with_metadata(init, **{AXES_KEY: tuple(axes)})


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """An nnx.Param of `value` with these logical axes (`AXES_KEY`)."""
    return nnx.Param(value, **{AXES_KEY: tuple(axes)})


def logical_rules(overrides: Mapping[str, Sequence[str]] | None = None) -> dict[str, tuple[str, ...]]:
    """`LOGICAL_RULES` with `overrides` (logical name -> mesh axes, e.g. {"mlp": ()}) merged over them.
    Only parameter axes (`PARAM_AXES`) can be overridden; mesh axes must be among `MESH_AXES`."""
    rules = dict(LOGICAL_RULES)
    for name, axes in dict(overrides or {}).items():
        if name not in PARAM_AXES:
            raise ValueError(f"sharding rule {name!r}: only the parameter axes {PARAM_AXES} can be overridden")
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown or len(set(axes)) != len(axes):
            raise ValueError(f"sharding rule {name!r}: {axes} must be distinct mesh axes among {MESH_AXES}")
        rules[name] = axes
    return rules


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, sequence); one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; expected {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices are not a multiple of {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, Sequence[str]] | None = None) -> P:
    """The PartitionSpec of an array with these logical axes (axes not dividing a dimension are dropped);
    rules: logical name -> mesh axes (default `LOGICAL_RULES`)."""
    rules = LOGICAL_RULES if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical, shape):
        axes = []
        size = 1
        for axis in rules.get(name, ()) if name else ():
            n = mesh.shape[axis]
            if axis in used or n == 1 or dim % (size * n):
                continue
            axes.append(axis)
            size *= n
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def named(mesh: Mesh, *logical: str | None, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical, shape, mesh))


def declared_axes(var: nnx.Variable) -> Axes | None:
    """The logical axes declared on a variable (`with_axes`, `param`), or None."""
    axes = var.get_metadata().get(AXES_KEY)
    return None if axes is None else tuple(axes)


def param_logical_axes(model: Any) -> dict[str, Axes]:
    """{dotted path ('language_model.layers.0.self_attn.q_proj.kernel'): logical axes} of every nnx.Param of
    a module (or its state, abstract ones too) as declared where it was created; a parameter without
    declared axes (none in this model: tests/model/test_sharding_axes.py) is replicated."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = declared_axes(var)
        ndim = len(var.shape)
        if axes is not None and len(axes) != ndim:
            raise ValueError(f"parameter {'.'.join(map(str, path))} of shape {tuple(var.shape)} declares "
                             f"logical axes {axes}")
        out[".".join(map(str, path))] = (None,) * ndim if axes is None else axes
    return out


def path_names(path: tuple) -> tuple[str, ...]:
    """The names along a pytree key path (dict keys, attribute names, sequence indices)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def dotted_path(path: tuple) -> str:
    """A pytree key path as 'language_model.layers.0.self_attn.q_proj.kernel'."""
    return ".".join(path_names(path))


def tree_shardings(tree: Any, mesh: Mesh, axes: Mapping[str, Axes],
                   rules: Mapping[str, Sequence[str]] | None = None) -> Any:
    """NamedShardings for a parameter-shaped pytree (parameters, gradients) from the parameters' logical axes
    (`param_logical_axes` of the model) and the rules (default `LOGICAL_RULES`)."""
    def one(path, leaf):
        name, shape = dotted_path(path), np.shape(leaf)
        if name not in axes:
            raise KeyError(f"{name}: not a parameter of the model whose logical axes are given")
        return NamedSharding(mesh, logical_to_spec(axes[name], shape, mesh, rules))
    return jax.tree_util.tree_map_with_path(one, tree)


def batch_spec(name: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a token array of a batch: [B, T] (position ids [3, B, T]). Pixel rows are placed by
    `device_batch.vision_input`."""
    if name == "position_ids":
        return (None, "batch", "sequence")
    if ndim >= 2:
        return ("batch", "sequence") + (None,) * (ndim - 2)
    return (None,) * ndim


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's part of a batch onto the mesh (global arrays built from process-local data)."""
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        sharding = named(mesh, *batch_spec(name, value.ndim), shape=_global_shape(name, value.shape))
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def _global_shape(name: str, local: tuple[int, ...]) -> tuple[int, ...]:
    """The global shape of a batch array of which each process holds an equal slice along its batch axis."""
    n = jax.process_count()
    axis = 1 if name == "position_ids" else 0
    return tuple(d * n if i == axis else d for i, d in enumerate(local))


def activation_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """Hidden states [B, T, E] between decoder layers: batch over (data, fsdp), tokens over sequence."""
    return named(mesh, "batch", "sequence", None, shape=shape)
