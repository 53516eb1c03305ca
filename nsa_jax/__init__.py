"""VideoNSA in JAX: Qwen2.5-VL with Native Sparse Attention for video tokens, in Flax NNX."""

from nsa_jax.config import ConfigError, ModelConfig, NSAConfig, TextConfig, VisionConfig, tiny_config
from nsa_jax.conversion import CheckpointError, from_pretrained, save_hf, save_orbax
from nsa_jax.model import Qwen25VL, VisionInput, init_model
from nsa_jax.processing import get_rope_index
from nsa_jax.vision import vision_layout

__all__ = ["ConfigError", "CheckpointError", "ModelConfig", "NSAConfig", "TextConfig", "VisionConfig",
           "Qwen25VL", "VisionInput", "from_pretrained", "get_rope_index", "init_model", "save_hf", "save_orbax",
           "tiny_config", "vision_layout"]
