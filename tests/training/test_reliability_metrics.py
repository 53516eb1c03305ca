"""Issue 21, item 10(a): metrics.jsonl holds each step once after a kill and a resume; the rows logged past
the restored checkpoint (and a torn last line) are kept aside, not lost. (tests/training/test_train_resume.py checks the
same through a real kill -9 and resume.)"""

from __future__ import annotations

import json

from nsa_jax.training.events import abandoned_metrics_path, open_metrics


def _rows(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rows_past_the_resumed_step_move_aside(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 6))
        f.write('{"step": 6, "lo')  # kill -9 mid-write
    with open_metrics(path, 3) as f:
        f.write(json.dumps({"step": 4, "loss": 40.0}) + "\n")
    assert [(r["step"], r["loss"]) for r in _rows(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    with open(abandoned_metrics_path(path)) as f:
        aside = f.read().splitlines()
    assert [json.loads(line)["step"] for line in aside[:2]] == [4, 5] and aside[2] == '{"step": 6, "lo'
    with open_metrics(path, 4):  # nothing to move: the file stays as it is
        pass
    assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4]
