"""fla's bitonic top-k network (`fla/ops/nsa/utils.py`, `parallel_nsa_kernel_topk`), in jnp.

VideoNSA picks its blocks with this network, and with tied scores (every zeroed query row) the network's
order decides which blocks are kept, so mode "videonsa" replays it exactly: block scores are taken in chunks
of `chunk` (= block_size in fla) blocks; each chunk is sorted by the bitonic network whose compare-and-swap
swaps a pair when `(left > right) != flip`; from the second chunk on, the chunk is sorted ascending, its top
half is joined to the top half kept so far and the join is merged descending. The first S entries are the
result, S = block_count rounded up to a power of two. Ids are 1-based in the network (0 = empty slot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from pallas_kernels.layout import next_pow2


def bitonic_log2(n: int) -> int:
    """log2 of a bitonic network's length (a power of two)."""
    if n <= 0 or n & (n - 1):
        raise ValueError(f"bitonic network needs a power-of-two length, got {n}")
    return n.bit_length() - 1


def _layers(stages: range, order, n_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """The compare-and-swap layers of `_bitonic_merge(stage, order)` for each stage, as (distance, flip)
    rows. `order` 2 alternates directions over sub-sequences of 2**stage; else a bool, True = descending."""
    dists, flips = [], []
    for stage in stages:
        if order == 2:
            flip = (np.arange(2 ** n_dims) >> stage) & 1
        else:
            flip = np.full(2 ** n_dims, int(bool(order)))
        for i in range(stage):
            dists.append(2 ** (stage - 1 - i))
            flips.append(flip.astype(bool))
    return np.asarray(dists, np.int32), np.stack(flips)


def _run_layers(x, ids, layers):
    """Applies compare-and-swap layers: a pair (left, right) at distance d swaps iff (left > right) != flip."""
    pos = jnp.arange(x.shape[-1])

    def layer(carry, lay):
        x, ids = carry
        dist, flip = lay
        partner = pos ^ dist
        xp, ip = x[..., partner], ids[..., partner]
        is_left = (pos & dist) == 0
        cond = (jnp.where(is_left, x, xp) > jnp.where(is_left, xp, x)) != flip
        return (jnp.where(cond, xp, x), jnp.where(cond, ip, ids)), None

    return jax.lax.scan(layer, (x, ids), tuple(jnp.asarray(a) for a in layers))[0]


def fla_topk(scores: jax.Array, current: jax.Array, *, group_size: int, block_count: int,
             chunk: int) -> jax.Array:
    """Blocks kept by fla's network for each row.

    scores: [..., NB] float32 importance of each block relative to the row's segment start (only entries
      j < current are read). current: [...] int32, the row's current block (relative). group_size: the
      current block's score (1 per head of the group). Returns [..., block_count] int32 relative block
      indices in the network's output order, -1 for empty slots.
    """
    s = next_pow2(block_count)
    n_dims = bitonic_log2(chunk)
    if s > chunk:
        raise ValueError(f"fla top-k needs next_pow2(block_count)={s} <= chunk (block_size)={chunk}")
    nb = scores.shape[-1]
    n_chunks = -(-nb // chunk)
    scores = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, n_chunks * chunk - nb)])
    cur = current[..., None]
    first_half = jnp.arange(chunk) < chunk // 2
    presort = _layers(range(1, n_dims), 2, n_dims)
    ascending, descending = _layers([n_dims], False, n_dims), _layers([n_dims], True, n_dims)
    chunks = jnp.moveaxis(scores.reshape(scores.shape[:-1] + (n_chunks, chunk)), -2, 0)

    def sort_chunk(c, part):
        o_c = c * chunk + jnp.arange(chunk)
        x = jnp.where(o_c == cur, jnp.float32(group_size), jnp.where(o_c < cur, part, 0.0))
        ids = jnp.where(o_c <= cur, o_c + 1, 0).astype(jnp.int32)
        return _run_layers(x, ids, presort)

    def step(carry, inp):
        b_i, o_i = carry
        c, part = inp
        x, ids = sort_chunk(c, part)
        x, ids = _run_layers(x, ids, ascending)
        x, ids = _run_layers(jnp.where(first_half, b_i, x), jnp.where(first_half, o_i, ids), descending)
        active = c * chunk <= cur  # fla loops over chunks up to the current block only
        return (jnp.where(active, x, b_i), jnp.where(active, ids, o_i)), None

    b_i, o_i = _run_layers(*sort_chunk(0, chunks[0]), descending)
    if n_chunks > 1:
        (b_i, o_i), _ = jax.lax.scan(step, (b_i, o_i), (jnp.arange(1, n_chunks), chunks[1:]))
    return o_i[..., :block_count] - 1


def recent_topk(scores: jax.Array, current: jax.Array, first: jax.Array, *, block_count: int) -> jax.Array:
    """Top `block_count` blocks per row: the current block always, then past blocks by score, ties to the
    most recent block. scores: [..., NB] (entries first <= j < current are read); current, first: [...] int32
    absolute block indices. Returns [..., block_count] int32 absolute indices, -1 for empty slots."""
    nb = scores.shape[-1]
    j = jnp.arange(nb)
    cur, lo = current[..., None], first[..., None]
    key = jnp.where(j == cur, jnp.inf, jnp.where((j < cur) & (j >= lo), scores, -jnp.inf))
    k = min(block_count, nb)
    val, idx = jax.lax.top_k(key[..., ::-1], k)  # reversed: lax.top_k prefers the lower index on ties
    idx = jnp.where(val > -jnp.inf, nb - 1 - idx, -1).astype(jnp.int32)
    pad = block_count - k
    return jnp.pad(idx, [(0, 0)] * (idx.ndim - 1) + [(0, pad)], constant_values=-1) if pad else idx
