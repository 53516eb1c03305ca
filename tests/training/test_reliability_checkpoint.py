"""Issue 21, checkpoints: a healthy checkpoint of another config is called that, with the fields and arrays
that differ; a corrupt one suggests a flag that exists; neither error removes a checkpoint."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from configs.tiny import get_config
from nsa_jax.training.checkpoint import CheckpointError, Checkpointer
from nsa_jax.training.train_step import TrainState


def _state(width: int) -> TrainState:
    params = {"embed": np.ones((4, width), np.float32), "norm": np.ones((width,), np.float32)}
    return TrainState(np.int32(2), params, {"mu": params}, np.int32(0))


def _abstract(state: TrainState) -> TrainState:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)


def _checkpointer(directory: str, preset: str) -> Checkpointer:
    return Checkpointer(directory, save_every=1, async_save=False, config={"model": {"preset": preset, "seed": 0}})


def test_other_config_and_corrupt_checkpoints_are_told_apart(tmp_path):
    directory = str(tmp_path / "checkpoints")
    ckpt = _checkpointer(directory, "tiny")
    for step in (1, 2):
        ckpt.save(step, _state(8)._replace(step=np.int32(step)), {"step": step})
    ckpt.close()

    other = _checkpointer(directory, "demo")
    with pytest.raises(CheckpointError, match=r"checkpoints/2 \(step 2\) is healthy but was made by another config: "
                                              r"these fields differ: model\.preset='tiny' there, 'demo' here; "
                                              r"4 arrays differ, e\.g\. params\.embed: \(4, 8\) there, \(4, 16\) here"):
        other.restore(2, _abstract(_state(16)))
    state, data = other.restore(2, _abstract(_state(8)))  # same arrays: restores, whatever the config says
    assert int(state.step) == 2 and data == {"step": 2}
    other.close()

    for dirpath, _, files in os.walk(os.path.join(directory, "2", "state")):
        for name in files:
            with open(os.path.join(dirpath, name), "wb") as f:
                f.write(b"garbage")
    ckpt = _checkpointer(directory, "tiny")
    with pytest.raises(CheckpointError, match=r"checkpoints/2 \(step 2\) is unreadable or corrupt .*steps \[1\]; "
                                              r"resume from one with --config\.checkpoint\.resume_from_step=N"):
        ckpt.restore(2, _abstract(_state(8)))
    assert ckpt.steps() == [1, 2]  # nothing removed
    ckpt.close()
    assert "resume_from_step" in get_config().checkpoint  # the flag the message names exists
