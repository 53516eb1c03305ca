"""The eval runner (data/tasks/runner.py): resume, sharding, failed videos, torn part files; one CLI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data.decode import VideoDecodeError
from data.tasks import generic
from data.tasks.base import Item
from data.tasks.generic import Question
from data.tasks.runner import merge, part_path, run_shard, table_path

from tests import ROOT


def _items(n: int) -> list[Item]:
    qs = [Question(id=f"q{i}", video=f"v{i}.mp4", question=f"Question {i}?", answer="B", options=("x", "y"))
          if i % 2 else Question(id=f"q{i}", video=f"v{i}.mp4", question=f"Question {i}?", answer=f"word{i}")
          for i in range(n)]
    return [Item(q.id, q.video, generic.prompt_text(q), q) for q in qs]


class Answerer:
    """Answers with a fixed text per question id and counts who was asked; can fail after N answers, or raise
    a video error for some ids."""

    def __init__(self, text: str, fail_after: int | None = None, bad_videos: tuple[str, ...] = ()):
        self.text, self.fail_after, self.bad_videos, self.asked = text, fail_after, bad_videos, []

    def __call__(self, item: Item) -> str:
        if self.fail_after is not None and len(self.asked) == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.asked.append(item.id)
        if item.id in self.bad_videos:
            raise VideoDecodeError(f"{item.video}: moov atom not found")
        return f"{self.text} {item.id}"


def _run(items, answerer, out, index=0, count=1, **kw):
    return run_shard(items, answerer, generic.TASK.score, out, index, count, progress=False, **kw)


def test_resume_keeps_answers_and_skips_them(tmp_path):
    out = str(tmp_path / "results.json")
    items = _items(5)
    first = Answerer("first", fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        _run(items, first, out)
    second = Answerer("second")
    records = _run(items, second, out)
    assert first.asked == ["q0", "q1"] and second.asked == ["q2", "q3", "q4"]
    assert [records[i.id]["prediction"] for i in items] == ["first q0", "first q1", "second q2", "second q3",
                                                            "second q4"]
    results = merge(items, out, 1, generic.summarize)
    assert [r["id"] for r in results["records"]] == [i.id for i in items]
    third = Answerer("third")
    _run(items, third, out)
    assert third.asked == []
    with open(out) as f:
        assert json.load(f) == results


def test_two_processes_cover_every_question_once(tmp_path):
    out = str(tmp_path / "results.json")
    items = _items(7)
    p1 = Answerer("p1")
    _run(items, p1, out, 1, 2)
    assert merge(items, out, 2, generic.summarize) is None and not os.path.exists(out)  # shard 0 is missing
    p0 = Answerer("p0")
    _run(items, p0, out, 0, 2)
    assert p0.asked == ["q0", "q2", "q4", "q6"] and p1.asked == ["q1", "q3", "q5"]
    results = merge(items, out, 2, generic.summarize)
    assert [r["prediction"] for r in results["records"]] == [f"p{i % 2} q{i}" for i in range(7)]
    for i in range(2):
        with open(part_path(out, i, 2)) as f:
            assert len(f.read().splitlines()) == len(items[i::2])
    assert results["total"] == 7


def test_a_bad_video_is_recorded_as_failed_and_the_run_goes_on(tmp_path):
    out = str(tmp_path / "results.json")
    items = _items(4)
    first = Answerer("a", bad_videos=("q1",))
    _run(items, first, out)
    assert first.asked == ["q0", "q1", "q2", "q3"]
    results = merge(items, out, 1, generic.summarize)
    assert results["failed"] == 1 and results["failures"] == [
        {"id": "q1", "reason": "VideoDecodeError: v1.mp4: moov atom not found"}]
    assert results["total"] == 3  # scored over the answered ones
    again = Answerer("b")
    _run(items, again, out)
    assert again.asked == []  # a rerun does not stumble over it again
    retry = Answerer("c")
    _run(items, retry, out, retry_failed=True)
    assert retry.asked == ["q1"]
    results = merge(items, out, 1, generic.summarize)
    assert results["failed"] == 0 and results["records"][1]["prediction"] == "c q1"
    assert "overall" in open(table_path(out)).read()


def test_a_torn_last_line_is_cut_and_the_run_merges(tmp_path):
    out = str(tmp_path / "results.json")
    items = _items(4)
    _run(items[:2], Answerer("a"), out)
    with open(part_path(out, 0, 1), "a") as f:
        f.write('{"id": "q2", "predic')  # the disk filled up mid-line
    second = Answerer("b")
    _run(items, second, out)
    assert second.asked == ["q2", "q3"]
    with open(part_path(out, 0, 1)) as f:
        assert [json.loads(line)["id"] for line in f] == ["q0", "q1", "q2", "q3"]
    assert merge(items, out, 1, generic.summarize)["total"] == 4
    third = Answerer("c")
    _run(items, third, out)
    assert third.asked == []


def test_cli_end_to_end_on_a_synthetic_video(tmp_path):
    from data.synthetic import generate
    from nsa_jax import init_model, save_hf, tiny_config

    generate(tmp_path / "data", num_videos=1, frames_range=(16, 16))
    save_hf(init_model(tiny_config(), seed=0), str(tmp_path / "model"))
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "launch.eval", f"--model={tmp_path / 'model'}",
           f"--questions={tmp_path / 'data' / 'questions.json'}", f"--video_root={tmp_path / 'data'}",
           f"--out={out}", "--max_frames=4", "--max_pixels=12544", "--max_new_tokens=4", "--limit=3"]
    for _ in range(2):  # the second run finds every answer and only merges again
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    with open(part_path(str(out), 0, 1)) as f:
        assert len(f.read().splitlines()) == 3
    assert [r["id"] for r in results["records"]] == ["synth_0_0000_what_open", "synth_0_0000_what_mc",
                                                     "synth_0_0000_colour_open"]
    assert results["total"] == 3 and results["correct"] == sum(r["correct"] for r in results["records"])
    assert results["preset"]["name"] == "videonsa_eval" and results["preset"]["max_frames"] == 4
    assert all(isinstance(r["prediction"], str) for r in results["records"])
    assert "overall" in run.stdout
