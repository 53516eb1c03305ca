"""NSA through the Mosaic (TPU) kernels of `tpu_attention.py`, for `selection="query_block"` (head layout
"gqa", tie_break "recent"): compression and window as tiled flash attention over static key-tile lists,
selection as block-sparse flash attention over each query block's chosen blocks, all head-major; the top-k
by `tpu_topk.py` (importance summed per query block in a kernel, the "recent" rule in XLA); the gated sum in
jnp. Per-token selection needs row gathers, which Mosaic does not lower."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.layout import HeadLayout
from pallas_kernels.nsa_pallas import pad_to, tile_size, padded_segment_bounds
from pallas_kernels.reference import mean_pool
from pallas_kernels.tpu_attention import TiledConfig, static_lists, tiled_attention
from pallas_kernels.tpu_topk import query_block_topk_tpu

_TILE = 128  # rows per query tile and keys per key tile of compression and window (at most)


def nsa_tpu(q, k, v, g_cmp, g_slc, g_swa, *, layout: HeadLayout, block_size: int, block_count: int,
            window_size: int, segment_ids, causal_compression: bool, scale):
    b, t, hq, d = q.shape
    hkv, g, bs = k.shape[2], layout.group_size, block_size
    scale = d ** -0.5 if scale is None else float(scale)
    tile = max(bs, tile_size(t, _TILE))
    step = math.lcm(tile, bs if t <= 8 * bs else 8 * bs)  # query blocks: at most 8 or a multiple of 8
    tp = -(-t // step) * step
    lop, hip = padded_segment_bounds(segment_ids, b, t, tp)
    rows = lambda x: x[..., None]  # [B, Tp, 1]
    heads_first = lambda x: pad_to(x, 1, tp).transpose(0, 2, 1, 3)  # [B, H, Tp, D]
    qh, kh, vh = heads_first(q), heads_first(k), heads_first(v)

    kc32 = mean_pool(k, bs).transpose(0, 2, 1, 3)  # [B, HKV, NB, D]
    nb = kc32.shape[2]
    bkc = tile_size(nb, _TILE)
    nbp = -(-nb // bkc) * bkc
    kc, vc = (pad_to(x.astype(q.dtype), 2, nbp) for x in (kc32, mean_pool(v, bs).transpose(0, 2, 1, 3)))

    def static(cfg: TiledConfig, n_keys: int) -> jax.Array:
        lists = static_lists(cfg, tp // cfg.block_q, n_keys // cfg.block_k)
        return jnp.broadcast_to(jnp.asarray(lists), (b, hkv) + lists.shape)

    cmp_cfg = TiledConfig("cmp_causal" if causal_compression else "cmp_full", tile, bkc, scale, g, block_size=bs)
    o_cmp, lse = tiled_attention(cmp_cfg, static(cmp_cfg, nbp), qh, kc, vc, rows(lop), rows(hip))
    swa_cfg = TiledConfig("window", tile, tile, scale, g, window=window_size)
    o_swa, _ = tiled_attention(swa_cfg, static(swa_cfg, tp), qh, kh, vh, rows(lop), rows(hip))

    idx = query_block_topk_tpu(*(jax.lax.stop_gradient(x) for x in (qh, pad_to(kc32, 2, nbp), lse)), lop, t=t,
                               group_size=g, block_size=bs, block_count=block_count, scale=scale)
    slc_cfg = TiledConfig("selection", bs, bs, scale, g)
    o_slc, _ = tiled_attention(slc_cfg, idx, qh, kh, vh, rows(lop), rows(hip))

    gate = lambda x: pad_to(x, 1, tp).astype(jnp.float32).transpose(0, 2, 1)[..., None]  # [B, HQ, Tp, 1]
    o = gate(g_cmp) * o_cmp + gate(g_slc) * o_slc + gate(g_swa) * o_swa
    return o.transpose(0, 2, 1, 3)[:, :t].astype(q.dtype)
