"""NSA through the Pallas kernels: compression and window (`masked_flash.py`), top-k (`topk_fused.py`, or
`topk_query_block.py` for query blocks, `topk_fla.py` for fla's network), selection (`selection.py`, or
`block_sparse.py` for query blocks), gated sum in jnp (XLA fuses it; its gradient flows through autodiff).
q may be a chunk of the keys' sequence (`chunks.py`): the kernels read each query row's position and loop over
the whole keys."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import gpu_lowering_name
from pallas_kernels.block_sparse import BlockSparseConfig, block_sparse_attention
from pallas_kernels.block_sparse_mgpu import supported as mosaic_gpu_supported
from pallas_kernels.chunks import gather_chunks, query_positions, rows_at, static_offset
from pallas_kernels.layout import HeadLayout, next_pow2
from pallas_kernels.masked_flash import MaskedFlashConfig, masked_flash
from pallas_kernels.reference import mean_pool, released_lse
from pallas_kernels.segments import segment_bounds
from pallas_kernels.selection import SelectionConfig, selection_attention
from pallas_kernels.topk_fla import select_blocks_fla
from pallas_kernels.topk_fused import select_blocks_fused, visible_blocks
from pallas_kernels.topk_query_block import select_blocks_query_block


def tile_size(n: int, cap: int = 64) -> int:
    """A kernel tile for n rows: a power of two in [16, cap]."""
    return max(16, min(cap, next_pow2(n)))


def pad_to(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """x padded with `value` at the end of `axis` to `size`."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def group_rows(layout: HeadLayout) -> np.ndarray:
    """[HKV, GR] virtual row of each group slot (-1: padding), GR = group size rounded up to a tile."""
    gr = max(16, next_pow2(layout.group_size))
    rows = np.full((layout.num_kv_heads, gr), -1, np.int32)
    for h in range(layout.num_kv_heads):
        r = list(layout.rows_of_kv_head(h))
        rows[h, :len(r)] = r
    return rows


def padded_segment_bounds(segment_ids, b: int, t: int, tp: int) -> tuple[jax.Array, jax.Array]:
    """Segment bounds lo, hi [B, Tp] (one segment per row without ids); the padded tokens form their own
    segment [t, tp), so they never meet real tokens."""
    if segment_ids is None:
        lo, hi = jnp.zeros((b, t), jnp.int32), jnp.full((b, t), t, jnp.int32)
    else:
        lo, hi = segment_bounds(segment_ids)
    return pad_to(lo, 1, tp, t), pad_to(hi, 1, tp, tp)


class QueryRows(NamedTuple):
    """The kernels' Tp query rows against T keys (padded to Tkp = `end`). Row r of batch row b sits at position
    pos[b, r] = pos[b, 0] + r (a multiple of block_size at r = 0, as fla's top-k tiles need); rows lead[b] ..
    lead[b] + count - 1 hold q (a chunk of the sequence, `chunks.py`), the others pad. lo, hi [B, Tp]: the rows'
    segment bounds; key_lo, key_hi [B, T]: the keys'. axis: the mapped axis of the chunks (None: q is whole)."""

    pos: jax.Array
    lead: jax.Array | int  # an int where it is static
    count: int
    lo: jax.Array
    hi: jax.Array
    key_lo: jax.Array
    key_hi: jax.Array
    end: int
    axis: str | tuple[str, ...] | None = None

    @property
    def real(self) -> jax.Array:
        """[B, Tp] bool: the rows that hold q."""
        r = jnp.arange(self.pos.shape[1])[None] - jnp.reshape(self.lead, (-1, 1))
        return (r >= 0) & (r < self.count)

    def place(self, x: jax.Array) -> jax.Array:
        """q-side x [B, count, ...] -> [B, Tp, ...] at its rows (zeros elsewhere)."""
        tp = self.pos.shape[1]
        if isinstance(self.lead, int):
            return pad_to(jnp.pad(x, [(0, 0), (self.lead, 0)] + [(0, 0)] * (x.ndim - 2)), 1, tp)
        zeros = jnp.zeros((tp,) + x.shape[2:], x.dtype)
        return jax.vmap(lambda xb, lb: jax.lax.dynamic_update_slice_in_dim(zeros, xb, lb, axis=0))(x, self.lead)

    def own(self, x: jax.Array) -> jax.Array:
        """x [B, Tp, ...] -> its q rows [B, count, ...]."""
        if isinstance(self.lead, int):
            return x[:, self.lead:self.lead + self.count]
        return jax.vmap(lambda xb, lb: jax.lax.dynamic_slice_in_dim(xb, lb, self.count, axis=0))(x, self.lead)


def query_rows(segment_ids, *, b: int, tq: int, t: int, q_offset, block_size: int, axis=None
               ) -> tuple[QueryRows, int]:
    """The rows of q [B, tq, ...] at positions q_offset + [0, tq) of T keys (None: q is the whole sequence),
    shifted down to a block boundary, and the query tile. Tp and Tkp are multiples of max(tile, block_size);
    Tkp covers every row's position."""
    static = static_offset(q_offset)
    offset = query_positions(b, 1, q_offset)[:, 0]
    lead = static % block_size if static is not None else offset % block_size
    n = tq + (lead if static is not None else block_size - 1)  # rows, with room for the largest shift
    bq = tile_size(n)
    step = max(bq, block_size)
    tp = -(-n // step) * step
    end = -(-(t - tq + tp) // step) * step  # the last row sits at most at t - tq + tp - 1
    pos = (offset - lead)[:, None] + jnp.arange(tp, dtype=jnp.int32)[None]
    lo, hi = padded_segment_bounds(segment_ids, b, t, end)
    rows = QueryRows(pos, lead, tq, rows_at(lo, pos), rows_at(hi, pos), lo[:, :t], hi[:, :t], end, axis)
    return rows, bq


def whole_rows(lop, hip, t: int) -> QueryRows:
    """QueryRows of a whole sequence of t tokens padded to Tp rows with segment bounds lop, hip [B, Tp]."""
    pos = jnp.broadcast_to(jnp.arange(lop.shape[1], dtype=jnp.int32), lop.shape)
    return QueryRows(pos, 0, t, lop, hip, lop[:, :t], hip[:, :t], lop.shape[1])


def topk_lse(lse, rows: QueryRows, *, layout: HeadLayout, block_size: int, causal: bool, reading: str) -> jax.Array:
    """The lse [B, Tp, P] each padded row's block scores are divided by (`reference.read_lse`), from the
    compression kernel's lse of the virtual rows [B, Hv, Tp]; a padded zero row's softmax spreads evenly over
    the n blocks it sees: lse log n. The released reading of a chunk reads the other chunks' rows too: they are
    all-gathered along rows.axis."""
    b, hv, tp = lse.shape
    n = visible_blocks(rows.pos, rows.lo, rows.hi, block_size, causal)
    zero = jnp.where(n > 0, jnp.log(jnp.maximum(n, 1).astype(jnp.float32)), -jnp.inf)
    own = jnp.concatenate([lse.transpose(0, 2, 1), jnp.broadcast_to(
        zero[..., None], (b, tp, layout.padded_heads - hv))], axis=-1)
    if reading == "per_head":
        return own
    whole = rows.own(own)
    t = rows.key_lo.shape[1]
    if rows.count < t:
        if rows.axis is None:
            raise ValueError("lse_reading='released' on a query chunk needs query_axis (the mapped axis of the chunks)")
        whole = gather_chunks(whole, rows.axis)
    return rows_at(released_lse(whole, rows.key_lo, rows.key_hi), rows.pos)


def choose_blocks(qp, kc32, lse, lop, hip, *, t: int, layout: HeadLayout, block_size: int, block_count: int,
                  tie_break: str, selection: str, causal: bool, scale: float, block_q: int,
                  lse_reading: str = "per_head", rows: QueryRows | None = None) -> jax.Array:
    """Chosen blocks [B, N, HKV, next_pow2(block_count)] (-1 = empty, no gradient) of each padded token (N =
    Tp) or, for selection "query_block", of each query block (N = Tp // block_size).
    qp [B, Tp, HQ, D]; kc32 [B, NBp, HKV, D] float32 block means; lse [B, Hv, Tp]; lop, hip [B, Tp];
    lse_reading (tie_break "fla" only): `reference.read_lse`. rows: where the rows sit (None: the whole
    sequence of t tokens, `whole_rows`)."""
    qp, kc32, lse = (jax.lax.stop_gradient(x) for x in (qp, kc32, lse))
    rows = whole_rows(lop, hip, t) if rows is None else rows
    if selection == "query_block":
        return select_blocks_query_block(qp, kc32, lse, lop, layout=layout, t=t, block_size=block_size,
                                         block_count=block_count, scale=scale)
    if tie_break == "recent":
        return select_blocks_fused(qp, kc32, lse, lop, hip, rows.pos, layout=layout, block_size=block_size,
                                   block_count=block_count, causal=causal, scale=scale, block_q=block_q)
    read = topk_lse(lse, rows, layout=layout, block_size=block_size, causal=causal, reading=lse_reading)
    kc32 = pad_to(kc32, 1, max(kc32.shape[1], rows.end // block_size + block_size))
    idx = select_blocks_fla(qp, kc32, read.transpose(0, 2, 1), lop, rows.pos, layout=layout,
                            block_size=block_size, block_count=block_count, scale=scale)
    return jnp.where(rows.real[:, :, None, None], idx, -1)


def nsa_pallas(q, k, v, g_cmp, g_slc, g_swa, *, layout: HeadLayout, block_size: int, block_count: int,
               window_size: int, segment_ids, causal_compression: bool, tie_break: str, selection: str,
               lse_reading: str, scale, q_offset=None, query_axis=None):
    """`api.nsa_attention` through the kernels; q may be a chunk of the keys' sequence (q_offset)."""
    b, tq, hq, d = q.shape
    t = k.shape[1]
    hv, bs = layout.virtual_heads, block_size
    scale = d ** -0.5 if scale is None else float(scale)
    rows, bq = query_rows(segment_ids, b=b, tq=tq, t=t, q_offset=q_offset, block_size=bs, axis=query_axis)
    qp = rows.place(q)
    kp, vp = (pad_to(x, 1, rows.end) for x in (k, v))
    lop, hip = rows.lo, rows.hi

    kc32 = mean_pool(k, bs)  # float32 block means, also what the top-k scores against
    kc, vc = kc32.astype(q.dtype), mean_pool(v, bs).astype(q.dtype)
    nb = kc.shape[1]
    bkc = tile_size(nb)
    nbp = -(-nb // bkc) * bkc
    kc, vc = pad_to(kc, 1, nbp), pad_to(vc, 1, nbp)
    heads = dict(num_q_heads=hq, virtual_heads=hv, group_size=layout.group_size, scale=scale)
    cmp_cfg = MaskedFlashConfig("cmp_causal" if causal_compression else "cmp_full", block_size=bs,
                                block_q=bq, block_k=bkc, **heads)
    o_cmp, lse = masked_flash(cmp_cfg, qp, kc, vc, lop, hip, rows.pos)
    swa_cfg = MaskedFlashConfig("window", window=window_size, block_q=bq, block_k=bq, **heads)
    o_swa, _ = masked_flash(swa_cfg, qp, kp, vp, lop, hip, rows.pos)

    idx = choose_blocks(qp, pad_to(kc32, 1, nbp), lse, lop, hip, t=t, layout=layout, block_size=bs,
                        block_count=block_count, tie_break=tie_break, selection=selection,
                        causal=causal_compression, scale=scale, block_q=bq, lse_reading=lse_reading, rows=rows)
    vrows = np.arange(hv)
    if selection == "query_block":  # gqa layout: virtual heads are the query heads
        lowering = gpu_lowering_name(mosaic_gpu_fits=mosaic_gpu_supported(bs, d, q.dtype))
        cfg = BlockSparseConfig(bs, scale, layout.group_size, lowering=lowering)
        o_slc, _ = block_sparse_attention(cfg, qp, kp, vp, idx)
    else:
        groups = group_rows(layout)  # [HKV, GR]
        q_rows = jnp.where(jnp.asarray(groups >= 0)[None, None, :, :, None],
                           qp[:, :, np.maximum(groups, 0) % hq], jnp.zeros((), q.dtype))
        o_rows, _ = selection_attention(SelectionConfig(bs, scale, rows_per_token=layout.group_size), q_rows,
                                        kp, vp, idx, rows.pos)
        o_slc = o_rows[:, :, vrows // layout.group_size, vrows % layout.group_size]  # [B, Tp, Hv, D]

    gate = lambda g_: rows.place(g_).astype(jnp.float32)[:, :, vrows % hq, None]
    o = gate(g_cmp) * o_cmp + gate(g_slc) * o_slc + gate(g_swa) * o_swa
    o = o.reshape(b, -1, layout.copies, hq, d).mean(2)
    return rows.own(o).astype(q.dtype)
