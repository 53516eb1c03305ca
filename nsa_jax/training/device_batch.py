"""Host batch (numpy, this process's rows) -> the jitted step's batch (global arrays on the mesh)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nsa_jax.config import ModelConfig
from nsa_jax.training.flops import train_step_flops
from nsa_jax.model import VisionInput
from nsa_jax.training.sharding import shard_batch
from nsa_jax.training.vision_batch import padded_vision_layout, with_padding_frames

TOKEN_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")
VISION_KEYS = {"videos": ("pixel_values_videos", "video_grid_thw"), "images": ("pixel_values", "image_grid_thw")}


def global_grid(grid_thw: np.ndarray, num_rows: int, config: ModelConfig) -> np.ndarray:
    """Every process's grids (with its padding frames), in process order: the layout of the global rows."""
    local = with_padding_frames(grid_thw, num_rows, config.vision)
    if jax.process_count() == 1:
        return local
    width = multihost_utils.process_allgather(np.asarray(len(local)))
    padded = np.zeros((int(np.max(width)), 3), np.int64)
    padded[:len(local)] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, 3)
    return gathered[np.all(gathered > 0, axis=1)]


def device_batch(host: Mapping[str, np.ndarray], config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Token arrays sharded over (batch, sequence); pixel rows over the batch axes; layouts replicated."""
    batch: dict[str, Any] = shard_batch({k: host[k] for k in TOKEN_KEYS if k in host}, mesh)
    replicated = NamedSharding(mesh, P())
    for name, (pixel_key, grid_key) in VISION_KEYS.items():
        if pixel_key not in host:
            continue
        rows = np.asarray(host[pixel_key]).shape[0]
        grid = global_grid(host[grid_key], rows, config)
        layout = padded_vision_layout(grid, rows * jax.process_count(), config.vision)
        layout = jax.tree.map(lambda a: jax.device_put(a, replicated), layout)
        pixels = shard_batch({"pixel_values": host[pixel_key]}, mesh)["pixel_values"]
        batch[name] = VisionInput(pixels, layout)
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
