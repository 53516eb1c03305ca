"""NSA through the Pallas kernels: compression and window (`masked_flash.py`), top-k (`topk_fused.py`, or
`topk_query_block.py` for query blocks, `topk_fla.py` for fla's network), selection (`selection.py`, or
`block_sparse.py` for query blocks), gated sum in jnp (XLA fuses it; its gradient flows through autodiff)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.backend import gpu_lowering_name
from pallas_kernels.block_sparse import BlockSparseConfig, block_sparse_attention
from pallas_kernels.block_sparse_mgpu import supported as mosaic_gpu_supported
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


def topk_lse(lse, lo, hi, *, layout: HeadLayout, block_size: int, causal: bool, reading: str) -> jax.Array:
    """The lse [B, T, P] each padded row's block scores are divided by (`reference.read_lse`), from the
    compression kernel's lse of the virtual rows [B, Hv, T]; a padded zero row's softmax spreads evenly over
    the n blocks it sees: lse log n. lo, hi [B, T] segment bounds."""
    b, hv, t = lse.shape
    n = visible_blocks(jnp.arange(t)[None], lo, hi, block_size, causal)
    zero = jnp.where(n > 0, jnp.log(jnp.maximum(n, 1).astype(jnp.float32)), -jnp.inf)
    rows = jnp.concatenate([lse.transpose(0, 2, 1), jnp.broadcast_to(
        zero[..., None], (b, t, layout.padded_heads - hv))], axis=-1)
    return rows if reading == "per_head" else released_lse(rows, lo, hi)


def choose_blocks(qp, kc32, lse, lop, hip, *, t: int, layout: HeadLayout, block_size: int, block_count: int,
                  tie_break: str, selection: str, causal: bool, scale: float, block_q: int,
                  lse_reading: str = "per_head") -> jax.Array:
    """Chosen blocks [B, N, HKV, next_pow2(block_count)] (-1 = empty, no gradient) of each padded token (N =
    Tp) or, for selection "query_block", of each query block (N = Tp // block_size).
    qp [B, Tp, HQ, D]; kc32 [B, NBp, HKV, D] float32 block means; lse [B, Hv, Tp]; lop, hip [B, Tp];
    lse_reading (tie_break "fla" only): `reference.read_lse`."""
    qp, kc32, lse = (jax.lax.stop_gradient(x) for x in (qp, kc32, lse))
    if selection == "query_block":
        return select_blocks_query_block(qp, kc32, lse, lop, layout=layout, t=t, block_size=block_size,
                                         block_count=block_count, scale=scale)
    if tie_break == "recent":
        return select_blocks_fused(qp, kc32, lse, lop, hip, layout=layout, block_size=block_size,
                                   block_count=block_count, causal=causal, scale=scale, block_q=block_q)
    rows = topk_lse(lse[:, :, :t], lop[:, :t], hip[:, :t], layout=layout, block_size=block_size, causal=causal,
                    reading=lse_reading)
    tp = qp.shape[1]
    kc32 = pad_to(kc32, 1, max(kc32.shape[1], tp // block_size + block_size))
    idx = select_blocks_fla(qp, kc32, pad_to(rows, 1, tp, -jnp.inf).transpose(0, 2, 1), lop, layout=layout,
                            block_size=block_size, block_count=block_count, scale=scale)
    return jnp.where((jnp.arange(tp) < t)[None, :, None, None], idx, -1)


def nsa_pallas(q, k, v, g_cmp, g_slc, g_swa, *, layout: HeadLayout, block_size: int, block_count: int,
               window_size: int, segment_ids, causal_compression: bool, tie_break: str, selection: str,
               lse_reading: str, scale, q_offset=None, query_axis=None):
    if q_offset is not None:
        raise NotImplementedError("nsa_pallas: query chunks (q_offset) are not implemented yet")
    b, t, hq, d = q.shape
    hv, bs = layout.virtual_heads, block_size
    scale = d ** -0.5 if scale is None else float(scale)
    bq = tile_size(t)
    tp = -(-t // max(bq, bs)) * max(bq, bs)
    qp, kp, vp = (pad_to(x, 1, tp) for x in (q, k, v))
    lop, hip = padded_segment_bounds(segment_ids, b, t, tp)

    kc32 = mean_pool(k, bs)  # float32 block means, also what the top-k scores against
    kc, vc = kc32.astype(q.dtype), mean_pool(v, bs).astype(q.dtype)
    nb = kc.shape[1]
    bkc = tile_size(nb)
    nbp = -(-nb // bkc) * bkc
    kc, vc = pad_to(kc, 1, nbp), pad_to(vc, 1, nbp)
    heads = dict(num_q_heads=hq, virtual_heads=hv, group_size=layout.group_size, scale=scale)
    cmp_cfg = MaskedFlashConfig("cmp_causal" if causal_compression else "cmp_full", block_size=bs,
                                block_q=bq, block_k=bkc, **heads)
    o_cmp, lse = masked_flash(cmp_cfg, qp, kc, vc, lop, hip)
    swa_cfg = MaskedFlashConfig("window", window=window_size, block_q=bq, block_k=bq, **heads)
    o_swa, _ = masked_flash(swa_cfg, qp, kp, vp, lop, hip)

    idx = choose_blocks(qp, pad_to(kc32, 1, nbp), lse, lop, hip, t=t, layout=layout, block_size=bs,
                        block_count=block_count, tie_break=tie_break, selection=selection,
                        causal=causal_compression, scale=scale, block_q=bq, lse_reading=lse_reading)
    vrows = np.arange(hv)
    if selection == "query_block":  # gqa layout: virtual heads are the query heads
        lowering = gpu_lowering_name(mosaic_gpu_fits=mosaic_gpu_supported(bs, d, q.dtype))
        cfg = BlockSparseConfig(bs, scale, layout.group_size, lowering=lowering)
        o_slc, _ = block_sparse_attention(cfg, qp, kp, vp, idx)
    else:
        rows = group_rows(layout)  # [HKV, GR]
        q_rows = jnp.where(jnp.asarray(rows >= 0)[None, None, :, :, None],
                           qp[:, :, np.maximum(rows, 0) % hq], jnp.zeros((), q.dtype))
        o_rows, _ = selection_attention(SelectionConfig(bs, scale, rows_per_token=layout.group_size), q_rows,
                                        kp, vp, idx)
        o_slc = o_rows[:, :, vrows // layout.group_size, vrows % layout.group_size]  # [B, Tp, Hv, D]

    gate = lambda g_: pad_to(g_, 1, tp).astype(jnp.float32)[:, :, vrows % hq, None]
    o = gate(g_cmp) * o_cmp + gate(g_slc) * o_slc + gate(g_swa) * o_swa
    o = o.reshape(b, tp, layout.copies, hq, d).mean(2)
    return o[:, :t].astype(q.dtype)
