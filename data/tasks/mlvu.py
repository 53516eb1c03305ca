"""MLVU, test split (lmms-eval task `mlvu_test`, the VideoNSA fork).

Dataset (sy1998/MLVU_Test): rows with `video_name` (path under the data directory), `question` (the options
already inside it), `answer` (a letter), `task_type`. Prompt: the question, then "\\nOnly give the best
option.\\nBest option: (". Parsing (the fork's `extract_characters_regex`): the stripped output's character
just before its first ")", else the whole stripped output. Score: accuracy per task type, averaged over the
nine test task types (a type with no question counts 0), in percent.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from data.tasks.base import Item, Task, accuracy, read_rows

SUFFIX = "\nOnly give the best option.\nBest option: ("
TASK_TYPES = ("anomaly_reco", "count", "ego", "needleQA", "order", "plotQA", "sportsQA", "topic_reasoning",
              "tutorialQA")


def parse(prediction: str) -> str:
    s = prediction.strip()
    if ")" in s:
        at = s.index(")")
        return s[at - 1:at]  # "" when ")" comes first, as the fork's slice
    return s


def load(data_dir: str) -> list[Item]:
    rows = read_rows(data_dir, ("**/test-*.parquet", "**/*.parquet", "*.json", "*.jsonl"))
    unknown = sorted({r["task_type"] for r in rows} - set(TASK_TYPES))
    if unknown:
        raise ValueError(f"{data_dir}: unknown MLVU task types {unknown} (lmms-eval's aggregation fails on them)")
    ids = [str(r.get("question_id", i)) for i, r in enumerate(rows)]
    return [Item(i, os.path.join(data_dir, r["video_name"]), r["question"] + SUFFIX, {**r, "id": i})
            for i, r in zip(ids, rows)]


def score(doc: Mapping[str, Any], prediction: str, seed: int) -> dict[str, Any]:
    del seed
    parsed = parse(prediction)
    return {"id": doc["id"], "prediction": prediction, "parsed": parsed, "answer": doc["answer"],
            "correct": parsed == doc["answer"], "task_type": doc["task_type"]}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per task type (the fork's substring match of type names), and the mean of the nine percentages."""
    categories = {}
    for name in TASK_TYPES:
        mine = [r for r in records if name in r["task_type"]]
        categories[name] = accuracy(sum(bool(r["correct"]) for r in mine), len(mine))
    mean = sum(100 * c["accuracy"] for c in categories.values()) / len(TASK_TYPES)
    return {"score": mean, "metric": "mlvu_percetion_score (mean of task-type accuracies, %)",
            "categories": categories}


TASK = Task(name="mlvu_test", load=load, score=score, aggregate=aggregate, max_new_tokens=16)
