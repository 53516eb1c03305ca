"""Grain pipeline from pre-decoded shards to packed, fixed-shape training batches.

Records (`data/records.py`) are read with Grain's ArrayRecord source, split by process (record i goes to
process i % process_count), shuffled with a seed (a new order each epoch), and turned into samples: frames
normalised and patchified as the video processor does, the Qwen2.5-VL chat template with the video pads
expanded, labels on the answer tokens, and mRoPE ids from `nsa_jax.rope.get_rope_index`. Samples are then
packed in order into the rows of a batch: a row takes samples while its tokens fit `seq_len` and it holds
fewer than `samples_per_row`; the batch takes samples while rows remain and its pixel rows fit
`max_patches`. With `samples_per_row=1` every row holds one sample.

Batch format (numpy, fixed shapes for a given configuration, so a jitted step never recompiles;
B = batch_size, L = seq_len, V = B * samples_per_row):

    input_ids            int32   [B, L]       padded with <|endoftext|>
    labels               int32   [B, L]       the token itself on answer tokens (each assistant answer and
                                              its <|im_end|>), -100 elsewhere (Hugging Face convention:
                                              position t predicts labels[t + 1])
    segment_ids          int32   [B, L]       1, 2, ... for the samples of a row in order; 0 on padding
    position_ids         int32   [3, B, L]    mRoPE (t, h, w) ids, restarting at 0 for each sample; 0 on padding
    pixel_values_videos  float32 [max_patches, 3*2*14*14]  the patch rows of every video of the batch, in
                                              row-major sample order, zero padded at the end
    video_grid_thw       int32   [V, 3]       (t, h, w) patch grid of each video in the same order; row
                                              r's samples take slots r*samples_per_row ..., unused slots are 0
    second_per_grid_ts   float32 [V]          seconds per temporal patch of each video, 0 for unused slots

An exhausted finite dataset (`num_epochs`) ends with a partially filled batch. The iterator is a Grain
`DatasetIterator`: `get_state()` is a small JSON-able dict and `set_state` resumes exactly; save it with
the model checkpoint (e.g. through `orbax_save_args` / `orbax_restore_args`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from data.records import decode_record
from nsa_jax import processing
from nsa_jax.chat import encode_chat
from nsa_jax.config import ModelConfig
from nsa_jax.rope import get_rope_index
from nsa_jax.tokenizer import ENDOFTEXT, VIDEO_PAD, VISION_END, VISION_START, Tokenizer

IGNORE = -100


class SampleTooLongError(ValueError):
    """A sample that does not fit the configured sequence length or pixel budget."""


def check_tokenizer(tokenizer: Tokenizer, config: ModelConfig) -> None:
    """Raises ValueError unless the tokenizer's vision tokens have the ids the model config expects."""
    expected = {VISION_START: config.vision_start_token_id, VISION_END: config.vision_end_token_id,
                VIDEO_PAD: config.video_token_id}
    wrong = {t: (tokenizer.special_ids.get(t), i) for t, i in expected.items() if tokenizer.special_ids.get(t) != i}
    if wrong:
        raise ValueError("the tokenizer's vision tokens do not match the model config (token: tokenizer id, "
                         f"config id): {wrong}; the video features would never reach the model")


def record_messages(conversations: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
    """LLaVA-Video turns (`<video>` in a human turn) -> chat messages, the video item first in its turn."""
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
    """One record -> token ids, labels, mRoPE ids [3, n], pixel rows, grid and second_per_grid_t."""
    # Frames are already resized (predecode); normalise as the video processor does (fused rescale + norm).
    pixels, grid = processing.patchify(processing.normalize(record["frames"], fused=True))
    ids, answer = encode_chat(tokenizer, record_messages(record["conversations"]), video_grid_thw=[grid],
                              merge_size=config.vision.spatial_merge_size)
    spg = float(record["second_per_grid_t"])
    positions, _ = get_rope_index(ids[None], config, video_grid_thw=[grid], second_per_grid_ts=[spg])
    return {"id": record["id"], "input_ids": np.asarray(ids, np.int32),
            "labels": np.where(answer, ids, IGNORE).astype(np.int32),
            "position_ids": positions[:, 0].astype(np.int32), "pixels": pixels,
            "grid": np.asarray(grid, np.int32), "second_per_grid_t": spg}


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Shapes of a packed batch (see the module docstring)."""

    batch_size: int
    seq_len: int
    max_patches: int
    samples_per_row: int
    patch_dim: int
    pad_id: int

    def check_fits(self, sample: dict[str, Any]) -> None:
        n, p = len(sample["input_ids"]), len(sample["pixels"])
        if n > self.seq_len:
            raise SampleTooLongError(f"sample {sample['id']}: {n} tokens > seq_len={self.seq_len}")
        if p > self.max_patches:
            raise SampleTooLongError(f"sample {sample['id']}: {p} pixel rows > max_patches={self.max_patches}")


def collate(rows: Sequence[Sequence[dict[str, Any]]], spec: PackSpec) -> dict[str, np.ndarray]:
    """Rows of samples (at most batch_size rows, each fitting seq_len) -> one batch of fixed shapes."""
    b, length, per_row = spec.batch_size, spec.seq_len, spec.samples_per_row
    batch = {
        "input_ids": np.full((b, length), spec.pad_id, np.int32),
        "labels": np.full((b, length), IGNORE, np.int32),
        "segment_ids": np.zeros((b, length), np.int32),
        "position_ids": np.zeros((3, b, length), np.int32),
        "pixel_values_videos": np.zeros((spec.max_patches, spec.patch_dim), np.float32),
        "video_grid_thw": np.zeros((b * per_row, 3), np.int32),
        "second_per_grid_ts": np.zeros((b * per_row,), np.float32),
    }
    patch = 0
    for r, samples in enumerate(rows):
        token = 0
        for s, sample in enumerate(samples):
            n, p = len(sample["input_ids"]), len(sample["pixels"])
            span = slice(token, token + n)
            batch["input_ids"][r, span] = sample["input_ids"]
            batch["labels"][r, span] = sample["labels"]
            batch["segment_ids"][r, span] = s + 1
            batch["position_ids"][:, r, span] = sample["position_ids"]
            batch["pixel_values_videos"][patch:patch + p] = sample["pixels"]
            batch["video_grid_thw"][r * per_row + s] = sample["grid"]
            batch["second_per_grid_ts"][r * per_row + s] = sample["second_per_grid_t"]
            token += n
            patch += p
    return batch


class PackedBatchIterator(grain.DatasetIterator):
    """Packs the samples of a parent iterator into batches, in order (see the module docstring).

    A sample that does not fit the current batch waits for the next one; the state then is the parent's
    state from before that sample was drawn, so a restored iterator draws it again.
    """

    def __init__(self, parent: grain.DatasetIterator, spec: PackSpec):
        super().__init__(parent)
        self._spec = spec
        self._pending: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None

    def _peek(self) -> dict[str, Any] | None:
        """The next sample without consuming it; None at the end of the data."""
        if self._pending is None:
            state = self._parent.get_state()
            try:
                sample = next(self._parent)
            except StopIteration:
                return None
            self._spec.check_fits(sample)
            self._pending, self._pending_state = sample, state
        return self._pending

    def __next__(self) -> dict[str, np.ndarray]:
        spec = self._spec
        rows: list[list[dict[str, Any]]] = [[]]
        row_tokens = patches = 0
        while (sample := self._peek()) is not None:
            n, p = len(sample["input_ids"]), len(sample["pixels"])
            if patches + p > spec.max_patches:
                break
            if len(rows[-1]) == spec.samples_per_row or row_tokens + n > spec.seq_len:
                if len(rows) == spec.batch_size:
                    break
                rows.append([])
                row_tokens = 0
            rows[-1].append(sample)
            row_tokens += n
            patches += p
            self._pending = None
        if not rows[0]:
            raise StopIteration
        return collate(rows, spec)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None


class PackedBatchDataset(grain.IterDataset):
    """`IterDataset` of packed batches over an `IterDataset` of samples."""

    def __init__(self, parent: grain.IterDataset, spec: PackSpec):
        super().__init__(parent)
        self._spec = spec

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self._spec)


def samples(shard_paths: Sequence[str], config: ModelConfig, tokenizer: Tokenizer, *, seed: int = 0,
            process_index: int = 0, process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
    """This process's samples (before packing), shuffled; endless unless `num_epochs` is given."""
    check_tokenizer(tokenizer, config)
    ds = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(list(shard_paths)))
    ds = ds[process_index::process_count].shuffle(seed=seed).repeat(num_epochs)
    return ds.map(lambda data: make_sample(decode_record(data), config, tokenizer))


def dataset(shard_paths: Sequence[str], config: ModelConfig, tokenizer: Tokenizer, *, batch_size: int,
            seq_len: int, max_patches: int, samples_per_row: int = 1, seed: int = 0, process_index: int = 0,
            process_count: int = 1, num_epochs: int | None = None, num_threads: int = 2,
            prefetch: int = 8) -> PackedBatchDataset:
    """The Grain dataset of packed batches for this process; `num_threads` prepare samples ahead, at most
    `prefetch` of them."""
    spec = PackSpec(batch_size=batch_size, seq_len=seq_len, max_patches=max_patches,
                    samples_per_row=samples_per_row, patch_dim=config.vision.patch_dim,
                    pad_id=tokenizer.special_ids[ENDOFTEXT])
    ds = samples(shard_paths, config, tokenizer, seed=seed, process_index=process_index,
                 process_count=process_count, num_epochs=num_epochs)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return PackedBatchDataset(ds.to_iter_dataset(read), spec)


def batches(shard_paths: Sequence[str], config: ModelConfig, tokenizer: Tokenizer,
            **kw: Any) -> PackedBatchIterator:
    """An iterator of packed batches with `get_state` / `set_state` (arguments as `dataset`)."""
    return iter(dataset(shard_paths, config, tokenizer, **kw))


def orbax_save_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax args that save the iterator's state as an item of a composite checkpoint, e.g.
    `manager.save(step, args=ocp.args.Composite(params=..., data=orbax_save_args(it)))`."""
    return grain.checkpoint.CheckpointSave(iterator)


def orbax_restore_args(iterator: grain.DatasetIterator) -> Any:
    """Orbax args that restore a saved state into `iterator` (a freshly built one of the same pipeline)."""
    return grain.checkpoint.CheckpointRestore(iterator)
