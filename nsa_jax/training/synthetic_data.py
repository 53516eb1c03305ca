"""Deterministic synthetic training batches in the data pipeline's host format, with a savable state.

Each row is one sample filling the whole row: text prompt, <vision_start>, the video's placeholder tokens,
<vision_end>, then an answer that repeats the prompt (learnable by attention). Labels are the answer
tokens (-100 elsewhere). Batch `step` depends only on (seed, step), so the iterator state is the step.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from nsa_jax.config import ModelConfig
from nsa_jax.processing import get_rope_index
from nsa_jax.chat import IGNORE


class SyntheticBatches(Iterator[dict[str, np.ndarray]]):
    """Host batches: input_ids, labels [B, T], position_ids [3, B, T], pixel_values_videos [N, D] and
    video_grid_thw [B, 3] (one video per row; pixel rows padded with zeros to max_patches)."""

    def __init__(self, config: ModelConfig, *, batch_size: int, seq_len: int, video_grid: Sequence[int],
                 max_patches: int, seed: int = 0, poison_steps: Sequence[int] = (), text_vocab: int = 0):
        """text_vocab: prompt words are ids 1 .. text_vocab - 1 (0 = every id below the special tokens)."""
        self.cfg, self.batch_size, self.seq_len = config, batch_size, seq_len
        self.text_vocab = text_vocab or config.vision_start_token_id - 1
        if not 2 <= self.text_vocab <= config.vision_start_token_id - 1:
            raise ValueError(f"text_vocab={text_vocab}: expected 2 .. {config.vision_start_token_id - 1}")
        self.grid = np.asarray(video_grid, np.int64)
        self.max_patches, self.seed, self.poison = max_patches, seed, set(poison_steps)
        patches = batch_size * int(self.grid.prod())
        if patches > max_patches:
            raise ValueError(f"{batch_size} videos of grid {tuple(self.grid)} need {patches} pixel rows "
                             f"> max_patches={max_patches}")
        self.video_tokens = int(self.grid.prod()) // config.vision.spatial_merge_size**2
        self.text = seq_len - self.video_tokens - 2
        if self.text < 4:
            raise ValueError(f"seq_len={seq_len} leaves no room for text after {self.video_tokens} video tokens")
        self.step = 0

    def get_state(self) -> dict[str, int]:
        return {"step": self.step}

    def set_state(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def batch(self, step: int) -> dict[str, np.ndarray]:
        cfg, b = self.cfg, self.batch_size
        rng = np.random.default_rng([self.seed, step])
        prompt = self.text // 2
        answer = self.text - prompt
        words = rng.integers(1, self.text_vocab, size=(b, prompt))
        ids = np.concatenate([words, np.full((b, 1), cfg.vision_start_token_id),
                              np.full((b, self.video_tokens), cfg.video_token_id),
                              np.full((b, 1), cfg.vision_end_token_id), np.resize(words, (b, answer))], axis=1)
        labels = np.full_like(ids, IGNORE)
        labels[:, -answer:] = ids[:, -answer:]
        grid = np.repeat(self.grid[None], b, axis=0)
        positions, _ = get_rope_index(ids, cfg, video_grid_thw=grid, second_per_grid_ts=[0.5] * b)
        pixels = np.zeros((self.max_patches, cfg.vision.patch_dim), np.float32)
        real = b * int(self.grid.prod())
        pixels[:real] = rng.standard_normal((real, cfg.vision.patch_dim), dtype=np.float32)
        if step in self.poison:
            pixels[:real] = np.nan
        return {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32),
                "position_ids": np.asarray(positions, np.int32), "pixel_values_videos": pixels,
                "video_grid_thw": grid.astype(np.int32)}
