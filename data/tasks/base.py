"""What a benchmark task is to the runner: its items, its generation settings, its scoring and aggregation."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Any, Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Item:
    """One question to ask: `video` is a path the answerer opens, `prompt` the user text after the video, `doc`
    whatever the task's scorer reads (a dataset row, or a generic Question)."""

    id: str
    video: str
    prompt: str
    doc: Any


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark: `load(data_dir)` -> items in dataset order; `score(doc, prediction, seed)` -> a record (JSON);
    `aggregate(records)` -> {"score": headline, "categories": {name: {...}}, ...} as the task's lmms-eval utils."""

    name: str
    load: Callable[[str], list[Item]]
    score: Callable[[Any, str, int], dict[str, Any]]
    aggregate: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]
    max_new_tokens: int
    fps: float = 4.0  # frame rate of the paper's runs (SPEC §7)
    stop_strings: tuple[str, ...] = ()


def parse_reasoning_answer(text: str) -> str:
    """The lmms-eval wrapper's last step: the inside of the first <answer>...</answer>, else of the first
    \\boxed{...} (both trimmed, non-greedy), else the text unchanged."""
    tagged = re.search(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
    if tagged:
        return tagged.group(1)
    boxed = re.search(r"\\boxed\{\s*(.*?)\s*\}", text, re.DOTALL)
    return boxed.group(1) if boxed else text


def read_rows(data_dir: str, patterns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of the first pattern (glob under `data_dir`, sorted) that matches files: parquet, a JSON list or JSONL."""
    for pattern in patterns:
        paths = sorted(glob.glob(os.path.join(data_dir, pattern), recursive=True))
        if paths:
            return [row for path in paths for row in _read_file(path)]
    raise FileNotFoundError(f"{data_dir}: no annotation file matching any of {list(patterns)}")


def _read_file(path: str) -> list[dict[str, Any]]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def accuracy(correct: int, total: int) -> dict[str, Any]:
    return {"accuracy": correct / total if total else 0.0, "correct": correct, "total": total}


def format_table(summary: Mapping[str, Any]) -> str:
    """A readable table of a summary's categories and its headline score."""
    rows = [(name, _cell(value)) for name, value in summary.get("categories", {}).items()]
    width = max([len(name) for name, _ in rows] + [len("overall")])
    lines = [f"{name:<{width}}  {cell}" for name, cell in rows]
    lines.append(f"{'overall':<{width}}  {summary['score']:.4f}  ({summary['metric']})")
    if summary.get("failed"):
        lines.append(f"{summary['failed']} question(s) failed and are not scored (see 'failures')")
    if summary.get("random_choices"):
        lines.append(f"{summary['random_choices']} answer(s) unparsed: a seeded random letter, as lmms-eval does")
    return "\n".join(lines)


def _cell(value: Mapping[str, Any]) -> str:
    if "correct" in value:
        return f"{value['accuracy']:.4f}  ({value['correct']}/{value['total']})"
    return f"{value['score']:.4f}  (n={value['total']})"
