"""Scoring parity with lmms-eval: our task parsers and aggregations against lmms-eval's own functions.

lmms-eval is a test-only dependency installed without its extras (`pip install --no-deps lmms-eval==0.7.3
loguru`); its task `utils.py` files are loaded by path with the video / dataframe libraries they import at the
top stubbed out (the functions called here do not use them). The VideoNSA fork (SPEC §7) is the contract: 0.7.3
is used where its code equals the fork's (LongVideoBench, TimeScope, LongTimeScope, TOMATO parsing and
aggregation; VSIBench's word / float / relative-accuracy functions and MLVU's aggregation), and cases worked
from the fork's source are used where they differ (MLVU's parser, VSIBench's composition, `<think>` handling).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest

from data.tasks import longvideobench, mlvu, timescope, tomato, vsibench
from data.tasks.base import parse_reasoning_answer

LMMS = importlib.util.find_spec("lmms_eval")
if LMMS is None:  # the oracle of these tests: `make venv` installs its files (not its heavy dependencies)
    raise ImportError("lmms-eval is not installed: pip install --no-deps lmms-eval==0.7.3 (make venv does)")
STUBBED = ("decord", "cv2", "pandas", "datasets", "lmms_eval.utils", "lmms_eval.tasks._task_utils.file_utils")


def _load(relative: str) -> types.ModuleType:
    root = os.path.dirname(LMMS.origin)
    with pytest.MonkeyPatch.context() as mp:
        for name in STUBBED:
            stub = types.ModuleType(name)
            stub.VideoReader = stub.cpu = stub.generate_submission_file = stub.Dataset = None
            mp.setitem(sys.modules, name, stub)
        name = f"lmms_{relative.replace('/', '_')}"
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, relative))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _outputs() -> list[str]:
    """A few hundred varied generations: letters in many forms, sentences with several letters, tags, numbers."""
    forms = ["{L}", "{l}", "({L})", "{L}.", "{L})", " {L} ", "Answer: {L}", "answer: {l}", "The answer is {L}.",
             "The best answer is: ({L})", "The correct option is {L}", "Best option: ({L}) the cat", "Best answer:{L}",
             "Final answer: {L}", "I think it is {L}, not A", "{L}. Because B is wrong", "Option {L} is right",
             "<answer>{L}</answer>", "<answer> ({L}) </answer>", "\\boxed{{{L}}}", "{L}: {l}bc", "({L}) and (C)",
             "Neither B nor {L}", "after {l} careful look: {L}", "{L}!", "'{L}'", "{L};", "?{L}?"]
    letters = [f.format(L=L, l=L.lower()) for f in forms for L in "ABCDEF"]
    other = ["", " ", "\n", "None", "I cannot tell from the video.", "a", "e", "Apple", "The Answer: b",
             "this is a long answer with many words but without any capital letter at all here",
             "This Is A Long Answer With Many Words And One Capital Letter Everywhere Here Too",
             "The cat sits on the mat", "red ball", "the red ball rolls left", "It moves to the left side slowly",
             "3", "3.", "3.5", "3.5 meters", "three", "Three boxes.", "1,200", "-2", "0.0", "nan", "inf", "2 m",
             "12 chairs", "About 4", "4.0.", "1e3", "  7", "7 ", "42\nB", "1/2", "(A)(B)(C)", "ABCD", "D) 4 m"]
    return letters + other


OUTPUTS = [parse_reasoning_answer(o) for o in _outputs()]


def test_parse_reasoning_answer_matches_lmms_eval_without_think_blocks():
    lmms = _load("models/model_utils/reasoning_model_utils.py")
    raw = _outputs()
    assert len(raw) > 200
    for text in raw:  # 0.7.3 also strips <think> blocks and the result; the fork does neither
        if text == text.strip():
            assert parse_reasoning_answer(text) == lmms.parse_reasoning_model_answer(text), text
    assert parse_reasoning_answer(" B ") == " B "  # the fork returns the text unchanged


DOC = {"id": "x", "question": "Which?", "option0": "cat", "option1": "dog", "option2": "red ball",
       "option3": "N/A", "option4": "N/A", "correct_choice": 1, "duration_group": 600, "question_category": "T3O"}


def test_longvideobench_parsing_and_random_choices():
    lmms = _load("tasks/longvideobench/utils.py")
    lmms.random = types.SimpleNamespace(choice=lambda choices: "RANDOM")
    letters = ["A", "B", "C"]
    randoms = 0
    for text in OUTPUTS:
        ours = longvideobench.score(DOC, text, seed=0)
        expected = lmms.parse_multi_choice_response(text, letters, dict(zip(letters, ["cat", "dog", "red ball"])))
        assert (("RANDOM" if ours["random_choice"] else ours["parsed"]) == expected), text
        randoms += ours["random_choice"]
        assert not ours["random_choice"] or ours["parsed"] in letters
    assert randoms > 10
    assert longvideobench.score(DOC, "", seed=0) == longvideobench.score(DOC, "", seed=0)  # seeded
    assert longvideobench.prompt(DOC) == lmms.longvideobench_doc_to_text(
        DOC, {"pre_prompt": "", "post_prompt": longvideobench.POST_PROMPT})


def test_longvideobench_aggregate():
    lmms = _load("tasks/longvideobench/utils.py")
    records = [longvideobench.score({**DOC, "id": str(i), "duration_group": [15, 60, 600][i % 3],
                                     "question_category": ["S2E", "T3O"][i % 2]}, text, seed=1)
               for i, text in enumerate(OUTPUTS)]
    lmms_records = [{"id": r["id"], "duration_group": r["duration_group"], "question_category": r["question_category"],
                     "answer": r["answer"], "parsed_pred": r["parsed"]} for r in records]
    assert longvideobench.aggregate(records)["score"] == lmms.longvideobench_aggregate_results(lmms_records)


@pytest.mark.parametrize("task, prefixes", [("timescope", timescope.PREFIXES),
                                            ("longtimescope", timescope.LONG_PREFIXES)])
def test_timescope_parsing_and_aggregate(task, prefixes):
    lmms = _load(f"tasks/{task}/utils.py")
    for text in OUTPUTS:
        assert timescope.parse(text, prefixes) == lmms.extract_characters_regex(text), text
    score = timescope.TIMESCOPE.score if task == "timescope" else timescope.LONGTIMESCOPE.score
    docs = [{"id": i, "video": "v.mp4", "answer": "ABCD"[i % 4].lower() if i % 5 == 0 else "ABCD"[i % 4],
             "type": ["QA", "OCR", "temporal"][i % 3], "length": [60, 3600][i % 2]} for i in range(len(OUTPUTS))]
    records = [score(d, text, 0) for d, text in zip(docs, OUTPUTS)]
    lmms_records = [lmms.timescope_process_results(d, [text])["timescope_perception_score"]
                    for d, text in zip(docs, OUTPUTS)]
    assert [r["parsed"] for r in records] == [r["pred_answer"] for r in lmms_records]
    assert timescope.aggregate(records)["score"] == lmms.timescope_aggregate_results(lmms_records)


def test_tomato_parsing_and_aggregate():
    lmms = _load("tasks/tomato/utils.py")
    options = ["left", "right", "up", "down", "not moving"]
    _, letters, index2ans = lmms.construct_prompt("Q?", options)
    for text in OUTPUTS:
        assert tomato.parse(text, options) == lmms.parse_multi_choice_response(text, letters, index2ans), text
    docs = [{"id": i, "question": "Q?", "options": options, "answer": i % 5,
             "reason_type": ["rotation", "count"][i % 2], "demonstration_type": ["human", "object", "simulated"][i % 3]} for i in range(len(OUTPUTS))]
    records = [tomato.score(d, text, 0) for d, text in zip(docs, OUTPUTS)]
    lmms_records = [lmms.tomato_process_results(d, [text])["tomato_score"] for d, text in zip(docs, OUTPUTS)]
    assert [float(r["correct"]) for r in records] == [r["score"] for r in lmms_records]
    assert tomato.aggregate(records)["score"] == lmms.tomato_aggregate_results(lmms_records)


def test_tomato_prompt_is_the_forks():
    # the fork's construct_prompt has "{num_frames} separate frames" (0.7.3 dropped the count); the rest is equal
    lmms = _load("tasks/tomato/utils.py")
    ours = tomato.prompt({"question": "Where?", "options": ["left", "right"]})
    theirs, _, _ = lmms.construct_prompt("Where?", ["left", "right"])
    assert ours.replace("with 16 separate frames", "with frames") == theirs.replace("content.\n", "content. \n", 1)


def test_mlvu_parsing_as_the_fork():
    # the fork's extract_characters_regex: stripped; the character before the first ")", else the whole string
    cases = {"A) the cat": "A", "B)": "B", " (C) dog": "C", "D": "D", " d ": "d", "": "", ")": "", "A)B)": "A",
             "The answer is B) dog": "B", "C. dog": "C. dog", "<answer>B) x</answer>": "B"}
    for text, expected in cases.items():
        assert mlvu.parse(parse_reasoning_answer(text)) == expected, text


def test_mlvu_aggregate():
    lmms = _load("tasks/mlvu/utils.py")
    types_ = mlvu.TASK_TYPES[:-1]  # one type without questions counts 0 in the mean of nine
    docs = [{"id": str(i), "question": "Q", "answer": "ABCD"[i % 4], "task_type": types_[i % len(types_)]}
            for i in range(len(OUTPUTS))]
    records = [mlvu.score(d, text, 0) for d, text in zip(docs, OUTPUTS)]
    lmms_records = [{"task_type": r["task_type"], "pred_answer": r["parsed"], "answer": r["answer"]} for r in records]
    expected = lmms.mlvu_aggregate_results_test(lmms_records)
    assert mlvu.aggregate(records)["score"] == pytest.approx(expected, abs=1e-12)


def test_vsibench_scoring_as_the_fork_composes_lmms_functions():
    lmms = _load("tasks/vsibench/utils.py")

    def fork_numeric(prediction: str, truth: str) -> float:  # the fork's process_results, numeric branch
        try:
            return lmms.mean_relative_accuracy(lmms.to_float(lmms.fuzzy_matching(prediction)), lmms.to_float(truth),
                                               start=.5, end=.95, interval=.05)
        except TypeError:
            return 0.0

    for text in OUTPUTS:
        for truth in ("A", "c"):
            doc = {"id": "1", "question_type": "route_planning", "ground_truth": truth}
            expected = lmms.exact_match(lmms.fuzzy_matching(text), truth)
            assert vsibench.score(doc, text, 0)["accuracy"] == expected, text
        for truth in ("3", "3.5", "120", "0.7"):
            doc = {"id": "1", "question_type": "object_counting", "ground_truth": truth}
            assert vsibench.score(doc, text, 0)[vsibench.MRA] == pytest.approx(fork_numeric(text, truth), abs=0), text
    assert vsibench.score({"id": "1", "question_type": "object_counting", "ground_truth": "3"}, "three", 0)[
        vsibench.MRA] == 0.0  # the fork has no number words (0.7.3 reads them)
    kwargs = {"pre_prompt": "", "mca_post_prompt": vsibench.MC_POST_PROMPT,
              "na_post_prompt": vsibench.NUMERIC_POST_PROMPT}
    for doc in ({"question_type": "route_planning", "question": "How?", "options": ["A. left", "B. right"]},
                {"question_type": "room_size_estimation", "question": "How big?"}):
        assert vsibench.prompt(doc) == lmms.vsibench_doc_to_text(doc, kwargs)


def test_vsibench_aggregate_hand_worked():
    # the fork: mean per question type; the three direction types averaged into one; overall = mean of the rest
    records = [{"question_type": "object_rel_direction_easy", "accuracy": 1.0},
               {"question_type": "object_rel_direction_medium", "accuracy": 0.0},
               {"question_type": "object_rel_direction_hard", "accuracy": 1.0},
               {"question_type": "route_planning", "accuracy": 0.0},
               {"question_type": "route_planning", "accuracy": 1.0},
               {"question_type": "object_counting", vsibench.MRA: 0.2},
               {"question_type": "object_counting", vsibench.MRA: 0.6}]
    summary = vsibench.aggregate(records)
    cats = {k: v["score"] for k, v in summary["categories"].items()}
    assert cats == pytest.approx({"object_counting_MRA:.5:.95:.05": 0.4, "route_planning_accuracy": 0.5,
                                  "object_rel_direction_accuracy": 2 / 3})
    assert summary["score"] == pytest.approx((0.4 + 0.5 + 2 / 3) / 3)
