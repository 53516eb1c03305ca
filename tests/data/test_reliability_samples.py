"""Issue 21, over-long samples: predecode reports each sample's lengths; the pipeline skips (or truncates) a
sample that does not fit, counts it in its state and in the training metrics, and stops only past
`data.max_skip_fraction` with the fraction and the sample named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data import pipeline
from data.decode import DecodeSettings
from data.predecode import predecode
from data.shards import Manifest, shard_paths
from data.synthetic import generate
from nsa_jax import tiny_config
from nsa_jax.tokenizer import ByteTokenizer

CFG = tiny_config()
TOK = ByteTokenizer(CFG.text.vocab_size)
SETTINGS = DecodeSettings(fps=4, min_frames=4, max_frames=4, min_pixels=28 * 28, max_pixels=3136)
NUM = 50
LONG_ID = "long_answer"


def write_annotations(path, videos: list[str], long_index: int | None = 7) -> list[dict]:
    """NUM short question/answer entries over `videos`; entry `long_index` has a 400-character answer."""
    entries = []
    for i in range(NUM):
        answer = "x" * 400 if i == long_index else f"answer {i}"
        entries.append({"id": LONG_ID if i == long_index else f"s{i}", "video": videos[i % len(videos)],
                        "conversations": [{"from": "human", "value": "<video>\nWhat is it?"},
                                          {"from": "gpt", "value": answer}]})
    with open(path, "w") as f:
        json.dump(entries, f)
    return entries


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    d = tmp_path_factory.mktemp("samples")
    with open(generate(d / "src", num_videos=2, seed=1, frames_range=(8, 12))) as f:
        write_annotations(d / "ann.json", [e["video"] for e in json.load(f)])
    predecode(str(d / "ann.json"), str(d / "src"), str(d / "frames"), SETTINGS, shard_size=16, progress=False)
    return str(d / "frames")


def _drain(it) -> int:
    """Samples packed into the batches of a finite iterator."""
    return sum(int(np.all(b["video_grid_thw"] > 0, axis=1).sum()) for b in it)


def _batches(frames, **kw):
    args = dict(batch_size=4, seq_len=128, max_patches=4 * 32, num_epochs=1, max_skip_fraction=0.05) | kw
    return pipeline.batches(shard_paths(frames), CFG, TOK, **args)


def test_manifest_lists_sample_lengths(frames):
    manifest = Manifest.load(frames)
    rows = {row[0]: row for i in sorted(manifest.shards) for row in manifest.shards[i].samples}
    assert len(rows) == NUM
    assert rows[LONG_ID][2] == len("<video>\nWhat is it?") + 400
    assert all(0 < row[1] <= 32 for row in rows.values())  # 4 frames of at most 3136 pixels: (2, <=4, <=4)


def test_over_long_sample_is_skipped_and_counted(frames):
    it = _batches(frames)
    assert _drain(it) == NUM - 1
    state = it.get_state()
    assert pipeline.fit_counts(state) == {"skipped_samples": 1, "truncated_samples": 0}
    assert state["drawn"] == NUM and LONG_ID in state["examples"][0]
    restored = _batches(frames)
    restored.set_state(json.loads(json.dumps(state)))  # the counts travel with the checkpointed state
    assert pipeline.fit_counts(restored.get_state())["skipped_samples"] == 1


def test_truncate_keeps_the_video_and_cuts_the_answer(frames):
    it = _batches(frames, too_long="truncate")
    assert _drain(it) == NUM
    assert pipeline.fit_counts(it.get_state()) == {"skipped_samples": 0, "truncated_samples": 1}
    # Too short for the video tokens: truncation cannot help, the sample is skipped.
    it = _batches(frames, too_long="truncate", seq_len=8, max_skip_fraction=1.0)
    assert _drain(it) == 0 and pipeline.fit_counts(it.get_state())["skipped_samples"] == NUM


def test_past_the_skip_fraction_the_error_names_fraction_and_sample(frames):
    with pytest.raises(pipeline.SkipBudgetError, match=rf"max_skip_fraction=0.0 .*sample {LONG_ID}: \d+ tokens"):
        _drain(_batches(frames, max_skip_fraction=0.0))
    with pytest.raises(pipeline.SkipBudgetError, match=r"50 of 50 samples can never fit.*pixel rows > max_patches=8"):
        pipeline.check_lengths([r for s in Manifest.load(frames).shards.values() for r in s.samples], seq_len=128,
                               max_patches=8, merge_size=2, max_skip_fraction=0.5)
    with pytest.raises(ValueError, match="too_long='cut'"):
        _batches(frames, too_long="cut")


def test_training_skips_the_sample_and_reports_it(frames, tmp_path):
    from configs.tiny import get_config
    from nsa_jax.training.loop import train
    c = get_config()
    c.data.update(source="shards", shards_dir=frames, batch_size=4, seq_len=128, max_patches=4 * 32)
    c.train.update(steps=13, log_every=1)  # 13 x 4 draws: the long sample is drawn at least once
    c.checkpoint.update(every=100, save_last=False)
    history = train(c, str(tmp_path / "run"), make_shard_batches=pipeline.training_batches)
    assert [r["step"] for r in history] == list(range(1, 14))
    assert history[-1]["skipped_samples"] >= 1 and history[-1]["truncated_samples"] == 0
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert json.loads(f.readlines()[-1])["skipped_samples"] == history[-1]["skipped_samples"]
