"""Remat policies of nsa_jax/layers.py. "attention": the NSA kernels' residuals, named by their custom VJPs, are
kept from the forward, so the backward runs no forward kernel again (full remat runs each twice), with the gradients
of no remat (interpret mode). "attention_mlp": a gated MLP's gate and up projections are kept too."""

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.layers import REMAT_POLICIES
from pallas_kernels import nsa_attention, nsa_variant

KW = dict(block_size=8, block_count=2, window_size=8, impl="pallas")


def _pallas_calls(jaxpr) -> int:
    """pallas_call equations of a jaxpr and of every jaxpr nested in its equations' parameters."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            n += 1
            continue
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    n += _pallas_calls(sub)
    return n


def test_attention_policy_keeps_cudnn_residuals():
    """The policy keeps the outputs of jax's cuDNN flash-attention forward primitive (its output and softmax
    statistics), not those of other primitives (cuDNN itself runs on NVIDIA GPUs only)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    policy = REMAT_POLICIES["attention"]
    assert policy(cudnn._dot_product_attention_fwd_p_wrapper)  # what jax.nn.dot_product_attention binds
    assert not policy(cudnn._dot_product_attention_bwd_p_wrapper) and not policy(jax.lax.dot_general_p)


def test_attention_policy_keeps_the_kernels_residuals():
    """Mode native's kernels; mode videonsa runs the same custom VJPs (compression, window, selection)."""
    ks = jax.random.split(jax.random.key(0), 5)
    b, t, hq, hkv, d = 1, 32, 2, 1, 16
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk, h in zip(ks[:3], (hq, hkv, hkv)))
    gates = tuple(jax.nn.sigmoid(jax.random.normal(ks[3], (3, b, t, hq))))
    w = jax.random.normal(ks[4], (b, t, hq, d))
    flags = nsa_variant("native").flags()

    def layer(x, k, v, *g):  # a projection before the kernels, as in a decoder layer
        return (nsa_attention(jnp.tanh(x) * 2.0, k, v, *g, **KW, **flags) * w).sum()

    def grads(policy):
        f = layer if policy is None else jax.checkpoint(layer, policy=REMAT_POLICIES[policy])
        g = jax.grad(f, argnums=range(6))
        return _pallas_calls(jax.make_jaxpr(g)(q, k, v, *gates).jaxpr), jax.jit(g)(q, k, v, *gates)

    plain, want = grads(None)
    full, _ = grads("full")
    kept, got = grads("attention")
    assert kept == plain < full  # full remat runs the forward kernels again; "attention" does not
    for a, r in zip(got, want):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)


def test_attention_mlp_policy_keeps_the_gate_and_up_projections():
    """Policy "attention_mlp" keeps a gated MLP's gate and up outputs: the backward recomputes none of its
    matmuls (full remat recomputes both), with the gradients of no remat."""
    from flax import nnx

    from nsa_jax.layers import GatedMLP

    mlp = GatedMLP(16, 48, "silu", bias=False, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    graphdef, params = nnx.split(mlp)
    x, w = jax.random.normal(jax.random.key(1), (2, 2, 8, 16))
    loss = lambda p, x: (nnx.merge(graphdef, p)(x) * w).sum()  # linear in the output: its value is not needed

    def grads(policy):
        f = loss if policy is None else jax.checkpoint(loss, policy=REMAT_POLICIES[policy])
        g = jax.grad(f, argnums=(0, 1))
        dots = str(jax.make_jaxpr(g)(params, x)).count("dot_general")
        return dots, jax.jit(g)(params, x)

    plain, want = grads(None)
    full, _ = grads("full")
    kept, got = grads("attention_mlp")
    assert kept == plain == full - 2  # full remat runs gate_proj and up_proj again
    for a, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-6)
