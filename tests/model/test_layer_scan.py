"""`layer_scan.prefetched_scan` (the decoder's scan under parameter prefetch) against `lax.scan` with autodiff:
the same output and gradients for the stacked parameters and the input, with gather placed before the first
layer and in each loop body of both passes and scatter in the backward's. Its collectives on a mesh are
checked in tests/training/test_train_mesh.py."""

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.layer_scan import prefetched_scan


def _layer(p, h):
    return jnp.tanh(h @ p["w"] + p["b"]) * h


def test_prefetched_scan_matches_scan_and_gathers_once_per_layer():
    n, d = 4, 8
    ks = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(ks[0], (n, d, d)) * 0.5, "b": jax.random.normal(ks[1], (n, d))}
    x = jax.random.normal(ks[2], (3, d))
    calls = {"gather": 0, "scatter": 0}

    def counted(kind):
        def f(p):
            calls[kind] += 1  # counted at trace time: once per traced use
            return p
        return f

    def loss_prefetched(p, x):
        return jnp.sum(prefetched_scan(_layer, p, x, counted("gather"), counted("scatter")) ** 2)

    def loss_scan(p, x):
        return jnp.sum(jax.lax.scan(lambda h, pi: (_layer(pi, h), None), x, p)[0] ** 2)

    got, got_grads = jax.value_and_grad(loss_prefetched, argnums=(0, 1))(params, x)
    want, want_grads = jax.value_and_grad(loss_scan, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Traced once each: forward (first layer + the loop body) and backward (last layer + the loop body).
    assert calls == {"gather": 4, "scatter": 1}
