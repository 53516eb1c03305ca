"""VideoNSA in JAX: Qwen2.5-VL with Native Sparse Attention for video tokens, in Flax NNX.

The names below load their module on first use, so importing a processor module (`nsa_jax.processing`,
`nsa_jax.chat`, `nsa_jax.tokenizer`), as the data pipeline does, loads no network code.
"""

import importlib

_EXPORTS = {
    "ConfigError": "config", "ModelConfig": "config", "NSAConfig": "config", "TextConfig": "config",
    "VisionConfig": "config", "tiny_config": "config",
    "CheckpointError": "conversion", "from_pretrained": "conversion", "save_hf": "conversion",
    "save_orbax": "conversion",
    "Qwen25VL": "model", "VisionInput": "model", "init_model": "model",
    "get_rope_index": "processing",
    "vision_layout": "vision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nsa_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(f"nsa_jax.{_EXPORTS[name]}"), name)
