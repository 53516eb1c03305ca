"""Context parallelism past the KV heads (`nsa_jax/head_parallel.py`'s sequence split): on 8 fake CPU devices,
a tiny model's loss and gradients with its query tokens split 8 ways equal one device's: mode native over
`sequence` 4 beside its heads over `tensor` 2, mode videonsa (whose padded head layout keeps heads whole) over
`sequence` 8. The tiny model has 2 KV heads, so neither 8 nor 4 splits its heads. (tests/training/
test_train_mesh.py covers batch rows over `data` 2 beside the tokens over `sequence` 4 in both modes.) The work
runs in a subprocess so XLA_FLAGS takes effect before jax is imported."""

from __future__ import annotations

import json
import sys

from tests.support.fake_devices import run_with_fake_devices

CASES = {"native": {"tensor": 2, "sequence": 4}, "videonsa": {"sequence": 8}}


def _compare() -> dict:
    import jax
    import numpy as np

    from configs.tiny import get_config
    from nsa_jax.config import NSAConfig, model_preset
    from nsa_jax.head_parallel import split_axes
    from nsa_jax.sharding import make_mesh
    from nsa_jax.training.device_batch import device_batch
    from nsa_jax.training.model_setup import split_for_training
    from nsa_jax.training.optimizer import make_optimizer
    from nsa_jax.training.synthetic_data import SyntheticBatches
    from nsa_jax.training.train_step import StepFunctions

    c = get_config()

    def run(cfg, host, shape, devices):
        mesh = make_mesh(shape, devices)
        graphdef, params = split_for_training(cfg, mesh, compute_dtype="float32", remat="none", seed=0)
        fns = StepFunctions(graphdef, make_optimizer(params, learning_rate=1e-3, weight_decay=0.0, grad_clip=0.0),
                            mesh, loss_chunk=32)
        batch = device_batch(host, cfg, mesh)
        lowered = jax.jit(fns.micro_sums).lower(params, batch)
        sums = lowered.compile()(params, batch)
        return float(sums.loss), jax.device_get(sums.grads), lowered.as_text().count("all_gather")

    out = {}
    rel = lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
    for mode, shape in CASES.items():
        c.model.nsa.mode = mode
        cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
        host = SyntheticBatches(cfg, batch_size=2, seq_len=64, video_grid=(2, 8, 8), max_patches=256).batch(0)
        ref_loss, ref_grads, _ = run(cfg, host, {"data": 1}, jax.devices()[:1])
        loss, grads, gathers = run(cfg, host, shape, jax.devices())
        axes = split_axes(make_mesh(shape, jax.devices()), batch=2, length=64, num_kv_heads=2,
                          split_heads=mode == "native")
        out[mode] = {"reference": ref_loss, "loss": loss, "all_gathers": gathers, "axes": axes,
                     "max_rel_grad_diff": max(jax.tree.leaves(jax.tree.map(rel, grads, ref_grads)))}
    return out


def test_sequence_split_matches_single_device(tmp_path):
    out = run_with_fake_devices(__file__, 8, tmp_path / "out.json")
    for mode, r in out.items():
        assert abs(r["loss"] - r["reference"]) <= 1e-5 * abs(r["reference"]), (mode, r)
        assert r["max_rel_grad_diff"] < 1e-4, (mode, r)
        assert r["all_gathers"] > 0, (mode, r)  # k / v gathered inside shard_map
    # (batch, heads, sequence) axes of the attention split: the queries split 8 ways in both
    assert out["native"]["axes"] == [[], ["tensor"], ["sequence"]]
    assert out["videonsa"]["axes"] == [[], [], ["sequence"]]


if __name__ == "__main__":
    import pathlib
    pathlib.Path(sys.argv[1]).write_text(json.dumps(_compare()))
