"""Two processes (jax.distributed on CPU, 4 rows each) train the same first step as one process holding
both processes' rows with the exact (unpadded) vision layout: each process's pixel padding sits between the
processes' real rows, and must not shift the vision features of the second process's rows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs.tiny import get_config
from nsa_jax.model import VisionInput
from nsa_jax.training.device_batch import device_batch
from nsa_jax.config import NSAConfig, model_preset
from nsa_jax.training.model_setup import split_for_training
from nsa_jax.training.optimizer import make_optimizer
from nsa_jax.sharding import make_mesh
from nsa_jax.training.synthetic_data import SyntheticBatches
from nsa_jax.training.train_step import StepFunctions
from nsa_jax.vision import vision_layout

from tests import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "launch.train", "--config=configs/tiny.py",
                               f"--workdir={tmp_path}", "--config.train.steps=1",
                               f"--config.distributed.coordinator_address=localhost:{port}",
                               "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]

    # The oracle while they run: one device, both processes' rows (seeds 0 and 1), no pixel padding at all.
    c = get_config()
    cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
    hosts = [SyntheticBatches(cfg, batch_size=4, seq_len=64, video_grid=(2, 4, 4), max_patches=144, seed=p).batch(0)
             for p in (0, 1)]
    tokens = {k: np.concatenate([h[k] for h in hosts], axis=1 if k == "position_ids" else 0)
              for k in ("input_ids", "labels", "position_ids")}
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    graphdef, params = split_for_training(cfg, mesh, compute_dtype="float32", remat="none", seed=0)
    fns = StepFunctions(graphdef, make_optimizer(params, learning_rate=1e-3, weight_decay=0.0, grad_clip=0.0), mesh,
                        loss_chunk=32)
    batch = device_batch(tokens, cfg, mesh)
    real = np.concatenate([h["pixel_values_videos"][:128] for h in hosts])
    grid = np.concatenate([h["video_grid_thw"] for h in hosts])
    exact = VisionInput(jax.numpy.asarray(real), vision_layout(grid, cfg.vision))

    sums = jax.jit(lambda p, b: fns.micro_sums(p, {**b, "videos": exact}))(params, batch)
    loss = float(sums.loss / sums.tokens)
    grad_norm = float(optax.tree.norm(jax.tree.map(lambda g: g / sums.tokens, sums.grads)))

    for p in procs:
        assert p.wait(timeout=400) == 0, p.stderr.read()[-3000:]
    (record,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert record["loss"] == pytest.approx(loss, rel=1e-5)
    assert record["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
