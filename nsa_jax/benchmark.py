"""The generation benchmark of `launch/bench_generate.py` (SPEC §5): prefill seconds and decode tokens/s of one
video prompt, per NSA mode.

A model of `preset`'s shapes (random weights in `dtype`, shared by the modes) answers one prompt: a system / user
text, one video of `grid` (t, 26, 42) patches for qwen25vl_7b ((t, 4, 8) for tiny) and a question. Per mode,
`nsa_jax.generate.Decoder` runs what `generate` runs: the prefill (vision tower + language model over the prompt
into the KV cache; the first call compiles, the next `prefill_iters` are timed) and `decode_tokens` greedy
decode steps (timed after one compiled step, the host reading each token as `generate` does). The vision tower
alone is timed once, so the language model's share of the prefill is the difference.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.config import NSAConfig, model_preset
from nsa_jax.generate import Decoder, VisionPrompt
from nsa_jax.model import VisionInput, abstract_model
from nsa_jax.vision import vision_layout


def _config(preset: str, mode: str):
    small = {} if preset == "qwen25vl_7b" else dict(block_size=8, block_count=2, window_size=16)
    return model_preset(preset, NSAConfig(mode=mode, **small))


def _grid(preset: str, cfg, video_tokens: int) -> np.ndarray:
    """A video grid (t, h, w) in patches with at least `video_tokens` merged tokens."""
    h, w = (26, 42) if preset == "qwen25vl_7b" else (4, 8)
    per_t = h * w // cfg.vision.spatial_merge_size ** 2
    return np.array([[-(-video_tokens // per_t), h, w]])


def _random_params(abstract, dtype) -> dict:
    """Every parameter of the abstract model: norm scales 1, everything else normal(0.02)."""
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    key = jax.random.key(0)
    out = {}
    for i, (path, leaf) in enumerate(flat):
        shape = (leaf.get_value() if hasattr(leaf, "get_value") else leaf.value).shape
        norm = any("norm" in str(p) or str(p) == "ln_q" for p in path)
        out[path] = jnp.ones(shape, dtype) if norm else (
            0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(dtype)
    return out


def _model(preset: str, mode: str, params: dict, dtype):
    """The model of `mode` holding the shared parameters (dense layers simply have no gates)."""
    abstract = abstract_model(_config(preset, mode), dtype=dtype, param_dtype=dtype)
    graphdef, state = nnx.split(abstract)
    flat = [(path, leaf.replace(params[path])) for path, leaf in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _prompt(cfg, grid: np.ndarray):
    n = int(grid.prod()) // cfg.vision.spatial_merge_size ** 2
    text = lambda k, seed: list(np.random.default_rng(seed).integers(0, 256, k))
    ids = text(20, 0) + [cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id] + \
        text(40, 1)
    pixels = np.random.default_rng(2).standard_normal((int(grid.prod()), cfg.vision.patch_dim)).astype(np.float32)
    return np.asarray(ids, np.int32), VisionPrompt(pixels, grid, [2.0])


def _timed(fn, iters: int) -> tuple[float, float, object]:
    """(first call's seconds, best of `iters` later calls, the last result); results are waited for."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(iters):
        del out
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def bench_mode(preset: str, mode: str, params: dict, dtype, grid: np.ndarray, *, decode_tokens: int,
               prefill_iters: int) -> dict:
    """Prefill and decode timings of one mode's model holding the shared parameters."""
    model = _model(preset, mode, params, dtype)
    ids, vision = _prompt(model.config, grid)
    decoder = Decoder(model)
    compile_s, prefill_s, (logits, cache, next_ids) = _timed(
        lambda: decoder.prefill([(ids, vision)], 2 * decode_tokens + 1), prefill_iters)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    logits, cache = decoder.step(token, next_ids, cache)  # compiles
    np.asarray(logits)
    t0 = time.perf_counter()
    for step in range(1, decode_tokens + 1):
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        np.asarray(token)  # the host reads each token, as `generate` does
        logits, cache = decoder.step(token, next_ids + step, cache)
    jax.block_until_ready(logits)
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # the same steps with no host read in between: the device's time per step
    for step in range(decode_tokens + 1, 2 * decode_tokens + 1):
        logits, cache = decoder.step(jnp.argmax(logits, -1).astype(jnp.int32), next_ids + step, cache)
    jax.block_until_ready(logits)
    device_step_ms = (time.perf_counter() - t0) / decode_tokens * 1e3
    row = {"mode": mode, "prompt_tokens": int(len(ids)),
           "video_tokens": int(np.sum(ids == model.config.video_token_id)),
           "cache_slots": int(cache.valid.shape[1]), "prefill_first_call_s": compile_s, "prefill_s": prefill_s,
           "decode_tokens": decode_tokens, "decode_s": decode_s,
           "decode_tokens_per_s": decode_tokens / decode_s, "decode_step_no_host_read_ms": device_step_ms}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        row["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return row


def bench_generation(preset: str, video_tokens: int, modes: Sequence[str], *, decode_tokens: int,
                     prefill_iters: int, dtype: str) -> Iterator[dict]:
    """Yields the result once the vision tower is timed (no rows yet), then again after each mode with that
    mode's row appended (`bench_mode`), so a run cut short keeps what it measured."""
    dtype_name, dtype = dtype, jnp.dtype(dtype)
    gated = next(m for m in modes if m != "dense") if set(modes) - {"dense"} else "dense"
    cfg = _config(preset, gated)
    grid = _grid(preset, cfg, video_tokens)
    params = _random_params(abstract_model(cfg, dtype=dtype, param_dtype=dtype), dtype)
    model = _model(preset, gated, params, dtype)
    _, vision = _prompt(cfg, grid)
    videos = VisionInput(jnp.asarray(vision.pixel_values_videos), vision_layout(grid, cfg.vision))
    graphdef, state = nnx.split(model.visual)
    tower = jax.jit(lambda state, v: nnx.merge(graphdef, state)(v.pixel_values, v.layout))
    _, vision_s, _ = _timed(lambda: tower(state, videos), prefill_iters)
    del model
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "preset": preset,
              "dtype": dtype_name, "grid": grid[0].tolist(), "vision_pixel_rows": int(grid.prod()),
              "vision_tower_s": vision_s, "rows": []}
    yield result
    for mode in modes:
        result["rows"].append(bench_mode(preset, mode, params, dtype, grid, decode_tokens=decode_tokens,
                                         prefill_iters=prefill_iters))
        yield result
