"""LongVideoBench, validation split, video only (lmms-eval task `longvideobench_val_v`, the VideoNSA fork).

Dataset (longvideobench/LongVideoBench): rows with `id`, `video_path`, `question`, `option0`..`option4` ("N/A"
for absent ones; or `candidates`, as `lvb_val.json` ships them), `correct_choice` (index), `duration_group`,
`question_category`; videos under `videos/`. Prompt: the question, "A. option" lines, then "Answer with the
option's letter from the given choices directly.\\n". Parsing: answer prefixes removed (case-sensitive), then
the first capital A-E anywhere; none (or > 10 words without one) -> a random letter among the options, here
seeded per question (`seed`, the id) and counted. Score: accuracy, per duration group and question category.
"""

from __future__ import annotations

import os
import random
import re
from typing import Any, Mapping, Sequence

from data.tasks.base import Item, Task, accuracy, read_rows

POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"
ANSWER_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                   "The best option is", "The correct option is", "Best answer:", "Best option:")


def options(doc: Mapping[str, Any]) -> list[str]:
    """The options up to the first "N/A" (`option0`..`option4`), or `candidates`."""
    if "candidates" in doc and "option0" not in doc:
        return [str(c) for c in doc["candidates"]]
    found = []
    for i in range(5):
        option = doc.get(f"option{i}")
        if option == "N/A":
            break
        found.append(option)
    return found


def prompt(doc: Mapping[str, Any]) -> str:
    """The question and "A. option" lines (every option that is not "N/A", as lmms-eval lists them), the post prompt."""
    if "option0" in doc:
        shown = [str(doc.get(f"option{i}")) for i in range(5) if doc.get(f"option{i}") != "N/A"]
    else:
        shown = options(doc)
    lines = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(shown))
    return f"{doc['question']}\n{lines}\n{POST_PROMPT}"


def parse(prediction: str, letters: Sequence[str], rng: random.Random) -> tuple[str, bool]:
    """(letter, whether it was a random choice) as lmms-eval's `parse_multi_choice_response`."""
    s = prediction.strip()
    for prefix in ANSWER_PREFIXES:
        s = s.replace(prefix, "")
    match = re.search(r"[ABCDE]", s)
    if match is None:  # also covers > 10 words without a letter
        return rng.choice(list(letters)), True
    return match[0], False


def load(data_dir: str) -> list[Item]:
    rows = read_rows(data_dir, ("**/validation-*.parquet", "lvb_val.json"))
    return [Item(str(r["id"]), os.path.join(data_dir, "videos", r["video_path"]), prompt(r), r) for r in rows]


def score(doc: Mapping[str, Any], prediction: str, seed: int) -> dict[str, Any]:
    letters = [chr(ord("A") + i) for i in range(len(options(doc)))]
    parsed, random_choice = parse(prediction, letters, random.Random(f"{seed}:{doc['id']}"))
    answer = chr(ord("A") + int(doc["correct_choice"]))
    return {"id": str(doc["id"]), "prediction": prediction, "parsed": parsed, "random_choice": random_choice,
            "answer": answer, "correct": parsed == answer, "duration_group": doc["duration_group"],
            "question_category": doc["question_category"]}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy per duration group and per question category, and overall (lmms-eval's "Overall": the mean over
    both groupings, each question counted twice, which is the plain accuracy), rounded to 5 digits as it reports."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        for key in (r["duration_group"], r["question_category"]):
            groups.setdefault(str(key), []).append(bool(r["correct"]))
    categories = {name: accuracy(sum(v), len(v)) for name, v in groups.items()}
    counted = sum(c["total"] for c in categories.values())
    overall = sum(c["correct"] for c in categories.values()) / counted if counted else 0.0
    return {"score": round(overall, 5), "metric": "lvb_acc", "categories": categories,
            "random_choices": sum(bool(r["random_choice"]) for r in records)}


TASK = Task(name="longvideobench_val_v", load=load, score=score, aggregate=aggregate, max_new_tokens=32)
