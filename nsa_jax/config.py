"""Model configuration dataclasses, read from and written to Hugging Face `config.json`.

Both HF layouts are read: the nested one (`text_config` / `vision_config`, transformers >= 4.52) and the
older flat one (text fields at the top level, `vision_config` nested). NSA settings are optional
top-level or `text_config` fields (`nsa_mode`, `nsa_block_size`, ...); see SPEC §6.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Literal, Sequence

NSAMode = Literal["dense", "videonsa", "native"]


class ConfigError(ValueError):
    """A configuration whose fields are missing or whose shapes don't fit."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The Qwen2.5-VL vision tower."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row: channels * temporal patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision_config.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ConfigError("vision_config: head_dim must be a multiple of 4 for the 2-D rotary embedding")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError(
                f"vision_config.window_size={self.window_size} must be a multiple of "
                f"patch_size*spatial_merge_size={self.patch_size * self.spatial_merge_size}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(f"vision_config.fullatt_block_indexes {bad} outside [0, depth={self.depth})")


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Native Sparse Attention settings of the language layers (SPEC §2, §3)."""

    mode: NSAMode = "dense"
    block_size: int = 64
    block_count: int = 32
    window_size: int = 256
    gate_temperature: float = 0.3
    # Layers that use NSA; None means every layer (ignored in mode "dense").
    layers: tuple[int, ...] | None = None
    # Kernel implementation passed to `pallas_kernels.nsa_attention`: "auto", "reference" or "pallas".
    impl: str = "auto"
    # "token" (each query its own top-k) or "query_block" (SPEC §4's opt-in: one set per block of queries;
    # mode native only).
    selection: str = "token"
    # Mode videonsa's top-k lse (SPEC §2.11): "released" (the release's reading of the compression lse buffer)
    # or "per_head" (each head's own).
    videonsa_lse: str = "released"

    @classmethod
    def from_dict(cls, d: Any) -> "NSAConfig":
        """From a mapping (a training config's `model.nsa`): every field it sets, the others default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d.keys()) - names)
        if unknown:
            raise ConfigError(f"nsa config: unknown fields {unknown}; expected some of {sorted(names)}")
        kw = {name: d[name] for name in names if name in d}
        if kw.get("layers") is not None:
            kw["layers"] = tuple(kw["layers"])
        return cls(**kw)

    def uses_nsa(self, layer: int) -> bool:
        return self.mode != "dense" and (self.layers is None or layer in self.layers)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 language model (with mRoPE)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text_config.hidden_size={self.hidden_size} is not divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"text_config.num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"num_key_value_heads={self.num_key_value_heads}")
        if 2 * sum(self.mrope_section) != self.head_dim:
            raise ConfigError(f"text_config.rope_scaling.mrope_section={list(self.mrope_section)} must sum to "
                              f"head_dim/2={self.head_dim // 2}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Qwen2.5-VL (optionally with VideoNSA attention): vision tower + language model + token ids."""

    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    nsa: NSAConfig = NSAConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Vision time ids: "truncate" = int(second_per_grid_t) as transformers 4.49-4.57 (VideoNSA's training);
    # "exact" = floor(t * second_per_grid_t * tokens_per_second).
    video_time_ids: Literal["truncate", "exact"] = "truncate"
    # Key layout of the HF checkpoint this config came from: "flat" (`model.layers.*`, `visual.*`) or
    # "nested" (`model.language_model.*`, `model.visual.*`); an export keeps it.
    hf_key_layout: Literal["flat", "nested"] = "flat"

    def validate(self) -> "ModelConfig":
        self.text.validate()
        self.vision.validate()
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ConfigError(f"vision_config.out_hidden_size={self.vision.out_hidden_size} must equal "
                              f"text hidden_size={self.text.hidden_size}")
        if self.nsa.mode not in ("dense", "videonsa", "native"):
            raise ConfigError(f"nsa_mode={self.nsa.mode!r}: expected 'dense', 'videonsa' or 'native'")
        if self.nsa.selection not in ("token", "query_block"):
            raise ConfigError(f"nsa_selection={self.nsa.selection!r}: expected 'token' or 'query_block'")
        if self.nsa.videonsa_lse not in ("released", "per_head"):
            raise ConfigError(f"nsa_videonsa_lse={self.nsa.videonsa_lse!r}: expected 'released' or 'per_head'")
        if self.nsa.selection == "query_block" and self.nsa.mode == "videonsa":
            raise ConfigError("nsa_selection='query_block' needs nsa_mode='native' (mode videonsa keeps the "
                              "released per-token selection)")
        return self

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---------------------------------------------------------------- HF config.json

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], has_gates: bool = False) -> "ModelConfig":
        """Builds a config from an HF Qwen2.5-VL `config.json` dict (nested or flat form).

        `has_gates`: the checkpoint holds VideoNSA gate weights; NSA then defaults to the paper's settings.
        """
        text_d = dict(d.get("text_config") or {})
        # Flat form: text fields at the top level. Nested form may still repeat some at the top; the
        # nested values win.
        merged = {**{k: v for k, v in d.items() if k not in ("text_config", "vision_config")}, **text_d}
        vision_d = dict(d.get("vision_config") or {})

        def pick(dc: type, src: dict[str, Any]) -> dict[str, Any]:
            names = {f.name for f in dataclasses.fields(dc)}
            return {k: (tuple(v) if isinstance(v, list) else v) for k, v in src.items() if k in names}

        text_kw = pick(TextConfig, merged)
        rope_scaling = merged.get("rope_scaling") or {}
        if "mrope_section" in rope_scaling:
            text_kw["mrope_section"] = tuple(rope_scaling["mrope_section"])
        for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if required not in text_kw:
                raise ConfigError(f"config.json: missing text field {required!r} (top level or text_config)")
        vision_kw = pick(VisionConfig, vision_d)
        if "hidden_size" not in vision_d and "embed_dim" in vision_d:
            vision_kw["hidden_size"] = vision_d["embed_dim"]
        ids = {k: merged[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if k in merged}

        def nsa_field(name: str, default: Any) -> Any:
            return merged.get(name, default)

        mode = nsa_field("nsa_mode", "videonsa" if has_gates else "dense")
        if has_gates and mode == "dense":
            raise ConfigError("config.json: nsa_mode='dense' but the checkpoint holds g_proj gate weights")
        layers = nsa_field("nsa_layers", None)
        nsa = NSAConfig(mode=mode,
                        block_size=int(nsa_field("nsa_block_size", 64)),
                        block_count=int(nsa_field("nsa_block_count", 32)),
                        window_size=int(nsa_field("nsa_window_size", 256)),
                        gate_temperature=float(nsa_field("nsa_gate_temperature", 0.3)),
                        layers=None if layers is None else tuple(layers),
                        selection=nsa_field("nsa_selection", "token"),
                        videonsa_lse=nsa_field("nsa_videonsa_lse", "released"))
        return cls(text=TextConfig(**text_kw), vision=VisionConfig(**vision_kw), nsa=nsa,
                   video_time_ids=merged.get("video_time_ids", "truncate"),
                   hf_key_layout=d.get("hf_key_layout", "nested" if "text_config" in d else "flat"),
                   **ids).validate()

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF `config.json` dict (nested form) that transformers' Qwen2.5-VL loads."""
        t, v = self.text, self.vision
        text = {
            "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": t.tie_word_embeddings,
            "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(t.mrope_section)},
            "use_sliding_window": False,
        }
        vision = {
            "model_type": "qwen2_5_vl", "depth": v.depth, "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_heads": v.num_heads, "in_channels": v.in_channels,
            "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size, "window_size": v.window_size,
            "out_hidden_size": v.out_hidden_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second, "hidden_act": v.hidden_act,
        }
        d: dict[str, Any] = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": text, "vision_config": vision, "tie_word_embeddings": t.tie_word_embeddings,
            "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id, "vision_end_token_id": self.vision_end_token_id,
            "video_time_ids": self.video_time_ids, "hf_key_layout": self.hf_key_layout,
        }
        if self.nsa.mode != "dense":
            d.update(nsa_mode=self.nsa.mode, nsa_block_size=self.nsa.block_size,
                     nsa_block_count=self.nsa.block_count, nsa_window_size=self.nsa.window_size,
                     nsa_gate_temperature=self.nsa.gate_temperature)
            if self.nsa.layers is not None:
                d["nsa_layers"] = list(self.nsa.layers)
            if self.nsa.selection != "token":
                d["nsa_selection"] = self.nsa.selection
            if self.nsa.mode == "videonsa":
                d["nsa_videonsa_lse"] = self.nsa.videonsa_lse
        return d

    @classmethod
    def from_json(cls, path: str, has_gates: bool = False) -> "ModelConfig":
        """Reads `config.json` (a file or the directory holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no config.json")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(d, has_gates=has_gates)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from e

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)


def tiny_config(*, tie_word_embeddings: bool = False, mrope_section: Sequence[int] = (2, 3, 3),
                fullatt_block_indexes: Sequence[int] = (1,), window_size: int = 56, vision_depth: int = 2,
                num_layers: int = 2, nsa: NSAConfig = NSAConfig(), vocab_size: int = 512) -> ModelConfig:
    """A tiny random-init model for tests and the CPU demo, whose token ids fit `ByteTokenizer()`."""
    return ModelConfig(
        text=TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=tuple(mrope_section),
                        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=4096),
        vision=VisionConfig(depth=vision_depth, hidden_size=32, intermediate_size=64, num_heads=2,
                            window_size=window_size, out_hidden_size=64,
                            fullatt_block_indexes=tuple(fullatt_block_indexes)),
        # The special ids of `nsa_jax.tokenizer.ByteTokenizer()`'s default layout (text bytes are 0..255).
        nsa=nsa, vision_start_token_id=259, vision_end_token_id=260, image_token_id=261, video_token_id=262,
    ).validate()


def _demo(nsa: NSAConfig) -> ModelConfig:
    return tiny_config(nsa=nsa, num_layers=4).replace(
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                        max_position_embeddings=8192),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, window_size=56,
                            out_hidden_size=128, fullatt_block_indexes=(1,)))


def _qwen25_sized(hidden: int, mlp: int, layers: int, heads: int) -> Callable[[NSAConfig], ModelConfig]:
    """A Qwen2.5(-VL)-sized language model (2 KV heads, tied embeddings) on the 7B's vision tower."""
    return lambda nsa: ModelConfig(
        text=TextConfig(vocab_size=151936, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=2, tie_word_embeddings=True),
        vision=VisionConfig(out_hidden_size=hidden), nsa=nsa)


# Model variants by name: tiny (tests), demo (CPU), videonsa_1b (benchmark: a Qwen2.5-1.5B-sized LLM), videonsa_3b
# (Qwen2.5-VL-3B sized: multi-GPU runs), qwen25vl_7b (the paper's).
MODEL_PRESETS: dict[str, Callable[[NSAConfig], ModelConfig]] = {
    "tiny": lambda nsa: tiny_config(nsa=nsa),
    "demo": _demo,
    "videonsa_1b": _qwen25_sized(1536, 8960, 28, 12),
    "videonsa_3b": _qwen25_sized(2048, 11008, 36, 16),
    "qwen25vl_7b": lambda nsa: ModelConfig(nsa=nsa),
}


def model_preset(name: str, nsa: NSAConfig = NSAConfig()) -> ModelConfig:
    """The model config of variant `name` (`MODEL_PRESETS`) with these NSA settings."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"model preset {name!r}: expected one of {sorted(MODEL_PRESETS)}")
    return MODEL_PRESETS[name](nsa).validate()
