"""Multimodal rotary positions (mRoPE) of Qwen2.5-VL: the 3-D position ids and the rotary tables.

`get_rope_index` follows the rule Qwen2.5-VL and VideoNSA were trained with (transformers 4.49-4.57,
SPEC §1): a vision span starts at s = (max id so far) + 1 and gets ids
(s + t * int(second_per_grid_t) * tokens_per_second, s + row, s + col); text after it continues from the
span's max id + 1. `config.video_time_ids == "exact"` uses floor(t * second_per_grid_t * tokens_per_second).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from nsa_jax.config import ModelConfig


def _vision_span_ids(t: int, h: int, w: int, time_step: float, config: ModelConfig) -> np.ndarray:
    """Ids [3, t*h*w] of one merged-token grid relative to its start, before the offset."""
    tt = np.arange(t)
    if config.video_time_ids == "truncate":
        time = tt * int(time_step) * config.vision.tokens_per_second
    else:
        time = np.floor(tt * time_step * config.vision.tokens_per_second + 1e-9).astype(np.int64)
    t_idx = np.repeat(time, h * w)
    h_idx = np.tile(np.repeat(np.arange(h), w), t)
    w_idx = np.tile(np.arange(w), t * h)
    return np.stack([t_idx, h_idx, w_idx]).astype(np.int64)


def sequence_rope_index(tokens: np.ndarray, config: ModelConfig,
                        image_grid_thw: Sequence[Sequence[int]] = (),
                        video_grid_thw: Sequence[Sequence[int]] = (),
                        second_per_grid_ts: Sequence[float] | None = None) -> np.ndarray:
    """Position ids [3, len(tokens)] of one unpadded sequence whose vision spans use the given grids in order."""
    merge = config.vision.spatial_merge_size
    tokens = np.asarray(tokens)
    n = len(tokens)
    out = np.zeros((3, n), np.int64)
    img_i = vid_i = 0
    pos = 0  # next token index to place
    next_id = 0  # first id of the next span
    starts = np.flatnonzero(tokens[:-1] == config.vision_start_token_id) + 1
    for st in starts:
        kind = tokens[st]
        if kind == config.image_token_id:
            if img_i >= len(image_grid_thw):
                raise ValueError(f"more image spans than image_grid_thw rows ({len(image_grid_thw)})")
            t, h, w = image_grid_thw[img_i]
            time_step = 0.0
            img_i += 1
        elif kind == config.video_token_id:
            if vid_i >= len(video_grid_thw):
                raise ValueError(f"more video spans than video_grid_thw rows ({len(video_grid_thw)})")
            t, h, w = video_grid_thw[vid_i]
            time_step = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[vid_i])
            vid_i += 1
        else:
            continue
        h, w = int(h) // merge, int(w) // merge
        span = int(t) * h * w
        if st + span > n or np.any(tokens[st:st + span] != kind):
            raise ValueError(f"vision span at token {st} needs {span} pad tokens for grid {(t, h * merge, w * merge)}")
        text_len = st - pos
        out[:, pos:st] = next_id + np.arange(text_len)
        ids = _vision_span_ids(int(t), h, w, time_step, config) + next_id + text_len
        out[:, st:st + span] = ids
        next_id = int(ids.max()) + 1
        pos = st + span
    out[:, pos:] = next_id + np.arange(n - pos)
    return out


def get_rope_index(input_ids: np.ndarray, config: ModelConfig, *, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, attention_mask: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """3-D position ids [3, B, T] and rope deltas [B] for a (padded) batch, as transformers' `get_rope_index`.

    Grids are consumed across the batch in order. Padded positions (attention_mask == 0) get id 1.
    """
    input_ids = np.asarray(input_ids)
    b, n = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) == 1
    images = [] if image_grid_thw is None else [tuple(map(int, g)) for g in np.asarray(image_grid_thw)]
    videos = [] if video_grid_thw is None else [tuple(map(int, g)) for g in np.asarray(video_grid_thw)]
    spg = None if second_per_grid_ts is None else [float(s) for s in np.asarray(second_per_grid_ts)]
    pos = np.ones((3, b, n), np.int64)
    deltas = np.zeros((b,), np.int64)
    img_used = vid_used = 0
    for i in range(b):
        toks = input_ids[i][mask[i]]
        follow = toks[np.flatnonzero(toks[:-1] == config.vision_start_token_id) + 1]
        n_img = int(np.sum(follow == config.image_token_id))
        n_vid = int(np.sum(follow == config.video_token_id))
        ids = sequence_rope_index(toks, config, images[img_used:img_used + n_img], videos[vid_used:vid_used + n_vid],
                                  None if spg is None else spg[vid_used:vid_used + n_vid])
        img_used += n_img
        vid_used += n_vid
        pos[:, i, mask[i]] = ids
        deltas[i] = (ids.max() + 1 if ids.size else 0) - n
    return pos, deltas


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


__all__ = ["get_rope_index", "sequence_rope_index", "mrope_cos_sin", "apply_rotary", "text_positions",
           "rotate_half"]
