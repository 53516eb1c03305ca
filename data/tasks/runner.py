"""The resumable, sharded eval loop: answers a shard's items into a JSONL part file, then merges every part.

Question i goes to shard i % count. Each shard appends one record a line to `<out>.part<i>of<n>.jsonl` and
flushes it, so a killed run loses at most the question it was on; a rerun keeps what `out` and the part file
hold and asks only the rest. A line that does not parse (a torn tail after a full disk or a crash) is skipped
on read and cut off before the next append. A question whose video cannot be read is recorded as failed with
its reason (not asked again unless `retry_failed`), and the run goes on.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

from absl import logging

from data.decode import VideoDecodeError
from data.tasks.base import Item, format_table

# What makes one question fail instead of the run: a video that is missing, unreadable or undecodable.
VIDEO_ERRORS: tuple[type[BaseException], ...] = (VideoDecodeError, OSError)


def part_path(out: str, index: int, count: int) -> str:
    return f"{out}.part{index}of{count}.jsonl"


def table_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".table.txt"


def read_records(path: str) -> dict[str, dict[str, Any]]:
    """Records by id of a results JSON (`records`) or a part file (JSONL; lines that do not parse are skipped)."""
    if not os.path.exists(path):
        return {}
    if not path.endswith(".jsonl"):
        with open(path) as f:
            return {r["id"]: r for r in json.load(f)["records"]}
    records, bad = {}, 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                records[record["id"]] = record
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                bad += line.strip() != b""
    if bad:
        logging.warning("%s: %d unreadable line(s) skipped (a torn write?)", path, bad)
    return records


def _cut_torn_tail(path: str) -> None:
    """Truncates a part file after its last newline, so the next record starts on a line of its own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logging.warning("%s: cutting a torn last line of %d bytes", path, len(data) - keep)
            f.truncate(keep)


def run_shard(items: Sequence[Item], answer_fn: Callable[[Item], str],
              score: Callable[[Any, str, int], dict[str, Any]], out: str, index: int, count: int, *, seed: int = 0,
              progress: bool = True, retry_failed: bool = False) -> dict[str, dict[str, Any]]:
    """Answers this shard's items (i % count == index) not yet in `out` or the part file; returns its records."""
    from tqdm import tqdm

    part = part_path(out, index, count)
    done = {**read_records(out), **read_records(part)}
    if retry_failed:
        done = {k: r for k, r in done.items() if "failed" not in r}
    mine = [item for i, item in enumerate(items) if i % count == index]
    records = {item.id: done[item.id] for item in mine if item.id in done}
    todo = [item for item in mine if item.id not in done]
    logging.info("shard %d/%d: %d questions, %d already answered", index, count, len(mine), len(records))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _cut_torn_tail(part)
    with open(part, "a") as f:
        for item in tqdm(todo, desc=f"eval {index}/{count}", disable=not progress):
            try:
                record = {**score(item.doc, answer_fn(item), seed), "id": item.id}
            except VIDEO_ERRORS as e:
                logging.warning("question %s failed: %s", item.id, e)
                record = {"id": item.id, "video": item.video, "failed": f"{type(e).__name__}: {e}"}
            f.write(json.dumps(record) + "\n")
            f.flush()
            records[item.id] = record
    return records


def merge(items: Sequence[Item], out: str, count: int,
          aggregate: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]],
          meta: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Writes `out` (the aggregate over answered questions, the failures, records in item order) and its table
    once every item has a record; else None."""
    found = read_records(out)
    for i in range(count):
        found.update(read_records(part_path(out, i, count)))
    missing = [item.id for item in items if item.id not in found]
    if missing:
        logging.warning("%d questions have no answer yet (e.g. %s): not merging", len(missing), missing[:3])
        return None
    records = [found[item.id] for item in items]
    failures = [{"id": r["id"], "reason": r["failed"]} for r in records if "failed" in r]
    summary = aggregate([r for r in records if "failed" not in r])
    results = {**(meta or {}), **summary, "failed": len(failures), "failures": failures, "records": records}
    for path, text in ((out, json.dumps(results, indent=1)), (table_path(out), format_table(results) + "\n")):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return results
