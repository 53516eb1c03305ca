"""The vision tower's segment attention (windows / frames padded to one width, valid for their lengths) against
attention over each segment alone: outputs and gradients, uneven lengths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax.vision import _segments, segment_attention

LENGTHS = (3, 5, 2)


def _each_segment_alone(q, k, v):
    outs, start = [], 0
    for n in LENGTHS:
        part = slice(start, start + n)
        outs.append(jax.nn.dot_product_attention(q[None, part], k[None, part], v[None, part])[0])
        start += n
    return jnp.concatenate(outs)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_segment_attention_equals_each_segment_alone(dtype, tol):
    seg = _segments(LENGTHS)
    q, k, v = (jax.random.normal(jax.random.key(i), (sum(LENGTHS), 2, 16), dtype) for i in range(3))
    w = jax.random.normal(jax.random.key(3), q.shape, dtype)
    grads = lambda f: jax.grad(lambda *a: (f(*a).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    padded = lambda q, k, v: segment_attention(q, k, v, seg)
    f32 = lambda x: np.asarray(x, np.float32)
    with jax.default_matmul_precision("float32"):  # a GPU's float32 matmuls default to TF32
        got_out, want_out = padded(q, k, v), _each_segment_alone(q, k, v)
        got_grads, want_grads = grads(padded), grads(_each_segment_alone)
    np.testing.assert_allclose(f32(got_out), f32(want_out), rtol=tol, atol=tol)
    for got, want in zip(got_grads, want_grads):
        assert np.isfinite(f32(got)).all()
        np.testing.assert_allclose(f32(got), f32(want), rtol=tol, atol=tol)
