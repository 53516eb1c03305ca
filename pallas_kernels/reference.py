"""Pure-jnp oracle of NSA: every branch and the whole gated sum, dense masks, float32 inside.

Branches work on *expanded* query heads: q [B, T, P, D] where head p reads KV head p // (P / HKV). The head
layouts of `layout.py` expand literally here ("videonsa": [q, q, zeros], P padded heads) and collapse after.
Masks (i query, j key or block, bs block size, seg(.) the segment; blocks never straddle segments):
- compression, causal ("native"): block j visible iff (j + 1) * bs - 1 <= i (complete blocks ending at or
  before i); non-causal ("videonsa", as released): iff i <= (j + 1) * bs - 1. Same segment in both.
- importance (per KV head, summed over its heads): sum_p exp(scale * q_p . k_cmp_j - lse_p) for past blocks
  first_block(seg(i)) <= j < i // bs; the current block i // bs is always chosen ("recent") or scores one
  per head of the group ("fla", inside fla's network). lse_p is row p's own lse, or (lse reading
  "released", SPEC §2.11) what the released top-k reads: `read_lse`.
- selection: keys j <= i of the chosen blocks. Window: i - window < j <= i. Same segment everywhere.
i is a query row's absolute position: `positions` [B, Tq] (default 0 .. T - 1) where q holds one chunk of the
sequence whose keys k, v [B, T, ...] and segment ids [B, T] cover it all (`chunks.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.chunks import gather_chunks, query_positions, rows_at
from pallas_kernels.layout import HeadLayout, head_layout
from pallas_kernels.segments import default_segments, segment_bounds
from pallas_kernels.topk_rules import fla_topk, recent_topk

NEG_INF = -jnp.inf


def mean_pool(x: jax.Array, block_size: int) -> jax.Array:
    """[B, T, H, D] -> [B, ceil(T / bs), H, D] float32 block means; the last block averages what it has."""
    b, t, h, d = x.shape
    nb = -(-t // block_size)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block_size - t), (0, 0), (0, 0)))
    counts = jnp.minimum(block_size, t - jnp.arange(nb) * block_size).astype(jnp.float32)
    return xp.reshape(b, nb, block_size, h, d).sum(2) / counts[None, :, None, None]


def _kv_for_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """KV heads [B, N, HKV, D] -> per query head [B, N, P, D] (head p reads KV head p // (P / HKV))."""
    return jnp.repeat(x, num_heads // x.shape[2], axis=2)


def _block_segments(segment_ids: jax.Array, block_size: int) -> jax.Array:
    return segment_ids[:, ::block_size]


def _rows(q: jax.Array, k: jax.Array, segment_ids, positions) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(segment ids of the keys [B, T], positions [B, Tq] of the query rows, their segment ids [B, Tq])."""
    b, tq = q.shape[:2]
    seg = default_segments(b, k.shape[1]) if segment_ids is None else segment_ids
    pos = query_positions(b, tq, None) if positions is None else positions
    return seg, pos, rows_at(seg, pos)


def _masked_softmax_attention(s: jax.Array, mask: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s [B, P, T, N] logits, mask broadcastable, v [B, N, P, D]; rows with no key give o = 0, lse = -inf.
    Written so that masked-out and empty rows give finite gradients."""
    s = jnp.where(mask, s, NEG_INF)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = e.sum(-1)
    safe_l = jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bptn,bnpd->btpd", e / safe_l[..., None], v)
    lse = jnp.where(l > 0, jnp.where(jnp.isfinite(m[..., 0]), m[..., 0], 0.0) + jnp.log(safe_l), NEG_INF)
    return o, lse.transpose(0, 2, 1)


def compression_attention(q, k, v, *, block_size: int, causal: bool, segment_ids=None, scale=None, positions=None):
    """Attention of q [B, Tq, P, D] to mean-pooled k, v [B, T, HKV, D]. Returns o [B, Tq, P, D] float32 and
    the natural-log lse [B, Tq, P] (-inf where a row sees no block)."""
    p, d = q.shape[2:]
    scale = d ** -0.5 if scale is None else scale
    seg, pos, q_seg = _rows(q, k, segment_ids, positions)
    kc, vc = mean_pool(k, block_size), mean_pool(v, block_size)
    nb = kc.shape[1]
    s = jnp.einsum("btpd,bnpd->bptn", q.astype(jnp.float32), _kv_for_heads(kc, p)) * scale
    i, j = pos[:, :, None], jnp.arange(nb)[None, None, :]
    visible = ((j + 1) * block_size - 1 <= i) if causal else (i <= (j + 1) * block_size - 1)
    same = q_seg[:, :, None] == _block_segments(seg, block_size)[:, None, :]
    return _masked_softmax_attention(s, (visible & same)[:, None], _kv_for_heads(vc, p))


def block_importance(q, k, lse, *, block_size: int, scale=None, segment_ids=None, positions=None,
                     operands=None) -> jax.Array:
    """Importance [B, Tq, HKV, NB] of past blocks (first block of the segment <= j < i // bs), summed over
    the heads of each KV head; -inf elsewhere. q [B, Tq, P, D], k [B, T, HKV, D], lse [B, Tq, P].
    operands: None (float32 products of q and the float32 block means, then the scale) or a dtype: fla's top-k
    arithmetic (the released one, `parallel_nsa_kernel_topk` over `mean_pooling`'s k_cmp): q * scale and the
    block means rounded to it, their products summed in float32."""
    b, t, p, d = q.shape
    hkv = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    seg, pos, q_seg = _rows(q, k, segment_ids, positions)
    kc = mean_pool(k, block_size)
    nb = kc.shape[1]
    if operands is None:
        s = jnp.einsum("btpd,bnpd->btpn", q.astype(jnp.float32), _kv_for_heads(kc, p)) * scale
    else:
        qs = (q.astype(jnp.float32) * scale).astype(operands)
        s = jnp.einsum("btpd,bnpd->btpn", qs, _kv_for_heads(kc.astype(operands), p),
                       preferred_element_type=jnp.float32)
    finite = jnp.isfinite(lse)[..., None]
    prob = jnp.where(finite, jnp.exp(s - jnp.where(finite, lse[..., None], 0.0)), 0.0)
    imp = prob.reshape(b, t, hkv, p // hkv, nb).sum(3)
    i, j = pos[:, :, None], jnp.arange(nb)[None, None, :]
    past = (j < i // block_size) & (q_seg[:, :, None] == _block_segments(seg, block_size)[:, None, :])
    return jnp.where(past[:, :, None, :], imp, NEG_INF)


LSE_READINGS = ("per_head", "released")


def read_lse(lse: jax.Array, reading: str, segment_ids: jax.Array | None = None) -> jax.Array:
    """The lse [B, T, P] that padded row p of token t divides its block scores by, from the compression
    branch's lse [B, T, P] (each row's own).

    "per_head": each row's own. "released" (SPEC §2.11): the released top-k reads flex_attention's contiguous
    [P, L] lse buffer of a sequence of L tokens as if it were [L, P]: row p of token t gets element t * P + p
    of the buffer, i.e. the lse of row (t * P + p) // L at token (t * P + p) % L. Each segment is its own
    sequence (positions relative to its start), so packing never changes a sample's result.
    """
    if reading == "per_head":
        return lse
    if reading != "released":
        raise ValueError(f"lse reading must be one of {LSE_READINGS}, got {reading!r}")
    b, t, _ = lse.shape
    lo, hi = segment_bounds(default_segments(b, t) if segment_ids is None else segment_ids)
    return released_lse(lse, lo, hi)


def released_lse(lse: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
    """`read_lse(lse, "released")` with the segment bounds lo, hi [B, T] (start, end) given."""
    b, t, p = lse.shape
    flat = (jnp.arange(t)[None, :] - lo)[..., None] * p + jnp.arange(p)  # [B, T, P] index into the buffer
    n = (hi - lo)[..., None]
    src = (lo[..., None] + flat % n) * p + flat // n  # position in lse.reshape(B, T * P)
    return jnp.take_along_axis(lse.reshape(b, t * p), src.reshape(b, t * p), axis=1).reshape(b, t, p)


def _first_block(segment_ids: jax.Array, block_size: int) -> jax.Array:
    """[B, T] absolute index of the first block of each token's segment."""
    t = segment_ids.shape[1]
    pos = jnp.arange(t)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return jax.lax.cummax(jnp.where(new, pos, 0), axis=1) // block_size


def select_blocks(importance, *, block_size: int, block_count: int, tie_break: str, group_size: int,
                  segment_ids=None, positions=None) -> jax.Array:
    """Chosen blocks [B, Tq, HKV, block_count] int32 (absolute indices, -1 = empty slot) from the importance
    [B, Tq, HKV, NB] of the query rows at `positions`; segment_ids [B, T] of the whole sequence.

    tie_break "recent": current block always, then by importance, ties to the most recent block.
    tie_break "fla": fla's bitonic network over blocks relative to the segment start (`topk_rules.py`),
    the current block scoring `group_size`.
    """
    b, t, hkv, nb = importance.shape
    seg = default_segments(b, t) if segment_ids is None else segment_ids
    pos = query_positions(b, t, None) if positions is None else positions
    first = jnp.broadcast_to(rows_at(_first_block(seg, block_size), pos)[:, :, None], (b, t, hkv))
    cur = jnp.broadcast_to((pos // block_size)[:, :, None], (b, t, hkv))
    if tie_break == "recent":
        return recent_topk(importance, cur, first, block_count=block_count)
    if tie_break != "fla":
        raise ValueError(f"tie_break must be 'recent' or 'fla', got {tie_break!r}")
    # Shift each row's blocks so that its segment's first block is block 0, as fla's varlen kernel sees them.
    rel = jnp.arange(nb)[None, None, None, :] + first[..., None]
    shifted = jnp.take_along_axis(importance, jnp.minimum(rel, nb - 1), axis=-1)
    out = fla_topk(shifted, cur - first, group_size=group_size, block_count=block_count, chunk=block_size)
    return jnp.where(out >= 0, out + first[..., None], -1)


def selection_attention(q, k, v, block_indices, *, block_size: int, scale=None, segment_ids=None, positions=None):
    """Attention of q [B, Tq, P, D] to keys j <= i in the blocks `block_indices` [B, Tq, HKV, S] of its KV head."""
    p, d = q.shape[2:]
    hkv, t = k.shape[2], k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    seg, pos, q_seg = _rows(q, k, segment_ids, positions)
    nb = -(-t // block_size)
    chosen = (block_indices[..., None] == jnp.arange(nb)).any(-2)  # [B, Tq, HKV, NB]
    key_chosen = jnp.repeat(chosen, block_size, axis=-1)[..., :t]  # [B, Tq, HKV, T]
    mask = jnp.repeat(key_chosen, p // hkv, axis=2).transpose(0, 2, 1, 3)  # [B, P, Tq, T]
    i, j = pos[:, :, None], jnp.arange(t)[None, None, :]
    mask = mask & ((j <= i) & (q_seg[:, :, None] == seg[:, None, :]))[:, None]
    s = jnp.einsum("btpd,bnpd->bptn", q.astype(jnp.float32), _kv_for_heads(k.astype(jnp.float32), p)) * scale
    return _masked_softmax_attention(s, mask, _kv_for_heads(v.astype(jnp.float32), p))[0]


def window_attention(q, k, v, *, window_size: int, scale=None, segment_ids=None, positions=None):
    """Causal attention of q [B, Tq, P, D] to the last `window_size` keys including i, in its segment."""
    p, d = q.shape[2:]
    scale = d ** -0.5 if scale is None else scale
    seg, pos, q_seg = _rows(q, k, segment_ids, positions)
    i, j = pos[:, :, None], jnp.arange(k.shape[1])[None, None, :]
    mask = (j <= i) & (j > i - window_size) & (q_seg[:, :, None] == seg[:, None, :])
    s = jnp.einsum("btpd,bnpd->bptn", q.astype(jnp.float32), _kv_for_heads(k.astype(jnp.float32), p)) * scale
    return _masked_softmax_attention(s, mask[:, None], _kv_for_heads(v.astype(jnp.float32), p))[0]


def expand_heads(x: jax.Array, layout: HeadLayout) -> jax.Array:
    """Query-head tensor [B, T, HQ, ...] -> padded heads [B, T, P, ...] ("videonsa": [x, x, zeros])."""
    if layout.kind == "gqa":
        return x
    zeros = jnp.zeros(x.shape[:2] + (layout.padded_heads - 2 * layout.num_q_heads,) + x.shape[3:], x.dtype)
    return jnp.concatenate([x, x, zeros], axis=2)


def collapse_heads(o: jax.Array, layout: HeadLayout) -> jax.Array:
    """Padded heads [B, T, P, D] -> query heads [B, T, HQ, D] (mean of the two copies in "videonsa")."""
    if layout.kind == "gqa":
        return o
    hq = layout.num_q_heads
    return 0.5 * (o[:, :, :hq] + o[:, :, hq:2 * hq])


def query_block_importance(importance: jax.Array, block_size: int) -> jax.Array:
    """Importance [B, T, HKV, NB] summed over each block of block_size consecutive queries, given back to
    every query of the block (their past blocks are the same, so -inf entries stay -inf)."""
    b, t, hkv, nb = importance.shape
    n = -(-t // block_size)
    padded = jnp.pad(importance, ((0, 0), (0, n * block_size - t), (0, 0), (0, 0)))
    summed = padded.reshape(b, n, block_size, hkv, nb).sum(2)
    return jnp.repeat(summed, block_size, axis=1)[:, :t]


def topk_lse_rows(lse: jax.Array, reading: str, segment_ids, positions, query_axis, length: int) -> jax.Array:
    """`read_lse` for the query rows at `positions` [B, Tq] of a sequence of `length` tokens, from their own lse
    [B, Tq, P]. The released reading of a chunk reads other rows' lse too: the chunks' lse are all-gathered
    along `query_axis` first."""
    if reading == "per_head" or positions is None:
        return read_lse(lse, reading, segment_ids)
    if lse.shape[1] < length:
        if query_axis is None:
            raise ValueError("lse_reading='released' on a query chunk needs query_axis (the mapped axis of the chunks)")
        lse = gather_chunks(lse, query_axis)
    return rows_at(read_lse(lse, reading, segment_ids), positions)


def nsa_reference(q, k, v, g_cmp, g_slc, g_swa, *, block_size: int = 64, block_count: int = 32,
                  window_size: int = 256, segment_ids=None, causal_compression: bool = True,
                  head_layout_kind: str = "gqa", tie_break: str = "recent", selection: str = "token",
                  lse_reading: str = "per_head", scale=None, return_block_indices: bool = False,
                  q_offset=None, query_axis=None):
    """The whole NSA: o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa per head, in q's dtype. selection
    "query_block": one chosen set per block of block_size queries, by their summed importance. lse_reading:
    which lse the top-k divides by (`read_lse`). q_offset, query_axis: q is a chunk of the keys' sequence
    (`chunks.py`, `api.nsa_attention`)."""
    layout = head_layout(head_layout_kind, q.shape[2], k.shape[2])
    pos = None if q_offset is None else query_positions(q.shape[0], q.shape[1], q_offset)
    rows = dict(segment_ids=segment_ids, positions=pos)
    qe = expand_heads(q, layout)
    gates = [expand_heads(g[..., None].astype(jnp.float32), layout) for g in (g_cmp, g_slc, g_swa)]
    o_cmp, lse = compression_attention(qe, k, v, block_size=block_size, causal=causal_compression, scale=scale,
                                       **rows)
    lse = topk_lse_rows(jax.lax.stop_gradient(lse), lse_reading, segment_ids, pos, query_axis, k.shape[1])
    imp = block_importance(jax.lax.stop_gradient(qe), jax.lax.stop_gradient(k), lse, block_size=block_size,
                           scale=scale, operands=q.dtype if tie_break == "fla" else None, **rows)
    if selection == "query_block":
        imp = query_block_importance(imp, block_size)
    idx = select_blocks(imp, block_size=block_size, block_count=block_count, tie_break=tie_break,
                        group_size=layout.group_size, **rows)
    o_slc = selection_attention(qe, k, v, idx, block_size=block_size, scale=scale, **rows)
    o_swa = window_attention(qe, k, v, window_size=window_size, scale=scale, **rows)
    o = gates[0] * o_cmp + gates[1] * o_slc + gates[2] * o_swa
    o = collapse_heads(o, layout).astype(q.dtype)
    return (o, idx) if return_block_indices else o


__all__ = ["mean_pool", "compression_attention", "read_lse", "block_importance", "query_block_importance",
           "select_blocks", "selection_attention", "window_attention", "expand_heads", "collapse_heads",
           "nsa_reference"]
