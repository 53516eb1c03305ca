"""Multimodal rotary embeddings (mRoPE) of Qwen2.5-VL: the rotary tables of 3-D position ids and their
application. The position ids themselves come with the prompt (`nsa_jax.processing.get_rope_index`)."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def mrope_cos_sin(position_ids: jnp.ndarray, head_dim: int, theta: float,
                  mrope_section: Sequence[int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin [B, T, head_dim] (float32) for 3-D position ids [3, B, T], sections over (t, h, w)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)))
    # Which of the three axes each rotary channel reads: the sections repeat over both halves.
    axis_of = np.concatenate([np.full(s, i % 3) for i, s in enumerate(list(mrope_section) * 2)])
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [3,B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [3, B, T, D]
    emb = jnp.where(axis_of == 0, emb[0], jnp.where(axis_of == 1, emb[1], emb[2]))
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [..., T, H, D] by cos/sin [..., T, D] (broadcast over heads)."""
    return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


def text_positions(batch: int, length: int, start: int = 0) -> np.ndarray:
    """Position ids [3, B, T] of plain text (all three axes equal)."""
    return np.broadcast_to(np.arange(start, start + length), (3, batch, length)).copy()


__all__ = ["mrope_cos_sin", "apply_rotary", "text_positions", "rotate_half"]
