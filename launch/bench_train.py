"""Training-step benchmark: tokens/s and MFU of one optimizer step (SPEC §5: 1B-class, 32K tokens, 1 H100).

    python -m launch.bench_train --config=configs/videonsa_1b.py --steps=10 --out=bench_train.json

Runs the same jitted step as `launch/train.py` (bf16 compute, float32 master weights, AdamW, remat) on one
fixed synthetic batch (one 32,768-token row: a 192-frame video + text), so host-side batch preparation is
not timed. MFU = model FLOPs of the step (`nsa_jax/training/flops.py`: 6 N per token + attention over
the keys each row really needs, recompute not counted) / (step time x bf16 peak of the devices).
CPU smoke run: `--config=configs/tiny.py --config.peak_flops_per_device=1e11`. On one 80 GB H100 the 32K step
needs `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` (it prints the compiled step's memory: ~53 GiB live at peak).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/videonsa_1b.py", "Model / data / train config.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("out", "", "Optional JSON file for the results.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from nsa_jax.training import flops
    from nsa_jax.training.device_batch import batch_flops, batch_token_counts, device_batch
    from nsa_jax.config import NSAConfig, model_preset
    from nsa_jax.training.model_setup import split_for_training
    from nsa_jax.training.optimizer import learning_rate_schedule, make_optimizer
    from nsa_jax.sharding import make_mesh
    from nsa_jax.training.synthetic_data import SyntheticBatches
    from nsa_jax.training.train_step import StepFunctions, TrainState, param_shardings, state_shardings

    c, t, d = FLAGS.config, FLAGS.config.train, FLAGS.config.data
    mesh = make_mesh(dict(c.mesh))
    cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
    graphdef, params = split_for_training(cfg, mesh, compute_dtype=c.model.compute_dtype, remat=t.remat,
                                          seed=0, attention_impl=c.model.attention_impl,
                                          sharding_rules=c.get("sharding_rules"))
    tx = make_optimizer(params, learning_rate=learning_rate_schedule(t.learning_rate, 1000, 0.1, 0.0),
                        weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    init = lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jnp.zeros((), jnp.int32))
    shardings = state_shardings(jax.eval_shape(init, params), mesh, param_shardings(params))
    state = jax.jit(init, out_shardings=shardings)(params)
    del params
    step = StepFunctions(graphdef, tx, mesh, loss_chunk=t.loss_chunk).compile(shardings)
    host = SyntheticBatches(cfg, batch_size=d.batch_size, seq_len=d.seq_len, video_grid=tuple(d.video_grid),
                            max_patches=d.max_patches).batch(0)
    batch = device_batch(host, cfg, mesh)

    start = time.perf_counter()
    lowered = step.step.lower(state, batch)
    lower_s = time.perf_counter() - start
    print(f"traced and lowered in {lower_s:.1f} s; compiling", flush=True)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.1f} s", flush=True)
    memory = compiled.memory_analysis()
    if memory is not None:
        print("device memory (GiB): " + ", ".join(
            f"{name} {getattr(memory, name + '_size_in_bytes') / 2**30:.2f}"
            for name in ("argument", "output", "temp", "generated_code")), flush=True)
    state, m = compiled(state, batch)
    loss = float(m.loss)
    for _ in range(FLAGS.warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - start) / FLAGS.steps

    counts = batch_token_counts(host, cfg)
    tokens = sum(a + b for a, b in counts)
    patches = int((host["video_grid_thw"].prod(axis=1)).sum())
    step_flops = batch_flops(host, cfg)
    device = jax.devices()[0]
    peak = c.peak_flops_per_device if c.peak_flops_per_device > 0 else flops.peak_flops(device.device_kind)
    stats = device.memory_stats() or {}
    result = {
        "device": device.device_kind, "devices": jax.device_count(), "preset": c.model.preset,
        "nsa_mode": c.model.nsa.mode, "compute_dtype": c.model.compute_dtype, "remat": t.remat,
        "tokens_per_step": tokens, "vision_tokens": sum(b for _, b in counts), "pixel_rows": patches,
        "lower_s": lower_s, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "model_tflops_per_step": step_flops / 1e12, "achieved_tflops_per_device": step_flops / step_s / 1e12
        / jax.device_count(), "mfu": step_flops / step_s / (peak * jax.device_count()) if peak else None,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "first_loss": loss,
        "last_loss": float(m.loss), "jax": jax.__version__,
    }
    print(json.dumps(result, indent=2))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
