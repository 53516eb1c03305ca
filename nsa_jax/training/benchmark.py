"""The training-step benchmark of `launch/bench_train.py`: tokens/s and MFU of one optimizer step.

The same jitted step as training (`launch/train.py`: compute dtype, float32 master weights, AdamW, remat) runs on
one fixed synthetic batch, so host-side batch preparation is not timed. MFU = model FLOPs of the step
(`flops.py`: 6 N per token + attention over the keys each row really needs, recompute not counted) / (step time
x peak FLOP/s of the devices).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax

from nsa_jax.config import NSAConfig, model_preset
from nsa_jax.sharding import make_mesh
from nsa_jax.training import flops, profile
from nsa_jax.training.device_batch import batch_flops, batch_token_counts, device_batch
from nsa_jax.training.model_setup import split_for_training
from nsa_jax.training.optimizer import learning_rate_schedule, make_optimizer
from nsa_jax.training.synthetic_data import SyntheticBatches
from nsa_jax.training.train_step import (StepFunctions, initial_state, param_shardings, place_initial_state,
                                         state_shardings)


def bench_train_step(config: Any, *, steps: int, warmup: int, report: Callable[[str], None] = print,
                     profile_dir: str = "", profile_steps: int = 3) -> dict:
    """Compiles the step of `config` (an ml_collections training config), runs it once and `warmup` more times,
    then times `steps` steps; the figures as a dict. `report` gets the progress lines (lowering, compiling, the
    compiled step's memory). profile_dir: also trace `profile_steps` more steps there with `jax.profiler`, write the
    compiled program beside the trace (`step.hlo.txt`) and add where their device time went (`profile.breakdown`)
    as "profile"."""
    c, t, d = config, config.train, config.data
    mesh = make_mesh(dict(c.mesh))
    cfg = model_preset(c.model.preset, NSAConfig.from_dict(c.model.nsa))
    graphdef, params = split_for_training(cfg, mesh, compute_dtype=c.model.compute_dtype, remat=t.remat,
                                          seed=0, attention_impl=c.model.attention_impl,
                                          sharding_rules=c.get("sharding_rules"), prefetch=t.prefetch_params)
    tx = make_optimizer(params, learning_rate=learning_rate_schedule(t.learning_rate, 1000, 0.1, 0.0),
                        weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    init = functools.partial(initial_state, tx)
    shardings = state_shardings(jax.eval_shape(init, params), mesh, param_shardings(params))
    state = place_initial_state(tx, params, shardings)
    del params
    step = StepFunctions(graphdef, tx, mesh, loss_chunk=t.loss_chunk).compile(shardings)
    host = SyntheticBatches(cfg, batch_size=d.batch_size, seq_len=d.seq_len, video_grid=tuple(d.video_grid),
                            max_patches=d.max_patches).batch(0)
    batch = device_batch(host, cfg, mesh)

    start = time.perf_counter()
    lowered = step.step.lower(state, batch)
    lower_s = time.perf_counter() - start
    report(f"traced and lowered in {lower_s:.1f} s; compiling")
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    report(f"compiled in {compile_s:.1f} s")
    memory = compiled.memory_analysis()
    if memory is not None:
        report("device memory (GiB): " + ", ".join(
            f"{name} {getattr(memory, name + '_size_in_bytes') / 2**30:.2f}"
            for name in ("argument", "output", "temp", "generated_code")))
    state, m = compiled(state, batch)
    loss = float(m.loss)
    for _ in range(warmup):
        state, m = compiled(state, batch)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, batch)
    jax.block_until_ready((state, m))
    step_s = (time.perf_counter() - start) / steps

    breakdown = None
    if profile_dir:
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(profile_steps):
                state, m = compiled(state, batch)
            jax.block_until_ready((state, m))
        hlo_text = compiled.as_text()
        with open(os.path.join(profile_dir, "step.hlo.txt"), "w") as f:  # the program the trace ran, for re-reading
            f.write(hlo_text)
        breakdown = profile.breakdown(profile.load_trace(profile_dir), hlo_text, profile_steps)
        report(f"profile: {profile_steps} steps traced to {profile_dir}")

    counts = batch_token_counts(host, cfg)
    tokens = sum(a + b for a, b in counts)
    patches = int((host["video_grid_thw"].prod(axis=1)).sum())
    step_flops = batch_flops(host, cfg)
    device = jax.devices()[0]
    peak = c.peak_flops_per_device if c.peak_flops_per_device > 0 else flops.peak_flops(device.device_kind)
    stats = device.memory_stats() or {}
    return {
        "device": device.device_kind, "devices": jax.device_count(), "preset": c.model.preset,
        "nsa_mode": c.model.nsa.mode, "compute_dtype": c.model.compute_dtype, "remat": t.remat,
        "prefetch_params": t.prefetch_params,
        "tokens_per_step": tokens, "vision_tokens": sum(b for _, b in counts), "pixel_rows": patches,
        "lower_s": lower_s, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "model_tflops_per_step": step_flops / 1e12, "achieved_tflops_per_device": step_flops / step_s / 1e12
        / jax.device_count(), "mfu": step_flops / step_s / (peak * jax.device_count()) if peak else None,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "first_loss": loss,
        "last_loss": float(m.loss), "jax": jax.__version__, **({"profile": breakdown} if breakdown else {}),
    }
