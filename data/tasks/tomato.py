"""TOMATO (lmms-eval task `tomato`, the VideoNSA fork).

Dataset (lmms-lab/TOMATO): rows with `id`, `question`, `options` (list), `answer` (option index), `video_path`
(under the data directory), `reason_type`, `demonstration_type`. Prompt: the fork's template, which says
"16 separate frames" whatever the frame count, with the options as a Python dict repr. Parsing (the fork's
`parse_multi_choice_response`, GPT parser off): edge punctuation stripped; every option letter that occurs
anywhere in the output is a candidate (so the "A" of "After" counts); with none and more than 5 words, every
option whose text occurs (case-insensitive); several -> the one whose "(X)" (or text) occurs last, ties and
no "(X)" at all going to the earliest letter; none -> "A". Score: accuracy overall, per reason type and per
demonstration type.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from data.tasks.base import Item, Task, accuracy, read_rows

NUM_FRAMES = 16  # what the fork's prompt claims
TEMPLATE = "\n".join([
    f"You will be provided with {NUM_FRAMES} separate frames uniformly sampled from a video, the frames are provided "
    "in chronological order of the video. Analyze these frames and provide the answer to the question about the "
    "video content. Answer the multiple-choice question about the video content. ",
    "",
    "You must use these frames to answer the multiple-choice question; do not rely on any externel knowledge or "
    "commonsense. ",
    "",
    "<question> ",
    "{question} ",
    "</question>",
    "",
    "<options> ",
    "{options} ",
    "</options>",
    "",
    "Even if the information in these separate frames is not enough to answer the question, PLEASE TRY YOUR BEST TO "
    "GUESS AN ANSWER WHICH YOU THINK WOULD BE THE MOST POSSIBLE ONE BASED ON THE QUESTION. ",
    "",
    "DO NOT GENERATE ANSWER SUCH AS 'NOT POSSIBLE TO DETERMINE.' ",
    "",
])


def index_to_answer(options: Sequence[str]) -> dict[str, str]:
    return {chr(65 + i): option for i, option in enumerate(options)}


def prompt(doc: Mapping[str, Any]) -> str:
    return TEMPLATE.format(question=doc["question"], options=index_to_answer(list(doc["options"])))


def parse(prediction: str, options: Sequence[str]) -> str:
    index2ans = index_to_answer(options)
    for char in ",.!?;:'":
        prediction = prediction.strip(char)
    response = f" {prediction} "
    # a letter anywhere; (the fork's next test, " X ", can find nothing this one missed)
    candidates = [letter for letter in index2ans if letter in response]
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [letter for letter, text in index2ans.items() if text.lower() in response.lower()]
        by_text = True
    if not candidates:
        return "A"
    if len(candidates) == 1:
        return candidates[0]
    lowered = response.lower()
    starts = [lowered.rfind(index2ans[c].lower()) if by_text else response.rfind(f"({c})") for c in candidates]
    return candidates[starts.index(max(starts))]


def load(data_dir: str) -> list[Item]:
    rows = read_rows(data_dir, ("**/test-*.parquet", "**/*.parquet", "*.json", "*.jsonl"))
    return [Item(str(r["id"]), os.path.join(data_dir, r["video_path"]), prompt(r), r) for r in rows]


def score(doc: Mapping[str, Any], prediction: str, seed: int) -> dict[str, Any]:
    del seed
    parsed = parse(prediction, list(doc["options"]))
    answer = chr(65 + int(doc["answer"]))
    return {"id": str(doc["id"]), "prediction": prediction, "parsed": parsed, "answer": answer,
            "correct": parsed == answer, "reason_type": doc["reason_type"],
            "demonstration_type": doc["demonstration_type"]}


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(f"reason {r['reason_type']}", []).append(bool(r["correct"]))
        groups.setdefault(f"demonstration {r['demonstration_type']}", []).append(bool(r["correct"]))
    correct = sum(bool(r["correct"]) for r in records)
    return {"score": correct / len(records) if records else 0.0, "metric": "tomato_score (accuracy)",
            "categories": {name: accuracy(sum(v), len(v)) for name, v in groups.items()}}


TASK = Task(name="tomato", load=load, score=score, aggregate=aggregate, max_new_tokens=1024)
