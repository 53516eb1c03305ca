"""Greedy generation against two oracles: argmax of the full forward pass, and transformers' `generate`."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from hf_reference import hf_model
from nsa_jax import NSAConfig, VisionInput, from_pretrained, get_rope_index, init_model, tiny_config, vision_layout
from nsa_jax.generate import VisionPrompt, greedy_generate

GRID = np.array([[2, 8, 8]])
SECONDS = [1.0]
STEPS = 5


def _prompt(cfg):
    n = int(GRID.prod()) // cfg.vision.spatial_merge_size**2
    ids = np.array([5, 6, cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id, 7, 8],
                   np.int32)
    pixels = np.random.default_rng(0).standard_normal((int(GRID.prod()), cfg.vision.patch_dim)).astype(np.float32)
    return ids, pixels


@nnx.jit
def _forward(model, ids, position_ids, videos):
    return model.forward(ids, position_ids, videos=videos)


def _full_logits(model, seq, pixels):
    """The model's own forward pass over the whole sequence (jitted; no generation code involved)."""
    ids = np.asarray([seq], np.int32)
    pos, _ = get_rope_index(ids, model.config, video_grid_thw=GRID, second_per_grid_ts=SECONDS)
    videos = VisionInput(jnp.asarray(pixels), vision_layout(GRID, model.config.vision))
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(pos, jnp.int32), videos))[0]


@pytest.mark.parametrize("nsa", [NSAConfig(), NSAConfig(mode="native", block_size=8, block_count=2, window_size=16)],
                         ids=["dense", "native"])
def test_cache_decoding_equals_teacher_forced_argmax(nsa):
    """Causal models: one forward over prompt + generation; its argmax at each step is the next token."""
    cfg = tiny_config(nsa=nsa)
    model = init_model(cfg, seed=1)
    ids, pixels = _prompt(cfg)
    out, scores = greedy_generate(model, ids, VisionPrompt(pixels, GRID, SECONDS), max_new_tokens=STEPS,
                                  method="cache", return_logits=True)
    assert out.shape == (STEPS,)
    logits = _full_logits(model, np.concatenate([ids, out]), pixels)[len(ids) - 1:-1]
    np.testing.assert_array_equal(out, logits.argmax(-1))
    np.testing.assert_allclose(scores, logits, atol=1e-4, rtol=0)


def test_videonsa_recompute_equals_prefix_argmax():
    """Mode videonsa is not causal for text rows: the oracle reruns the full forward on every exact prefix."""
    cfg = tiny_config(nsa=NSAConfig(mode="videonsa", block_size=8, block_count=2, window_size=16))
    model = init_model(cfg, seed=1)
    ids, pixels = _prompt(cfg)
    steps = 2
    out, scores = greedy_generate(model, ids, VisionPrompt(pixels, GRID, SECONDS), max_new_tokens=steps,
                                  return_logits=True)
    seq = list(ids)
    for step in range(steps):
        logits = _full_logits(model, seq, pixels)[-1]
        np.testing.assert_allclose(scores[step], logits, atol=1e-4, rtol=0)
        seq.append(int(logits.argmax()))
    np.testing.assert_array_equal(out, seq[len(ids):])
    with pytest.raises(ValueError, match="videonsa"):
        greedy_generate(model, ids, VisionPrompt(pixels, GRID, SECONDS), max_new_tokens=1, method="cache")


def test_stops_after_eos():
    cfg = tiny_config()
    model = init_model(cfg, seed=1)
    ids, pixels = _prompt(cfg)
    full = greedy_generate(model, ids, VisionPrompt(pixels, GRID, SECONDS), max_new_tokens=STEPS)
    cut = greedy_generate(model, ids, VisionPrompt(pixels, GRID, SECONDS), max_new_tokens=STEPS,
                          eos_token_ids=[int(full[1])])
    np.testing.assert_array_equal(cut, full[:2])


def test_matches_transformers_generate(tmp_path):
    """A tiny random HF model saved to disk, loaded with from_pretrained: same tokens as HF greedy generate."""
    cfg = tiny_config()
    hf = hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path)
    ids, pixels = _prompt(cfg)
    with torch.no_grad():
        theirs = hf.generate(input_ids=torch.from_numpy(ids[None].astype(np.int64)),
                             pixel_values_videos=torch.from_numpy(pixels), video_grid_thw=torch.from_numpy(GRID),
                             second_per_grid_ts=torch.tensor(SECONDS), max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    ours, scores = greedy_generate(from_pretrained(str(tmp_path)), ids, VisionPrompt(pixels, GRID, SECONDS),
                                   max_new_tokens=STEPS, return_logits=True)
    np.testing.assert_array_equal(ours, theirs.sequences[0, len(ids):].numpy())
    np.testing.assert_allclose(scores, torch.cat(theirs.logits).numpy(), atol=1e-4, rtol=0)
