"""Block importance fused with the top-k ("recent" rule) in one Pallas kernel.

One program per (batch, KV head, query tile of BQ tokens). It walks the compressed key tiles the tile can
see, scores them for every row of the KV head's group (exp(scale q . k_cmp - lse), summed over the group, plus
1 / n_visible per padded zero row), and keeps a running top list per token of W = next_pow2(block_count)
(value, block) slots. Candidates enter in order (value desc, block desc) while they beat the list's smallest
slot by the same order, which is exactly "current block first (scored +inf), then by importance, ties to
the most recent block". The importance tensor [B, T, HKV, NB] is never written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import call_options, dot
from pallas_kernels.layout import HeadLayout, next_pow2

_BIG = 2 ** 30


def visible_blocks(pos, lo, hi, block_size: int, causal: bool):
    """Compressed blocks a row sees (the padded zero rows' softmax spreads over them evenly)."""
    if causal:
        return (pos + 1) // block_size - lo // block_size
    return (hi + block_size - 1) // block_size - pos // block_size


def _insert_round(carry):
    """Moves, per row, the best remaining candidate into the list if it beats the list's smallest slot."""
    cand, cols, vals, idx, _ = carry
    best = cand.max(axis=1)
    best_j = jnp.where(cand == best[:, None], cols, -1).max(axis=1)
    mv = vals.min(axis=1)
    mi = jnp.where(vals == mv[:, None], idx, _BIG).min(axis=1)
    beats = (best > -jnp.inf) & ((best > mv) | ((best == mv) & (best_j > mi)))
    slots = jax.lax.broadcasted_iota(jnp.int32, vals.shape, 1)
    pos = jnp.where((vals == mv[:, None]) & (idx == mi[:, None]), slots, vals.shape[1]).min(axis=1)
    put = beats[:, None] & (slots == pos[:, None])
    vals = jnp.where(put, best[:, None], vals)
    idx = jnp.where(put, best_j[:, None], idx)
    cand = jnp.where(beats[:, None] & (cols == best_j[:, None]), -jnp.inf, cand)
    return cand, cols, vals, idx, beats.astype(jnp.int32).max()


def _kernel(q_ref, kc_ref, lse_ref, lo_ref, hi_ref, pos_ref, out_ref, *, layout: HeadLayout, block_size: int,
            block_count: int, causal: bool, scale: float, block_q: int, block_k: int, num_k_tiles: int):
    h, q0 = pl.program_id(1), pos_ref[0]
    bs, hq, gv, hv = block_size, layout.num_q_heads, layout.group_size, layout.virtual_heads
    pos = q0 + jnp.arange(block_q)
    lo, hi = lo_ref[...], hi_ref[...]
    first, cur = lo // bs, pos // bs
    n_real = jnp.clip(hv - h * gv, 0, gv)
    n_vis = visible_blocks(pos, lo, hi, bs, causal).astype(jnp.float32)
    zero_term = jnp.where(n_vis > 0, (gv - n_real).astype(jnp.float32) / jnp.maximum(n_vis, 1.0), 0.0)

    def head(g, imp, kc):
        """Adds row h * Gv + g's probabilities (a padded row past the real ones adds nothing)."""
        v = jnp.minimum(h * gv + g, hv - 1)
        lse = jnp.where(h * gv + g < hv, lse_ref[v, :], -jnp.inf)
        s = dot(q_ref[:, v % hq, :].astype(jnp.float32), kc, trans_b=True) * scale
        finite = (lse > -jnp.inf)[:, None]
        return imp + jnp.where(finite, jnp.exp(s - jnp.where(finite, lse[:, None], 0.0)), 0.0)

    def tile(t, carry):
        vals, idx = carry
        kc = kc_ref[pl.ds(t * block_k, block_k), :]
        cols = t * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        imp = jax.lax.fori_loop(0, gv, functools.partial(head, kc=kc),
                                jnp.zeros((block_q, block_k), jnp.float32) + zero_term[:, None])
        past = (cols >= first[:, None]) & (cols < cur[:, None])
        cand = jnp.where(cols == cur[:, None], jnp.inf, jnp.where(past, imp, -jnp.inf))
        carry = jax.lax.while_loop(lambda c: c[4] > 0, _insert_round, (cand, cols, vals, idx, jnp.int32(1)))
        return carry[2], carry[3]

    w = out_ref.shape[-1]
    slot = jax.lax.broadcasted_iota(jnp.int32, (block_q, w), 1)
    # Slots beyond block_count are locked (+inf, never the smallest); the rest start empty.
    vals = jnp.where(slot < block_count, -jnp.inf, jnp.inf)
    idx = jnp.full((block_q, w), -1, jnp.int32)
    t_first = lo_ref[0] // bs // block_k
    t_last = jnp.minimum((q0 + block_q - 1) // bs // block_k + 1, num_k_tiles)
    vals, idx = jax.lax.fori_loop(t_first, t_last, tile, (vals, idx))
    out_ref[...] = jnp.where(vals > -jnp.inf, idx, -1)


def select_blocks_fused(q, k_cmp, lse, lo, hi, pos=None, *, layout: HeadLayout, block_size: int, block_count: int,
                        causal: bool, scale: float, block_q: int) -> jax.Array:
    """Chosen blocks [B, Tp, HKV, W] int32 (-1 = empty; W = next_pow2(block_count), order arbitrary).

    q [B, Tp, HQ, D] (Tp a multiple of block_q); k_cmp [B, NBp, HKV, D] float32 block means (zero-padded to
    a multiple of the key tile); lse [B, Hv, Tp] of the compression branch; lo, hi [B, Tp] segment bounds
    (every segment starts on a block boundary); pos [B, Tp] the rows' positions, consecutive in each batch row
    (None: 0 .. Tp - 1).
    """
    b, tp, hq, d = q.shape
    pos = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp)) if pos is None else pos
    nbp, hkv = k_cmp.shape[1], k_cmp.shape[2]
    block_k = min(64, nbp)
    w = next_pow2(block_count)
    kernel = functools.partial(_kernel, layout=layout, block_size=block_size, block_count=block_count,
                               causal=causal, scale=scale, block_q=block_q, block_k=block_k,
                               num_k_tiles=nbp // block_k)
    row = pl.BlockSpec((None, block_q), lambda i, h, t: (i, t))
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, tp // block_q),
        in_specs=[pl.BlockSpec((None, block_q, hq, d), lambda i, h, t: (i, t, 0, 0)),
                  pl.BlockSpec((None, nbp, None, d), lambda i, h, t: (i, 0, h, 0)),
                  pl.BlockSpec((None, layout.virtual_heads, block_q), lambda i, h, t: (i, 0, t)),
                  row, row, row],
        out_specs=pl.BlockSpec((None, block_q, None, w), lambda i, h, t: (i, t, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, hkv, w), jnp.int32),
        name="nsa_topk_fused",
        **call_options(),
    )(q, k_cmp, lse, lo, hi, pos)
