"""The generic task (`--questions`): video QA questions, prompts and scoring, open-ended and multiple choice.

A question file is a JSON list or JSONL of objects with `question`, `answer` and a video path (`video`,
`video_path` or `video_name`), and for multiple choice the options (`options` or `candidates`) with the answer
as a letter, an option index or the option text, the shape LongVideoBench, MLVU, TimeScope, Tomato and VSIBench
ship (converted to one object per question). Multiple-choice predictions are scored by the option letter read
from the generation as lmms-eval does (answer prefixes stripped, then "(A)", then the first standalone letter);
open-ended ones by normalised exact match or normalised containment of the reference.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from typing import Any, Sequence

from data.tasks.base import Item, Task

LETTERS = "ABCDEFGHIJ"
MC_SUFFIX = "Answer with the option's letter from the given choices directly."
# Prefixes lmms-eval strips before looking for the letter (videomme / longvideobench `extract_characters_regex`).
ANSWER_PREFIXES = ("the best answer is", "the correct answer is", "the answer is", "the answer", "best answer:",
                   "best option:", "answer:", "option:")
_OPTION_LABEL = re.compile(r"^\s*\(?([A-J])[.):]\s*")


@dataclasses.dataclass(frozen=True)
class Question:
    """One QA item: `answer` is an option letter when `options` is not empty, else the reference text."""

    id: str
    video: str
    question: str
    answer: str
    options: tuple[str, ...] = ()
    kind: str = ""

    @property
    def multiple_choice(self) -> bool:
        return bool(self.options)


def _answer_letter(answer: Any, options: Sequence[str]) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return LETTERS[answer]
    text = str(answer).strip()
    label = _OPTION_LABEL.match(text + " ")
    if len(text) == 1 and text.upper() in LETTERS[:len(options)]:
        return text.upper()
    if label and label.group(1) in LETTERS[:len(options)]:
        return label.group(1)
    stripped = [_OPTION_LABEL.sub("", o).strip().lower() for o in options]
    if text.lower() in stripped:
        return LETTERS[stripped.index(text.lower())]
    raise ValueError(f"answer {answer!r} is neither an option letter, an index nor one of the options")


def question_from_dict(entry: dict[str, Any], index: int) -> Question:
    """A Question from one file entry (field aliases as documented in the module)."""
    video = entry.get("video", entry.get("video_path", entry.get("video_name")))
    if not video or "question" not in entry or "answer" not in entry:
        raise ValueError(f"question {index}: needs 'question', 'answer' and 'video' (or 'video_path'), got "
                         f"{sorted(entry)}")
    options = tuple(str(o) for o in (entry.get("options") or entry.get("candidates") or ()))
    if len(options) > len(LETTERS):
        raise ValueError(f"question {index}: at most {len(LETTERS)} options")
    answer = _answer_letter(entry["answer"], options) if options else str(entry["answer"])
    return Question(id=str(entry.get("id", entry.get("question_id", index))), video=str(video),
                    question=str(entry["question"]), answer=answer, options=options, kind=str(entry.get("kind", "")))


def load_questions(path: str) -> list[Question]:
    """Questions of a JSON list or JSONL file; ids must be unique."""
    with open(path) as f:
        text = f.read()
    stripped = text.lstrip()
    entries = json.loads(text) if stripped.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    questions = [question_from_dict(e, i) for i, e in enumerate(entries)]
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise ValueError(f"{path}: duplicate question id {q.id!r}")
        seen.add(q.id)
    return questions


def prompt_text(q: Question) -> str:
    """The user text after the video: the question, then (multiple choice) lettered options and the
    instruction to answer with the letter, unless the question already lists them."""
    if not q.options or MC_SUFFIX in q.question:
        return q.question
    lines = [o if _OPTION_LABEL.match(o) else f"{LETTERS[i]}. {o}" for i, o in enumerate(q.options)]
    return "\n".join([q.question, *lines, MC_SUFFIX])


def parse_option_letter(text: str, num_options: int = 5) -> str | None:
    """The option letter a generation names, or None: answer prefixes are stripped, then the first "(X)",
    else the first standalone capital letter among the first `num_options` letters ("A", "A.", "A)")."""
    s = text.strip()
    lowered = s.lower()
    for prefix in ANSWER_PREFIXES:
        at = lowered.find(prefix)
        if at >= 0:
            s = s[at + len(prefix):]
            lowered = s.lower()
    allowed = LETTERS[:num_options]
    paren = re.search(rf"\(([{allowed}])\)", s)
    if paren:
        return paren.group(1)
    alone = re.search(rf"(?<![A-Za-z])([{allowed}])(?![A-Za-z])", s)
    return alone.group(1) if alone else None


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and the articles a/an/the removed, whitespace collapsed."""
    text = text.lower().translate(str.maketrans({c: " " for c in string.punctuation}))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def open_answer_correct(prediction: str, reference: str) -> bool:
    """Normalised exact match, or the normalised reference appears as whole words in the prediction."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not ref:
        return not pred
    return pred == ref or f" {ref} " in f" {pred} "


def score(q: Question, prediction: str) -> dict[str, Any]:
    """The record of one answered question: prediction, parsed letter (multiple choice) and correctness."""
    record: dict[str, Any] = {"id": q.id, "video": q.video, "kind": q.kind, "question": q.question,
                              "options": list(q.options), "answer": q.answer, "prediction": prediction}
    if q.multiple_choice:
        record["parsed"] = parse_option_letter(prediction, len(q.options))
        record["correct"] = record["parsed"] == q.answer
    else:
        record["correct"] = open_answer_correct(prediction, q.answer)
    return record


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, for multiple-choice and open questions, and per question kind."""
    def acc(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(rs)
        correct = sum(bool(r["correct"]) for r in rs)
        return {"accuracy": correct / n if n else 0.0, "correct": correct, "total": n}

    mc = [r for r in records if r["options"]]
    open_ = [r for r in records if not r["options"]]
    kinds = sorted({r.get("kind", "") for r in records} - {""})
    by_kind = {k: acc([r for r in records if r.get("kind") == k]) for k in kinds}
    overall = acc(records)
    return {**overall, "multiple_choice": acc(mc), "open": acc(open_), "by_kind": by_kind,
            "score": overall["accuracy"], "metric": "accuracy", "categories": by_kind}


def accuracy_by_kind_and_form(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy per "<kind>/<form>" (form "mc" or "open") over scored records, rounded to 3 digits, by key."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        form = "mc" if r["options"] else "open"
        groups.setdefault(f"{r['kind']}/{form}", []).append(bool(r["correct"]))
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(groups.items())}


def load(path: str) -> list[Item]:
    """Items of a question file (the video paths stay relative to --video_root)."""
    return [Item(q.id, q.video, prompt_text(q), q) for q in load_questions(path)]


TASK = Task(name="generic", load=load, score=lambda q, prediction, seed: score(q, prediction), aggregate=summarize,
            max_new_tokens=16)
