"""Greedy generation for one sample: the vision tower once, a prefill over the prompt, then text decoding.

Two decoders, both returning what `argmax(model(prefix)[-1])` gives step after step:
- "cache": a jitted prefill runs the model's own layers over the prompt (NSA for vision in NSA layers) and
  keeps every layer's K/V in a fixed-size cache [layers, 1, prompt + max_new_tokens, KV heads, D]; each
  decode step is one jitted call that attends a text token densely to the cached K/V. Exact for dense
  layers and for mode "native" (text rows take only the dense branch there).
- "recompute": each step reruns the language model over the exact prefix with the merged vision features
  reused. Needed for mode "videonsa": its text rows also take the NSA branch, whose compression mask is
  not causal (SPEC §2.5), so a text row's output depends on how many tokens follow it.
Generated text gets mRoPE ids max(prompt ids) + 1 + step on all three axes (transformers' rope_deltas).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.attention import dense_attention
from nsa_jax.language import TokenContext
from nsa_jax.model import Qwen25VL, VisionInput, scatter_vision
from nsa_jax.rope import get_rope_index, mrope_cos_sin

Method = Literal["auto", "cache", "recompute"]
BUCKET = 64  # prompt and KV-cache lengths are rounded up to this


@dataclasses.dataclass(frozen=True)
class VisionPrompt:
    """The vision inputs of one prompt: pixel rows and grids as the processor returns them."""

    pixel_values_videos: np.ndarray | None = None  # [N, patch_dim]
    video_grid_thw: np.ndarray | None = None  # [n, 3]
    second_per_grid_ts: Sequence[float] | None = None
    pixel_values: np.ndarray | None = None  # images
    image_grid_thw: np.ndarray | None = None


def _vision_inputs(model: Qwen25VL, vision: VisionPrompt) -> tuple[VisionInput | None, VisionInput | None]:
    from nsa_jax.vision import vision_layout

    vc = model.config.vision
    images = videos = None
    if vision.pixel_values is not None:
        images = VisionInput(jnp.asarray(vision.pixel_values), vision_layout(vision.image_grid_thw, vc))
    if vision.pixel_values_videos is not None:
        videos = VisionInput(jnp.asarray(vision.pixel_values_videos), vision_layout(vision.video_grid_thw, vc))
    return images, videos


def _context(model: Qwen25VL, input_ids: jax.Array, position_ids: jax.Array) -> TokenContext:
    cfg = model.config
    cos, sin = mrope_cos_sin(position_ids, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)
    vision_mask = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
    return TokenContext(position_ids, cos, sin, None, None, vision_mask)


def _embed(model: Qwen25VL, input_ids: jax.Array, features: dict[str, jax.Array]) -> jax.Array:
    """Token embeddings with the merged vision features scattered over the image / video pad tokens."""
    cfg = model.config
    x = model.language_model.embed_tokens(input_ids)
    if "image" in features:
        x = scatter_vision(x, input_ids == cfg.image_token_id, features["image"])
    if "video" in features:
        x = scatter_vision(x, input_ids == cfg.video_token_id, features["video"])
    return x


@nnx.jit
def _vision_features(model: Qwen25VL, images: VisionInput | None, videos: VisionInput | None
                     ) -> dict[str, jax.Array]:
    out = {}
    if images is not None:
        out["image"] = model.visual(images.pixel_values, images.layout)
    if videos is not None:
        out["video"] = model.visual(videos.pixel_values, videos.layout)
    return out


@nnx.jit
def _last_logits(model: Qwen25VL, input_ids: jax.Array, position_ids: jax.Array,
                 features: dict[str, jax.Array]) -> jax.Array:
    """Logits [vocab] of the last token of the exact prefix input_ids [1, T]."""
    h = model.language_model(_embed(model, input_ids, features), _context(model, input_ids, position_ids))
    return model.logits(h[:, -1])[0]


@functools.partial(nnx.jit, static_argnames=("cache_len",))
def _prefill(model: Qwen25VL, input_ids: jax.Array, position_ids: jax.Array, features: dict[str, jax.Array],
             length: jax.Array, cache_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Logits [vocab] of token `length - 1` and K/V caches [layers, 1, cache_len, KV heads, D] of a prompt whose
    tokens from `length` on are padding (causal layers: they change nothing before them)."""
    ctx = _context(model, input_ids, position_ids)
    x = _embed(model, input_ids, features)
    t = input_ids.shape[1]
    ks, vs = [], []
    for layer in model.language_model.layers:
        xn = layer.input_layernorm(x)
        _, k, v = layer.self_attn.qkv(xn, ctx)
        pad = ((0, 0), (0, cache_len - t), (0, 0), (0, 0))
        ks.append(jnp.pad(k, pad))
        vs.append(jnp.pad(v, pad))
        x = x + layer.self_attn(xn, ctx)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = model.language_model.norm(jax.lax.dynamic_index_in_dim(x, length - 1, axis=1, keepdims=False))
    return model.logits(h)[0], jnp.stack(ks), jnp.stack(vs)


@nnx.jit
def _decode_step(model: Qwen25VL, token: jax.Array, position: jax.Array, index: jax.Array, k_cache: jax.Array,
                 v_cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One text token (int32 scalar) at cache slot `index` with mRoPE id `position`: logits and the new caches."""
    input_ids = token.reshape(1, 1)
    ctx = _context(model, input_ids, jnp.broadcast_to(position, (3, 1, 1)))
    x = model.language_model.embed_tokens(input_ids)
    valid = (jnp.arange(k_cache.shape[2]) <= index)[None]
    new_k, new_v = [], []
    for i, layer in enumerate(model.language_model.layers):
        attn = layer.self_attn
        xn = layer.input_layernorm(x)
        q, k, v = attn.qkv(xn, ctx)
        kc = jax.lax.dynamic_update_slice(k_cache[i], k.astype(k_cache.dtype), (0, index, 0, 0))
        vc = jax.lax.dynamic_update_slice(v_cache[i], v.astype(v_cache.dtype), (0, index, 0, 0))
        new_k.append(kc)
        new_v.append(vc)
        o = dense_attention(q, kc, vc, causal=False, kv_valid=valid, implementation=attn.implementation)
        x = x + attn.o_proj(o.reshape(1, 1, -1).astype(x.dtype))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    h = model.language_model.norm(x)
    return model.logits(h[:, -1])[0], jnp.stack(new_k), jnp.stack(new_v)


def resolve_method(model: Qwen25VL, method: Method) -> Literal["cache", "recompute"]:
    """"auto": the KV cache unless some layer runs mode "videonsa" (whose text rows need the full prefix)."""
    nsa = model.config.nsa
    videonsa = nsa.mode == "videonsa" and any(nsa.uses_nsa(i) for i in range(model.config.text.num_hidden_layers))
    if method == "auto":
        return "recompute" if videonsa else "cache"
    if method == "cache" and videonsa:
        raise ValueError("method='cache' is not exact for nsa mode 'videonsa' (non-causal compression); "
                         "use 'recompute'")
    if method not in ("cache", "recompute"):
        raise ValueError(f"unknown method {method!r}")
    return method


def greedy_generate(model: Qwen25VL, input_ids: Sequence[int] | np.ndarray, vision: VisionPrompt = VisionPrompt(),
                    *, max_new_tokens: int, eos_token_ids: Sequence[int] = (), method: Method = "auto",
                    return_logits: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Greedy continuation (int32 [n <= max_new_tokens], stopping after the first EOS) of one prompt [T].

    return_logits: also return the logits float32 [n, vocab] each token was chosen from.
    """
    ids = np.asarray(input_ids, np.int32).reshape(1, -1)
    position_ids, _ = get_rope_index(ids, model.config, image_grid_thw=vision.image_grid_thw,
                                     video_grid_thw=vision.video_grid_thw,
                                     second_per_grid_ts=vision.second_per_grid_ts)
    next_id = int(position_ids.max()) + 1
    features = _vision_features(model, *_vision_inputs(model, vision))
    eos = set(int(e) for e in eos_token_ids)
    out: list[int] = []
    scores: list[jax.Array] = []

    def result():
        tokens = np.asarray(out, np.int32)
        if not return_logits:
            return tokens
        return tokens, np.asarray(jnp.stack(scores), np.float32).reshape(len(out), -1)

    if max_new_tokens <= 0:
        return result()
    t = ids.shape[1]
    pos = jnp.asarray(position_ids, jnp.int32)
    if resolve_method(model, method) == "cache":
        # Prompt and cache padded to multiples of BUCKET, so prompts of similar length share compiled steps.
        padded = -(-t // BUCKET) * BUCKET
        cache_len = -(-(padded + max_new_tokens) // BUCKET) * BUCKET
        pad_ids = np.pad(ids, ((0, 0), (0, padded - t)))
        pad_pos = jnp.pad(pos, ((0, 0), (0, 0), (0, padded - t)), mode="edge")
        logits, k_cache, v_cache = _prefill(model, jnp.asarray(pad_ids), pad_pos, features, jnp.int32(t),
                                            cache_len=cache_len)
        for step in range(max_new_tokens):
            token = int(jnp.argmax(logits))
            out.append(token)
            scores.append(logits)
            if token in eos or step == max_new_tokens - 1:
                break
            logits, k_cache, v_cache = _decode_step(model, jnp.int32(token), jnp.int32(next_id + step),
                                                    jnp.int32(t + step), k_cache, v_cache)
        return result()
    seq = ids
    for step in range(max_new_tokens):
        logits = _last_logits(model, jnp.asarray(seq), pos, features)
        token = int(jnp.argmax(logits))
        out.append(token)
        scores.append(logits)
        if token in eos:
            break
        seq = np.concatenate([seq, [[token]]], axis=1).astype(np.int32)
        pos = jnp.concatenate([pos, jnp.full((3, 1, 1), next_id + step, jnp.int32)], axis=2)
    return result()
