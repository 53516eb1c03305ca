"""Model FLOPs of a training step (forward + backward = 3x forward, remat recompute not counted), for MFU.

Matmuls count 2 FLOPs per multiply-add. Attention counts QK^T and PV over the keys each query row really
needs: dense causal rows see (i + 1) keys of their sample; NSA rows see the compressed blocks, the selected
blocks and the window (SPEC §2); vision tower rows see their window or their frame.
"""

from __future__ import annotations

import numpy as np

from nsa_jax.config import ModelConfig

# bf16 dense peak FLOP/s per device, by `jax.Device.device_kind` substring.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12, "TPU v5p": 459e12,
              "TPU v5 lite": 197e12, "TPU v4": 275e12, "TPU v6": 918e12}


def peak_flops(device_kind: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None


def text_matmul_params(cfg: ModelConfig) -> int:
    """Weights of the language model that take part in a matmul per token (embedding lookup excluded)."""
    t = cfg.text
    d = t.head_dim
    attn = t.hidden_size * d * (t.num_attention_heads * 2 + t.num_key_value_heads * 2)
    mlp = 3 * t.hidden_size * t.intermediate_size
    total = 0
    for layer in range(t.num_hidden_layers):
        total += attn + mlp
        if cfg.nsa.uses_nsa(layer):
            total += t.hidden_size * t.hidden_size + t.hidden_size * t.num_attention_heads * 3
    return total + t.hidden_size * t.vocab_size  # LM head (tied or not, it is a matmul)


def vision_matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(weights per patch in the blocks + patch embedding, merger weights per merged token)."""
    v = cfg.vision
    block = 4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size
    wide = v.hidden_size * v.spatial_merge_size**2
    return v.depth * block + v.patch_dim * v.hidden_size, wide * wide + wide * v.out_hidden_size


def _dense_keys(n: int) -> float:
    return n * (n + 1) / 2  # sum over rows of a causal sample of length n


def _nsa_keys(n: int, cfg: ModelConfig) -> float:
    """Keys over all rows of an NSA sequence of n tokens: compressed blocks + selected tokens + window."""
    s = cfg.nsa
    i = np.arange(n, dtype=np.float64)
    return float(np.sum(i // s.block_size + np.minimum(i + 1, s.block_count * s.block_size)
                        + np.minimum(i + 1, s.window_size)))


def train_step_flops(cfg: ModelConfig, *, samples: int, text_tokens: int, vision_tokens: int,
                     patches: int = 0, frame_patches: int = 0) -> float:
    """FLOPs of one training step over `samples` samples, each with text_tokens + vision_tokens tokens."""
    t, v = cfg.text, cfg.vision
    tokens = text_tokens + vision_tokens
    fwd = 2 * text_matmul_params(cfg) * tokens
    per_key = 4 * t.num_attention_heads * t.head_dim
    for layer in range(t.num_hidden_layers):
        if cfg.nsa.uses_nsa(layer) and vision_tokens:
            # Text rows dense over the whole causal prefix; vision rows through NSA.
            fwd += per_key * (_dense_keys(tokens) * text_tokens / tokens + _nsa_keys(vision_tokens, cfg))
        else:
            fwd += per_key * _dense_keys(tokens)
    if patches:
        per_patch, merger = vision_matmul_params(cfg)
        window = (v.window_size // v.patch_size) ** 2
        full = len(v.fullatt_block_indexes)
        keys = (v.depth - full) * window + full * max(frame_patches, window)
        fwd += (2 * per_patch + 4 * v.hidden_size * keys) * patches + 2 * merger * patches / v.spatial_merge_size**2
    return 3.0 * fwd * samples
