"""Dense softmax attention used by the vision tower and the text branch of the language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    kv_valid: jax.Array | None = None, implementation: str | None = None) -> jax.Array:
    """Softmax attention, q [B,T,H,D], k/v [B,S,K,D] with H divisible by K (GQA), scale 1/sqrt(D).

    causal: query i sees keys j <= i + S - T (the queries are the last T positions of the keys).
    segment_ids [B,T] (T == S), or a pair ([B,T] of the queries, [B,S] of the keys): tokens attend only keys
    of the same segment (packed samples).
    kv_valid [B,S] bool: keys that exist (padding masked out). A row with no visible key returns zeros.
    Without masks (and T == S) this is `jax.nn.dot_product_attention` (cuDNN on GPU where
    `implementation="cudnn"`).
    """
    t, s = q.shape[1], k.shape[1]
    if segment_ids is None and kv_valid is None and (t == s or not causal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
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


def dense_attention_rows(q: jax.Array, k: jax.Array, v: jax.Array, rows: jax.Array, *, chunk: int,
                         segment_ids: jax.Array | None = None, kv_valid: jax.Array | None = None,
                         implementation: str | None = None) -> jax.Array:
    """Causal `dense_attention` for the query rows where `rows` [B,T] holds; other rows may get anything.

    Queries go in chunks of `chunk` rows against the keys up to the chunk's end; a chunk with none of the
    rows (e.g. the middle of a long video, whose tokens take the NSA branch) is skipped at run time.
    """
    t = q.shape[1]
    if t <= chunk:
        return dense_attention(q, k, v, causal=True, segment_ids=segment_ids, kv_valid=kv_valid,
                               implementation=implementation)
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        seg = None if segment_ids is None else (segment_ids[:, start:end], segment_ids[:, :end])
        valid = None if kv_valid is None else kv_valid[:, :end]
        attend = lambda a, b, c, seg=seg, valid=valid: dense_attention(
            a, b, c, causal=True, segment_ids=seg, kv_valid=valid, implementation=implementation)
        qc = q[:, start:end]
        outs.append(jax.lax.cond(rows[:, start:end].any(), attend, lambda a, b, c: jnp.zeros_like(a),
                                 qc, k[:, :end], v[:, :end]))
    return jnp.concatenate(outs, axis=1)
