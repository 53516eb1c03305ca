"""`make_blocks` (blocks created under one vmap per run of equal kinds) and `run_blocks` (a scan over them)
against plain per-block construction and a Python loop; the gated MLP's padded hidden width."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.layers import make_blocks, run_blocks, runs


class Block(nnx.Module):
    def __init__(self, wide: bool, rngs: nnx.Rngs):
        self.proj = nnx.Linear(4, 8 if wide else 4, rngs=rngs)
        self.out = nnx.Linear(8 if wide else 4, 4, rngs=rngs)

    def __call__(self, x):
        return x + self.out(jnp.tanh(self.proj(x)))


def test_make_blocks_keeps_order_kinds_and_gives_distinct_initialisations():
    kinds = [True, True, False, True]
    blocks = make_blocks(kinds, lambda wide, r: Block(wide, r), nnx.Rngs(0))
    assert [b.proj.kernel.shape[1] for b in blocks] == [8, 8, 4, 8]
    kernels = [np.asarray(b.out.kernel[...]) for b in blocks]
    assert not np.allclose(kernels[0], kernels[1]) and not np.allclose(kernels[1], kernels[3])
    # The same initialiser statistics as a block built on its own (lecun normal: variance 1 / fan_in).
    assert abs(float(np.var(np.concatenate([k.ravel() for k in (kernels[0], kernels[1], kernels[3])]))) - 1 / 8) < 0.06


def test_run_blocks_scan_equals_a_python_loop():
    blocks = make_blocks([True] * 3 + [False] * 2, lambda wide, r: Block(wide, r), nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (5, 4))
    want = x
    for b in blocks:
        want = b(want)
    plain = lambda b, h, _: (b(h), None)
    np.testing.assert_allclose(run_blocks(blocks[:3], x, plain)[0], blocks[2](blocks[1](blocks[0](x))),
                               rtol=1e-5, atol=1e-5)
    got = run_blocks(blocks[3:], run_blocks(blocks[:3], x, plain)[0], plain)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Per-block inputs and outputs (a KV cache's shape): block i gets xs[i], its y's come back stacked.
    xs = jnp.arange(3.0)
    h, ys = run_blocks(blocks[:3], x, lambda b, h, c: (b(h) + c, h.sum() + c), xs)
    loop, sums = x, []
    for i, b in enumerate(blocks[:3]):
        sums.append(loop.sum() + xs[i])
        loop = b(loop) + xs[i]
    np.testing.assert_allclose(h, loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ys, jnp.stack(sums), rtol=1e-5, atol=1e-5)


def test_runs_of_equal_kinds():
    assert runs([True, True, False, True]) == [(0, 2), (2, 3), (3, 4)]
    assert runs([None] * 3) == [(0, 3)] and runs([]) == []


def test_gated_mlp_pads_its_hidden_width_for_the_matmuls_and_keeps_values_and_gradients():
    """A hidden width of 40 runs its matmuls at 128 (`MLP_WIDTH_MULTIPLE`, zero weights); values and gradients (of
    the parameters, as stored, and of x) equal the unpadded layers' own calls."""
    from nsa_jax.layers import MLP_WIDTH_MULTIPLE, GatedMLP

    mlp = GatedMLP(24, 40, "silu", bias=True, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    for name in ("gate_proj", "up_proj", "down_proj"):  # nonzero biases: the real outputs carry them
        layer = getattr(mlp, name)
        layer.bias[...] = jax.random.normal(jax.random.key(len(name)), layer.bias.shape)
    x = jax.random.normal(jax.random.key(1), (2, 5, 24))
    w = jax.random.normal(jax.random.key(2), (2, 5, 24))
    graphdef, state = nnx.split(mlp)
    plain = lambda m, x: m.down_proj(m.act(m.gate_proj(x)) * m.up_proj(x))

    def loss(fn):
        return lambda state, x: (fn(nnx.merge(graphdef, state), x) * w).sum()

    ours, want = jax.value_and_grad(loss(lambda m, x: m(x)), (0, 1)), jax.value_and_grad(loss(plain), (0, 1))
    (v, g), (v_want, g_want) = ours(state, x), want(state, x)
    np.testing.assert_allclose(v, v_want, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_want)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    dots = [e for e in jax.make_jaxpr(lambda x: mlp(x))(x).jaxpr.eqns if e.primitive.name == "dot_general"]
    assert sorted(e.outvars[0].aval.shape[-1] for e in dots) == [24, MLP_WIDTH_MULTIPLE, MLP_WIDTH_MULTIPLE]
