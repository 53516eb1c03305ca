"""Dense softmax attention used by the vision tower and the text branch of the language model."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                    segment_ids: jax.Array | None = None, kv_valid: jax.Array | None = None,
                    implementation: str | None = None) -> jax.Array:
    """Softmax attention, q [B,T,H,D], k/v [B,S,K,D] with H divisible by K (GQA), scale 1/sqrt(D).

    segment_ids [B,T] (T == S): tokens attend only keys of the same segment (packed samples).
    kv_valid [B,S] bool: keys that exist (padding masked out). A row with no visible key returns zeros.
    Without masks this is `jax.nn.dot_product_attention` (cuDNN on GPU where `implementation="cudnn"`).
    """
    if segment_ids is None and kv_valid is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    t, s = q.shape[1], k.shape[1]
    mask = jnp.ones((q.shape[0], 1, t, s), bool)
    if causal:
        mask &= jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]
    if segment_ids is not None:
        mask &= (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    if kv_valid is not None:
        mask &= kv_valid[:, None, None, :]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return jnp.where(jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None], out, 0).astype(out.dtype)
