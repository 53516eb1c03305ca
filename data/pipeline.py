"""Grain pipeline from pre-decoded shards to fixed-shape training batches.

Records (`data/records.py`) are read with Grain's ArrayRecord source, shuffled with a seed, split by
process (record i goes to process i % process_count), turned into samples (patchify through the processor,
the chat template, labels on answer tokens only, mRoPE ids), and batched. One sample fills one row (no
packing yet), so rows need no segment ids.

Batch format (numpy, fixed shapes, the trainer's host format):

    input_ids            int32   [B, seq_len]      padded with <|endoftext|>
    labels               int32   [B, seq_len]      the token where it is learned (answer tokens), else -100
    position_ids         int32   [3, B, seq_len]   mRoPE ids (padding continues as text)
    pixel_values_videos  float32 [max_patches, 1176]  every row's patch rows in order, zero padded
    video_grid_thw       int32   [B, 3]            each row's video grid

The iterator's state (`get_state` / `set_state`) is Grain's, a small dict saved with the model checkpoint.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import grain
import numpy as np

from data.records import decode_record
from nsa_jax import processing
from nsa_jax.chat import encode_chat
from nsa_jax.config import ModelConfig
from nsa_jax.rope import get_rope_index
from nsa_jax.tokenizer import Tokenizer

IGNORE = -100


class SampleTooLongError(ValueError):
    """A sample that does not fit the configured sequence length or pixel budget."""


def record_messages(conversations: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """LLaVA-Video turns (`<video>` in the human text) -> chat messages with a video item."""
    messages = []
    for turn in conversations:
        role = "user" if turn["from"] == "human" else "assistant"
        text = turn["value"]
        if role == "user" and "<video>" in text:
            content = [{"type": "video"}, {"type": "text", "text": text.replace("<video>", "").strip()}]
            messages.append({"role": role, "content": content})
        else:
            messages.append({"role": role, "content": text})
    return messages


def make_sample(record: dict[str, Any], config: ModelConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """One record -> token ids, labels, pixel rows, grid and second_per_grid_t."""
    # Frames are already resized (predecode); normalise as the video processor does (fused rescale + norm).
    pixels, grid = processing.patchify(processing.normalize(record["frames"], fused=True))
    ids, answer = encode_chat(tokenizer, record_messages(record["conversations"]), video_grid_thw=[grid],
                              merge_size=config.vision.spatial_merge_size)
    return {"id": record["id"], "input_ids": np.asarray(ids, np.int32),
            "labels": np.where(answer, ids, IGNORE).astype(np.int32), "pixels": pixels,
            "grid": np.asarray(grid, np.int32), "second_per_grid_t": float(record["second_per_grid_t"])}


def collate(samples: Sequence[dict[str, Any]], config: ModelConfig, *, seq_len: int, max_patches: int,
            pad_id: int) -> dict[str, np.ndarray]:
    """Samples -> one fixed-shape batch (format in the module docstring)."""
    b = len(samples)
    ids = np.full((b, seq_len), pad_id, np.int32)
    labels = np.full((b, seq_len), IGNORE, np.int32)
    pixels = np.zeros((max_patches, config.vision.patch_dim), np.float32)
    offset = 0
    for r, s in enumerate(samples):
        n, p = len(s["input_ids"]), len(s["pixels"])
        if n > seq_len:
            raise SampleTooLongError(f"sample {s['id']}: {n} tokens > seq_len={seq_len}")
        if offset + p > max_patches:
            raise SampleTooLongError(f"sample {s['id']}: the batch's pixel rows exceed max_patches={max_patches}")
        ids[r, :n], labels[r, :n] = s["input_ids"], s["labels"]
        pixels[offset:offset + p] = s["pixels"]
        offset += p
    grids = np.stack([s["grid"] for s in samples])
    positions, _ = get_rope_index(ids, config, video_grid_thw=grids,
                                  second_per_grid_ts=[s["second_per_grid_t"] for s in samples])
    return {"input_ids": ids, "labels": labels, "position_ids": positions.astype(np.int32),
            "pixel_values_videos": pixels, "video_grid_thw": grids}


def dataset(shard_paths: Sequence[str], config: ModelConfig, tokenizer: Tokenizer, *, batch_size: int,
            seq_len: int, max_patches: int, seed: int = 0, process_index: int = 0, process_count: int = 1,
            num_epochs: int | None = None) -> grain.IterDataset:
    """The Grain dataset of batches for this process (endless unless num_epochs is given)."""
    source = grain.sources.ArrayRecordDataSource(list(shard_paths))
    ds = grain.MapDataset.source(source)
    ds = ds[process_index::process_count]
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.map(lambda data: make_sample(decode_record(data), config, tokenizer))
    pad = tokenizer.special_ids["<|endoftext|>"]
    ds = ds.batch(batch_size, drop_remainder=True,
                  batch_fn=lambda s: collate(s, config, seq_len=seq_len, max_patches=max_patches, pad_id=pad))
    return ds.to_iter_dataset()


def batches(shard_paths: Sequence[str], config: ModelConfig, tokenizer: Tokenizer, **kw: Any) -> Iterator:
    """An iterator of batches with `get_state` / `set_state` (see `dataset`)."""
    return iter(dataset(shard_paths, config, tokenizer, **kw))
