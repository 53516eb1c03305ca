"""Dense softmax attention of the language model: the functions (masked, chunked, cached), the per-token context
every attention layer reads (`TokenContext`), a layer's KV cache (`LayerCache`) and the dense attention layer that
the VideoNSA layer (`videonsa.py`) extends.

Every attention layer takes an optional KV cache and returns it updated: a chunk's rotated k, v are written at
slot `ctx.cache_start`. Without `ctx.cache_valid` (a prefill) the chunk attends within itself through the layer's
own attention (dense or the VideoNSA hybrid); with it (decoding) the chunk attends densely (causal GQA) to every
visible cached token, as the released VideoNSA decodes (SPEC §2.12: a decode step's token is text, so it takes
the pure dense path in every mode).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from nsa_jax.config import TextConfig
from nsa_jax.cudnn import chunk_attention, chunk_attention_applies, cudnn_applies
from nsa_jax.head_parallel import QueryChunk, head_parallel
from nsa_jax.layers import Runtime, linear
from nsa_jax.rope import apply_rotary

# Attention with explicit masks runs this many query rows at a time: masks of [B, 1, chunk, S], not [B, 1, T, S].
QUERY_CHUNK = 2048


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    kv_valid: jax.Array | None = None, implementation: str | None = None,
                    query_chunk: int = QUERY_CHUNK, q_offset: int | jax.Array | None = None) -> jax.Array:
    """Softmax attention, q [B,T,H,D], k/v [B,S,K,D] with H divisible by K (GQA), scale 1/sqrt(D).

    causal: query i sees keys j <= i + q_offset; q_offset (an int or a traced int32 scalar) is the position of
    the first query among the keys, by default S - T (the queries are the last T positions of the keys).
    segment_ids [B,T] (T == S), or a pair ([B,T] of the queries, [B,S] of the keys): tokens attend only keys
    of the same segment (packed samples). With q_offset it may be the keys' [B,S] alone (the queries' are
    their rows q_offset + i).
    kv_valid [B,S] bool: keys that exist (padding masked out). A row with no visible key returns zeros.
    Without masks (and T == S, no q_offset) this is `jax.nn.dot_product_attention` with `implementation` (None:
    cuDNN's flash attention where it applies, on NVIDIA GPUs in bf16 / f16, else XLA's); with masks, queries
    go `query_chunk` rows at a time.
    """
    t, s = q.shape[1], k.shape[1]
    if q_offset is not None and segment_ids is not None and not isinstance(segment_ids, tuple):
        segment_ids = (jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, t, axis=1), segment_ids)
    if q_offset is None and segment_ids is None and kv_valid is None and (t == s or not causal):
        if implementation is None and cudnn_applies(q):
            implementation = "cudnn"
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    if t > query_chunk:
        return _query_chunks(q, k, v, None, chunk=query_chunk, causal=causal, segment_ids=segment_ids,
                             kv_valid=kv_valid, implementation=implementation, q_offset=q_offset)
    mask = jnp.ones((q.shape[0], 1, t, s), bool)
    if causal:
        offset = s - t if q_offset is None else q_offset
        mask &= (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + offset)[None, None]
    if segment_ids is not None:
        q_seg, k_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        mask &= (q_seg[:, :, None] == k_seg[:, None, :])[:, None]
    if kv_valid is not None:
        mask &= kv_valid[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return jnp.where(jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None], out, 0).astype(out.dtype)


def dense_attention_rows(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array, *, chunk: int = QUERY_CHUNK,
                         segment_ids: jax.Array | None = None, kv_valid: jax.Array | None = None,
                         implementation: str | None = None, q_offset: int | jax.Array | None = None) -> jax.Array:
    """Causal `dense_attention` for the query rows where `rows` [B,T] holds; other rows may get anything.

    Queries go in chunks of `chunk` rows against the keys up to the chunk's end; a chunk with none of the
    rows (e.g. the middle of a long video, whose tokens take the NSA branch) is skipped at run time.
    q_offset: as `dense_attention`'s (q a chunk of the keys' sequence; segment_ids then the keys').
    """
    if q.shape[1] <= chunk:
        return dense_attention(q, k, v, causal=True, segment_ids=segment_ids, kv_valid=kv_valid,
                               implementation=implementation, q_offset=q_offset)
    return _query_chunks(q, k, v, rows, chunk=chunk, causal=True, segment_ids=segment_ids, kv_valid=kv_valid,
                         implementation=implementation, q_offset=q_offset)


def _query_chunks(q, k, v, rows: jax.Array | None, *, chunk: int, causal: bool, segment_ids, kv_valid,
                  implementation, q_offset=None) -> jax.Array:
    """`dense_attention` `chunk` query rows at a time, each chunk against the keys it can see (all of them
    where q_offset is given: the keys a chunk sees are then known at run time only); with `rows`, chunks
    holding none of them are skipped (zeros). A causal chunk whose rows and keys hold one segment (checked at run
    time) runs as `cudnn.chunk_attention` where that applies: no mask."""
    t, s = q.shape[1], k.shape[1]
    if q_offset is not None and segment_ids is not None and not isinstance(segment_ids, tuple):
        segment_ids = (jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, t, axis=1), segment_ids)
    q_seg, k_seg = (segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)) \
        if segment_ids is not None else (None, None)
    unmasked = causal and q_offset is None and kv_valid is None and t == s and not isinstance(segment_ids, tuple)
    # [B, S]: keys 0 .. j all hold key 0's segment (computed once; each chunk reads its last key's entry).
    one_prefix = None if k_seg is None or not unmasked else jnp.cumsum(k_seg != k_seg[:, :1], axis=1) == 0
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        stop = end + s - t if causal and q_offset is None else s  # the last key a causal chunk sees, plus one
        seg = None if q_seg is None else (q_seg[:, start:end], k_seg[:, :stop])
        valid = None if kv_valid is None else kv_valid[:, :stop]
        offset = None if q_offset is None else q_offset + start
        attend = lambda a, b, c, seg=seg, valid=valid, offset=offset: dense_attention(
            a, b, c, causal=causal, segment_ids=seg, kv_valid=valid, implementation=implementation,
            query_chunk=chunk, q_offset=offset)
        if unmasked and chunk_attention_applies(q[:, start:end], start, implementation):
            one_segment = None if one_prefix is None else one_prefix[:, stop - 1].all()
            attend = _unmasked_chunk(attend, start, one_segment)
        args = (q[:, start:end], k[:, :stop], v[:, :stop])
        outs.append(attend(*args) if rows is None else jax.lax.cond(
            rows[:, start:end].any(), attend, lambda a, b, c: jnp.zeros_like(a), *args))
    return jnp.concatenate(outs, axis=1)


def _unmasked_chunk(masked, start: int, one_segment: jax.Array | None):
    """`chunk_attention` of the chunk at row `start`; with segment ids, where its keys hold one segment (else
    masked)."""
    fast = lambda a, b, c: chunk_attention(a, b, c, start)
    if one_segment is None:
        return fast
    return lambda a, b, c: jax.lax.cond(one_segment, fast, masked, a, b, c)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, valid: jax.Array) -> jax.Array:
    """Causal GQA of a chunk q [B, T, H, D] over cached k, v [B, S, K, D]: query i of row b sees the slots s
    with valid[b, s] and s <= start[b] + i (the chunk itself sits at slots start[b] ...). Rows with no visible
    slot return zeros."""
    t, s = q.shape[1], k.shape[1]
    mask = valid[:, None, :] & (jnp.arange(s)[None, None, :] <= start[:, None, None] + jnp.arange(t)[None, :, None])
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None])
    return jnp.where(mask.any(-1)[..., None, None], out, 0).astype(q.dtype)


@struct.dataclass
class TokenContext:
    """Per-token facts every attention layer may need, computed once per forward pass."""

    position_ids: jax.Array  # [3, B, T] mRoPE ids
    cos: jax.Array  # [B, T, D]
    sin: jax.Array  # [B, T, D]
    segment_ids: jax.Array | None  # [B, T] packed samples (0 = padding) or None
    kv_valid: jax.Array | None  # [B, T] keys that exist (padding masked) or None
    vision_mask: jax.Array  # [B, T] bool: vision tokens (the pad tokens that receive features: `Qwen25VL.embed`)
    cache_start: jax.Array | None = None  # [B] int32: the cache slot of each row's first chunk token
    cache_valid: jax.Array | None = None  # [B, S] bool: cached slots the chunk may see (None: a prefill)
    # Static: no row holds more vision tokens than this (the vision features' rows; None: not known).
    vision_tokens: int | None = struct.field(pytree_node=False, default=None)


class LayerCache(NamedTuple):
    """One layer's rotated keys and values [B, S, K, D]."""

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> "LayerCache":
        """k, v [B, T, K, D] written at slots start[b] .. start[b] + T - 1 of each row."""
        put = jax.vmap(lambda cache, new, s: jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype),
                                                                                  s, axis=0))
        return LayerCache(put(self.k, k, start), put(self.v, v, start))


class DenseAttention(nnx.Module):
    """Causal GQA self-attention with mRoPE (Qwen2.5-VL)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype, runtime: Runtime = Runtime()):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = linear(cfg.hidden_size, self.num_heads * d, kernel_axes=("embed", "heads"), bias=True, **kw)
        self.k_proj = linear(cfg.hidden_size, self.num_kv_heads * d, kernel_axes=("embed", "kv_heads"), bias=True,
                             **kw)
        self.v_proj = linear(cfg.hidden_size, self.num_kv_heads * d, kernel_axes=("embed", "kv_heads"), bias=True,
                             **kw)
        self.o_proj = linear(self.num_heads * d, cfg.hidden_size, kernel_axes=("heads", "embed"), bias=False, **kw)
        self.runtime = runtime

    def qkv(self, x: jax.Array, ctx: TokenContext) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B,T,H,D], k, v [B,T,K,D] after mRoPE."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = ctx.cos.astype(x.dtype), ctx.sin.astype(x.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def __call__(self, x: jax.Array, ctx: TokenContext, cache: LayerCache | None = None
                 ) -> tuple[LayerCache | None, jax.Array]:
        """(updated cache, output [B, T, E]); see the module docstring for the cache."""
        q, k, v = self.qkv(x, ctx)
        if cache is not None:
            cache = cache.write(k, v, ctx.cache_start)
        if cache is not None and ctx.cache_valid is not None:
            o = cached_attention(q, cache.k, cache.v, ctx.cache_start, ctx.cache_valid)
        else:
            o = self.attend(q, k, v, x, ctx)
        return cache, self.o_proj(o.reshape(*x.shape[:2], -1).astype(x.dtype))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array, ctx: TokenContext) -> jax.Array:
        """The attention core over the chunk itself: causal GQA, [B, T, H, D]."""
        del x
        impl, mesh = self.runtime.attention_impl, self.runtime.mesh

        def attend(q, k, v, segment_ids, kv_valid, chunk: QueryChunk | None = None):
            return dense_attention(q, k, v, causal=True, segment_ids=segment_ids, kv_valid=kv_valid,
                                   implementation=impl, q_offset=None if chunk is None else chunk.offset)
        return head_parallel(mesh, attend, (q, k, v), dict(segment_ids=ctx.segment_ids, kv_valid=ctx.kv_valid),
                             num_kv_heads=self.num_kv_heads)
