"""Generation through the model's KV cache against independent oracles: the full forward pass (causal modes),
transformers' `generate` (dense), and a torch emulation of transformers' `generate(use_cache=True)` around the
released VideoNSA attention (mode videonsa: prefill through the hybrid layer, decode steps through its dense
path)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nsa_jax import NSAConfig, VisionInput, from_pretrained, get_rope_index, init_model, tiny_config, vision_layout
from nsa_jax.generate import Sampling, VisionPrompt, generate

from tests.references.hf_reference import hf_model
from tests.references.videonsa_torch_reference import videonsa_checkpoint

GRID = np.array([[4, 8, 8]])  # 64 vision tokens: 8 NSA blocks of 8
SECONDS = [1.0]
STEPS = 5
NATIVE = NSAConfig(mode="native", block_size=8, block_count=2, window_size=16)


def _prompt(cfg, grid=GRID, text=(5, 6), tail=(7, 8)):
    n = int(grid.prod()) // cfg.vision.spatial_merge_size**2
    ids = np.array([*text, cfg.vision_start_token_id] + [cfg.video_token_id] * n + [cfg.vision_end_token_id, *tail],
                   np.int32)
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod()), cfg.vision.patch_dim)).astype(np.float32)
    return ids, VisionPrompt(pixels, grid, SECONDS)


@nnx.jit
def _forward(model, ids, position_ids, videos):
    return model.forward(ids, position_ids, videos=videos)


def _full_logits(model, seq, vision):
    """The model's own forward pass over the whole sequence (jitted; no generation code involved)."""
    ids = np.asarray([seq], np.int32)
    pos, _ = get_rope_index(ids, model.config, video_grid_thw=vision.video_grid_thw,
                            second_per_grid_ts=vision.second_per_grid_ts)
    videos = VisionInput(jnp.asarray(vision.pixel_values_videos), vision_layout(vision.video_grid_thw,
                                                                                 model.config.vision))
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(pos, jnp.int32), videos))[0]


@pytest.mark.parametrize("nsa", [NSAConfig(), NATIVE], ids=["dense", "native"])
def test_cache_decoding_equals_teacher_forced_forward(nsa):
    """Causal modes: one forward over prompt + generation; its argmax at each step is the next token."""
    model = init_model(tiny_config(nsa=nsa), seed=1)
    ids, vision = _prompt(model.config)
    out = generate(model, [(ids, vision)], max_new_tokens=STEPS, return_logits=True)[0]
    assert out.tokens.shape == (STEPS,)
    logits = _full_logits(model, np.concatenate([ids, out.tokens]), vision)[len(ids) - 1:-1]
    np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
    np.testing.assert_allclose(out.logits, logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["videonsa", "native"])
def test_generation_equals_torch_emulation_of_hf_generate(tmp_path, mode):
    """SPEC §2.12: the prefill's last row (mode videonsa: o_nsa + o_dense) gives the first token, then every step
    attends densely to the cache of rotated k, v; tokens and per-step logits equal a torch loop of HF forward
    calls with a per-layer cache around the release's attention (mode native: SPEC §3's layer with numpy NSA)."""
    cfg = tiny_config()
    nsa = dict(block_size=8, block_count=2, window_size=16, gate_temperature=0.3)
    hf, state = videonsa_checkpoint(tmp_path, cfg, nsa, seed=3, mode=mode)
    ours = from_pretrained(str(tmp_path))
    assert ours.config.nsa.mode == mode
    ids, vision = _prompt(cfg)
    got = generate(ours, [(ids, vision)], max_new_tokens=STEPS, return_logits=True)[0]

    pos, _ = get_rope_index(ids[None], cfg, video_grid_thw=GRID, second_per_grid_ts=SECONDS)
    state.update(caches={}, pos=torch.from_numpy(pos), vision=torch.from_numpy(ids[None] == cfg.video_token_id))
    tokens, logits = [], []
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(ids[None].astype(np.int64)), position_ids=torch.from_numpy(pos),
                 pixel_values_videos=torch.from_numpy(vision.pixel_values_videos),
                 video_grid_thw=torch.from_numpy(GRID), second_per_grid_ts=torch.tensor(SECONDS), use_cache=False)
        for step in range(STEPS):
            logits.append(out.logits[0, -1].numpy())
            tokens.append(int(logits[-1].argmax()))
            state.update(pos=torch.full((3, 1, 1), int(pos.max()) + 1 + step), vision=torch.zeros(1, 1, dtype=bool))
            out = hf(input_ids=torch.tensor([[tokens[-1]]]), position_ids=state["pos"], use_cache=False)
    state["caches"] = None
    np.testing.assert_array_equal(got.tokens, tokens)
    np.testing.assert_allclose(got.logits, np.stack(logits), atol=1e-4, rtol=0)


def test_stops_at_eos_and_stop_strings_and_batches():
    model = init_model(tiny_config(nsa=NATIVE), seed=1)
    ids, vision = _prompt(model.config)
    full = generate(model, [(ids, vision)], max_new_tokens=STEPS)[0].tokens
    cut = generate(model, [(ids, vision)], max_new_tokens=STEPS, eos_token_ids=[int(full[1])])[0].tokens
    np.testing.assert_array_equal(cut, full[:2])
    text = lambda tokens: "".join(f"<{t}>" for t in tokens)
    stopped = generate(model, [(ids, vision)], max_new_tokens=STEPS, stop_strings=[f"<{full[2]}>"],
                       detokenize=text)[0]
    assert stopped.text == text(full[:2]) and len(stopped.tokens) == 3
    # Prompts of different lengths (another video size) decoded together: each as it is alone.
    other = _prompt(model.config, grid=np.array([[2, 8, 12]]), text=(9,), tail=(4, 5, 6))
    both = generate(model, [(ids, vision), other], max_new_tokens=STEPS, return_logits=True)
    alone = generate(model, [other], max_new_tokens=STEPS, return_logits=True)[0]
    np.testing.assert_array_equal(both[0].tokens, full)
    np.testing.assert_array_equal(both[1].tokens, alone.tokens)
    np.testing.assert_allclose(both[1].logits, alone.logits, atol=1e-5, rtol=0)


def test_stop_strings_cut_as_the_lmms_eval_wrapper_cuts():
    """Each stop string in turn: `ans.split(term)[0]` for every non-empty term (lmms-eval's videonsa.py)."""
    from nsa_jax.generate import _cut

    def wrapper(ans, until):
        for term in until:
            if len(term) > 0:
                ans = ans.split(term)[0]
        return ans

    for text, until in [("abXcYd", ["Y", "X"]), ("abXc", ["Xc", "bX"]), ("no stop", ["", "Z"]), ("a\n\nb", ["\n\n"])]:
        got, hit = _cut(text, until)
        assert got == wrapper(text, until) and hit == (got != text)


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = init_model(tiny_config(), seed=1)
    ids, vision = _prompt(model.config)
    run = lambda sampling: generate(model, [(ids, vision)], max_new_tokens=STEPS, sampling=sampling)[0].tokens
    greedy = run(Sampling())
    hot = Sampling(temperature=5.0, seed=7)
    np.testing.assert_array_equal(run(hot), run(hot))
    assert not np.array_equal(run(hot), greedy)  # a flat distribution over 512 tokens
    np.testing.assert_array_equal(run(Sampling(temperature=5.0, top_p=1e-6, seed=7)), greedy)


def test_matches_transformers_generate(tmp_path):
    """A tiny random HF model saved to disk, loaded with from_pretrained: same tokens as HF greedy generate."""
    cfg = tiny_config()
    hf = hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path)
    ids, vision = _prompt(cfg)
    with torch.no_grad():
        theirs = hf.generate(input_ids=torch.from_numpy(ids[None].astype(np.int64)),
                             pixel_values_videos=torch.from_numpy(vision.pixel_values_videos),
                             video_grid_thw=torch.from_numpy(GRID), second_per_grid_ts=torch.tensor(SECONDS),
                             max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, eos_token_id=None,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ours = generate(from_pretrained(str(tmp_path)), [(ids, vision)], max_new_tokens=STEPS, return_logits=True)[0]
    np.testing.assert_array_equal(ours.tokens, theirs.sequences[0, len(ids):].numpy())
    np.testing.assert_allclose(ours.logits, torch.cat(theirs.logits).numpy(), atol=1e-4, rtol=0)
