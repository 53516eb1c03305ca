"""Per-layer, per-branch analysis of a VideoNSA model on one input: gate values and attention sinks.

Replays the language model layer by layer and, in each NSA layer, recomputes every branch's attention
weights with explicit masks (the `pallas_kernels.reference` semantics), so it is meant for analysis-sized
inputs (a few thousand tokens), not for long-video throughput.

Attention sinks (as in the VideoNSA paper's figures): a key is a *sink* of a branch when the mean attention
weight it receives, over the (query, head) rows that can see it, is at least `epsilon`; the branch's sink
ratio is the share of its keys (or compressed blocks) that are sinks, reported with their positions.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.chat import encode_chat
from nsa_jax.model import Qwen25VL, VisionInput
from nsa_jax.processing import get_rope_index
from nsa_jax.videonsa import NSAAttention, kernel_variant, nsa_rows
from nsa_jax.vision import vision_layout
from pallas_kernels import reference as ref
from pallas_kernels.layout import head_layout

BRANCHES = ("cmp", "slc", "swa", "dense")


def _probs(s: jax.Array, mask: jax.Array) -> jax.Array:
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.where(mask, p, 0.0)


def _sinks(weights: np.ndarray, visible: np.ndarray, epsilon: float) -> dict[str, Any]:
    """weights, visible [rows, keys]: sink keys, their ratio and mean received weight."""
    seen = visible.sum(0)
    received = np.where(seen > 0, weights.sum(0) / np.maximum(seen, 1), 0.0)
    keys = np.flatnonzero(seen > 0)
    sinks = keys[received[keys] >= epsilon]
    return {"ratio": float(len(sinks) / max(len(keys), 1)), "positions": sinks.tolist(),
            "mean_weight": received[sinks].round(4).tolist()}


def branch_weights(attn: NSAAttention, q: jax.Array, k: jax.Array, rows: np.ndarray) -> dict[str, tuple]:
    """Attention weights [rows * heads, keys] and visibility of each branch for batch row 0's query `rows`."""
    nsa = attn.nsa
    variant = kernel_variant(nsa)
    layout = head_layout(variant.head_layout, q.shape[2], k.shape[2])
    qe = ref.expand_heads(q.astype(jnp.float32), layout)  # [1, T, P, D]
    kf = k.astype(jnp.float32)
    t, p, d = qe.shape[1], qe.shape[2], qe.shape[3]
    scale = d**-0.5
    kv_of = np.arange(p) // (p // k.shape[2])
    kh = kf[0][:, kv_of]  # [T, P, D]
    i = np.arange(t)[:, None]
    out = {}
    # Compression: over block means.
    kc = ref.mean_pool(kf, nsa.block_size)[0][:, kv_of]  # [NB, P, D]
    j = np.arange(kc.shape[0])[None, :]
    end = (j + 1) * nsa.block_size - 1
    vis = (end <= i) if variant.causal_compression else (i <= end)
    s = jnp.einsum("tpd,npd->ptn", qe[0], kc) * scale
    out["cmp"] = (_probs(s, vis[None]), np.broadcast_to(vis, (p, *vis.shape)))
    # Selection: the reference's chosen blocks.
    lse = jax.nn.logsumexp(jnp.where(vis[None], s, -jnp.inf), axis=-1)  # [P, T]
    lse = ref.read_lse(lse.T[None], variant.lse_reading)
    imp = ref.block_importance(qe, kf, lse, block_size=nsa.block_size)
    idx = np.asarray(ref.select_blocks(imp, block_size=nsa.block_size, block_count=nsa.block_count,
                                       tie_break=variant.tie_break, group_size=p // k.shape[2],
                                       segment_ids=jnp.zeros((1, t), jnp.int32)))[0]  # [T, HKV, S]
    key_block = np.arange(t) // nsa.block_size
    chosen = (key_block[None, None, :, None] == idx[:, :, None, :]).any(-1)  # [T, HKV, keys]
    sel = chosen[:, kv_of].transpose(1, 0, 2) & (np.arange(t)[None, None, :] <= i[None])
    sk = jnp.einsum("tpd,spd->pts", qe[0], kh) * scale
    out["slc"] = (_probs(sk, sel), sel)
    win = (np.arange(t)[None, :] <= i) & (np.arange(t)[None, :] > i - nsa.window_size)
    out["swa"] = (_probs(sk, win[None]), np.broadcast_to(win, (p, t, t)))
    causal = np.broadcast_to(np.arange(t)[None, :] <= i, (p, t, t))
    out["dense"] = (_probs(sk, causal), causal)
    return {name: (np.asarray(w)[:, rows].reshape(-1, w.shape[-1]), np.asarray(v)[:, rows].reshape(-1, v.shape[-1]))
            for name, (w, v) in out.items()}


def analyze(model: Qwen25VL, input_ids: np.ndarray, position_ids: np.ndarray, videos: VisionInput | None,
            epsilon: float = 0.1) -> dict[str, Any]:
    """Gate statistics over vision tokens and attention sinks per layer and branch (batch row 0)."""
    cfg = model.config
    ids = jnp.asarray(input_ids[:1])
    pos = jnp.asarray(position_ids[:, :1])
    x, ctx = model.embed(ids, pos, videos=videos)
    vision = np.asarray(nsa_rows(cfg.nsa, ctx))[0]
    rows = np.flatnonzero(vision)
    layers = []
    for n, layer in enumerate(model.language_model.layers):
        attn = layer.self_attn
        entry: dict[str, Any] = {"layer": n, "nsa": isinstance(attn, NSAAttention)}
        if entry["nsa"] and len(rows):
            h = layer.input_layernorm(x)
            gates = np.asarray(jax.nn.sigmoid(attn.gate_logits(h)))[0, rows]  # [V, H, 3]
            entry["gates"] = {b: {"mean": float(gates[..., i].mean()), "std": float(gates[..., i].std()),
                                  "per_head": gates[..., i].mean(0).round(4).tolist()}
                              for i, b in enumerate(BRANCHES[:3])}
            q, k, _ = attn.qkv(h, ctx)
            if cfg.nsa.mode == "videonsa":
                keep = jnp.asarray(vision)[None, :, None, None]
                q, k = jnp.where(keep, q, 0), jnp.where(keep, k, 0)
            entry["sinks"] = {b: _sinks(w, v, epsilon) for b, (w, v) in branch_weights(attn, q, k, rows).items()}
        _, x = layer(x, ctx)
        layers.append(entry)
    return {"mode": cfg.nsa.mode, "tokens": int(ids.shape[1]), "vision_tokens": int(len(rows)),
            "epsilon": epsilon, "layers": layers}


def analyze_video(model: Qwen25VL, tokenizer, video, question: str, epsilon: float = 0.1) -> dict[str, Any]:
    """`analyze` on one video and a question about it: the chat template with the video before the question
    and a generation prompt. `video` holds the processor's `pixel_values_videos`, `video_grid_thw` and
    `second_per_grid_ts` (a `nsa_jax.generate.VisionPrompt`, or `data.video_inputs.VideoInputs`)."""
    cfg = model.config
    grid = video.video_grid_thw
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    ids, _ = encode_chat(tokenizer, messages, video_grid_thw=grid, add_generation_prompt=True)
    ids = np.asarray(ids)[None]
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=grid, second_per_grid_ts=video.second_per_grid_ts)
    videos = VisionInput(np.asarray(video.pixel_values_videos), vision_layout(grid, cfg.vision))
    summary = analyze(model, ids, pos, videos, epsilon=epsilon)
    summary["grid_thw"] = np.asarray(grid)[0].tolist()
    return summary


def save(summary: dict[str, Any], out_dir: str) -> list[str]:
    """Writes `summary.json` and the plots (`plot`) into `out_dir`; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return [path, *plot(summary, out_dir)]


def plot(summary: dict[str, Any], out_dir: str) -> list[str]:
    """gates.png (mean gate per branch and layer) and sinks.png (sink ratio per branch and layer)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nsa_layers = [e for e in summary["layers"] if "gates" in e]
    paths = []
    for name, key, branches in (("gates.png", "gates", BRANCHES[:3]), ("sinks.png", "sinks", BRANCHES)):
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for b in branches:
            values = [e[key][b]["mean" if key == "gates" else "ratio"] for e in nsa_layers]
            ax.plot([e["layer"] for e in nsa_layers], values, marker="o", label=b)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean gate over vision tokens" if key == "gates" else "attention-sink ratio")
        ax.set_title(f"{key} ({summary['mode']}, {summary['vision_tokens']} vision tokens)")
        ax.legend()
        fig.tight_layout()
        path = f"{out_dir}/{name}"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
