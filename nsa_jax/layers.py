"""Small building blocks shared by the vision tower and the language model."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding

from nsa_jax.layer_scan import prefetched_scan
from nsa_jax.sharding import LOGICAL_RULES, dotted_path, logical_to_spec, param, param_logical_axes, with_axes
from pallas_kernels import RESIDUALS

INIT = nnx.initializers.normal(0.02)
MLP_PROJECTIONS = "mlp_projections"  # checkpoint name of a gated MLP's gate and up outputs (`GatedMLP`)


def _cudnn_attention_forward(prim, *_, **__) -> bool:
    """cuDNN flash attention's forward (the primitive jax binds, "..._wrapper", and its core): its output and
    softmax statistics are the residuals of its backward."""
    return prim.name in ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper")


REMAT_POLICIES = {
    "none": None,  # no remat
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Full remat, but the attention cores' residuals are kept from the forward: the NSA kernels' (their q, k, v,
    # outputs, lse and selected blocks) and cuDNN's dense attention's: the backward recomputes the projections,
    # MLP and norms, not the attention kernels.
    "attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(RESIDUALS), _cudnn_attention_forward),
    # "attention", and the gated MLPs' gate and up projections (the block's widest matmuls): the backward
    # recomputes only the norms, the attention projections and the elementwise work.
    "attention_mlp": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_only_these_names(RESIDUALS, MLP_PROJECTIONS), _cudnn_attention_forward),
}


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a model runs, not what it computes (constructor argument of the model and its blocks).

    mesh: the device mesh of training; the attention core runs split by heads and query tokens over it
      (`head_parallel.py`) and decoder layers pin their hidden states to [batch, sequence]
      (`sharding.activation_sharding`).
    remat: the rematerialisation policy of the repeated blocks (`REMAT_POLICIES`).
    attention_impl: `jax.nn.dot_product_attention`'s implementation for dense attention (None: cuDNN where it
      applies, else XLA's).
    prefetch: the decoder layers run as `layer_scan.prefetched_scan` (the next layer's parameters gathered
      while a layer computes, in both passes); it recomputes each layer in the backward itself, so it needs
      remat "full" (and a mesh).
    sharding_rules: the parameters' placement rules (logical name -> mesh axes, as pairs; empty: the defaults):
      where they are stored, and (keeping only their tensor-parallel axes) where they are used.
    """

    mesh: Mesh | None = None
    remat: str = "none"
    attention_impl: str | None = None
    prefetch: bool = False
    sharding_rules: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat policy {self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
        if self.prefetch and (self.mesh is None or self.remat != "full"):
            raise ValueError(f"parameter prefetch recomputes each layer in the backward: it needs a mesh and "
                             f"remat 'full' (got remat {self.remat!r}, mesh {self.mesh})")

    def call(self, fn: Callable, *args):
        """fn(*args), its activations rematerialised in the backward pass by the remat policy (under prefetch
        the layer scan recomputes the layers itself)."""
        if self.remat == "none" or self.prefetch:
            return fn(*args)
        return nnx.remat(fn, policy=REMAT_POLICIES[self.remat])(*args)

    def rules(self, *, compute: bool) -> dict[str, tuple[str, ...]]:
        """The parameters' placement rules: where they are stored, or (compute) where they are used, split over
        tensor only (the other axes are ZeRO-3's: a parameter is gathered over them before use)."""
        rules = dict(self.sharding_rules) or LOGICAL_RULES
        return {name: tuple(a for a in axes if a == "tensor") for name, axes in rules.items()} if compute else rules

    def placements(self, block: nnx.Module) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        """(gather, scatter) of one block's state (`nnx.split`): each parameter constrained to its compute
        placement / its storage placement (`rules`)."""
        axes = param_logical_axes(block)
        leaves, _ = jax.tree_util.tree_flatten_with_path(nnx.split(block)[1])
        names = [dotted_path(path) for path, _ in leaves]
        names = [n if n in axes else n.rsplit(".", 1)[0] for n in names]  # the Variable's value key

        def place(r):
            specs = [None if n not in axes else NamedSharding(self.mesh, logical_to_spec(axes[n], leaf.shape,
                                                                                         self.mesh, r))
                     for n, (_, leaf) in zip(names, leaves)]

            def constrain(state):
                flat, treedef = jax.tree.flatten(state)
                return jax.tree.unflatten(treedef, [x if s is None else jax.lax.with_sharding_constraint(x, s)
                                                    for x, s in zip(flat, specs)])
            return constrain
        return place(self.rules(compute=True)), place(self.rules(compute=False))


def linear(din: int, dout: int, *, kernel_axes: tuple[str | None, str | None], bias: bool, rngs: nnx.Rngs,
           dtype: jnp.dtype, param_dtype: jnp.dtype) -> nnx.Linear:
    """A Linear layer with the HF initialisation (normal(0.02) kernel, zero bias). float32 compute multiplies at
    full precision (no TF32); other compute dtypes take the backend's default (bf16 products, float32 sums on
    GPU), as transformers' bf16 models do.

    kernel_axes: the logical axes of the kernel [din, dout] (`nsa_jax.sharding`); the bias takes the last."""
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return nnx.Linear(din, dout, use_bias=bias, kernel_init=with_axes(INIT, kernel_axes),
                      bias_init=with_axes(nnx.initializers.zeros, kernel_axes[-1:]),
                      dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)


class RMSNorm(nnx.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (the order matters for bf16 parity)."""

    def __init__(self, dim: int, eps: float, *, param_dtype: jnp.dtype):
        self.weight = param(jnp.ones((dim,), param_dtype), (None,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


def activation(name: str):
    """The HF activation of that name."""
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu", "gelu_exact"):
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"unsupported activation {name!r}")


# A gated MLP's hidden width is padded to a multiple of this at compute time (zero weights: same values and
# gradients). The GEMMs whose contracted dimension is the hidden width run far slower at a ragged width: at the
# vision tower's 3420, the MLP's forward + backward took 1.9x the time of the padded 3456 on an H200
# (BENCHMARKS.md).
MLP_WIDTH_MULTIPLE = 128


def _apply(layer: nnx.Linear, x: jax.Array, *, pad_in: int = 0, pad_out: int = 0) -> jax.Array:
    """`layer(x)` with its kernel padded by zeros: `pad_in` rows (x then has as many more features), `pad_out`
    columns (as many more outputs, zero where the bias is zero-padded too)."""
    bias = None if layer.bias is None else layer.bias[...]
    x, kernel, bias = layer.promote_dtype((x, layer.kernel[...], bias), dtype=layer.dtype)
    kernel = jnp.pad(kernel, ((0, pad_in), (0, pad_out)))
    y = layer.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision)
    return y if bias is None else y + jnp.pad(bias, (0, pad_out))


class GatedMLP(nnx.Module):
    """SwiGLU MLP: down(act(gate(x)) * up(x)), its hidden width padded to `MLP_WIDTH_MULTIPLE` for the matmuls."""

    def __init__(self, dim: int, hidden: int, act: str, *, bias: bool, rngs: nnx.Rngs, dtype: jnp.dtype,
                 param_dtype: jnp.dtype):
        kw = dict(bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = linear(dim, hidden, kernel_axes=("embed", "mlp"), **kw)
        self.up_proj = linear(dim, hidden, kernel_axes=("embed", "mlp"), **kw)
        self.down_proj = linear(hidden, dim, kernel_axes=("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.gate_proj.out_features
        pad = -hidden % MLP_WIDTH_MULTIPLE  # padded columns: gate = up = 0, so act(gate) * up = 0 there
        gate, up = checkpoint_name((_apply(self.gate_proj, x, pad_out=pad), _apply(self.up_proj, x, pad_out=pad)),
                                   MLP_PROJECTIONS)
        return _apply(self.down_proj, self.act(gate) * up, pad_in=pad)


def runs(kinds: Sequence) -> list[tuple[int, int]]:
    """[start, stop) of each run of equal consecutive entries of `kinds`, in order."""
    bounds = [i for i in range(1, len(kinds)) if kinds[i] != kinds[i - 1]]
    return list(zip([0, *bounds], [*bounds, len(kinds)])) if kinds else []


def make_blocks(kinds: Sequence, make: Callable[..., nnx.Module], rngs: nnx.Rngs) -> list[nnx.Module]:
    """One block `make(kind, rngs)` per entry of `kinds`, each run of equal kinds created under one `nnx.vmap`:
    the random initialisation of a run compiles as one block, so compile time does not grow with depth."""
    blocks: list[nnx.Module] = []
    for start, stop in runs(kinds):
        kind = kinds[start]
        create = nnx.split_rngs(splits=stop - start)(nnx.vmap(lambda r: make(kind, r), in_axes=0, out_axes=0))
        graphdef, state = nnx.split(create(rngs))
        blocks += [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state)) for i in range(stop - start)]
    return blocks


def run_blocks(blocks: Sequence[nnx.Module], x: jax.Array, call: Callable, xs: Any = None,
               runtime: Runtime | None = None) -> tuple[jax.Array, Any]:
    """x through `x, y = call(block, x, xs_i)` for each block in order, with xs_i the block's slice of `xs` (a
    pytree with a leading block axis, or None); returns (x, the y's stacked). One `lax.scan` over the stacked
    parameters when the blocks share a structure (one compiled block: compile time does not grow with
    depth), else a loop. With `runtime.prefetch` and no xs (training), `layer_scan.prefetched_scan` (the y's
    are then None)."""
    parts = [nnx.split(block) for block in blocks]
    if not parts:
        return x, xs
    graphdef = parts[0][0]
    shared = all(g == graphdef for g, _ in parts[1:])
    if runtime is not None and runtime.prefetch and xs is None:
        if not shared:
            raise ValueError("parameter prefetch needs the layers to share one structure (all NSA or all dense)")
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in parts))
        gather, scatter = runtime.placements(blocks[0])
        fn = lambda state, h: call(nnx.merge(graphdef, state), h, None)[0]
        return prefetched_scan(fn, stacked, x, gather, scatter), None
    if len(parts) == 1 or not shared:
        ys = []
        for i, block in enumerate(blocks):
            x, y = call(block, x, jax.tree.map(lambda a, i=i: a[i], xs))
            ys.append(y)
        return x, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(state for _, state in parts))
    return jax.lax.scan(lambda h, args: call(nnx.merge(graphdef, args[0]), h, args[1]), x, (stacked, xs))
