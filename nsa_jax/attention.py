"""Dense softmax attention used by the vision tower and the text branch of the language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Attention with explicit masks runs this many query rows at a time: masks of [B, 1, chunk, S], not [B, 1, T, S].
QUERY_CHUNK = 2048


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    kv_valid: jax.Array | None = None, implementation: str | None = None,
                    query_chunk: int = QUERY_CHUNK) -> jax.Array:
    """Softmax attention, q [B,T,H,D], k/v [B,S,K,D] with H divisible by K (GQA), scale 1/sqrt(D).

    causal: query i sees keys j <= i + S - T (the queries are the last T positions of the keys).
    segment_ids [B,T] (T == S), or a pair ([B,T] of the queries, [B,S] of the keys): tokens attend only keys
    of the same segment (packed samples).
    kv_valid [B,S] bool: keys that exist (padding masked out). A row with no visible key returns zeros.
    Without masks (and T == S) this is `jax.nn.dot_product_attention` with `implementation` (None: cuDNN's
    flash attention where it applies, on NVIDIA GPUs in bf16 / f16, else XLA's); with masks, queries go
    `query_chunk` rows at a time.
    """
    t, s = q.shape[1], k.shape[1]
    if segment_ids is None and kv_valid is None and (t == s or not causal):
        if implementation is None and _cudnn_applies(q):
            implementation = "cudnn"
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    if t > query_chunk:
        return _query_chunks(q, k, v, None, chunk=query_chunk, causal=causal, segment_ids=segment_ids,
                             kv_valid=kv_valid, implementation=implementation)
    mask = jnp.ones((q.shape[0], 1, t, s), bool)
    if causal:
        mask &= jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]
    if segment_ids is not None:
        q_seg, k_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        mask &= (q_seg[:, :, None] == k_seg[:, None, :])[:, None]
    if kv_valid is not None:
        mask &= kv_valid[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return jnp.where(jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None], out, 0).astype(out.dtype)


def _cudnn_applies(q: jax.Array) -> bool:
    """cuDNN flash attention takes this query: an NVIDIA GPU, bf16 / f16, head dim a multiple of 8 up to 128."""
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and jax.devices()[0].device_kind.upper().startswith("NVIDIA")
            and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128)


def dense_attention_rows(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array, *, chunk: int = QUERY_CHUNK,
                         segment_ids: jax.Array | None = None, kv_valid: jax.Array | None = None,
                         implementation: str | None = None) -> jax.Array:
    """Causal `dense_attention` for the query rows where `rows` [B,T] holds; other rows may get anything.

    Queries go in chunks of `chunk` rows against the keys up to the chunk's end; a chunk with none of the
    rows (e.g. the middle of a long video, whose tokens take the NSA branch) is skipped at run time.
    """
    if q.shape[1] <= chunk:
        return dense_attention(q, k, v, causal=True, segment_ids=segment_ids, kv_valid=kv_valid,
                               implementation=implementation)
    return _query_chunks(q, k, v, rows, chunk=chunk, causal=True, segment_ids=segment_ids, kv_valid=kv_valid,
                         implementation=implementation)


def _query_chunks(q, k, v, rows: jax.Array | None, *, chunk: int, causal: bool, segment_ids, kv_valid,
                  implementation) -> jax.Array:
    """`dense_attention` `chunk` query rows at a time, each chunk against the keys it can see; with `rows`,
    chunks holding none of them are skipped (zeros)."""
    t, s = q.shape[1], k.shape[1]
    q_seg, k_seg = (segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)) \
        if segment_ids is not None else (None, None)
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        stop = end + s - t if causal else s  # the last key a causal chunk sees, plus one
        seg = None if q_seg is None else (q_seg[:, start:end], k_seg[:, :stop])
        valid = None if kv_valid is None else kv_valid[:, :stop]
        attend = lambda a, b, c, seg=seg, valid=valid: dense_attention(
            a, b, c, causal=causal, segment_ids=seg, kv_valid=valid, implementation=implementation,
            query_chunk=chunk)
        args = (q[:, start:end], k[:, :stop], v[:, :stop])
        outs.append(attend(*args) if rows is None else jax.lax.cond(
            rows[:, start:end].any(), attend, lambda a, b, c: jnp.zeros_like(a), *args))
    return jnp.concatenate(outs, axis=1)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, valid: jax.Array) -> jax.Array:
    """Causal GQA of a chunk q [B, T, H, D] over cached k, v [B, S, K, D]: query i of row b sees the slots s
    with valid[b, s] and s <= start[b] + i (the chunk itself sits at slots start[b] ...). Rows with no visible
    slot return zeros."""
    t, s = q.shape[1], k.shape[1]
    mask = valid[:, None, :] & (jnp.arange(s)[None, None, :] <= start[:, None, None] + jnp.arange(t)[None, :, None])
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None])
    return jnp.where(mask.any(-1)[..., None, None], out, 0).astype(q.dtype)
