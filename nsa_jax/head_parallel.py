"""Attention split over devices by heads (DeepSpeed-Ulysses style) and, past the KV-head count, by query tokens.

Between layers, training shards activations along tokens (mesh axis `sequence`) and heads' projections along
`tensor`. Attention needs every key of a query's sample, and the Pallas / cuDNN kernels are custom calls
that XLA's partitioner can only replicate. `head_parallel` runs the attention core inside `shard_map`
instead: q, k, v and per-head gates are resharded (all-to-all) from [batch, sequence] to [batch, heads]
over the mesh axes that divide the KV heads, and each device attends its heads over whole sequences.

The other head axes (those the KV heads do not divide, e.g. `sequence` 8 over a 7B's 4 KV heads) split the
queries instead (context parallelism): each device keeps its contiguous chunk of query tokens, all-gathers k
and v along those axes (autodiff turns the gather into a reduce-scatter of dk, dv) and attends its chunk
against the whole keys, its rows at their absolute positions (`QueryChunk`). NSA's work per token hardly
depends on its position (block_count blocks, a window, the small compressed keys), so equal chunks are
balanced. The output goes back the way q came. Mesh axes that divide neither the batch, nor the KV heads, nor
the tokens see the attention replicated (correct, not faster).
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
HEAD_AXES = ("tensor", "sequence")


class QueryChunk(NamedTuple):
    """A device's query rows in the sequence split: positions offset + [0, size) of the gathered keys' sequence,
    chunk i of the mesh axes `axis` at offset i * size."""

    offset: jax.Array  # int32 scalar
    size: int
    axis: tuple[str, ...]

    def rows(self, x: jax.Array) -> jax.Array:
        """The chunk's rows [B, size, ...] of a whole-sequence x [B, T, ...]."""
        return jax.lax.dynamic_slice_in_dim(x, self.offset, self.size, axis=1)


def _dividing(mesh: Mesh, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
    """The axes (in order, size > 1) whose running product divides `size`."""
    out, product = [], 1
    for axis in axes:
        n = mesh.shape.get(axis, 1)
        if n > 1 and size % (product * n) == 0:
            out.append(axis)
            product *= n
    return tuple(out)


def split_axes(mesh: Mesh, *, batch: int, length: int, num_kv_heads: int, split_heads: bool = True
               ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(batch axes, head axes, sequence axes) of the attention split: batch rows over the BATCH_AXES that divide
    them, heads over the HEAD_AXES that divide the KV heads, query tokens over the remaining HEAD_AXES (size >
    1) when their product divides the length."""
    heads = _dividing(mesh, HEAD_AXES, num_kv_heads) if split_heads else ()
    rest = tuple(a for a in HEAD_AXES if a not in heads and mesh.shape.get(a, 1) > 1)
    sequence = rest if length % int(np.prod([mesh.shape[a] for a in rest])) == 0 else ()
    return _dividing(mesh, BATCH_AXES, batch), heads, sequence


def head_parallel(mesh: Mesh | None, fn: Callable[..., jax.Array], heads: tuple[jax.Array, ...],
                  rows: Mapping[str, jax.Array | None], *, num_kv_heads: int, split_heads: bool = True,
                  key_heads: tuple[int, ...] = (1, 2)) -> jax.Array:
    """fn(*heads, **rows) on each device's batch rows, heads and query tokens.

    heads: arrays [B, T, H, ...] whose axis 2 is a head axis (query heads, KV heads or per-head gates;
    every head count a multiple of `num_kv_heads`, query heads grouped by KV head). rows: [B, T] arrays
    (None entries are passed as None). fn returns [B, T, H, D]. split_heads=False keeps heads whole (for
    layouts where a device's query heads would not read its own KV heads); batch rows are still split.
    Under a sequence split (see the module doc) fn is called as fn(*heads, chunk=QueryChunk, **rows): the
    heads at `key_heads` (k and v) cover the whole sequence, the others the chunk's rows; rows cover the whole
    sequence. Without a mesh (or a mesh of one device) this is fn(*heads, **rows).
    """
    with jax.named_scope("attention_core"):  # the profile's part (nsa_jax/training/profile.py)
        return _head_parallel(mesh, fn, heads, rows, num_kv_heads=num_kv_heads, split_heads=split_heads,
                              key_heads=key_heads)


def _head_parallel(mesh: Mesh | None, fn: Callable[..., jax.Array], heads: tuple[jax.Array, ...],
                   rows: Mapping[str, jax.Array | None], *, num_kv_heads: int, split_heads: bool,
                   key_heads: tuple[int, ...]) -> jax.Array:
    if mesh is None or mesh.size == 1:
        return fn(*heads, **rows)
    b, t = heads[0].shape[:2]
    batch, head, sequence = split_axes(mesh, batch=b, length=t, num_kv_heads=num_kv_heads, split_heads=split_heads)
    if not (batch or head or sequence):
        return fn(*heads, **rows)
    b_spec, h_spec, s_spec = batch or None, head or None, sequence or None
    present = {k: v for k, v in rows.items() if v is not None}
    absent = {k: None for k, v in rows.items() if v is None}

    def local(hs, rs):
        if not sequence:
            return fn(*hs, **rs, **absent)
        size = hs[0].shape[1]
        chunk = QueryChunk(jax.lax.axis_index(sequence) * size, size, sequence)
        hs = [jax.lax.all_gather(h, sequence, axis=1, tiled=True) if i in key_heads else h for i, h in enumerate(hs)]
        return fn(*hs, **rs, **absent, chunk=chunk)

    head_specs = tuple(P(b_spec, s_spec, h_spec, *([None] * (a.ndim - 3))) for a in heads)
    row_specs = {k: P(b_spec, None) for k in present}
    return jax.shard_map(local, mesh=mesh, in_specs=(head_specs, row_specs),
                         out_specs=P(b_spec, s_spec, h_spec, None), check_vma=False)(tuple(heads), present)
