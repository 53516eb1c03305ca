"""kill -9 and SIGTERM mid-training, then resume: the loss of every step equals an uninterrupted run's.
A corrupt latest checkpoint gives an error naming it; resuming from the earlier one still works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import ROOT

STEPS = 8


def _config(**overrides):
    from configs.tiny import get_config
    c = get_config()
    c.train.steps = STEPS
    c.checkpoint.update(every=2, keep=10)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def _records(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _launch(workdir, env):
    return subprocess.Popen([sys.executable, "-m", "launch.train", "--config=configs/tiny.py", f"--workdir={workdir}",
                             f"--config.train.steps={STEPS}", "--config.checkpoint.keep=10"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, workdir, step, timeout=240.0):
    end = time.time() + timeout
    while time.time() < end:
        recs = _records(workdir)
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """A persistent compilation cache shared by this process and its children (each compiles once)."""
    import jax
    cache = str(tmp_path / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    yield env
    jax.config.update("jax_compilation_cache_dir", None)


def test_kill_sigterm_corrupt_resume(tmp_path, cache_env):
    from nsa_jax.training.checkpoint import CheckpointError, Checkpointer
    from nsa_jax.training.loop import train

    reference = {r["step"]: r["loss"] for r in train(_config(), str(tmp_path / "reference"))}
    assert sorted(reference) == list(range(1, STEPS + 1))
    work = str(tmp_path / "run")

    # 1. kill -9 mid-training (frozen first, so it cannot finish meanwhile).
    proc = _launch(work, cache_env)
    _wait_for_step(proc, work, 3)
    proc.send_signal(signal.SIGSTOP)
    proc.kill()
    proc.wait()
    killed_at = _records(work)[-1]["step"]
    assert killed_at < STEPS

    # 2. Resume, then SIGTERM: it saves the step it reached and exits 0.
    proc = _launch(work, cache_env)
    _wait_for_step(proc, work, killed_at + 1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    stopped_at = _records(work)[-1]["step"]
    ckpt = Checkpointer(os.path.join(work, "checkpoints"))
    assert ckpt.latest_step() == stopped_at
    earlier = [s for s in ckpt.steps() if s < stopped_at]
    ckpt.close()
    assert earlier, "expected an earlier checkpoint to fall back to"

    # 3. Corrupt the latest checkpoint: a clear error naming it and the earlier steps.
    state_dir = os.path.join(work, "checkpoints", str(stopped_at), "state")
    for dirpath, _, files in os.walk(state_dir):
        for name in files:
            with open(os.path.join(dirpath, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match=rf"checkpoints/{stopped_at}\b.*corrupt.*{earlier[-1]}"):
        train(_config(), work)

    # 4. Resume from the earlier checkpoint and finish.
    train(_config(**{"checkpoint.resume_from_step": earlier[-1]}), work)
    records = _records(work)
    assert [r["step"] for r in records] == sorted(reference)  # each step once, despite the kill -9
    for r in records:  # every run's every step: killed, SIGTERM'd and resumed ones
        assert r["loss"] == pytest.approx(reference[r["step"]], rel=1e-6, abs=1e-6), r
    assert os.listdir(os.path.join(work, "abandoned_checkpoints"))
