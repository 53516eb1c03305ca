"""Training on the Grain pipeline's shards (data/pipeline.py): the iterator state is checkpointed, so
resuming from a step replays exactly the batches the first run saw after it."""

from __future__ import annotations

import json
import os

import jax
import pytest

from configs.tiny import get_config
from data.decode import DecodeSettings
from data.predecode import predecode
from data.synthetic import generate
from data.pipeline import training_batches
from nsa_jax.training.loop import train


def test_shards_training_resumes_with_the_data_state(tmp_path):
    raw = str(tmp_path / "raw")
    annotations = generate(raw, num_videos=4, seed=0, frames_range=(16, 24), fps=8, duration_range=(2, 3))
    predecode(annotations, raw, str(tmp_path / "shards"), DecodeSettings(fps=4, min_frames=4, max_frames=8,
              min_pixels=28 * 28, max_pixels=56 * 56), shard_size=2, progress=False)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax_cache"))  # the resume compiles nothing new
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    c = get_config()
    c.data.update(source="shards", shards_dir=str(tmp_path / "shards"), batch_size=2, seq_len=1024, max_patches=512)
    c.train.steps = 4
    c.checkpoint.update(every=2, keep=5)
    work = str(tmp_path / "run")
    try:
        first = {r["step"]: r["loss"] for r in train(c, work, make_shard_batches=training_batches)}
        states = []
        for step in (2, 4):  # Grain's iterator state travels with each checkpoint and moves on
            with open(os.path.join(work, "checkpoints", str(step), "data", "metadata")) as f:
                states.append(json.load(f))
        assert states[0] and states[0] != states[1]
        c.checkpoint.resume_from_step = 2
        again = {r["step"]: r["loss"] for r in train(c, work, make_shard_batches=training_batches)}
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
    assert sorted(first) == [1, 2, 3, 4] and sorted(again) == [3, 4]
    assert len(set(first.values())) == 4  # different batches
    for step, loss in again.items():
        assert loss == pytest.approx(first[step], rel=1e-6)
