"""Tiny random transformers Qwen2.5-VL models: the independent oracle of the parity tests (test-only)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from nsa_jax.config import ModelConfig


def hf_model(config: ModelConfig, seed: int = 0, noise: float = 0.05) -> Qwen2_5_VLForConditionalGeneration:
    """A random HF model of this config in float32, its weights perturbed so norms are not all ones."""
    torch.manual_seed(seed)
    hf_cfg = Qwen2_5_VLConfig(**config.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    model = Qwen2_5_VLForConditionalGeneration(hf_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def hf_logits(model, **inputs) -> np.ndarray:
    """Logits of the HF model on numpy inputs (converted to torch)."""
    def conv(v):
        if v is None:
            return None
        a = np.asarray(v)
        return torch.from_numpy(a.astype(np.int64) if a.dtype.kind in "iub" else a.astype(np.float32))
    t = {k: conv(v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**t, use_cache=False).logits.float().numpy()
