"""Attention with heads split over devices and whole sequences per device (DeepSpeed-Ulysses style).

Between layers, training shards activations along tokens (mesh axis `sequence`) and heads' projections along
`tensor`. Attention needs every key of a query's sample, and the Pallas / cuDNN kernels are custom calls
that XLA's partitioner can only replicate. `head_parallel` runs the attention core inside `shard_map`
instead: q, k, v and per-head gates are resharded (all-to-all) from [batch, sequence] to [batch, heads]
over the mesh axes that divide the KV heads, each device attends its heads over whole sequences, and the
output goes back the same way. Mesh axes that divide neither the batch nor the KV heads see the attention
replicated (correct, not faster).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
from jax.sharding import Mesh, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor", "sequence")


def _dividing(mesh: Mesh, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The axes (in order, size > 1) whose running product divides `size`."""
    out, product = [], 1
    for axis in axes:
        n = mesh.shape.get(axis, 1)
        if n > 1 and size % (product * n) == 0:
            out.append(axis)
            product *= n
    return tuple(out)


def head_parallel(mesh: Mesh | None, fn: Callable[..., jax.Array], heads: tuple[jax.Array, ...],
                  rows: Mapping[str, jax.Array | None], *, num_kv_heads: int, split_heads: bool = True
                  ) -> jax.Array:
    """fn(*heads, **rows) on each device's batch rows and heads, the whole sequence at once.

    heads: arrays [B, T, H, ...] whose axis 2 is a head axis (query heads, KV heads or per-head gates;
    every head count a multiple of `num_kv_heads`, query heads grouped by KV head). rows: [B, T] arrays
    (None entries are passed as None). fn returns [B, T, H, D]. split_heads=False keeps heads whole (for
    layouts where a device's query heads would not read its own KV heads); batch rows are still split.
    Without a mesh (or a mesh of one device) this is fn(*heads, **rows).
    """
    if mesh is None or mesh.size == 1:
        return fn(*heads, **rows)
    b = heads[0].shape[0]
    batch = _dividing(mesh, BATCH_AXES, b)
    head = _dividing(mesh, HEAD_AXES, num_kv_heads) if split_heads else ()
    if not batch and not head:
        return fn(*heads, **rows)
    b_spec, h_spec = batch or None, head or None
    present = {k: v for k, v in rows.items() if v is not None}
    absent = {k: None for k, v in rows.items() if v is None}

    def local(hs, rs):
        return fn(*hs, **rs, **absent)

    head_specs = tuple(P(b_spec, None, h_spec, *([None] * (a.ndim - 3))) for a in heads)
    row_specs = {k: P(b_spec, None) for k in present}
    return jax.shard_map(local, mesh=mesh, in_specs=(head_specs, row_specs),
                         out_specs=P(b_spec, None, h_spec, None), check_vma=False)(tuple(heads), present)
