"""Grain pipeline from pre-decoded shards to packed, fixed-shape training batches.

Records (`data/records.py`) are read with Grain's ArrayRecord source (`ShardRecords`: a read error names
the shard file), split by process (record i goes to
process i % process_count), shuffled with a seed (a new order each epoch), and turned into samples: frames
normalised and patchified as the video processor does, the Qwen2.5-VL chat template with the video pads
expanded, labels on the answer tokens, and mRoPE ids from `nsa_jax.processing.get_rope_index`. Samples are then
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

A sample that does not fit (more tokens than `seq_len` or more pixel rows than `max_patches`) is skipped, or
with `too_long="truncate"` cut to `seq_len` tokens when its video tokens and an answer token remain; the
iterator counts both (`fit_counts` of its state) and raises `SkipBudgetError` once more than
`max_skip_fraction` of the samples drawn (at least of one epoch) were skipped.

An exhausted finite dataset (`num_epochs`) ends with a partially filled batch. The iterator is a Grain
`DatasetIterator`: `get_state()` is a small JSON-able dict and `set_state` resumes exactly; save it with
the model checkpoint (e.g. through `orbax_save_args` / `orbax_restore_args`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from data.errors import DataError
from data.records import decode_record
from data.shards import ShardError
from nsa_jax import processing
from nsa_jax.chat import IGNORE, encode_chat
from nsa_jax.tokenizer import ENDOFTEXT, VIDEO_PAD, VISION_END, VISION_START, Tokenizer

TOO_LONG_POLICIES = ("skip", "truncate")
_LOGGED_SKIPS = 5  # skips logged one by one; later ones are only counted
_EXAMPLES = 5  # reasons of skipped samples kept for the error message

log = logging.getLogger(__name__)


class SampleTooLongError(DataError):
    """A sample that does not fit the configured sequence length or pixel budget."""


class SkipBudgetError(SampleTooLongError):
    """More samples skipped than `max_skip_fraction` allows."""


def check_tokenizer(tokenizer: Tokenizer, config: processing.PromptTokens) -> None:
    """Raises DataError unless the tokenizer's vision tokens have the ids the model config expects."""
    expected = {VISION_START: config.vision_start_token_id, VISION_END: config.vision_end_token_id,
                VIDEO_PAD: config.video_token_id}
    wrong = {t: (tokenizer.special_ids.get(t), i) for t, i in expected.items() if tokenizer.special_ids.get(t) != i}
    if wrong:
        raise DataError("the tokenizer's vision tokens do not match the model config (token: tokenizer id, "
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


def make_sample(record: dict[str, Any], config: processing.PromptTokens, tokenizer: Tokenizer) -> dict[str, Any]:
    """One record -> token ids, labels, mRoPE ids [3, n], pixel rows, grid and second_per_grid_t."""
    # Frames are already resized (predecode); normalise as the video processor does (fused rescale + norm).
    pixels, grid = processing.patchify(processing.normalize(record["frames"], fused=True))
    ids, answer = encode_chat(tokenizer, record_messages(record["conversations"]), video_grid_thw=[grid],
                              merge_size=config.vision.spatial_merge_size)
    spg = float(record["second_per_grid_t"])
    positions, _ = processing.get_rope_index(ids[None], config, video_grid_thw=[grid], second_per_grid_ts=[spg])
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

    def misfit(self, sample: dict[str, Any]) -> str | None:
        """Why the sample does not fit a batch ("sample ID: ..."), or None."""
        n, p = len(sample["input_ids"]), len(sample["pixels"])
        if p > self.max_patches:
            return f"sample {sample['id']}: {p} pixel rows > max_patches={self.max_patches}"
        if n > self.seq_len:
            return f"sample {sample['id']}: {n} tokens > seq_len={self.seq_len}"
        return None


@dataclasses.dataclass(frozen=True)
class FitPolicy:
    """What happens to a sample that does not fit: `too_long` "skip" or "truncate" (to seq_len tokens, when
    every video token and an answer token remain; else skipped); more than `max_skip_fraction` of the
    samples drawn, and at least of `num_samples` (one epoch), skipped raises SkipBudgetError."""

    too_long: str = "skip"
    max_skip_fraction: float = 0.0
    num_samples: int = 0
    video_token_id: int = -1

    def __post_init__(self):
        if self.too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"too_long={self.too_long!r}: expected one of {TOO_LONG_POLICIES}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction={self.max_skip_fraction}: expected a fraction in [0, 1]")

    def truncated(self, sample: dict[str, Any], seq_len: int) -> dict[str, Any] | None:
        """The sample cut to `seq_len` tokens, or None if that would cut a video token or every answer token."""
        ids, labels = sample["input_ids"], sample["labels"]
        video = ids == self.video_token_id
        if video[seq_len:].any() or not (labels[1:seq_len] != IGNORE).any():
            return None
        return sample | {"input_ids": ids[:seq_len], "labels": labels[:seq_len],
                         "position_ids": sample["position_ids"][:, :seq_len]}


def check_lengths(lengths: Sequence[Sequence[Any]], *, seq_len: int, max_patches: int, merge_size: int,
                  max_skip_fraction: float) -> list[str]:
    """Reasons of the samples that fit no batch whatever the tokenizer (more pixel rows than `max_patches` or
    more video tokens than `seq_len`), from a manifest's `[id, pixel rows, text bytes]` rows; raises
    SkipBudgetError when they are more than `max_skip_fraction` of all."""
    reasons = []
    for sample_id, patches, _ in lengths:
        if patches > max_patches:
            reasons.append(f"sample {sample_id}: {patches} pixel rows > max_patches={max_patches}")
        elif patches // merge_size ** 2 > seq_len:
            reasons.append(f"sample {sample_id}: {patches // merge_size ** 2} video tokens > seq_len={seq_len}")
    if len(reasons) > max_skip_fraction * len(lengths):
        raise SkipBudgetError(f"{len(reasons)} of {len(lengths)} samples can never fit, more than "
                              f"max_skip_fraction={max_skip_fraction} allows; e.g. {'; '.join(reasons[:_EXAMPLES])}")
    return reasons


def fit_counts(state: dict[str, Any]) -> dict[str, int]:
    """{"skipped_samples", "truncated_samples"} of a PackedBatchIterator state (empty for other states)."""
    if not isinstance(state, dict) or "skipped" not in state:
        return {}
    return {"skipped_samples": state["skipped"], "truncated_samples": state["truncated"]}


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
    state from before that sample was drawn, so a restored iterator draws it again. Samples that fit no
    batch are handled by `policy` (see FitPolicy) and counted in the state.
    """

    def __init__(self, parent: grain.DatasetIterator, spec: PackSpec, policy: FitPolicy = FitPolicy()):
        super().__init__(parent)
        self._spec, self._policy = spec, policy
        self._pending: dict[str, Any] | None = None
        self._pending_state: dict[str, Any] | None = None  # the state from before the pending sample was drawn
        self._counts = {"drawn": 0, "skipped": 0, "truncated": 0}
        self._examples: list[str] = []

    def _fitting(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        """The sample as it goes into a batch (maybe truncated), or None when it is skipped."""
        self._counts["drawn"] += 1
        reason = self._spec.misfit(sample)
        if reason is None:
            return sample
        if self._policy.too_long == "truncate" and len(sample["pixels"]) <= self._spec.max_patches:
            cut = self._policy.truncated(sample, self._spec.seq_len)
            if cut is not None:
                self._counts["truncated"] += 1
                return cut
        self._skip(reason)
        return None

    def _skip(self, reason: str) -> None:
        """Counts a skipped sample; raises SkipBudgetError past the policy's fraction."""
        c, policy = self._counts, self._policy
        c["skipped"] += 1
        self._examples = (self._examples + [reason])[-_EXAMPLES:]
        limit = policy.max_skip_fraction * max(c["drawn"], policy.num_samples)
        if c["skipped"] > limit:
            raise SkipBudgetError(
                f"{c['skipped']} of {c['drawn']} samples drawn do not fit and were skipped, more than "
                f"max_skip_fraction={policy.max_skip_fraction} of max({c['drawn']}, {policy.num_samples} samples "
                f"an epoch) allows; raise data.seq_len / data.max_patches, set data.too_long='truncate', or "
                f"raise data.max_skip_fraction; e.g. {'; '.join(self._examples)}")
        if c["skipped"] <= _LOGGED_SKIPS:
            log.warning("skipping %s (too_long=%s)%s", reason, policy.too_long,
                        "; further skips are only counted" if c["skipped"] == _LOGGED_SKIPS else "")

    def _peek(self) -> dict[str, Any] | None:
        """The next fitting sample without consuming it; None at the end of the data."""
        while self._pending is None:
            state = self._state_now()
            try:
                sample = self._fitting(next(self._parent))
            except StopIteration:
                return None
            if sample is not None:
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

    def _state_now(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), **self._counts, "examples": list(self._examples)}

    def get_state(self) -> dict[str, Any]:
        return self._pending_state if self._pending is not None else self._state_now()

    @staticmethod
    def counters_of(state: dict[str, Any]) -> dict[str, int]:
        """The counters a trainer logs from a state of this iterator (`fit_counts`)."""
        return fit_counts(state)

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = self._pending_state = None
        self._counts = {k: int(state.get(k, 0)) for k in self._counts}  # states saved before counting lack them
        self._examples = list(state.get("examples", []))


class PackedBatchDataset(grain.IterDataset):
    """`IterDataset` of packed batches over an `IterDataset` of samples."""

    def __init__(self, parent: grain.IterDataset, spec: PackSpec, policy: FitPolicy = FitPolicy()):
        super().__init__(parent)
        self._spec, self._policy = spec, policy

    def __iter__(self) -> PackedBatchIterator:
        return PackedBatchIterator(self._parent.__iter__(), self._spec, self._policy)


class ShardRecords:
    """The decoded records of ArrayRecord shards, by global index; a failure to read or parse one raises
    ShardError naming its file and position."""

    def __init__(self, shard_paths: Sequence[str]):
        self._paths = list(shard_paths)
        self._sources = []
        for path in self._paths:
            try:
                self._sources.append(grain.sources.ArrayRecordDataSource(path))
            except Exception as e:  # noqa: BLE001 - any failure to open is reported with the file
                raise ShardError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from e
        self._ends = list(itertools.accumulate(len(source) for source in self._sources))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard = bisect.bisect_right(self._ends, index)
        position = index - (self._ends[shard - 1] if shard else 0)
        try:
            return decode_record(self._sources[shard][position])
        except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file
            raise ShardError(f"{self._paths[shard]}: record {position} is unreadable ({type(e).__name__}: "
                             f"{str(e)[:300]}); run launch/predecode.py into a new --out_dir") from e


def _process_records(shard_paths: Sequence[str], process_index: int, process_count: int) -> grain.MapDataset:
    """This process's decoded records, in file order."""
    return grain.MapDataset.source(ShardRecords(shard_paths))[process_index::process_count]


def samples(shard_paths: Sequence[str], config: processing.PromptTokens, tokenizer: Tokenizer, *, seed: int = 0,
            process_index: int = 0, process_count: int = 1, num_epochs: int | None = None) -> grain.MapDataset:
    """This process's samples (before packing), shuffled; endless unless `num_epochs` is given."""
    check_tokenizer(tokenizer, config)
    ds = _process_records(shard_paths, process_index, process_count).shuffle(seed=seed).repeat(num_epochs)
    return ds.map(lambda record: make_sample(record, config, tokenizer))


def dataset(shard_paths: Sequence[str], config: processing.PromptTokens, tokenizer: Tokenizer, *, batch_size: int,
            seq_len: int, max_patches: int, samples_per_row: int = 1, seed: int = 0, process_index: int = 0,
            process_count: int = 1, num_epochs: int | None = None, num_threads: int = 2,
            prefetch: int = 8, too_long: str = "skip", max_skip_fraction: float = 0.0) -> PackedBatchDataset:
    """The Grain dataset of packed batches for this process; `num_threads` prepare samples ahead, at most
    `prefetch` of them; `too_long` and `max_skip_fraction` as in FitPolicy (the default: stop at the first
    sample that does not fit)."""
    spec = PackSpec(batch_size=batch_size, seq_len=seq_len, max_patches=max_patches,
                    samples_per_row=samples_per_row, patch_dim=config.vision.patch_dim,
                    pad_id=tokenizer.special_ids[ENDOFTEXT])
    num_samples = len(_process_records(shard_paths, process_index, process_count))
    if not num_samples:
        raise DataError(f"{os.path.dirname(shard_paths[0])}: process {process_index} of {process_count} gets no "
                        "record (fewer records than processes)")
    policy = FitPolicy(too_long=too_long, max_skip_fraction=max_skip_fraction, video_token_id=config.video_token_id,
                       num_samples=num_samples)
    ds = samples(shard_paths, config, tokenizer, seed=seed, process_index=process_index,
                 process_count=process_count, num_epochs=num_epochs)
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return PackedBatchDataset(ds.to_iter_dataset(read), spec, policy)


def training_batches(d: Any, config: processing.PromptTokens, tokenizer: Tokenizer, *, process_index: int,
                     process_count: int) -> PackedBatchIterator:
    """One process's batches of a training config's `data` section over the shards in `d.shards_dir` (the
    trainer's `make_shard_batches`): checks the shards and the manifest's sample lengths first."""
    from data.shards import Manifest, shard_paths
    paths = shard_paths(d.shards_dir)
    manifest = Manifest.load(d.shards_dir)
    max_patches = d.max_patches // process_count
    misfits = check_lengths([row for i in sorted(manifest.shards) for row in manifest.shards[i].samples],
                            seq_len=d.seq_len, max_patches=max_patches, merge_size=config.vision.spatial_merge_size,
                            max_skip_fraction=d.max_skip_fraction)
    if misfits:
        log.warning("%d samples of %s never fit and will be skipped, e.g. %s", len(misfits), d.shards_dir,
                    "; ".join(misfits[:5]))
    return batches(paths, config, tokenizer, batch_size=d.batch_size // process_count, seq_len=d.seq_len,
                   max_patches=max_patches, samples_per_row=d.samples_per_row, seed=d.seed,
                   process_index=process_index, process_count=process_count, too_long=d.too_long,
                   max_skip_fraction=d.max_skip_fraction)


def batches(shard_paths: Sequence[str], config: processing.PromptTokens, tokenizer: Tokenizer,
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
