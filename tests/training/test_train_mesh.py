"""Loss and gradients on 8 fake CPU devices, for several (data, fsdp, tensor, sequence) meshes and both NSA
modes, equal the single-device ones. The tiny model has 2 KV heads, so `sequence` 4 beside `tensor` 2, and
`sequence` 8, split the query tokens (`head_parallel`'s context parallelism: k, v all-gathered); mode
videonsa keeps its heads whole, so its head axes all split tokens. Each device computes only its own share of
every loss chunk's logits (read from the compiled program). ZeRO-3 with parameter prefetch
(nsa_jax/layer_scan.py) is checked in the compiled program's loops. The work runs in a subprocess so XLA_FLAGS
takes effect before jax is imported."""

from __future__ import annotations

import json
import re
import sys

import pytest

from tests.support.fake_devices import run_with_fake_devices
from tests.support.hlo import while_body_gathers

LAYOUTS = [
    {"data": 8},
    {"tensor": 2, "sequence": 4},  # heads over tensor (native); sequence 4 does not divide them: tokens split
    {"fsdp": 2, "tensor": 2, "sequence": 2},
    {"fsdp": 4, "sequence": 2},  # heads split over sequence (Ulysses), parameters over fsdp and sequence
    {"sequence": 8},  # query tokens split 8 ways
]
# (batch, heads, tokens) axes of the attention split, where the tokens split
SPLITS = {("native", 1): [[], ["tensor"], ["sequence"]], ("videonsa", 1): [[], [], ["tensor", "sequence"]],
          ("native", 4): [[], [], ["sequence"]]}
# Mode videonsa skips sequence 8: its tokens already split 8 ways under tensor 2 x sequence 4.
MODE_LAYOUTS = {"native": LAYOUTS, "videonsa": LAYOUTS[:4]}
MODES = ("videonsa", "native")

def _compare_layouts(mode: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs.tiny import get_config
    from nsa_jax.training.device_batch import device_batch
    from nsa_jax.config import NSAConfig, model_preset
    from nsa_jax.head_parallel import split_axes
    from nsa_jax.training.model_setup import split_for_training
    from nsa_jax.training.optimizer import make_optimizer
    from nsa_jax.sharding import make_mesh
    from nsa_jax.training.synthetic_data import SyntheticBatches
    from nsa_jax.training.train_step import StepFunctions

    c = get_config()

    def run(cfg, host, shape, devices, prefetch=False):
        mesh = make_mesh(shape, devices)
        graphdef, params = split_for_training(cfg, mesh, compute_dtype="float32", remat="full" if prefetch else "none",
                                              seed=0, prefetch=prefetch)
        fns = StepFunctions(graphdef, make_optimizer(params, learning_rate=1e-3, weight_decay=0.0, grad_clip=0.0),
                            mesh, loss_chunk=32)
        batch = device_batch(host, cfg, mesh)
        traced = jax.jit(fns.micro_sums).trace(params, batch)
        lowered = traced.lower()
        compiled = lowered.compile()
        sums = compiled(params, batch)
        gathers = lowered.as_text().count("all_gather")
        sharded = sum(not p.sharding.is_fully_replicated for p in jax.tree.leaves(params))
        head_parallel = "shard_map" in str(traced.jaxpr)
        text = compiled.as_text()
        loops = while_body_gathers(text)
        # Each device's LM-head product [rows, vocab / tensor] in the loss loop's forward.
        loss_rows = sorted({(int(r), int(v)) for r, v, name in re.findall(
            r"= f32\[(\d+),(\d+)\]\{[^}]*\} dot\([^\n]*op_name=\"([^\"]*)\"", text)
            if "jvp(loss)" in name and "transpose" not in name})
        return (float(sums.loss), float(sums.tokens), jax.device_get(sums.grads), sharded, head_parallel, gathers, loops,
                loss_rows)

    c.model.nsa.mode = mode
    cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
    host = SyntheticBatches(cfg, batch_size=8, seq_len=64, video_grid=(2, 4, 4), max_patches=288).batch(0)
    ref_loss, ref_tokens, ref_grads, *_ = run(cfg, host, {"data": 1}, jax.devices()[:1])
    out = {"reference": ref_loss, "layouts": [], "prefetch": {}}
    rel = lambda a, b: float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
    if mode == "native":  # the layer scan does not depend on the mode: one mode checks it
        for prefetch in (False, True):
            loss, _, grads, _, _, _, loops, _ = run(cfg, host, {"fsdp": 8}, jax.devices(), prefetch=prefetch)
            out["prefetch"][str(prefetch)] = {"loss": loss, "loops": loops, "max_rel_grad_diff": max(
                jax.tree.leaves(jax.tree.map(rel, grads, ref_grads)))}
    for shape in MODE_LAYOUTS[mode]:
        loss, tokens, grads, sharded, head_parallel, gathers, _, loss_rows = run(cfg, host, shape, jax.devices())
        axes = split_axes(make_mesh(shape, jax.devices()), batch=8, length=64, num_kv_heads=2,
                          split_heads=mode == "native")
        out["layouts"].append({
            "shape": shape, "loss": loss, "tokens": tokens, "ref_tokens": ref_tokens,
            "max_rel_grad_diff": max(jax.tree.leaves(jax.tree.map(rel, grads, ref_grads))),
            "sharded_params": sharded, "shard_map": head_parallel, "all_gathers": gathers, "axes": axes,
            "loss_rows": loss_rows})
    del jnp
    return out


@pytest.mark.parametrize("mode", MODES)  # one subprocess per mode: the two run side by side under xdist
def test_mesh_layouts_match_single_device(tmp_path, mode):
    out = run_with_fake_devices(__file__, 8, tmp_path / "out.json", mode)
    for r in out["layouts"]:
        assert r["tokens"] == r["ref_tokens"], (mode, r)
        assert abs(r["loss"] - out["reference"]) <= 1e-4 * abs(out["reference"]), (mode, r)
        assert r["max_rel_grad_diff"] < 1e-3, (mode, r)
        # Every layout splits batch rows or heads, so attention runs inside shard_map.
        assert r["shard_map"], (mode, r)
        # Each loss chunk (8 rows x 32 tokens, vocab 512) is split over the devices that split batch rows or
        # tokens (tensor splits neither): no device computes another's logits.
        splits = r["shape"].get("data", 1) * r["shape"].get("fsdp", 1) * r["shape"].get("sequence", 1)
        assert r["loss_rows"] == [[8 * 32 // splits, 512 // r["shape"].get("tensor", 1)]], (mode, r)
    # The layouts really shard: parameters are split over fsdp / tensor / sequence.
    assert all(r["sharded_params"] > 0 for r in out["layouts"][1:]), mode
    for i, r in enumerate(out["layouts"]):
        if (mode, i) in SPLITS:  # the queries split: k / v gathered inside shard_map
            assert r["axes"] == SPLITS[mode, i] and r["all_gathers"] > 0, (mode, r)
    if mode == "native":
        # ZeRO-3 over 8 devices with parameter prefetch (remat full): the same loss and gradients; the decoder's
        # forward and backward loops gather parameters that nothing in the iteration reads (the next layer's /
        # the previous one's), where plain autodiff's every gather feeds the layer it precedes.
        on, off = out["prefetch"]["True"], out["prefetch"]["False"]
        for r in (on, off):
            assert abs(r["loss"] - out["reference"]) <= 1e-4 * abs(out["reference"]) and r["max_rel_grad_diff"] < 1e-3
        assert all(loop["free"] == 0 for loop in off["loops"]), off["loops"]
        prefetched = [loop for loop in on["loops"] if loop["gathers"] and loop["free"] == loop["gathers"]]
        assert len(prefetched) == 2, on["loops"]


if __name__ == "__main__":
    import pathlib
    pathlib.Path(sys.argv[1]).write_text(json.dumps(_compare_layouts(sys.argv[2])))
