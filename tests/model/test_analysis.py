"""The gate / attention-sink analysis: its attention weights are the ones the NSA oracle uses, sinks are
found as defined, and the CLI writes its JSON and plots."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import NSAConfig, get_rope_index, init_model, save_hf, tiny_config
from nsa_jax.analysis import _sinks, analyze, branch_weights
from nsa_jax.attention import TokenContext
from nsa_jax.rope import mrope_cos_sin
from pallas_kernels import reference as ref
from pallas_kernels.layout import head_layout

from tests import ROOT


def test_sinks_hand_computed():
    # 3 query rows over 4 keys; key 0 gets 0.5, 0.6, 0.7 from the rows that see it.
    w = np.array([[0.5, 0.5, 0, 0], [0.6, 0.2, 0.2, 0], [0.7, 0.1, 0.1, 0.1]])
    vis = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    s = _sinks(w, vis, epsilon=0.25)  # key 1 gets (0.5 + 0.2 + 0.1) / 3 = 0.267, key 2 (0.2 + 0.1) / 2
    assert s["positions"] == [0, 1] and s["ratio"] == 0.5
    np.testing.assert_allclose(s["mean_weight"], [0.6, 0.2667], atol=1e-4)
    assert _sinks(w, vis, epsilon=0.3)["positions"] == [0]


@pytest.mark.parametrize("mode", ["videonsa", "native"])
def test_branch_weights_reproduce_the_oracle_outputs(mode):
    cfg = tiny_config(nsa=NSAConfig(mode=mode, block_size=4, block_count=2, window_size=6))
    attn = init_model(cfg, seed=1).language_model.layers[0].self_attn
    rng = np.random.default_rng(0)
    t = 27
    x = jnp.asarray(rng.standard_normal((1, t, cfg.text.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (3, 1, t))
    cos, sin = mrope_cos_sin(pos, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)
    q, k, v = attn.qkv(x, TokenContext(pos, cos, sin, None, None, jnp.ones((1, t), bool)))
    rows = np.arange(t)
    weights = branch_weights(attn, q, k, rows)
    layout = head_layout("videonsa" if mode == "videonsa" else "gqa", q.shape[2], k.shape[2])
    qe = ref.expand_heads(q, layout)
    p = qe.shape[2]
    kv_of = np.arange(p) // (p // k.shape[2])
    values = np.asarray(v[0][:, kv_of]).transpose(1, 0, 2)  # [P, T, D]
    o_cmp, lse = ref.compression_attention(qe, k, v, block_size=4, causal=mode == "native")
    reading = "released" if mode == "videonsa" else "per_head"  # mode videonsa's default (SPEC §2.11)
    imp = ref.block_importance(qe, k, ref.read_lse(lse, reading), block_size=4)
    idx = ref.select_blocks(imp, block_size=4, block_count=2, tie_break="fla" if mode == "videonsa" else "recent",
                            group_size=p // k.shape[2])
    expected = {"slc": ref.selection_attention(qe, k, v, idx, block_size=4),
                "swa": ref.window_attention(qe, k, v, window_size=6)}
    for name, out in expected.items():
        w = weights[name][0].reshape(p, t, t)
        np.testing.assert_allclose(np.einsum("pts,psd->tpd", w, values), np.asarray(out[0]), atol=1e-5)
    vc = np.asarray(ref.mean_pool(v, 4)[0][:, kv_of]).transpose(1, 0, 2)
    w = weights["cmp"][0].reshape(p, t, -1)
    np.testing.assert_allclose(np.einsum("ptn,pnd->tpd", w, vc), np.asarray(o_cmp[0]), atol=1e-5)


def test_analyze_summary_and_cli(tmp_path):
    cfg = tiny_config(nsa=NSAConfig(mode="videonsa", block_size=4, block_count=2, window_size=8))
    model = init_model(cfg, seed=2)
    ids = np.array([[1, 2, cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id, 3]])
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=[[2, 4, 4]], second_per_grid_ts=[2.0])
    summary = analyze(model, ids, pos, None)
    assert summary["vision_tokens"] == 7  # the first frame pair's top-left token has t = h = w: "text"
    for layer in summary["layers"]:
        assert set(layer["sinks"]) == {"cmp", "slc", "swa", "dense"}
        for g in layer["gates"].values():
            assert 0 < g["mean"] < 1 and len(g["per_head"]) == cfg.text.num_attention_heads

    from data.synthetic import write_mp4
    frames = np.random.default_rng(0).integers(0, 255, (6, 56, 84, 3), dtype=np.uint8)
    write_mp4(str(tmp_path / "v.mp4"), frames, fps=4)
    save_hf(model, str(tmp_path / "model"))
    out = subprocess.run([sys.executable, "-m", "launch.analyze", f"--model={tmp_path / 'model'}",
                          f"--video={tmp_path / 'v.mp4'}", f"--out={tmp_path / 'an'}", "--max_pixels=4704"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "an" / "summary.json").read_text())
    assert summary["vision_tokens"] > 0 and len(summary["layers"]) == cfg.text.num_hidden_layers
    assert (tmp_path / "an" / "gates.png").stat().st_size > 1000 and (tmp_path / "an" / "sinks.png").exists()
