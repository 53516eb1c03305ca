"""Qwen2.5-VL for conditional generation (optionally with VideoNSA attention), in Flax NNX."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.config import ModelConfig
from nsa_jax.attention import LayerCache, TokenContext
from nsa_jax.language import TextModel
from nsa_jax.layers import Runtime, linear
from nsa_jax.processing import get_rope_index
from nsa_jax.rope import mrope_cos_sin
from nsa_jax.vision import VisionLayout, VisionTower, vision_layout


class VisionInput(NamedTuple):
    """Pixel rows of all images (or all videos) of a batch with their precomputed layout.

    Training splits the rows into chunks of whole frames (`nsa_jax/training/device_batch.py`): pixel_values
    [K, R, C*T*P*P], one layout per chunk stacked on a leading axis, and `token_order`, the merged tokens'
    order (of the K * R / merge^2 concatenated) that puts the real ones first, in sequence order.
    """

    pixel_values: jax.Array  # [N, C*T*P*P], or [K, R, C*T*P*P] in chunks
    layout: VisionLayout
    token_order: jax.Array | None = None  # [K * R / merge^2] int32 when in chunks


class KVCache(NamedTuple):
    """Rotated keys and values of every token so far (one `LayerCache` per layer) and which slots hold one."""

    layers: tuple[LayerCache, ...]  # per layer: k, v [B, S, K, D]
    valid: jax.Array  # [B, S] bool: slots holding a real token
    end: jax.Array  # [B] int32: each row's next free slot

    @staticmethod
    def concatenate(caches: list["KVCache"]) -> "KVCache":
        """The rows of several caches (same length) as one cache."""
        return jax.tree.map(lambda *a: jnp.concatenate(a, 0), *caches)


def scatter_vision(embeds: jax.Array, mask: jax.Array, features: jax.Array) -> jax.Array:
    """Replaces the rows of embeds [B,T,E] where mask [B,T] holds, in order, by features [M,E]."""
    flat_mask = mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, features.shape[0] - 1)
    flat = jnp.where(flat_mask[:, None], features[idx].astype(embeds.dtype), embeds.reshape(-1, embeds.shape[-1]))
    return flat.reshape(embeds.shape)


class Qwen25VL(nnx.Module):
    """`Qwen2_5_VLForConditionalGeneration`: vision tower, language model and LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 runtime: Runtime = Runtime()):
        """runtime: mesh, remat policy and dense attention implementation (`layers.Runtime`)."""
        self.config = config.validate()
        self.visual = VisionTower(config.vision, rngs=rngs, dtype=dtype, param_dtype=param_dtype, runtime=runtime)
        self.language_model = TextModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype, runtime=runtime)
        if not config.text.tie_word_embeddings:
            self.lm_head = linear(config.text.hidden_size, config.text.vocab_size, kernel_axes=("embed", "vocab"),
                                  bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.dtype = dtype

    # ------------------------------------------------------------------ jittable core

    def embed(self, input_ids: jax.Array, position_ids: jax.Array, *, images: VisionInput | None = None,
              videos: VisionInput | None = None, segment_ids: jax.Array | None = None,
              kv_valid: jax.Array | None = None) -> tuple[jax.Array, TokenContext]:
        """Token embeddings [B, T, E] with the vision features scattered over the image / video pad tokens,
        and the per-token context of the layers (mRoPE cos / sin of position ids [3, B, T], masks).

        The vision tokens are the pad tokens that receive features, at most the features' rows in any row
        (`TokenContext.vision_tokens`); without any images or videos, every image / video pad token (their rows
        unknown)."""
        cfg = self.config
        x = self.language_model.embed(input_ids)
        image_mask = input_ids == cfg.image_token_id
        video_mask = input_ids == cfg.video_token_id
        if images is None and videos is None:
            vision_mask, vision_tokens = image_mask | video_mask, None
        else:
            vision_mask, vision_tokens = jnp.zeros_like(image_mask), 0
            for inputs, mask in ((images, image_mask), (videos, video_mask)):
                if inputs is not None:
                    features = self.vision_features(inputs)
                    x = scatter_vision(x, mask, features)
                    vision_mask, vision_tokens = vision_mask | mask, vision_tokens + features.shape[0]
        cos, sin = mrope_cos_sin(position_ids, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)
        return x, TokenContext(position_ids, cos, sin, segment_ids, kv_valid, vision_mask,
                               vision_tokens=vision_tokens)

    def forward(self, input_ids: jax.Array, position_ids: jax.Array, *, images: VisionInput | None = None,
                videos: VisionInput | None = None, segment_ids: jax.Array | None = None,
                kv_valid: jax.Array | None = None, return_hidden: bool = False) -> jax.Array:
        """Logits [B, T, vocab] from token ids [B, T] and 3-D position ids [3, B, T] (fixed shapes)."""
        x, ctx = self.embed(input_ids, position_ids, images=images, videos=videos, segment_ids=segment_ids,
                            kv_valid=kv_valid)
        _, h = self.language_model(x, ctx)
        return h if return_hidden else self.logits(h)

    # ------------------------------------------------------------------ KV cache (SPEC §2.12)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty KV cache of `length` slots per row."""
        return KVCache(self.language_model.init_cache(batch, length, self.dtype),
                       jnp.zeros((batch, length), bool), jnp.zeros((batch,), jnp.int32))

    def prefill(self, input_ids: jax.Array, position_ids: jax.Array, lengths: jax.Array, cache: KVCache, *,
                images: VisionInput | None = None, videos: VisionInput | None = None
                ) -> tuple[jax.Array, KVCache]:
        """Runs prompts [B, T] (row b's tokens from lengths[b] on are padding) through the layers into an empty
        cache: (logits [B, vocab] of each row's last prompt token, the cache).

        Each layer attends as in `forward` (the VideoNSA hybrid in NSA layers). Trailing padding changes
        nothing before it in causal layers; in mode videonsa (non-causal compression) it would, so its prompts
        come unpadded (`exact_prefill`).
        """
        x, ctx = self.embed(input_ids, position_ids, images=images, videos=videos)
        t = input_ids.shape[1]
        ctx = ctx.replace(cache_start=jnp.zeros_like(lengths))
        layers, h = self.language_model(x, ctx, cache.layers)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
        valid = cache.valid.at[:, :t].set(jnp.arange(t)[None, :] < lengths[:, None])
        return self.logits(last), KVCache(layers, valid, lengths.astype(jnp.int32))

    def decode_step(self, tokens: jax.Array, position_ids: jax.Array, cache: KVCache
                    ) -> tuple[jax.Array, KVCache]:
        """One token per row, tokens [B] with mRoPE ids [3, B], at slot cache.end of each row: (logits [B, vocab],
        the cache). The token attends densely to its row's cached tokens and itself (SPEC §2.12)."""
        x, ctx = self.embed(tokens[:, None], position_ids[:, :, None])
        valid = cache.valid | (jnp.arange(cache.valid.shape[1])[None, :] == cache.end[:, None])
        ctx = ctx.replace(cache_start=cache.end, cache_valid=valid)
        layers, h = self.language_model(x, ctx, cache.layers)
        return self.logits(h[:, 0]), KVCache(layers, valid, cache.end + 1)

    @property
    def exact_prefill(self) -> bool:
        """Whether a prompt's result depends on tokens after it (mode videonsa's non-causal compression), so
        prefills must run at the prompt's exact length."""
        nsa = self.config.nsa
        return nsa.mode == "videonsa" and any(nsa.uses_nsa(i) for i in range(self.config.text.num_hidden_layers))

    def vision_features(self, vision: VisionInput) -> jax.Array:
        """Merged tokens [M, E] of the real rows first, in order; chunks run the tower independently (vmap)."""
        if vision.token_order is None:
            return self.visual(vision.pixel_values, vision.layout)
        graphdef, state = nnx.split(self.visual)
        chunks = jax.vmap(lambda state, pixels, layout: nnx.merge(graphdef, state)(pixels, layout),
                          in_axes=(None, 0, 0))(state, vision.pixel_values, vision.layout)
        return chunks.reshape(-1, chunks.shape[-1])[vision.token_order]

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.text.tie_word_embeddings:
            return self.language_model.embed_tokens.attend(hidden)
        return self.lm_head(hidden)

    # ------------------------------------------------------------------ transformers-style call

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                 position_ids=None) -> jax.Array:
        """Logits as `Qwen2_5_VLForConditionalGeneration(...).logits` (concrete, not jitted, inputs)."""
        input_ids = np.asarray(input_ids)
        if position_ids is None:
            position_ids, _ = get_rope_index(input_ids, self.config, image_grid_thw=image_grid_thw,
                                             video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
                                             attention_mask=attention_mask)
        images = videos = None
        if pixel_values is not None:
            images = VisionInput(jnp.asarray(pixel_values), vision_layout(image_grid_thw, self.config.vision))
        if pixel_values_videos is not None:
            videos = VisionInput(jnp.asarray(pixel_values_videos), vision_layout(video_grid_thw, self.config.vision))
        kv_valid = None if attention_mask is None else jnp.asarray(attention_mask, bool)
        return self.forward(jnp.asarray(input_ids), jnp.asarray(position_ids, jnp.int32), images=images,
                            videos=videos, kv_valid=kv_valid)


def init_model(config: ModelConfig, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> Qwen25VL:
    """A randomly initialised model."""
    return Qwen25VL(config, rngs=nnx.Rngs(seed), dtype=dtype, param_dtype=param_dtype)


def abstract_model(config: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32) -> Qwen25VL:
    """The model with shape-only parameters (no memory), for loading checkpoints into."""
    return nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))
