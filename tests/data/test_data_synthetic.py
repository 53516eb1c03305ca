"""Synthetic needle videos: deterministic, the event is visible exactly where the annotation says, and the
questions' answers follow from the event."""

from __future__ import annotations

import json
import os

import av
import numpy as np
import pytest

from data.annotations import load_annotations
from data.synthetic import COLOURS, COUNTS, LETTERS, SHAPES, generate, shape_mask


def decode_all(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    return str(d), generate(d, num_videos=6, seed=11, frames_range=(60, 90))


def test_same_seed_same_data(synth, tmp_path):
    root, ann = synth
    generate(tmp_path, num_videos=6, seed=11, frames_range=(60, 90))
    for name in ("annotations.json", "questions.json"):
        with open(os.path.join(root, name)) as f, open(tmp_path / name) as g:
            assert json.load(f) == json.load(g)
    first = json.load(open(ann))[0]["video"]
    np.testing.assert_array_equal(decode_all(os.path.join(root, first)), decode_all(str(tmp_path / first)))
    other = generate(tmp_path / "other", num_videos=6, seed=12, frames_range=(60, 90))
    assert [e["event"] for e in json.load(open(other))] != [e["event"] for e in json.load(open(ann))]


def test_event_is_visible_only_in_its_frames(synth):
    root, ann = synth
    entries = json.load(open(ann))
    assert [a.id for a in load_annotations(ann)] == [e["id"] for e in entries]  # valid LLaVA-Video entries
    for e in entries:
        ev = e["event"]
        frames = decode_all(os.path.join(root, e["video"])).astype(np.int32)
        assert len(frames) == e["num_frames"]
        coloured = frames.max(-1) - frames.min(-1) > 90  # the background is grey
        shown = {s + i for s in ev["starts"] for i in range(ev["duration"])}
        flagged = {i for i in range(len(frames)) if coloured[i].mean() > 0.03}
        assert flagged == shown
        assert len(shown) / len(frames) < 0.2  # a short window of the video usually misses it
        mask = shape_mask(ev["shape"], *frames.shape[1:3], tuple(ev["centre"]), ev["radius"])
        for i in sorted(shown):
            iou = (coloured[i] & mask).sum() / (coloured[i] | mask).sum()
            assert iou > 0.8
            mean = frames[i][coloured[i]].mean(0)
            assert min(COLOURS, key=lambda c: np.abs(mean - COLOURS[c]).sum()) == ev["colour"]


def test_answers_follow_from_the_event(synth):
    root, ann = synth
    events = {e["video"]: (e["event"], e["num_frames"]) for e in json.load(open(ann))}
    questions = json.load(open(os.path.join(root, "questions.json")))
    assert len(questions) == 8 * len(events)
    for q in questions:
        ev, num_frames = events[q["video"]]
        third = ("at the beginning", "in the middle", "at the end")[3 * ev["starts"][0] // num_frames]
        truth = {"what": ev["shape"], "colour": ev["colour"], "when": third,
                 "count": COUNTS[len(ev["starts"]) - 1]}[q["kind"]]
        assert ev["shape"] in SHAPES and ev["when"] == third
        if q["form"] == "open":
            assert truth in q["answer"].lower() and not q["options"]
        else:
            assert len(set(q["options"])) == 4 and q["options"][LETTERS.index(q["answer"])] == truth
            for letter, option in zip(LETTERS, q["options"]):
                assert f"\n{letter}. {option.capitalize()}\n" in q["question"]
    letters = [q["answer"] for q in questions if q["form"] == "mc"]
    assert len(set(letters)) > 1  # the correct option is not always in one place


def test_demo_options_one_question_per_entry(tmp_path):
    """The CPU demo's set-up: chosen kinds, open questions only, one single-turn entry per video and kind, a
    centred shape on a dark background."""
    ann = generate(tmp_path, num_videos=3, seed=2, frames_range=(32, 32), sizes=((56, 56),),
                   radius_range=(0.45, 0.45), background_level=50.0, kinds=("colour", "what"), open_fraction=1.0,
                   one_question_per_entry=True)
    with open(ann) as f:
        entries = json.load(f)
    assert [e["id"] for e in entries] == [f"synth_2_{v:04d}_{k}" for v in range(3) for k in ("what", "colour")]
    assert [a.id for a in load_annotations(ann)] == [e["id"] for e in entries]
    questions = json.loads((tmp_path / "questions.json").read_text())
    assert sorted({q["kind"] for q in questions}) == ["colour", "what"] and len(questions) == 3 * 2 * 2
    for e in entries:
        human, gpt = e["conversations"]
        assert human["value"].startswith("<video>\n") and "Answer with" not in human["value"]
        kind = e["id"].rsplit("_", 1)[1]
        truth = e["event"]["shape"] if kind == "what" else e["event"]["colour"]
        assert truth in gpt["value"].lower()
        assert tuple(e["event"]["centre"]) == (0.5, 0.5)
        frames = decode_all(os.path.join(tmp_path, e["video"])).astype(np.int32)
        lit = {i for i in range(len(frames)) if (frames[i].max(-1) - frames[i].min(-1) > 90).mean() > 0.2}
        assert lit == {s + i for s in e["event"]["starts"] for i in range(e["event"]["duration"])}
    with pytest.raises(ValueError, match="kinds"):
        generate(tmp_path / "bad", num_videos=1, kinds=("size",))
