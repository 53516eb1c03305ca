"""Host batch (numpy, this process's rows) -> the jitted step's batch (global arrays on the mesh)."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nsa_jax.config import ModelConfig
from nsa_jax.model import VisionInput
from nsa_jax.training.flops import train_step_flops
from nsa_jax.training.sharding import shard_batch
from nsa_jax.training.vision_batch import padded_vision_layout
from nsa_jax.vision import VisionLayout

TOKEN_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")
VISION_KEYS = {"videos": ("pixel_values_videos", "video_grid_thw"), "images": ("pixel_values", "image_grid_thw")}


class VisionRows(NamedTuple):
    """Pixel rows as the processes hold them, the order that puts every real row before any padding row,
    and the layout of the rows in that order (the tower's merged tokens then line up with the sequence's
    placeholder tokens, which are in process order)."""

    pixel_values: jax.Array  # [N, D] global, process-major
    row_order: jax.Array  # [N] int32
    layout: VisionLayout

    def ordered(self) -> VisionInput:
        return VisionInput(self.pixel_values[self.row_order], self.layout)


def _allgather_rows(table: np.ndarray) -> list[np.ndarray]:
    """Every process's [n_p, 3] int table (this process's alone when single-process)."""
    if jax.process_count() == 1:
        return [table]
    counts = np.asarray(multihost_utils.process_allgather(np.asarray(len(table)))).reshape(-1)
    padded = np.zeros((int(counts.max()), 3), np.int64)
    padded[:len(table)] = table
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(counts), -1, 3)
    return [g[:n] for g, n in zip(gathered, counts)]


def vision_rows(pixels: np.ndarray, grid_thw: np.ndarray, config: ModelConfig, mesh: Mesh) -> VisionRows:
    """Global pixel rows (sharded over the batch axes) with their real-rows-first order and layout."""
    local_rows = pixels.shape[0]
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    grids = _allgather_rows(grid[np.all(grid > 0, axis=1)])
    real = [int(np.prod(g, axis=1).sum()) for g in grids]
    starts = [p * local_rows for p in range(len(grids))]
    order = np.concatenate([np.arange(s, s + r) for s, r in zip(starts, real)]
                           + [np.arange(s + r, s + local_rows) for s, r in zip(starts, real)]).astype(np.int32)
    layout = padded_vision_layout(np.concatenate(grids), local_rows * len(grids), config.vision)
    replicated = NamedSharding(mesh, P())
    place = lambda a: jax.device_put(a, replicated)
    return VisionRows(shard_batch({"pixel_values": pixels}, mesh)["pixel_values"], place(order),
                      jax.tree.map(place, layout))


def device_batch(host: Mapping[str, np.ndarray], config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Token arrays sharded over (batch, sequence); pixel rows over the batch axes; layouts replicated."""
    batch: dict[str, Any] = shard_batch({k: host[k] for k in TOKEN_KEYS if k in host}, mesh)
    for name, (pixel_key, grid_key) in VISION_KEYS.items():
        if pixel_key in host:
            batch[name] = vision_rows(np.asarray(host[pixel_key]), host[grid_key], config, mesh)
    return batch


def batch_token_counts(host: Mapping[str, np.ndarray], config: ModelConfig) -> list[tuple[int, int]]:
    """(text tokens, vision tokens) of each sample of the batch (rows split by segment ids when packed)."""
    ids = np.asarray(host["input_ids"])
    seg = np.asarray(host.get("segment_ids", np.ones_like(ids)))
    vision = (ids == config.video_token_id) | (ids == config.image_token_id)
    out = []
    for r in range(ids.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            m = seg[r] == s
            v = int(vision[r][m].sum())
            out.append((int(m.sum()) - v, v))
    return out


def batch_flops(host: Mapping[str, np.ndarray], config: ModelConfig) -> float:
    """Model FLOPs of a training step on this host batch: language model per sample + vision tower per grid."""
    total = sum(train_step_flops(config, samples=1, text_tokens=a, vision_tokens=b)
                for a, b in batch_token_counts(host, config))
    for _, grid_key in VISION_KEYS.values():
        for t, h, w in np.asarray(host.get(grid_key, np.zeros((0, 3))), np.int64).reshape(-1, 3):
            if t > 0:
                total += train_step_flops(config, samples=1, text_tokens=0, vision_tokens=0,
                                          patches=int(t * h * w), frame_patches=int(h * w))
    return total
