"""launch/eval.py: resume, sharding over processes, and one end-to-end run on a synthetic video."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launch.eval import merge, part_path, run_shard
from nsa_jax.qa import Question

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _questions(n: int) -> list[Question]:
    return [Question(id=f"q{i}", video=f"v{i}.mp4", question=f"Question {i}?", answer="B", options=("x", "y"))
            if i % 2 else Question(id=f"q{i}", video=f"v{i}.mp4", question=f"Question {i}?", answer=f"word{i}")
            for i in range(n)]


class Answerer:
    """Answers with a fixed text per question id and counts who was asked; can fail after N answers."""

    def __init__(self, text: str, fail_after: int | None = None):
        self.text, self.fail_after, self.asked = text, fail_after, []

    def __call__(self, q: Question) -> str:
        if self.fail_after is not None and len(self.asked) == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.asked.append(q.id)
        return f"{self.text} {q.id}"


def test_resume_keeps_answers_and_skips_them(tmp_path):
    out = str(tmp_path / "results.json")
    qs = _questions(5)
    first = Answerer("first", fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_shard(qs, first, out, 0, 1, progress=False)
    second = Answerer("second")
    records = run_shard(qs, second, out, 0, 1, progress=False)
    assert first.asked == ["q0", "q1"] and second.asked == ["q2", "q3", "q4"]
    assert [records[q.id]["prediction"] for q in qs] == ["first q0", "first q1", "second q2", "second q3",
                                                         "second q4"]
    results = merge(qs, out, 1)
    assert [r["id"] for r in results["records"]] == [q.id for q in qs]
    third = Answerer("third")
    run_shard(qs, third, out, 0, 1, progress=False)
    assert third.asked == []
    with open(out) as f:
        assert json.load(f) == results


def test_two_processes_cover_every_question_once(tmp_path):
    out = str(tmp_path / "results.json")
    qs = _questions(7)
    p1 = Answerer("p1")
    run_shard(qs, p1, out, 1, 2, progress=False)
    assert merge(qs, out, 2) is None and not os.path.exists(out)  # process 0's shard is missing
    p0 = Answerer("p0")
    run_shard(qs, p0, out, 0, 2, progress=False)
    assert p0.asked == ["q0", "q2", "q4", "q6"] and p1.asked == ["q1", "q3", "q5"]
    results = merge(qs, out, 2)
    assert [r["id"] for r in results["records"]] == [q.id for q in qs]
    assert [r["prediction"] for r in results["records"]] == [f"p{i % 2} q{i}" for i in range(7)]
    for i in range(2):
        with open(part_path(out, i, 2)) as f:
            assert len(f.read().splitlines()) == len(qs[i::2])
    assert results["total"] == 7


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
    assert all(isinstance(r["prediction"], str) for r in results["records"])
    assert "accuracy" in run.stdout
