"""The VideoNSA layer: mode `videonsa` against a plain torch oracle of the released model, mode `native`
against the jnp NSA oracle, VideoNSA checkpoints both ways, gradients reaching the gates."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from nsa_jax import (NSAConfig, VisionInput, from_pretrained, get_rope_index, init_model, save_hf, tiny_config,
                     vision_layout)
from nsa_jax.config import ConfigError
from nsa_jax.conversion import iter_hf_tensors
from nsa_jax.attention import TokenContext
from nsa_jax.rope import mrope_cos_sin
from pallas_kernels import nsa_attention

from tests.references.videonsa_torch_reference import videonsa_checkpoint, videonsa_layer

NSA = dict(block_size=4, block_count=2, window_size=8, gate_temperature=0.3)


def _tokens(cfg, rng, grid=(4, 4, 6), text=(5, 7)):
    t, h, w = grid
    span = [cfg.vision_start_token_id] + [cfg.video_token_id] * (t * h * w // 4) + [cfg.vision_end_token_id]
    return np.array([list(rng.integers(0, 256, text[0])) + span + list(rng.integers(0, 256, text[1]))])


def _heads_config(num_heads: int = 6, num_kv_heads: int = 2):
    """A tiny config whose padded videonsa layout has zero heads (6 / 2 heads: 16 padded, 4 of them zero)."""
    cfg = tiny_config(num_layers=2)
    hidden = 16 * num_heads
    text = dataclasses.replace(cfg.text, hidden_size=hidden, num_attention_heads=num_heads,
                               num_key_value_heads=num_kv_heads)
    return cfg.replace(text=text, vision=dataclasses.replace(cfg.vision, out_hidden_size=hidden)).validate()


@pytest.fixture(scope="module")
def videonsa_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("videonsa")
    cfg = _heads_config()
    hf, state = videonsa_checkpoint(path, cfg, NSA)
    return hf, state, from_pretrained(str(path)), path


def test_checkpoint_with_gates_loads_as_videonsa(videonsa_pair):
    _, _, ours, _ = videonsa_pair
    nsa = ours.config.nsa
    assert (nsa.mode, nsa.block_size, nsa.block_count, nsa.window_size, nsa.gate_temperature) == \
        ("videonsa", 4, 2, 8, 0.3)
    d = ours.config.to_hf_dict()
    assert d["nsa_videonsa_lse"] == "released"
    del d["nsa_videonsa_lse"]  # a checkpoint without the field is the release
    assert type(ours.config).from_hf_dict(d, has_gates=True).nsa.videonsa_lse == "released"
    own = type(ours.config).from_hf_dict(dict(d, nsa_videonsa_lse="per_head"), has_gates=True)
    assert own.nsa.videonsa_lse == "per_head" and own.to_hf_dict()["nsa_videonsa_lse"] == "per_head"
    with pytest.raises(ConfigError, match="nsa_videonsa_lse='transposed'"):
        type(ours.config).from_hf_dict(dict(d, nsa_videonsa_lse="transposed"), has_gates=True)


def _with_lse_reading(src, dst, reading: str):
    """The checkpoint at src seen through a config.json with nsa_videonsa_lse = reading (tensors linked)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    d = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(d, nsa_videonsa_lse=reading)))
    return from_pretrained(str(dst))


def test_lse_readings_each_match_the_release_and_differ(videonsa_pair, tmp_path):
    """SPEC §2.11: the released lse reading (the default) and each head's own both match the torch release
    path with that reading; the two give different logits."""
    hf, state, ours, src = videonsa_pair
    cfg = ours.config
    assert cfg.nsa.videonsa_lse == "released"
    rng = np.random.default_rng(0)
    grid = np.array([[4, 4, 6]])
    ids = _tokens(cfg, rng)
    spg = np.array([2.0])
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=grid, second_per_grid_ts=spg)
    pixels = rng.standard_normal((int(grid.prod()), cfg.vision.patch_dim)).astype(np.float32)
    state["pos"] = torch.from_numpy(pos)
    vision = dict(pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=spg)
    logits = {}
    for reading, model in (("released", ours), ("per_head", _with_lse_reading(src, tmp_path / "own", "per_head"))):
        state["nsa"]["lse_reading"] = reading
        with torch.no_grad():
            theirs = hf(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(pos), use_cache=False,
                        **{k: torch.from_numpy(np.asarray(v)) for k, v in vision.items()}).logits.numpy()
        logits[reading] = np.asarray(model(ids, **vision))
        assert np.abs(theirs).max() > 0.1
        np.testing.assert_allclose(logits[reading], theirs, atol=1e-4, rtol=0, err_msg=reading)
    state["nsa"]["lse_reading"] = "released"
    assert np.abs(logits["released"] - logits["per_head"]).max() > 1e-2


def _layer_case(cfg, seed: int, grid: tuple[int, int, int], text: tuple[int, int], spg: float):
    """Random hidden states of a video prompt: (x [1, T, E], the token context of ours, mRoPE ids [3, 1, T])."""
    rng = np.random.default_rng(seed)
    ids = _tokens(cfg, rng, grid=grid, text=text)
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=[list(grid)], second_per_grid_ts=[spg])
    x = rng.standard_normal((1, ids.shape[1], cfg.text.hidden_size)).astype(np.float32)
    cos, sin = mrope_cos_sin(jnp.asarray(pos), cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)
    return x, TokenContext(jnp.asarray(pos), cos, sin, None, None, jnp.asarray(ids == cfg.video_token_id)), pos


def test_videonsa_layer_gradients_match_torch(videonsa_pair):
    """Fine-tuning the released model: gradients of one layer (released lse reading) through the hidden states,
    q_proj and the gates equal torch autograd through the release's path."""
    hf, _, ours, _ = videonsa_pair
    x, ctx, pos = _layer_case(ours.config, 5, (4, 4, 4), (3, 5), 2.0)
    w = np.random.default_rng(6).standard_normal(x.shape).astype(np.float32)
    attn_t = hf.model.language_model.layers[0].self_attn
    xt = torch.from_numpy(x).requires_grad_(True)
    cos_t, sin_t = hf.model.language_model.rotary_emb(xt, torch.from_numpy(pos))
    attn_t.zero_grad()
    out = videonsa_layer(attn_t, xt, cos_t, sin_t, torch.from_numpy(pos), NSA)
    (out * torch.from_numpy(w)).sum().backward()

    loss = lambda m, h: (m(h, ctx)[1] * w).sum()
    grads, gx = nnx.grad(loss, argnums=(0, 1))(ours.language_model.layers[0].self_attn, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(gx), xt.grad.numpy(), atol=1e-4, rtol=1e-4)
    for name, theirs in (("q_proj", attn_t.q_proj.weight.grad.T), ("g_proj_1", attn_t.g_proj_1.weight.grad.T),
                         ("g_proj_2", attn_t.g_proj_2.weight.grad.T)):
        mine = np.asarray(getattr(grads, name).kernel[...])
        assert np.abs(mine).max() > 0, name
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-4, rtol=1e-4, err_msg=name)


def test_videonsa_layer_matches_torch_oracle(videonsa_pair):
    """One layer on random hidden states, with vision rows whose ids happen to be equal routed as text."""
    hf, _, ours, _ = videonsa_pair
    # spg 0.5: int(0.5) = 0, every frame pair gets time id s, so the top-left token of each is "text".
    x, ctx, pos = _layer_case(ours.config, 1, (6, 4, 4), (3, 9), 0.5)
    attn_t = hf.model.language_model.layers[1].self_attn
    cos_t, sin_t = hf.model.language_model.rotary_emb(torch.from_numpy(x), torch.from_numpy(pos))
    with torch.no_grad():
        theirs = videonsa_layer(attn_t, torch.from_numpy(x), cos_t, sin_t, torch.from_numpy(pos), NSA).numpy()
    mine = np.asarray(ours.language_model.layers[1].self_attn(jnp.asarray(x), ctx)[1])
    np.testing.assert_allclose(mine, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_videonsa_checkpoint_round_trip_keeps_names_and_dtypes(videonsa_pair, tmp_path, layout):
    _, _, _, src = videonsa_pair
    model = from_pretrained(str(src))
    save_hf(model, str(tmp_path / "a"), layout=layout, dtype=jnp.bfloat16)
    a = dict(iter_hf_tensors(str(tmp_path / "a")))
    assert any(".self_attn.g_proj_1.weight" in k for k in a) and any(".self_attn.g_proj_2.bias" in k for k in a)
    assert all(v.dtype == jnp.bfloat16 for v in a.values())
    reloaded = from_pretrained(str(tmp_path / "a"))  # stored dtypes kept
    assert reloaded.config.nsa == model.config.nsa
    save_hf(reloaded, str(tmp_path / "b"))
    b = dict(iter_hf_tensors(str(tmp_path / "b")))
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    if layout == "nested":
        assert all(k.startswith(("model.language_model.", "model.visual.", "lm_head.")) for k in a)


def _native_model(seed=0, selection="token"):
    nsa = NSAConfig(mode="native", block_size=4, block_count=2, window_size=6, selection=selection)
    return init_model(tiny_config(nsa=nsa), seed=seed)


@pytest.mark.parametrize("selection,vision_tokens", [("token", None), ("query_block", None), ("token", 12)])
def test_native_layer_matches_gathered_oracle(selection, vision_tokens):
    """Vision rows: NSA over the sample's vision tokens only (gathered); text rows: dense causal attention.
    vision_tokens 12 (each row's count; T = 21): NSA runs over the first 12 rows of the vision-first order."""
    model = _native_model(selection=selection)
    cfg = model.config
    rng = np.random.default_rng(2)
    ids = np.concatenate([_tokens(cfg, rng, grid=(2, 4, 6), text=(4, 3)),
                          _tokens(cfg, rng, grid=(2, 4, 6), text=(6, 1))], 0)
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=[[2, 4, 6]] * 2, second_per_grid_ts=[1.0, 1.0])
    x = jnp.asarray(rng.standard_normal((2, ids.shape[1], cfg.text.hidden_size)), jnp.float32)
    cos, sin = mrope_cos_sin(jnp.asarray(pos), cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)
    vision = ids == cfg.video_token_id
    ctx = TokenContext(jnp.asarray(pos), cos, sin, None, None, jnp.asarray(vision), vision_tokens=vision_tokens)
    assert vision.sum(1).max() == 12 and ids.shape[1] > 12
    attn = model.language_model.layers[0].self_attn
    mine = np.asarray(attn(x, ctx)[1])

    q, k, v = attn.qkv(x, ctx)
    gates = jax.nn.sigmoid(attn.gate_logits(x))
    dense = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    expected = np.array(dense)
    for b in range(2):
        idx = np.flatnonzero(vision[b])
        g = gates[b:b + 1][:, idx]
        o = nsa_attention(q[b:b + 1, idx], k[b:b + 1, idx], v[b:b + 1, idx], g[..., 0], g[..., 1], g[..., 2],
                          block_size=4, block_count=2, window_size=6, selection=selection, impl="reference")
        expected[b, idx] = np.asarray(o[0])
    expected = np.asarray(attn.o_proj(jnp.asarray(expected).reshape(*x.shape[:2], -1)))
    np.testing.assert_allclose(mine, expected, atol=1e-5, rtol=0)


def test_query_block_selection_round_trips_and_needs_mode_native():
    cfg = _native_model(selection="query_block").config
    d = cfg.to_hf_dict()
    assert d["nsa_selection"] == "query_block" and "nsa_selection" not in _native_model().config.to_hf_dict()
    assert type(cfg).from_hf_dict(d, has_gates=True).nsa == cfg.nsa
    with pytest.raises(ConfigError, match="nsa_selection='query_block' needs nsa_mode='native'"):
        tiny_config(nsa=NSAConfig(mode="videonsa", selection="query_block")).validate()


@pytest.mark.parametrize("mode", ["videonsa", "native"])
def test_gradients_reach_the_gates(mode):
    cfg = tiny_config(nsa=NSAConfig(mode=mode, block_size=4, block_count=2, window_size=6))
    model = init_model(cfg, seed=3)
    rng = np.random.default_rng(3)
    ids = _tokens(cfg, rng, grid=(2, 4, 4), text=(3, 3))
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=[[2, 4, 4]], second_per_grid_ts=[2.0])

    def loss(m):
        return jnp.mean(m.forward(jnp.asarray(ids), jnp.asarray(pos)) ** 2)

    grads = nnx.grad(loss)(model)
    gate_grads = {".".join(map(str, path)): np.asarray(g[...]) for path, g in nnx.to_flat_state(grads)
                  if any(str(p).startswith("g_proj") for p in path)}
    assert len(gate_grads) == 4 * cfg.text.num_hidden_layers  # kernel + bias of both gate layers
    for name, g in gate_grads.items():
        assert np.isfinite(g).all() and np.abs(g).max() > 0, (mode, name)


def test_native_with_one_sample_per_row_and_padding_equals_unpadded():
    """Segment ids of one sample + trailing padding (the pipeline's rows) give the unpacked outputs."""
    from nsa_jax.videonsa import check_native_packing
    model = _native_model(seed=4)
    cfg = model.config
    rng = np.random.default_rng(4)
    ids = _tokens(cfg, rng, grid=(2, 4, 6), text=(3, 2))
    n = ids.shape[1]
    padded = np.concatenate([ids, np.full((1, 9), 256)], 1)
    seg = np.concatenate([np.ones((1, n), np.int32), np.zeros((1, 9), np.int32)], 1)
    pos, _ = get_rope_index(padded, cfg, video_grid_thw=[[2, 4, 6]], second_per_grid_ts=[1.0])
    full = np.asarray(model.forward(jnp.asarray(padded), jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
    alone = np.asarray(model.forward(jnp.asarray(ids), jnp.asarray(pos[:, :, :n])))
    np.testing.assert_allclose(full[:, :n], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="samples_per_row=2"):
        check_native_packing("native", 2)
    check_native_packing("videonsa", 2)


def test_native_runs_nsa_over_the_vision_features_rows_only():
    """With videos, the vision tokens are the pad tokens that receive features and no row holds more than the
    features' rows (12 here, of T = 26): the layers then run NSA over the first 12 rows of the vision-first
    order, and give what they give over all T rows (the bound unknown)."""
    model = _native_model(seed=5)
    cfg = model.config
    rng = np.random.default_rng(5)
    ids = _tokens(cfg, rng, grid=(2, 4, 6), text=(5, 7))
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=[[2, 4, 6]], second_per_grid_ts=[1.0])
    pixels = rng.standard_normal((2 * 4 * 6, cfg.vision.patch_dim)).astype(np.float32)
    videos = VisionInput(jnp.asarray(pixels), vision_layout([[2, 4, 6]], cfg.vision))
    x, ctx = model.embed(jnp.asarray(ids), jnp.asarray(pos), videos=videos)
    assert ctx.vision_tokens == 12 and ids.shape[1] == 26
    np.testing.assert_array_equal(ctx.vision_mask, ids == cfg.video_token_id)
    _, bounded = model.language_model(x, ctx)
    _, unbounded = model.language_model(x, ctx.replace(vision_tokens=None))
    np.testing.assert_allclose(bounded, unbounded, atol=1e-5, rtol=0)
    assert model.embed(jnp.asarray(ids), jnp.asarray(pos))[1].vision_tokens is None  # no features: unknown
