"""TimeScope and LongTimeScope (lmms-eval tasks `timescope`, `longtimescope`, the VideoNSA fork).

Dataset (Apollo-LMMs/TimeScope, Apollo-LMMs/LongTimeScope2): rows with `id`, `video` (path under the data
directory; a missing .mp4 is looked for as .MP4, then .mkv), `input` (the whole prompt: `doc_to_text: input`,
so the yaml's post prompt is not used), `answer` (a letter), `type`, `length`. Parsing: answer prefixes
removed (case-sensitive), then the first capital A-F, else "". longtimescope's prefix list has two pairs
glued by a missing comma ("The best option isThe correct option is", "Best answer:Best option:"), so
"Best answer:" and friends are not removed there. Score: accuracy (case-insensitive letter match) per
length x type, per length, and overall, in percent.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from data.tasks.base import Item, Task, accuracy, read_rows

PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
            "The correct option is", "Best answer:", "Best option:")
LONG_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                 "The best option isThe correct option is", "Best answer:Best option:")


def parse(prediction: str, prefixes: Sequence[str] = PREFIXES) -> str:
    s = prediction.strip()
    for prefix in prefixes:
        s = s.replace(prefix, "")
    match = re.search(r"[ABCDEF]", s)
    return match[0] if match else ""


def video_path(data_dir: str, video: str) -> str:
    path = os.path.join(data_dir, video)
    for candidate in (path, path.replace("mp4", "MP4"), path.replace("mp4", "mkv")):
        if os.path.exists(candidate):
            return candidate
    return path  # reading it fails, and the question is recorded as failed


def load(data_dir: str) -> list[Item]:
    rows = read_rows(data_dir, ("**/test-*.parquet", "**/*.parquet", "*.json", "*.jsonl"))
    return [Item(str(r["id"]), video_path(data_dir, r["video"]), r["input"], r) for r in rows]


def _scorer(prefixes: Sequence[str]):
    def score(doc: Mapping[str, Any], prediction: str, seed: int) -> dict[str, Any]:
        del seed
        parsed = parse(prediction, prefixes)
        return {"id": str(doc["id"]), "prediction": prediction, "parsed": parsed, "answer": doc["answer"],
                "correct": parsed.lower() == str(doc["answer"]).lower(), "length": doc["length"], "type": doc["type"]}
    return score


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    cells: dict[str, list[bool]] = {}
    for r in records:  # first-seen order, as lmms-eval logs them
        cells.setdefault(f"{r['length']}_{r['type']}", []).append(bool(r["correct"]))
        cells.setdefault(f"length {r['length']}", []).append(bool(r["correct"]))
    categories = {name: accuracy(sum(v), len(v)) for name, v in cells.items()}
    correct = sum(bool(r["correct"]) for r in records)
    return {"score": 100 * correct / len(records) if records else 0.0,
            "metric": "timescope_perception_score (accuracy, %)", "categories": categories}


TIMESCOPE = Task(name="timescope", load=load, score=_scorer(PREFIXES), aggregate=aggregate, max_new_tokens=16)
LONGTIMESCOPE = Task(name="longtimescope", load=load, score=_scorer(LONG_PREFIXES), aggregate=aggregate,
                     max_new_tokens=16)
