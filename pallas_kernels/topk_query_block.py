"""Top-k for `selection="query_block"` in two Pallas kernels: block importance summed over each block of
queries, then the "recent" rule (`topk_rules.recent_topk`, the oracle's) on each query block's row.

Importance: one program per (batch, KV head, query block of block_size tokens). It walks the compressed key
tiles of the block's past (first block of its segment <= j < the query block) and adds, for every real token
of the block and every query head of the KV head, exp(scale q . k_cmp - lse), the product in q's dtype (bf16
inputs: bf16 operands with float32 sums, the precision of the compression branch that made lse). Head layout
"gqa" only (the only layout query blocks take): no padded zero rows. Rule: one program per (batch, query
block, KV head) takes the whole row and extracts block_count maxima (the current block first, ties to the
higher index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import call_options, dot
from pallas_kernels.layout import HeadLayout, next_pow2


def _kernel(q_ref, kc_ref, lse_ref, lo_ref, out_ref, *, group_size: int, block_size: int, scale: float,
            t: int, block_k: int, num_k_tiles: int, num_out_tiles: int):
    h, c = pl.program_id(1), pl.program_id(2)
    bs = block_size
    real = (c * bs + jnp.arange(bs)) < t  # tokens past t (padding) add nothing
    first = lo_ref[0] // bs  # every token of a query block is in one segment

    def head(g, imp, kc):
        lse = lse_ref[h * group_size + g, :]
        s = dot(q_ref[:, h * group_size + g, :], kc, trans_b=True) * scale
        ok = (real & (lse > -jnp.inf))[:, None]
        return imp + jnp.where(ok, jnp.exp(s - jnp.where(ok, lse[:, None], 0.0)), 0.0)

    def tile(kt, carry):
        kc = kc_ref[pl.ds(kt * block_k, block_k), :].astype(q_ref.dtype)
        imp = jax.lax.fori_loop(0, group_size, functools.partial(head, kc=kc), jnp.zeros((bs, block_k), jnp.float32))
        out_ref[pl.ds(kt * block_k, block_k)] = imp.sum(axis=0)
        return carry

    def zero(kt, carry):  # tiles outside the past (or padding): read by nobody, written so nothing is undefined
        out_ref[pl.ds(kt * block_k, block_k)] = jnp.zeros((block_k,), jnp.float32)
        return carry

    t_first, t_last = first // block_k, jnp.minimum((c + block_k - 1) // block_k, num_k_tiles)
    jax.lax.fori_loop(0, t_first, zero, 0)
    jax.lax.fori_loop(t_first, t_last, tile, 0)
    jax.lax.fori_loop(t_last, num_out_tiles, zero, 0)


def _rule_kernel(imp_ref, lo_ref, out_ref, *, block_size: int, block_count: int):
    c = pl.program_id(1)
    imp = imp_ref[...]
    j = jnp.arange(imp.shape[0])
    past = (j < c) & (j >= lo_ref[0] // block_size)
    slots = jnp.arange(out_ref.shape[0])

    def pick(r, carry):
        key, out = carry
        best = key.max()
        at = jnp.where(key == best, j, -1).max()
        out = jnp.where(slots == r, jnp.where(best > -jnp.inf, at, -1), out)
        return jnp.where(j == at, -jnp.inf, key), out

    key = jnp.where(j == c, jnp.inf, jnp.where(past, imp, -jnp.inf))
    _, out = jax.lax.fori_loop(0, block_count, pick, (key, jnp.full(slots.shape, -1, jnp.int32)))
    out_ref[...] = out


def select_blocks_query_block(q, k_cmp, lse, lo, *, layout: HeadLayout, t: int, block_size: int,
                              block_count: int, scale: float) -> jax.Array:
    """Chosen blocks [B, Tp // block_size, HKV, next_pow2(block_count)] int32 of each query block (-1 =
    empty): its own block, then its segment's past blocks by importance summed over its tokens and query
    heads, ties to the most recent.

    q [B, Tp, HQ, D] (Tp a multiple of block_size; tokens >= t are padding); k_cmp [B, NBp, HKV, D] float32
    block means (zero-padded to a multiple of min(64, NBp)); lse [B, HQ, Tp] of the compression branch; lo
    [B, Tp] segment starts (on block boundaries).
    """
    if layout.virtual_heads != layout.num_q_heads:
        raise ValueError(f"query-block top-k needs head layout 'gqa', got {layout.kind!r}")
    b, tp, hq, d = q.shape
    nbp, hkv = k_cmp.shape[1], k_cmp.shape[2]
    bs, block_k = block_size, min(64, nbp)
    nbr = 1 << (nbp - 1).bit_length()  # importance rows padded to a power of two (Triton's vectors)
    nqb = tp // bs
    kernel = functools.partial(_kernel, group_size=layout.group_size, block_size=bs, scale=scale, t=t,
                               block_k=block_k, num_k_tiles=nbp // block_k, num_out_tiles=nbr // block_k)
    importance = pl.pallas_call(
        kernel,
        grid=(b, hkv, nqb),
        in_specs=[pl.BlockSpec((None, bs, hq, d), lambda i, h, c: (i, c, 0, 0)),
                  pl.BlockSpec((None, nbp, None, d), lambda i, h, c: (i, 0, h, 0)),
                  pl.BlockSpec((None, hq, bs), lambda i, h, c: (i, 0, c)),
                  pl.BlockSpec((None, bs), lambda i, h, c: (i, c))],
        out_specs=pl.BlockSpec((None, None, None, nbr), lambda i, h, c: (i, c, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nqb, hkv, nbr), jnp.float32),
        name="nsa_topk_query_block",
        **call_options(),
    )(q, k_cmp, lse, lo)
    width = next_pow2(block_count)
    return pl.pallas_call(
        functools.partial(_rule_kernel, block_size=bs, block_count=min(block_count, nbp)),
        grid=(b, nqb, hkv),
        in_specs=[pl.BlockSpec((None, None, None, nbr), lambda i, c, h: (i, c, h, 0)),
                  pl.BlockSpec((None, bs), lambda i, c, h: (i, c))],
        out_specs=pl.BlockSpec((None, None, None, width), lambda i, c, h: (i, c, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, nqb, hkv, width), jnp.int32),
        name="nsa_topk_query_block_rule",
        **call_options(),
    )(importance, lo)
