"""Top-k for `selection="query_block"`: block importance summed over each block of queries, in one Pallas
kernel, then the "recent" rule (`topk_rules.recent_topk`) on the small [B, NQB, HKV, NB] result in XLA.

One program per (batch, KV head, query block of block_size tokens). It walks the compressed key tiles of the
block's past (first block of its segment <= j < the query block) and adds, for every real token of the
block and every query head of the KV head, exp(scale q . k_cmp - lse). Head layout "gqa" only (the only
layout query blocks take): no padded zero rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import call_options, dot
from pallas_kernels.layout import HeadLayout
from pallas_kernels.topk_rules import recent_topk


def _kernel(q_ref, kc_ref, lse_ref, lo_ref, out_ref, *, group_size: int, block_size: int, scale: float,
            t: int, block_k: int, num_k_tiles: int):
    h, c = pl.program_id(1), pl.program_id(2)
    bs = block_size
    real = (c * bs + jnp.arange(bs)) < t  # tokens past t (padding) add nothing
    first = lo_ref[0] // bs  # every token of a query block is in one segment

    def head(g, imp, kc):
        lse = lse_ref[h * group_size + g, :]
        s = dot(q_ref[:, h * group_size + g, :].astype(jnp.float32), kc, trans_b=True) * scale
        ok = (real & (lse > -jnp.inf))[:, None]
        return imp + jnp.where(ok, jnp.exp(s - jnp.where(ok, lse[:, None], 0.0)), 0.0)

    def tile(kt, carry):
        kc = kc_ref[pl.ds(kt * block_k, block_k), :]
        imp = jax.lax.fori_loop(0, group_size, functools.partial(head, kc=kc), jnp.zeros((bs, block_k), jnp.float32))
        out_ref[pl.ds(kt * block_k, block_k)] = imp.sum(axis=0)
        return carry

    def zero(kt, carry):  # tiles outside the past: read by nobody, written so that nothing is undefined
        out_ref[pl.ds(kt * block_k, block_k)] = jnp.zeros((block_k,), jnp.float32)
        return carry

    t_first, t_last = first // block_k, (c + block_k - 1) // block_k
    jax.lax.fori_loop(0, t_first, zero, 0)
    jax.lax.fori_loop(t_first, t_last, tile, 0)
    jax.lax.fori_loop(t_last, num_k_tiles, zero, 0)


def select_blocks_query_block(q, k_cmp, lse, lo, *, layout: HeadLayout, t: int, block_size: int,
                              block_count: int, scale: float) -> jax.Array:
    """Chosen blocks [B, Tp // block_size, HKV, block_count] int32 of each query block (-1 = empty): its
    own block, then its segment's past blocks by importance summed over its tokens and query heads, ties to
    the most recent.

    q [B, Tp, HQ, D] (Tp a multiple of block_size; tokens >= t are padding); k_cmp [B, NBp, HKV, D] float32
    block means (zero-padded to a multiple of min(64, NBp)); lse [B, HQ, Tp] of the compression branch; lo
    [B, Tp] segment starts (on block boundaries).
    """
    if layout.virtual_heads != layout.num_q_heads:
        raise ValueError(f"query-block top-k needs head layout 'gqa', got {layout.kind!r}")
    b, tp, hq, d = q.shape
    nbp, hkv = k_cmp.shape[1], k_cmp.shape[2]
    bs, block_k = block_size, min(64, nbp)
    nqb = tp // bs
    kernel = functools.partial(_kernel, group_size=layout.group_size, block_size=bs, scale=scale, t=t,
                               block_k=block_k, num_k_tiles=nbp // block_k)
    importance = pl.pallas_call(
        kernel,
        grid=(b, hkv, nqb),
        in_specs=[pl.BlockSpec((None, bs, hq, d), lambda i, h, c: (i, c, 0, 0)),
                  pl.BlockSpec((None, nbp, None, d), lambda i, h, c: (i, 0, h, 0)),
                  pl.BlockSpec((None, hq, bs), lambda i, h, c: (i, 0, c)),
                  pl.BlockSpec((None, bs), lambda i, h, c: (i, c))],
        out_specs=pl.BlockSpec((None, None, None, nbp), lambda i, h, c: (i, c, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nqb, hkv, nbp), jnp.float32),
        name="nsa_topk_query_block",
        **call_options(),
    )(q, k_cmp, lse, lo)
    cur = jnp.broadcast_to(jnp.arange(nqb)[None, :, None], (b, nqb, hkv))
    first = jnp.broadcast_to((lo[:, ::bs] // bs)[:, :, None], (b, nqb, hkv))
    return recent_topk(importance, cur, first, block_count=block_count)
