"""Shard files and the manifest of a pre-decoded dataset directory.

A directory written by `launch/predecode.py` holds, for dataset `video_qa_frames` and split `train`:

    video_qa_frames-train.array_record-00000-of-00012   ArrayRecord shards of `data.records` (TFDS naming)
    manifest.json                                      settings; per shard: records, failures, sample lengths
    failures.jsonl                                     one line per video that could not be decoded
    dataset_info.json, features.json                   TFDS metadata, written once every shard is done
    .predecode.lock                                    locked by the predecode run writing the directory

A shard is written under a temporary name and renamed when complete, then recorded in the manifest with
its size and record count; `verify_shard` checks a file against them (before training, and when predecode
resumes), so a deleted, truncated or replaced shard is caught and named.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data.errors import DataError

DATASET_NAME = "video_qa_frames"
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
LOCK = ".predecode.lock"  # held (fcntl) by the predecode run writing the directory
WRITER_OPTIONS = "group_size:1,zstd:1"  # one record per chunk: cheap random access


class ShardError(DataError):
    """A dataset directory, manifest or shard that cannot be used; the message names the file."""


def shard_filename(index: int, num_shards: int, split: str = "train") -> str:
    """TFDS's default file name of shard `index` of `num_shards`."""
    return f"{DATASET_NAME}-{split}.array_record-{index:05d}-of-{num_shards:05d}"


class ShardWriter:
    """Appends serialised records to `<path>.tmp`; `commit` renames it to `path`."""

    def __init__(self, path: str):
        self.path = path
        self._tmp = path + ".tmp"
        self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
        self.num_records = 0

    def write(self, record: bytes) -> None:
        self._writer.write(record)
        self.num_records += 1

    def commit(self) -> int:
        """Closes and renames the file; returns its size in bytes."""
        self._writer.close()
        os.replace(self._tmp, self.path)
        return os.path.getsize(self.path)


def sample_lengths(record: dict[str, Any]) -> list[Any]:
    """A record's row of `ShardInfo.samples`: [id, pixel rows (patches), UTF-8 bytes of its conversation]."""
    text = sum(len(turn["value"].encode()) for turn in record["conversations"])
    return [record["id"], int(np.prod(record["grid_thw"])), text]


@dataclasses.dataclass
class ShardInfo:
    file: str
    num_records: int
    num_bytes: int
    failures: list[dict[str, Any]]  # {"id", "video", "line", "error"} per skipped annotation
    samples: list[list[Any]] = dataclasses.field(default_factory=list)  # sample_lengths of each record, in order


@dataclasses.dataclass
class Manifest:
    """What a dataset directory was made from, and which shards are done."""

    annotations: str
    annotations_sha256: str  # of the annotation file's bytes: other content, same count, is not reused
    video_root: str
    settings: dict[str, Any]  # decoding settings: fps, frame and pixel bounds
    num_annotations: int
    shard_size: int
    split: str = "train"
    shards: dict[int, ShardInfo] = dataclasses.field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return -(-self.num_annotations // self.shard_size)

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards

    def shard_range(self, index: int) -> range:
        """Indices of the annotations that go into shard `index`."""
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.num_annotations))

    def failures(self) -> list[dict[str, Any]]:
        return [f for i in sorted(self.shards) for f in self.shards[i].failures]

    def save(self, out_dir: str) -> None:
        """Writes manifest.json and failures.jsonl atomically."""
        d = dataclasses.asdict(self)
        d["shards"] = {str(i): d["shards"][i] for i in sorted(self.shards)}
        d["dataset_name"], d["num_shards"], d["complete"] = DATASET_NAME, self.num_shards, self.complete
        _write_atomic(os.path.join(out_dir, MANIFEST), json.dumps(d, indent=1))
        _write_atomic(os.path.join(out_dir, FAILURES), "".join(json.dumps(f) + "\n" for f in self.failures()))

    @classmethod
    def load(cls, out_dir: str) -> "Manifest":
        """The manifest of `out_dir`; ShardError naming the file when it is missing or unreadable."""
        path = os.path.join(out_dir, MANIFEST)
        if not os.path.isfile(path):
            raise ShardError(f"{out_dir}: no {MANIFEST}; not a launch/predecode.py output directory")
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ShardError(f"{path}: unreadable manifest ({e})") from None
        shards = {int(i): ShardInfo(**s) for i, s in d.pop("shards").items()}
        fields = {f.name for f in dataclasses.fields(cls)}
        d.setdefault("annotations_sha256", "")  # manifests written before the hash was recorded
        return cls(**{k: v for k, v in d.items() if k in fields}, shards=shards)


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def verify_shard(out_dir: str, info: ShardInfo) -> str | None:
    """What is wrong with a shard file against its manifest entry (missing, size, record count), or None."""
    path = os.path.join(out_dir, info.file)
    if not os.path.isfile(path):
        return f"{path}: missing"
    size = os.path.getsize(path)
    if size != info.num_bytes:
        return f"{path}: {size} bytes, the manifest says {info.num_bytes} (truncated or replaced)"
    try:
        reader = ArrayRecordReader(path)
        count = reader.num_records()
        reader.close()
    except Exception as e:  # noqa: BLE001 - any failure to open is reported with the file
        return f"{path}: unreadable ({type(e).__name__}: {e})"
    if count != info.num_records:
        return f"{path}: {count} records, the manifest says {info.num_records}"
    return None


def shard_paths(out_dir: str) -> list[str]:
    """Paths of all shards of a completed dataset directory, in order, each checked by `verify_shard`;
    raises ShardError naming what is wrong."""
    manifest = Manifest.load(out_dir)
    if not manifest.complete:
        raise ShardError(f"{out_dir}: only {len(manifest.shards)} of {manifest.num_shards} shards are done; "
                         "run launch/predecode.py again to finish it")
    bad = [p for p in (verify_shard(out_dir, manifest.shards[i]) for i in range(manifest.num_shards)) if p]
    if bad:
        raise ShardError(f"{len(bad)} of {manifest.num_shards} shards do not match {os.path.join(out_dir, MANIFEST)}"
                         f": {'; '.join(bad[:5])}; run launch/predecode.py again to rewrite them")
    if not sum(s.num_records for s in manifest.shards.values()):
        raise ShardError(f"{out_dir}: no records: all {manifest.num_annotations} videos failed to decode "
                         f"(see {os.path.join(out_dir, FAILURES)})")
    return [os.path.join(out_dir, manifest.shards[i].file) for i in range(manifest.num_shards)]
