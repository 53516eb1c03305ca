"""Per-device memory of a training step with the tokens split over `sequence` (context parallelism), from the shapes.

One row of T tokens (batch 1, almost all vision: 4 patch rows per merged token), every device on `sequence`
(fsdp 1), bf16 compute over float32 master weights, AdamW, full remat (each block keeps its input), as
configs/videonsa_7b.py trains. Each term is counted from the tensors the step holds at its peak, the backward
pass of one decoder layer (`terms`); what XLA adds on top (fusion temporaries, fragmentation, the NSA
kernels' small index arrays, collective buffers) is not counted. `launch.memory` prints the table.
"""

from __future__ import annotations

GIB = 2 ** 30
BF16, F32 = 2, 4
SELECTION_PARTIALS = 3 << 30  # selection.SelectionConfig.partial_bytes (forward partials) + half (backward ds)


def parameter_counts(preset: str, mode: str):
    """(parameters of the whole model, of one decoder layer and of the embedding (the LM head's equal); the
    model config)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nsa_jax.config import NSAConfig, model_preset
    from nsa_jax.model import Qwen25VL

    cfg = model_preset(preset, NSAConfig(mode=mode))
    model = nnx.eval_shape(lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    lm = params["language_model"]
    return {"total": size(params), "layer": size(lm["layers"][0]), "embedding": size(lm["embed_tokens"])}, cfg


def terms(cfg, counts: dict[str, int], t: int, n: int, mode: str, loss_chunk: int) -> dict[str, dict[str, float]]:
    """Bytes per device: {"held": what lives through the backward pass, and one dict per phase of it}; the peak
    is held + the largest phase."""
    text, vision = cfg.text, cfg.vision
    e, m, hq, hkv, d = (text.hidden_size, text.intermediate_size, text.num_attention_heads,
                        text.num_key_value_heads, text.head_dim)
    tq = t // n  # this device's query tokens
    rows = tq * vision.spatial_merge_size ** 2  # its pixel rows
    hv = 2 * hq if mode == "videonsa" else hq  # NSA's virtual query rows per token (`layout.py`)
    group_rows = 16 * hkv  # the selection kernel's rows per token: each KV head's group padded to a tile
    # activations per token / row, bf16. Decoder layer: norms, q, k, v, attention out, residual, gate MLP (in,
    # gelu, logits), MLP gate / up / product. Vision block: norms, qkv, attention out, residual, MLP x 3.
    layer_acts = (6 * e + 2 * hkv * d + 3 * hq + 3 * m) * BF16
    block_acts = (7 * vision.hidden_size + 3 * vision.intermediate_size) * BF16
    nsa_rows = (3 * hv * d * BF16 + hv * d * F32  # branch outputs, their gated sum
                + group_rows * d * (BF16 + F32))  # selection q rows and their float32 dq
    kv = 2 * hkv * d * BF16  # k and v of one token
    return {
        "held": {
            "model state: f32 params, grads, Adam m and v (ZeRO-3)": counts["total"] * 4 * F32 / n,
            "remat checkpoints: decoder layer inputs": text.num_hidden_layers * tq * e * BF16,
            "remat checkpoints: vision block inputs": vision.depth * rows * vision.hidden_size * BF16,
            "pixel rows (f32)": rows * vision.patch_dim * F32,
        },
        "decoder layer backward": {
            "one layer's f32 weights and weight grads (ZeRO-3 gather)": counts["layer"] * 2 * F32,
            "its activations and their grads": 2 * tq * layer_acts,
            "k, v of the whole sequence, their grads" + (", zeroed copies" if mode == "videonsa" else ""):
                t * kv * (3 if mode == "videonsa" else 2),
            "NSA on the local queries (outputs, selection rows, partials)": tq * nsa_rows + SELECTION_PARTIALS,
        },
        "LM head + loss": {
            "LM head f32 weights and grad (vocab not split)": counts["embedding"] * 2 * F32,
            "a loss chunk's f32 logits and their grad": loss_chunk * text.vocab_size * 2 * F32,
        },
        "vision block backward": {"one block's activations and their grads": 2 * rows * block_acts},
    }


def peak(parts: dict[str, dict[str, float]]) -> tuple[float, str]:
    """(peak bytes, the phase that sets it)."""
    phases = {k: sum(v.values()) for k, v in parts.items() if k != "held"}
    top = max(phases, key=phases.get)
    return sum(parts["held"].values()) + phases[top], top


def table(preset: str, mode: str, n: int, lengths: list[int], loss_chunk: int) -> dict:
    counts, cfg = parameter_counts(preset, mode)
    out = {"preset": preset, "mode": mode, "devices": n, "parameters": counts, "GiB": {}, "peak_GiB": {}}
    for t in lengths:
        parts = terms(cfg, counts, t, n, mode, loss_chunk)
        out["GiB"][t] = {phase: {k: v / GIB for k, v in d.items()} for phase, d in parts.items()}
        total, phase = peak(parts)
        out["peak_GiB"][t] = {"total": total / GIB, "phase": phase}
    return out
