"""Issue 21, inputs: a config or input mistake stops before any work with one line naming the field or file
(no traceback, no silent exit 0), and leaves what is on disk as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from data.annotations import AnnotationError, load_annotations
from data.errors import DataError
from data.predecode import predecode
from data.shards import ShardError, shard_paths
from data.synthetic import generate

from tests import ROOT

ENTRY = {"id": "a", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"},
                                                        {"from": "gpt", "value": "A"}]}


def _tiny(**overrides):
    from configs.tiny import get_config
    c = get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("field, value", [
    ("checkpoint.keep", 0), ("train.steps", 0), ("train.learning_rate", -1e-4), ("data.batch_size", 0),
    ("train.grad_accum", 0), ("checkpoint.every", 0), ("data.too_long", "cut"), ("data.max_skip_fraction", 1.5),
])
def test_training_config_mistakes_name_the_field(tmp_path, field, value):
    from nsa_jax.training.loop import train
    from nsa_jax.training.validation import ConfigError
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match=rf"config\.{field}={value!r}: expected"):
        train(_tiny(**{field: value}), str(work))
    assert os.listdir(work) == ["metrics.jsonl"] and (work / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_parameter_prefetch_needs_full_remat():
    from nsa_jax.training.validation import config_problems
    problems = config_problems(_tiny(**{"train.prefetch_params": True, "train.remat": "dots"}))
    assert problems == ["config.train.prefetch_params=True: expected config.train.remat='full' (got 'dots'; the "
                        "prefetching layer scan recomputes each layer itself)"]
    assert config_problems(_tiny(**{"train.prefetch_params": True})) == []


def test_train_entry_point_prints_one_line(tmp_path):
    out = _run("launch.train", "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.checkpoint.every=0",
               "--config.data.source=shards", f"--config.data.shards_dir={tmp_path / 'nowhere'}")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "config.checkpoint.every=0" in out.stderr and "config.data.shards_dir=" in out.stderr


def test_annotation_file_mistakes_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"annotation file .*missing.json: No such file"):
        load_annotations(tmp_path / "missing.json")
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([ENTRY, ENTRY | {"id": "caf\u00e9"}], indent=1, ensure_ascii=False).encode("latin-1"))
    line = json.dumps([ENTRY, ENTRY | {"id": "x"}], indent=1).splitlines().index('  "id": "x",') + 1
    with pytest.raises(AnnotationError, match=rf"latin.json:{line}: .*not UTF-8 text \(byte 0xe9"):
        load_annotations(latin)


def test_predecode_input_mistakes_name_the_input(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([ENTRY]))
    (tmp_path / "empty.json").write_text("[]")
    out = str(tmp_path / "out")
    with pytest.raises(DataError, match=r"video_root .*no_videos: not a directory"):
        predecode(str(ann), str(tmp_path / "no_videos"), out, progress=False)
    with pytest.raises(DataError, match=r"empty.json: no annotations"):
        predecode(str(tmp_path / "empty.json"), str(tmp_path), out, progress=False)
    with pytest.raises(DataError, match="shard_size=0"):
        predecode(str(ann), str(tmp_path), out, shard_size=0, progress=False)
    assert not os.path.exists(out)
    cli = _run("launch.predecode", f"--annotations={tmp_path / 'latin.json'}", f"--video_root={tmp_path}",
               f"--out_dir={out}")
    assert cli.returncode != 0 and "Traceback" not in cli.stderr and "latin.json: No such file" in cli.stderr


def test_shard_directory_mistakes_name_the_directory(tmp_path):
    with pytest.raises(ShardError, match=r"nowhere: no manifest.json; not a launch/predecode.py output"):
        shard_paths(str(tmp_path / "nowhere"))
    root = tmp_path / "src"
    ann = generate(root, num_videos=1, seed=0, frames_range=(8, 10))
    entries = json.loads(open(ann).read())
    (tmp_path / "gone.json").write_text(json.dumps([e | {"video": "videos/gone.mp4"} for e in entries]))
    predecode(str(tmp_path / "gone.json"), str(root), str(tmp_path / "frames"), progress=False)
    with pytest.raises(ShardError, match=r"frames: no records: all 1 videos failed to decode \(see .*failures.jsonl"):
        shard_paths(str(tmp_path / "frames"))
    (tmp_path / "frames" / "manifest.json").write_text("{oops")
    with pytest.raises(ShardError, match=r"frames/manifest.json: unreadable manifest"):
        shard_paths(str(tmp_path / "frames"))
