"""Tiny random transformers Qwen2.5-VL models: the independent oracle of the parity tests (test-only)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from nsa_jax.config import ModelConfig

QWEN_TEMPLATE = (  # Qwen2.5-VL-7B-Instruct chat_template.json
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


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
