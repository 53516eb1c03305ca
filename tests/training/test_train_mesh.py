"""Loss and gradients on 8 fake CPU devices, for several (data, fsdp, tensor, sequence) meshes and both NSA
modes, equal the single-device ones. The work runs in a subprocess so XLA_FLAGS takes effect before jax is
imported."""

from __future__ import annotations

import json
import sys

from tests.support.fake_devices import run_with_fake_devices

LAYOUTS = [
    {"data": 8},
    {"data": 2, "sequence": 4},  # sequence 4 does not divide the 2 KV heads: query tokens split over it
    {"fsdp": 2, "tensor": 2, "sequence": 2},
    {"fsdp": 4, "sequence": 2},  # heads split over sequence (Ulysses), parameters over fsdp and sequence
]
MODES = ("videonsa", "native")

def _compare_layouts() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs.tiny import get_config
    from nsa_jax.training.device_batch import device_batch
    from nsa_jax.config import NSAConfig, model_preset
    from nsa_jax.training.model_setup import split_for_training
    from nsa_jax.training.optimizer import make_optimizer
    from nsa_jax.sharding import make_mesh
    from nsa_jax.training.synthetic_data import SyntheticBatches
    from nsa_jax.training.train_step import StepFunctions

    c = get_config()

    def run(cfg, host, shape, devices):
        mesh = make_mesh(shape, devices)
        graphdef, params = split_for_training(cfg, mesh, compute_dtype="float32", remat="none", seed=0)
        fns = StepFunctions(graphdef, make_optimizer(params, learning_rate=1e-3, weight_decay=0.0, grad_clip=0.0),
                            mesh, loss_chunk=32)
        batch = device_batch(host, cfg, mesh)
        sums = jax.jit(fns.micro_sums)(params, batch)
        sharded = sum(not p.sharding.is_fully_replicated for p in jax.tree.leaves(params))
        head_parallel = "shard_map" in str(jax.make_jaxpr(fns.micro_sums)(params, batch))
        return float(sums.loss), float(sums.tokens), jax.device_get(sums.grads), sharded, head_parallel

    out = {}
    for mode in MODES:
        c.model.nsa.mode = mode
        cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
        host = SyntheticBatches(cfg, batch_size=8, seq_len=64, video_grid=(2, 4, 4), max_patches=288).batch(0)
        ref_loss, ref_tokens, ref_grads, _, _ = run(cfg, host, {"data": 1}, jax.devices()[:1])
        out[mode] = {"reference": ref_loss, "layouts": []}
        for shape in LAYOUTS:
            loss, tokens, grads, sharded, head_parallel = run(cfg, host, shape, jax.devices())
            rel = lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
            out[mode]["layouts"].append({
                "shape": shape, "loss": loss, "tokens": tokens, "ref_tokens": ref_tokens,
                "max_rel_grad_diff": max(jax.tree.leaves(jax.tree.map(rel, grads, ref_grads))),
                "sharded_params": sharded, "shard_map": head_parallel})
    del jnp
    return out

def test_mesh_layouts_match_single_device(tmp_path):
    out = run_with_fake_devices(__file__, 8, tmp_path / "out.json")
    for mode in MODES:
        for r in out[mode]["layouts"]:
            assert r["tokens"] == r["ref_tokens"], (mode, r)
            assert abs(r["loss"] - out[mode]["reference"]) <= 1e-4 * abs(out[mode]["reference"]), (mode, r)
            assert r["max_rel_grad_diff"] < 1e-3, (mode, r)
            # Every layout splits batch rows or heads, so attention runs inside shard_map.
            assert r["shard_map"], (mode, r)
        # The layouts really shard: parameters are split over fsdp / tensor / sequence.
        assert all(r["sharded_params"] > 0 for r in out[mode]["layouts"][1:]), mode

if __name__ == "__main__":
    import pathlib
    pathlib.Path(sys.argv[1]).write_text(json.dumps(_compare_layouts()))
