"""Qwen2 language model with multimodal rotary embeddings; attention per layer is dense or VideoNSA.

Each layer is `layer_cache, x = layer(x, ctx, layer_cache)`: the KV cache is optional (`attention.py` says how a
chunk reads and writes it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from nsa_jax.attention import DenseAttention, LayerCache, TokenContext
from nsa_jax.config import ModelConfig
from nsa_jax.layers import GatedMLP, RMSNorm, Runtime, make_blocks, run_blocks
from nsa_jax.sharding import activation_sharding, logical_to_spec, with_axes
from nsa_jax.videonsa import NSAAttention


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, nsa: bool, *, rngs: nnx.Rngs, dtype, param_dtype,
                 runtime: Runtime = Runtime()):
        """nsa: NSA attention (else dense), as `cfg.nsa.uses_nsa(layer)` says."""
        t = cfg.text
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.runtime = runtime
        self.input_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype)
        if nsa:
            self.self_attn = NSAAttention(cfg, runtime=runtime, **kw)
        else:
            self.self_attn = DenseAttention(t, runtime=runtime, **kw)
        self.mlp = GatedMLP(t.hidden_size, t.intermediate_size, t.hidden_act, bias=False, **kw)

    def __call__(self, x: jax.Array, ctx: TokenContext, cache: LayerCache | None = None
                 ) -> tuple[LayerCache | None, jax.Array]:
        return self.runtime.call(DecoderLayer._forward, self, x, ctx, cache)

    def _forward(self, x: jax.Array, ctx: TokenContext, cache: LayerCache | None
                 ) -> tuple[LayerCache | None, jax.Array]:
        if self.runtime.mesh is not None:
            x = jax.lax.with_sharding_constraint(x, activation_sharding(self.runtime.mesh, x.shape))
        cache, h = self.self_attn(self.input_layernorm(x), ctx, cache)
        x = x + h
        return cache, x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nnx.Module):
    """Token embedding, decoder layers and the final norm (HF `Qwen2_5_VLTextModel`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 runtime: Runtime = Runtime()):
        t = cfg.text
        self.runtime = runtime
        self.embed_tokens = nnx.Embed(t.vocab_size, t.hidden_size,
                                      embedding_init=with_axes(nnx.initializers.normal(0.02), ("vocab", "embed")),
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        kinds = [cfg.nsa.uses_nsa(i) for i in range(t.num_hidden_layers)]
        self.layers = nnx.List(make_blocks(kinds, lambda nsa, r: DecoderLayer(
            cfg, nsa, rngs=r, dtype=dtype, param_dtype=param_dtype, runtime=runtime), rngs))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T, E]. On a mesh the table (in the compute dtype) is first placed for compute
        (gathered over its ZeRO-3 shards, `Runtime.rules`): a lookup into column-sharded rows would leave the
        result sharded on E, which the partitioner can only reshard to [batch, sequence] by replicating it."""
        mesh = self.runtime.mesh
        if mesh is None:
            return self.embed_tokens(input_ids)
        table = self.embed_tokens.embedding[...].astype(self.embed_tokens.dtype)
        spec = logical_to_spec(("vocab", "embed"), table.shape, mesh, self.runtime.rules(compute=True))
        table = jax.lax.with_sharding_constraint(table, NamedSharding(mesh, spec))
        x = jnp.take(table, input_ids, axis=0)
        return jax.lax.with_sharding_constraint(x, activation_sharding(mesh, x.shape))

    def __call__(self, x: jax.Array, ctx: TokenContext, cache: tuple[LayerCache, ...] | None = None
                 ) -> tuple[tuple[LayerCache, ...] | None, jax.Array]:
        """(updated cache, final hidden states); cache: one `LayerCache` per layer."""
        def step(layer, h, layer_cache):
            layer_cache, h = layer(h, ctx, layer_cache)
            return h, layer_cache

        if cache is None or ctx.cache_valid is None:
            # Forward and prefill: one scan over the layers (compile time does not grow with depth).
            stacked = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *cache)
            h, stacked = run_blocks(self.layers, x, step, stacked, self.runtime)
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
