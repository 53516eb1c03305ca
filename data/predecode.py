"""The pre-decoding job: annotations + videos -> ArrayRecord shards of sampled, resized frames.

Videos are decoded in a process pool (ordered, one task per annotation); the main process streams each
shard's records into a temporary file and renames it when the shard is complete, then records it in the
manifest. A rerun on the same directory skips the shards the manifest lists, after checking each file
against it (a missing or truncated shard is written again), and refuses a directory made from another
annotation file content or settings; a second run on a directory another one is writing stops at once
(`.predecode.lock`). A video that cannot be
decoded is logged, listed in `failures.jsonl` and skipped; a malformed annotation stops the job before
any decoding with an `AnnotationError` naming the file and line, and a missing annotation file or video
root, an empty annotation list or a bad setting with a `DataError` naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import logging
import multiprocessing
import os
from typing import Any, Callable, Iterator, Sequence

import tqdm

from data import records
from data.annotations import Annotation, load_annotations
from data.decode import DecodeSettings, VideoDecodeError, make_record
from data.errors import DataError
from data.shards import LOCK, Manifest, ShardInfo, ShardWriter, sample_lengths, shard_filename, verify_shard
from data.tfds_builder import write_dataset_info


def _encode_or_fail(annotation: Annotation, video_root: str,
                    settings: DecodeSettings) -> tuple[bytes, list[Any]] | dict[str, Any]:
    """(serialised record, its manifest lengths row), or the failure entry of a video that cannot be decoded."""
    try:
        record = make_record(annotation, video_root, settings)
    except VideoDecodeError as e:
        return {"id": annotation.id, "video": annotation.video, "line": annotation.line, "error": str(e)}
    return records.encode_record(record), sample_lengths(record)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checked_inputs(annotations_path: str, video_root: str, shard_size: int) -> list[Annotation]:
    """The annotations, after checking the arguments; raises DataError naming the one at fault."""
    if shard_size < 1:
        raise DataError(f"shard_size={shard_size}: must be at least 1")
    if not os.path.isdir(video_root):
        raise DataError(f"video_root {video_root}: not a directory")
    annotations = load_annotations(annotations_path)
    if not annotations:
        raise DataError(f"annotation file {annotations_path}: no annotations")
    return annotations


def _open_manifest(out_dir: str, fresh: Manifest) -> Manifest:
    """The directory's manifest if it was made from the same inputs (annotation file content included) and
    settings, without the shards that fail `verify_shard`; `fresh` if there is none; DataError if it was
    made from others."""
    if not os.path.exists(os.path.join(out_dir, "manifest.json")):
        return fresh
    existing = Manifest.load(out_dir)
    keys = ("annotations", "annotations_sha256", "video_root", "settings", "num_annotations", "shard_size", "split")
    diff = [k for k in keys if getattr(existing, k) != getattr(fresh, k)]
    if diff:
        raise DataError(f"{out_dir} holds shards made with other {', '.join(diff)} "
                        f"({', '.join(f'{k}={getattr(existing, k)!r}' for k in diff)}; now "
                        f"{', '.join(f'{k}={getattr(fresh, k)!r}' for k in diff)}); use a new --out_dir")
    for i, info in sorted(existing.shards.items()):
        problem = verify_shard(out_dir, info)
        if problem:
            logging.warning("rewriting shard %d: %s", i, problem)
            del existing.shards[i]
    return existing


def predecode(annotations_path: str, video_root: str, out_dir: str, settings: DecodeSettings = DecodeSettings(),
              *, shard_size: int = 64, num_workers: int = 0, split: str = "train",
              progress: bool = True) -> Manifest:
    """Writes (or finishes) the shards, manifest and TFDS metadata of `out_dir`; returns the manifest.

    `num_workers=0` decodes in this process. One run at a time per directory: a second raises DataError.
    """
    annotations = _checked_inputs(annotations_path, video_root, shard_size)
    os.makedirs(out_dir, exist_ok=True)
    with _exclusive(out_dir):
        manifest = _open_manifest(out_dir, Manifest(
            annotations=os.path.abspath(annotations_path), annotations_sha256=_file_sha256(annotations_path),
            video_root=os.path.abspath(video_root), settings=dataclasses.asdict(settings),
            num_annotations=len(annotations), shard_size=shard_size, split=split))
        work = functools.partial(_encode_or_fail, video_root=video_root, settings=settings)
        _write_shards(out_dir, manifest, annotations, work, num_workers, progress)
        manifest.save(out_dir)
        write_dataset_info(out_dir, manifest)
    return manifest


@contextlib.contextmanager
def _exclusive(out_dir: str) -> Iterator[None]:
    """Holds `out_dir`'s lock file (fcntl) for the block; DataError if another process holds it."""
    path = os.path.join(out_dir, LOCK)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise DataError(f"{out_dir}: another predecode is writing here (lock {path} held by pid "
                            f"{f.read().strip() or '?'}); wait for it to finish or use another --out_dir") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_shards(out_dir: str, manifest: Manifest, annotations: Sequence[Annotation],
                  work: Callable[[Annotation], Any], num_workers: int, progress: bool) -> None:
    """Decodes and writes the shards the manifest lacks, recording each in it as it is done."""
    todo = [i for i in range(manifest.num_shards) if i not in manifest.shards]
    tasks = [annotations[k] for i in todo for k in manifest.shard_range(i)]
    logging.info("predecode: %d annotations, %d of %d shards to write", len(annotations), len(todo),
                 manifest.num_shards)
    with _ordered_map(work, tasks, num_workers) as results, \
            tqdm.tqdm(total=len(tasks), desc="predecode", unit="video", disable=not progress) as bar:
        for shard in todo:
            name = shard_filename(shard, manifest.num_shards, manifest.split)
            writer = ShardWriter(os.path.join(out_dir, name))
            failures, lengths = [], []
            for _ in manifest.shard_range(shard):
                result = next(results)
                if isinstance(result, tuple):
                    writer.write(result[0])
                    lengths.append(result[1])
                else:
                    logging.warning("skipping %s (line %d): %s", result["id"], result["line"], result["error"])
                    failures.append(result)
                bar.update()
            manifest.shards[shard] = ShardInfo(file=name, num_records=writer.num_records,
                                               num_bytes=writer.commit(), failures=failures, samples=lengths)
            manifest.save(out_dir)


@contextlib.contextmanager
def _ordered_map(work: Callable[[Annotation], Any], tasks: Sequence[Annotation],
                 num_workers: int) -> Iterator[Iterator[Any]]:
    """The results of `work` on `tasks` in order, from a spawned process pool or inline."""
    if num_workers <= 0 or not tasks:
        yield map(work, tasks)
        return
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield pool.imap(work, tasks, chunksize=1)
