"""Qwen2 language model with multimodal rotary embeddings; attention per layer is dense or VideoNSA.

Every layer takes an optional KV cache (`LayerCache`) and returns it updated, `layer_cache, x = layer(x, ctx,
layer_cache)`: a chunk's rotated k, v are written at slot `ctx.cache_start`. Without `ctx.cache_valid` (a
prefill) the chunk attends within itself through the layer's own attention (dense or the VideoNSA hybrid);
with it (decoding) the chunk attends densely (causal GQA) to every visible cached token, as the released
VideoNSA decodes (SPEC §2.12: a decode step's token is text, so it takes the pure dense path in every mode).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from nsa_jax.attention import cached_attention, dense_attention
from nsa_jax.config import ModelConfig, TextConfig
from nsa_jax.head_parallel import head_parallel
from nsa_jax.layers import GatedMLP, RMSNorm, linear, make_blocks, run_blocks
from nsa_jax.rope import apply_rotary


class TokenContext(NamedTuple):
    """Per-token facts every attention layer may need, computed once per forward pass."""

    position_ids: jax.Array  # [3, B, T] mRoPE ids
    cos: jax.Array  # [B, T, D]
    sin: jax.Array  # [B, T, D]
    segment_ids: jax.Array | None  # [B, T] packed samples (0 = padding) or None
    kv_valid: jax.Array | None  # [B, T] keys that exist (padding masked) or None
    vision_mask: jax.Array  # [B, T] bool: image / video pad tokens
    cache_start: jax.Array | None = None  # [B] int32: the cache slot of each row's first chunk token
    cache_valid: jax.Array | None = None  # [B, S] bool: cached slots the chunk may see (None: a prefill)


class LayerCache(NamedTuple):
    """One layer's rotated keys and values [B, S, K, D]."""

    k: jax.Array
    v: jax.Array

    def write(self, k: jax.Array, v: jax.Array, start: jax.Array) -> "LayerCache":
        """k, v [B, T, K, D] written at slots start[b] .. start[b] + T - 1 of each row."""
        put = jax.vmap(lambda cache, new, s: jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype),
                                                                                  s, axis=0))
        return LayerCache(put(self.k, k, start), put(self.v, v, start))


class DenseAttention(nnx.Module):
    """Causal GQA self-attention with mRoPE (Qwen2.5-VL)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = linear(cfg.hidden_size, self.num_heads * d, bias=True, **kw)
        self.k_proj = linear(cfg.hidden_size, self.num_kv_heads * d, bias=True, **kw)
        self.v_proj = linear(cfg.hidden_size, self.num_kv_heads * d, bias=True, **kw)
        self.o_proj = linear(self.num_heads * d, cfg.hidden_size, bias=False, **kw)
        self.implementation: str | None = None  # jax.nn.dot_product_attention's ("cudnn" on NVIDIA GPUs)
        self.mesh: Mesh | None = None  # training's mesh: the attention core runs head-parallel over it

    def qkv(self, x: jax.Array, ctx: TokenContext) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q [B,T,H,D], k, v [B,T,K,D] after mRoPE."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = ctx.cos.astype(x.dtype), ctx.sin.astype(x.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def __call__(self, x: jax.Array, ctx: TokenContext, cache: LayerCache | None = None
                 ) -> tuple[LayerCache | None, jax.Array]:
        """(updated cache, output [B, T, E]); see the module docstring for the cache."""
        q, k, v = self.qkv(x, ctx)
        if cache is not None:
            cache = cache.write(k, v, ctx.cache_start)
        if cache is not None and ctx.cache_valid is not None:
            o = cached_attention(q, cache.k, cache.v, ctx.cache_start, ctx.cache_valid)
        else:
            o = self.attend(q, k, v, x, ctx)
        return cache, self.o_proj(o.reshape(*x.shape[:2], -1).astype(x.dtype))

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array, ctx: TokenContext) -> jax.Array:
        """The attention core over the chunk itself: causal GQA, [B, T, H, D]."""
        del x
        attend = lambda q, k, v, segment_ids, kv_valid: dense_attention(
            q, k, v, causal=True, segment_ids=segment_ids, kv_valid=kv_valid, implementation=self.implementation)
        return head_parallel(self.mesh, attend, (q, k, v), dict(segment_ids=ctx.segment_ids, kv_valid=ctx.kv_valid),
                             num_kv_heads=self.num_kv_heads)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, nsa: bool, *, rngs: nnx.Rngs, dtype, param_dtype):
        """nsa: NSA attention (else dense), as `cfg.nsa.uses_nsa(layer)` says."""
        t = cfg.text
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype)
        if nsa:
            from nsa_jax.videonsa import NSAAttention  # the hybrid layer builds on DenseAttention
            self.self_attn = NSAAttention(cfg, **kw)
        else:
            self.self_attn = DenseAttention(t, **kw)
        self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, t.hidden_act, bias=False, **kw)

    def __call__(self, x: jax.Array, ctx: TokenContext, cache: LayerCache | None = None
                 ) -> tuple[LayerCache | None, jax.Array]:
        cache, h = self.self_attn(self.input_layernorm(x), ctx, cache)
        x = x + h
        return cache, x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
    """Token embedding, decoder layers and the final norm (HF `Qwen2_5_VLTextModel`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        t = cfg.text
        self.embed_tokens = nnx.Embed(t.vocab_size, t.hidden_size, embedding_init=nnx.initializers.normal(0.02),
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kinds = [cfg.nsa.uses_nsa(i) for i in range(t.num_hidden_layers)]
        self.layers = nnx.List(make_blocks(kinds, lambda nsa, r: DecoderLayer(
            cfg, nsa, rngs=r, dtype=dtype, param_dtype=param_dtype), rngs))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, ctx: TokenContext, cache: tuple[LayerCache, ...] | None = None
                 ) -> tuple[tuple[LayerCache, ...] | None, jax.Array]:
        """(updated cache, final hidden states); cache: one `LayerCache` per layer."""
        def step(layer, h, layer_cache):
            layer_cache, h = layer(h, ctx, layer_cache)
            return h, layer_cache

        if cache is None or ctx.cache_valid is None:
            # Forward and prefill: one scan over the layers (compile time does not grow with depth).
            stacked = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *cache)
            h, stacked = run_blocks(self.layers, x, step, stacked)
            if cache is not None:
                cache = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(len(self.layers)))
            return cache, self.norm(h)
        # Decoding: layer by layer, each reading its own weights and updating its own cache in place (a scan
        # would stack every layer's weights and cache again at each step).
        new = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = step(layer, x, layer_cache)
            new.append(layer_cache)
        return tuple(new), self.norm(x)

    def init_cache(self, batch: int, length: int, dtype) -> tuple[LayerCache, ...]:
        """An empty cache of `length` slots per row for every layer."""
        attn = self.layers[0].self_attn
        shape = (batch, length, attn.num_kv_heads, attn.head_dim)
        return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers)
