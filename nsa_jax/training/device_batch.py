"""Host batch (numpy, this process's rows) -> the jitted step's batch (global arrays on the mesh)."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nsa_jax.config import ModelConfig
from nsa_jax.model import VisionInput
from nsa_jax.training.flops import train_step_flops
from nsa_jax.sharding import LOGICAL_RULES, named, shard_batch
from nsa_jax.training.vision_batch import host_chunks, token_order

TOKEN_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")
VISION_KEYS = {"videos": ("pixel_values_videos", "video_grid_thw"), "images": ("pixel_values", "image_grid_thw")}


def patch_chunks(mesh: Mesh) -> int:
    """Chunks of whole frames a batch's pixel rows are split into: one per device over the patch axes."""
    return int(np.prod([mesh.shape[a] for a in LOGICAL_RULES["patches"]]))


def _allgather(values: np.ndarray) -> np.ndarray:
    """[processes, n]: every process's int vector (this process's alone when single-process)."""
    values = np.asarray(values, np.int64).reshape(-1)
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)


def vision_input(pixels: np.ndarray, grid_thw: np.ndarray, config: ModelConfig, mesh: Mesh) -> VisionInput:
    """This process's pixel rows as chunks of whole frames ([C, R, D] globally, C over the patch axes), each
    chunk with its own layout, and the order of merged tokens that puts every real one first, in order.

    The processes agree on the chunk size and the layouts' padded shapes, so the arrays are global."""
    vision, count = config.vision, jax.process_count()
    chunks = patch_chunks(mesh)
    if chunks % count:
        raise ValueError(f"{chunks} pixel-row chunks (devices over {LOGICAL_RULES['patches']}) do not split "
                         f"over {count} processes")
    local = chunks // count
    chunked, layout, real = host_chunks(pixels, grid_thw, local, vision)
    if count > 1:  # one chunk size and one padded layout shape for all processes
        own = np.asarray([chunked.shape[1], *layout.window_segments.gather.shape[1:],
                          *layout.frame_segments.gather.shape[1:]])
        agreed = _allgather(own).max(axis=0)
        if np.any(agreed != own):
            chunked, layout, real = host_chunks(pixels, grid_thw, local, vision, min_rows=int(agreed[0]),
                                                min_segments=tuple(int(d) for d in agreed[1:]))
    order = token_order(_allgather(real).reshape(-1), chunked.shape[1] // vision.spatial_merge_size**2)
    place = lambda a: jax.make_array_from_process_local_data(
        named(mesh, "patches", *([None] * (a.ndim - 1)), shape=(a.shape[0] * count,) + a.shape[1:]), a)
    pixel_values = place(chunked)
    mine = range(jax.process_index() * local, (jax.process_index() + 1) * local)
    for shard in pixel_values.addressable_shards:  # the token order assumes process-major chunks
        held = range(chunks)[shard.index[0]]
        if held[0] not in mine or held[-1] not in mine:
            raise ValueError(f"mesh {dict(mesh.shape)}: process {jax.process_index()}'s devices do not hold "
                             f"pixel-row chunks {mine.start}..{mine.stop - 1}; order the devices process-major")
    return VisionInput(pixel_values, jax.tree.map(place, layout), jax.device_put(order, NamedSharding(mesh, P())))


def device_batch(host: Mapping[str, np.ndarray], config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """Token arrays sharded over (batch, sequence); pixel rows in chunks of whole frames over the patch axes."""
    batch: dict[str, Any] = shard_batch({k: host[k] for k in TOKEN_KEYS if k in host}, mesh)
    for name, (pixel_key, grid_key) in VISION_KEYS.items():
        if pixel_key in host:
            batch[name] = vision_input(np.asarray(host[pixel_key]), host[grid_key], config, mesh)
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
