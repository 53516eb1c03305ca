"""Answer parsing and scoring of the generic task (data/tasks/generic.py) on hand-written cases."""

from __future__ import annotations

import json

import pytest

from data.tasks.generic import (Question, load_questions, normalize_answer, open_answer_correct, parse_option_letter,
                               prompt_text, score, summarize)


@pytest.mark.parametrize("text, letter", [
    ("B", "B"),
    ("B.", "B"),
    ("(C) a square", "C"),
    ("The answer is D.", "D"),
    ("The best answer is: (A)", "A"),
    ("Answer: C) Circle", "C"),
    ("I think it is B, the circle", "B"),  # "I" is not an option letter
    ("option E", None),  # only 4 options: E is out of range
    ("circle", None),
    ("", None),
    ("ABC", None),  # not standalone
    ("a", None),  # lower case is not a letter choice
])
def test_parse_option_letter(text, letter):
    assert parse_option_letter(text, num_options=4) == letter


def test_normalize_and_open_match():
    assert normalize_answer("  The Circle!  ") == "circle"
    assert open_answer_correct("A circle.", "circle")
    assert open_answer_correct("It is a red circle", "A circle.")
    assert open_answer_correct("Twice.", "twice")
    assert not open_answer_correct("circles", "circle")  # whole words only
    assert not open_answer_correct("square", "A circle.")
    assert not open_answer_correct("", "circle")


def test_score_and_summarize():
    mc = Question(id="1", video="v.mp4", question="Which?", answer="B", options=("red", "blue"), kind="colour")
    op = Question(id="2", video="v.mp4", question="What?", answer="A circle.", kind="what")
    records = [score(mc, "(B) blue"), score(mc, "A"), score(op, "circle"), score(op, "square")]
    assert [r["correct"] for r in records] == [True, False, True, False]
    assert records[0]["parsed"] == "B" and "parsed" not in records[2]
    s = summarize(records)
    assert (s["accuracy"], s["correct"], s["total"]) == (0.5, 2, 4)
    assert s["multiple_choice"]["accuracy"] == 0.5 and s["open"]["accuracy"] == 0.5
    assert s["by_kind"]["colour"]["total"] == 2


def test_load_questions_formats(tmp_path):
    entries = [
        {"id": "a", "video": "x.mp4", "question": "Q?", "options": ["red", "blue", "green"], "answer": "C"},
        {"question_id": "b", "video_path": "y.mp4", "question": "Q?", "candidates": ["red", "blue"], "answer": 1},
        {"id": "c", "video": "z.mp4", "question": "Q?", "options": ["(A) red", "(B) blue"], "answer": "(A) red"},
        {"id": "d", "video": "z.mp4", "question": "Q?", "options": ["red", "blue"], "answer": "blue"},
        {"id": "e", "video": "z.mp4", "question": "Open?", "answer": "A circle."},
    ]
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    as_list = tmp_path / "q.json"
    as_list.write_text(json.dumps(entries))
    qs = load_questions(str(jsonl))
    assert qs == load_questions(str(as_list))
    assert [q.answer for q in qs] == ["C", "B", "A", "B", "A circle."]
    assert [q.id for q in qs] == ["a", "b", "c", "d", "e"] and qs[1].video == "y.mp4"
    assert not qs[4].multiple_choice
    assert prompt_text(qs[0]) == ("Q?\nA. red\nB. blue\nC. green\n"
                                  "Answer with the option's letter from the given choices directly.")
    assert prompt_text(qs[2]).startswith("Q?\n(A) red\n(B) blue\n")
    assert prompt_text(qs[4]) == "Open?"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**entries[0], "answer": "purple"}]))
    with pytest.raises(ValueError, match="purple"):
        load_questions(str(bad))
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([entries[0], entries[0]]))
    with pytest.raises(ValueError, match="duplicate"):
        load_questions(str(dup))
