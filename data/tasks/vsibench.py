"""VSI-Bench (lmms-eval task `vsibench`, the VideoNSA fork).

Dataset (nyu-visionx/VSI-Bench): rows with `id`, `dataset`, `scene_name` (video `<dataset>/<scene_name>.mp4`
under the data directory), `question_type`, `question`, `options` (already "A. ..." strings), `ground_truth`.
Prompt: "These are frames of a video." then the question and, for multiple choice, "Options:" and the option
lines with "Answer with the option's letter from the given choices directly."; numeric questions end with
"Please answer the question using a single word or phrase.". Scoring: the output's first space-separated word
with trailing dots removed; multiple choice: case-insensitive equality with the letter; numeric: `float()` of
that word (a number word or "3m" scores 0) and mean relative accuracy over thresholds .50, .55, ..., .95.
Score: each question type's mean, the three relative-direction types averaged into one, then the mean of all.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from data.tasks.base import Item, Task, read_rows

MULTIPLE_CHOICE = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
                   "object_rel_distance", "route_planning", "obj_appearance_order")
NUMERIC = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")
DIRECTION = MULTIPLE_CHOICE[:3]
PRE_PROMPT = "These are frames of a video."
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."
NUMERIC_POST_PROMPT = "Please answer the question using a single word or phrase."
MRA = "MRA:.5:.95:.05"


def prompt(doc: Mapping[str, Any]) -> str:
    if doc["question_type"] in NUMERIC:
        return f"{PRE_PROMPT}\n{doc['question']}\n{NUMERIC_POST_PROMPT}"
    options = "Options:\n" + "\n".join(doc["options"])
    return "\n".join([PRE_PROMPT, doc["question"], options, MC_POST_PROMPT])


def first_word(prediction: str) -> str:
    return prediction.split(" ")[0].rstrip(".").strip()


def to_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def mean_relative_accuracy(pred: float, target: float, start: float = .5, end: float = .95,
                           interval: float = .05) -> float:
    """Fraction of thresholds c in linspace(start, end) with |pred - target| / target <= 1 - c."""
    thresholds = np.linspace(start, end, int((end - start) / interval + 2))
    return float((abs(pred - target) / target <= 1 - thresholds).mean())


def load(data_dir: str) -> list[Item]:
    rows = read_rows(data_dir, ("**/test-*.parquet", "**/*.parquet", "*.json", "*.jsonl"))
    for r in rows:
        if r["question_type"] not in MULTIPLE_CHOICE + NUMERIC:
            raise ValueError(f"{data_dir}: question {r['id']}: unknown question type {r['question_type']!r}")
        if r["question_type"] in NUMERIC and to_float(r["ground_truth"]) == 0:
            raise ValueError(f"{data_dir}: question {r['id']}: ground truth 0 (relative accuracy undefined)")
    return [Item(str(r["id"]), os.path.join(data_dir, r["dataset"], f"{r['scene_name']}.mp4"), prompt(r), r)
            for r in rows]


def score(doc: Mapping[str, Any], prediction: str, seed: int) -> dict[str, Any]:
    del seed
    word = first_word(prediction)
    record = {"id": str(doc["id"]), "prediction": prediction, "parsed": word, "answer": doc["ground_truth"],
              "question_type": doc["question_type"]}
    if doc["question_type"] in MULTIPLE_CHOICE:
        return {**record, "accuracy": 1.0 if word.lower() == str(doc["ground_truth"]).lower() else 0.0}
    pred, target = to_float(word), to_float(doc["ground_truth"])
    return {**record, MRA: 0.0 if pred is None or target is None else mean_relative_accuracy(pred, target)}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means in lmms-eval's order (question types sorted, the direction types then folded into one)."""
    output: dict[str, float] = {}
    counts: dict[str, int] = {}
    for qtype in sorted({r["question_type"] for r in records}):
        metric = "accuracy" if qtype in MULTIPLE_CHOICE else MRA
        values = [r[metric] for r in records if r["question_type"] == qtype]
        output[f"{qtype}_{metric}"] = float(np.mean(values))
        counts[f"{qtype}_{metric}"] = len(values)
    present = [f"{q}_accuracy" for q in DIRECTION if f"{q}_accuracy" in output]  # lmms-eval needs all three
    if present:
        output["object_rel_direction_accuracy"] = sum(output.pop(k) for k in present) / len(present)
        counts["object_rel_direction_accuracy"] = sum(counts.pop(k) for k in present)
    overall = sum(output.values()) / len(output) if output else 0.0
    return {"score": overall, "metric": "vsibench_score (overall)",
            "categories": {k: {"score": v, "total": counts[k]} for k, v in output.items()}}


TASK = Task(name="vsibench", load=load, score=score, aggregate=aggregate, max_new_tokens=16, fps=1.0)
