"""Block importance fused with fla's bitonic top-k network (tie_break "fla", mode videonsa) in one Pallas kernel.

The released VideoNSA keeps the blocks that fla's `parallel_nsa_kernel_topk` keeps, and with tied scores (every
zeroed query row) the order of its network decides which ones (`topk_rules.py` replays it in jnp, the oracle).
This kernel runs the same network on the same importance, per token:

One program per (batch, KV head, tile of BQ <= block_size tokens), so all of a tile's rows share their current
block and their segment's first block. It walks the chunks of `block_size` compressed blocks from the segment
start up to the current block, scores each chunk for the KV head's Gv padded rows (exp(scale q . k_cmp - lse),
summed over the group; a padded zero row scores 0 against every block) and merges it into the running top list
with fla's compare-and-swap layers. A layer's partner exchange (element i meets i ^ d) is a reshape to
[BQ, width / 2d, 2, d] and two masked sums over the pair axis, as fla's Triton code does it. The importance
tensor [B, T, HKV, NB] is never written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import call_options, dot
from pallas_kernels.layout import HeadLayout, next_pow2
from pallas_kernels.topk_rules import bitonic_log2


def _pairs(a: jax.Array, dist: int) -> tuple[jax.Array, jax.Array]:
    """(left, right) of each element's pair at distance `dist` along the last axis, broadcast back to a's
    shape: element i pairs with i ^ dist; left is the one whose bit `dist` is clear."""
    rows, width = a.shape
    shape = (rows, width // (2 * dist), 2, dist)
    side = jax.lax.broadcasted_iota(jnp.int32, shape, 2)
    y = a.reshape(shape)
    zero = jnp.zeros((), a.dtype)
    half = lambda s: jnp.broadcast_to(jnp.sum(jnp.where(side == s, y, zero), axis=2, keepdims=True),
                                      shape).reshape(rows, width)
    return half(0), half(1)


def _merge(x: jax.Array, ids: jax.Array, stage: int, order) -> tuple[jax.Array, jax.Array]:
    """fla's `_bitonic_merge(stage, order)`: compare-and-swap layers at distances 2**(stage-1) .. 1; a pair
    swaps iff (left > right) != flip. order 2 alternates the direction every 2**stage elements, else a bool
    (True = descending)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    flip = ((lane >> stage) & 1) == 1 if order == 2 else jnp.full(x.shape, bool(order))
    for i in range(stage):
        dist = 2 ** (stage - 1 - i)
        is_left = (lane & dist) == 0
        (xl, xr), (il, ir) = _pairs(x, dist), _pairs(ids, dist)
        swap = (xl > xr) != flip
        x = jnp.where(swap, jnp.where(is_left, xr, xl), x)
        ids = jnp.where(swap, jnp.where(is_left, ir, il), ids)
    return x, ids


def _kernel(q_ref, kc_ref, lse_ref, lo_ref, pos_ref, out_ref, *, layout: HeadLayout, block_size: int,
            block_count: int, scale: float, block_q: int):
    h, q0 = pl.program_id(1), pos_ref[0]
    chunk, hq, gv, hv = block_size, layout.num_q_heads, layout.group_size, layout.virtual_heads
    n_dims = bitonic_log2(chunk)
    first = lo_ref[0] // block_size  # the tile's segment start and current block (relative to it)
    cur = q0 // block_size - first

    def importance(c):
        """[BQ, chunk] group importance of the blocks first + c * chunk + [0, chunk)."""
        kc = kc_ref[pl.ds(first + c * chunk, chunk), :]

        def row(g, imp):
            p = h * gv + g  # padded row; p >= hv is a zero row, which scores 0
            q = q_ref[:, jnp.minimum(p, hv - 1) % hq, :]
            s = dot((q.astype(jnp.float32) * scale).astype(q.dtype), kc, trans_b=True)  # fla's rounding of q * scale
            s = jnp.where(p < hv, s, 0.0)
            lse = lse_ref[p, :][:, None]
            finite = lse > -jnp.inf
            return imp + jnp.where(finite, jnp.exp(s - jnp.where(finite, lse, 0.0)), 0.0)

        return jax.lax.fori_loop(0, gv, row, jnp.zeros((block_q, chunk), jnp.float32))

    def sorted_chunk(c):
        """fla's entries of chunk c (the current block scores gv, later blocks are empty: 0 with id 0),
        presorted into alternating runs."""
        o_c = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (block_q, chunk), 1)
        x = jnp.where(o_c == cur, jnp.float32(gv), jnp.where(o_c < cur, importance(c), 0.0))
        ids = jnp.where(o_c <= cur, o_c + 1, 0)
        for stage in range(1, n_dims):
            x, ids = _merge(x, ids, stage, 2)
        return x, ids

    first_half = jax.lax.broadcasted_iota(jnp.int32, (block_q, chunk), 1) < chunk // 2

    def step(c, carry):
        b_i, o_i = carry
        x, ids = _merge(*sorted_chunk(c), n_dims, False)
        return _merge(jnp.where(first_half, b_i, x), jnp.where(first_half, o_i, ids), n_dims, True)

    carry = _merge(*sorted_chunk(0), n_dims, True)
    _, o_i = jax.lax.fori_loop(1, cur // chunk + 1, step, carry)

    w = out_ref.shape[-1]  # the first w entries: reshape [BQ, chunk / w, w] and keep slot 0 of axis 1
    lead = o_i.reshape(block_q, chunk // w, w)
    head = jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, lead.shape, 1) == 0, lead, 0), axis=1)
    col = jax.lax.broadcasted_iota(jnp.int32, (block_q, w), 1)
    out_ref[...] = jnp.where((col < block_count) & (head > 0), head - 1 + first, -1)


def select_blocks_fla(q, k_cmp, lse, lo, pos=None, *, layout: HeadLayout, block_size: int, block_count: int,
                      scale: float) -> jax.Array:
    """Chosen blocks [B, Tp, HKV, W] int32 (absolute, -1 = empty; W = next_pow2(block_count), in the network's
    order), as the oracle chooses them (`reference.select_blocks(..., tie_break="fla")`).

    fla's arithmetic: q * scale rounded to q's dtype, times the block means in q's dtype, summed in float32
    (`reference.block_importance(..., operands=q.dtype)`).
    q [B, Tp, HQ, D] (Tp a multiple of block_size); k_cmp [B, NB, HKV, D] block means (taken in q's dtype), padded to
    at least (last position + 1) / block_size + block_size blocks; lse [B, P, Tp] the lse each padded row divides
    its scores by; lo [B, Tp] segment starts (every segment starts on a block boundary); pos [B, Tp] the rows'
    positions, pos[b, 0] + r with pos[b, 0] a multiple of block_size (None: 0 .. Tp - 1).
    """
    b, tp, hq, d = q.shape
    pos = jnp.broadcast_to(jnp.arange(tp, dtype=jnp.int32), (b, tp)) if pos is None else pos
    nbp, hkv = k_cmp.shape[1], k_cmp.shape[2]
    w = next_pow2(block_count)
    if w > block_size:
        raise ValueError(f"fla top-k needs next_pow2(block_count)={w} <= block_size={block_size}")
    if tp % block_size or nbp < tp // block_size + block_size:
        raise ValueError(f"select_blocks_fla: Tp={tp} must be a multiple of block_size={block_size} and k_cmp "
                         f"must hold {tp // block_size + block_size} blocks, got {nbp}")
    block_q = min(64, block_size)
    kernel = functools.partial(_kernel, layout=layout, block_size=block_size, block_count=block_count,
                               scale=scale, block_q=block_q)
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, tp // block_q),
        in_specs=[pl.BlockSpec((None, block_q, hq, d), lambda i, h, t: (i, t, 0, 0)),
                  pl.BlockSpec((None, nbp, None, d), lambda i, h, t: (i, 0, h, 0)),
                  pl.BlockSpec((None, layout.padded_heads, block_q), lambda i, h, t: (i, 0, t)),
                  pl.BlockSpec((None, block_q), lambda i, h, t: (i, t)),
                  pl.BlockSpec((None, block_q), lambda i, h, t: (i, t))],
        out_specs=pl.BlockSpec((None, block_q, None, w), lambda i, h, t: (i, t, h, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, hkv, w), jnp.int32),
        name="nsa_topk_fla",
        **call_options(),
    )(q, k_cmp.astype(q.dtype), lse, lo, pos)
