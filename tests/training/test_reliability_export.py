"""Issue 21, items 2 and 10(d): a training workdir (or one of its step directories) loads with from_pretrained
and exports with launch.convert; a conversion interrupted by a full disk does not block the rerun."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from configs.tiny import get_config
from nsa_jax import CheckpointError, conversion, from_pretrained
from nsa_jax.sharding import dotted_path

from tests import ROOT

TOKENIZER_TEXT = '{"stand-in": "a tokenizer.json the run names; synthetic data never reads it"}'


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny run of 4 steps (checkpoints at 2 and 4) that names a tokenizer file."""
    from nsa_jax.training.loop import train
    root = tmp_path_factory.mktemp("run")
    (root / "tokenizer.json").write_text(TOKENIZER_TEXT)
    c = get_config()
    c.train.steps = 4
    c.checkpoint.update(every=2, keep=3)
    c.data.tokenizer = str(root / "tokenizer.json")
    train(c, str(root / "work"))
    return root / "work"


def _state_params(step_dir) -> dict[str, np.ndarray]:
    raw = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
    return {dotted_path(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(raw["params"])[0]}


def _model_params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_workdir_and_step_dir_load_the_trained_parameters(workdir):
    assert (workdir / "config.json").is_file() and (workdir / "tokenizer.json").read_text() == TOKENIZER_TEXT
    for path, step in ((workdir, 4), (workdir / "checkpoints" / "2", 2)):
        want = _state_params(workdir / "checkpoints" / str(step))
        got = _model_params(from_pretrained(str(path)))
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].dtype == np.float32, k
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{path}: {k}")
    half = _model_params(from_pretrained(str(workdir), dtype=jnp.bfloat16))
    want = _state_params(workdir / "checkpoints" / "4")
    for k in want:
        assert half[k].dtype == jnp.bfloat16, k
        np.testing.assert_array_equal(half[k], want[k].astype(jnp.bfloat16), err_msg=k)


def test_workdir_without_config_names_it(workdir, tmp_path):
    os.symlink(workdir / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(CheckpointError, match=rf"{tmp_path}: no config\.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="without a finished checkpoint"):
        from_pretrained(str(tmp_path / "empty"))


def test_export_after_a_full_disk(workdir, tmp_path, monkeypatch):
    dst = tmp_path / "hf"

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(conversion, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        conversion.convert("orbax_to_hf", str(workdir), str(dst), None)
    monkeypatch.undo()
    staging = conversion.staging_dir(str(dst))
    assert os.listdir(staging) and not dst.exists()  # the interrupted run's leftovers

    out = subprocess.run([sys.executable, "-m", "launch.convert", "--direction=orbax_to_hf", f"--src={workdir}",
                          f"--dst={dst}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not os.path.exists(staging)
    assert (dst / "tokenizer.json").read_text() == TOKENIZER_TEXT
    ids = np.array([[1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(np.asarray(from_pretrained(str(dst))(ids)),
                                  np.asarray(from_pretrained(str(workdir))(ids)))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # the run is untouched
