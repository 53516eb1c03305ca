"""`make_blocks` (blocks created under one vmap per run of equal kinds) and `run_blocks` (a scan over them)
against plain per-block construction and a Python loop."""

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
