"""The Pallas NSA kernels (interpret mode) inside `head_parallel` (shard_map over 4 fake CPU devices: batch
rows over `data`, KV heads over `sequence`) and under remat, as training runs them on GPUs: loss and
gradients for q, k, v and the gates equal the jnp oracle's on one device. The work runs in a subprocess so
XLA_FLAGS takes effect before jax is imported."""

from __future__ import annotations

import json
import sys

from tests.support.fake_devices import run_with_fake_devices


def _compare() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from nsa_jax.head_parallel import head_parallel
    from pallas_kernels import nsa_attention

    b, t, hq, hkv, d = 2, 96, 4, 2, 16
    ks = jax.random.split(jax.random.key(0), 7)
    q = jax.random.normal(ks[0], (b, t, hq, d))
    k, v = (jax.random.normal(kk, (b, t, hkv, d)) for kk in ks[1:3])
    gates = [jax.nn.sigmoid(jax.random.normal(kk, (b, t, hq))) for kk in ks[3:6]]
    w = jax.random.normal(ks[6], (b, t, hq, d))
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "sequence"))

    def loss(impl, m):
        attend = jax.checkpoint(lambda *a: nsa_attention(*a, impl=impl, block_size=16, block_count=2,
                                                         window_size=16))

        def f(*a):
            o = head_parallel(m, attend, a, {}, num_kv_heads=hkv)
            return (o * w).sum(), o
        return f

    args = (q, k, v, *gates)
    (_, got), got_grads = jax.jit(jax.value_and_grad(loss("pallas", mesh), range(6), has_aux=True))(*args)
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss("reference", None), range(6), has_aux=True))(*args)
    rel = lambda g, r: float(jnp.abs(g - r).max() / jnp.abs(r).max())
    jaxpr = str(jax.make_jaxpr(loss("pallas", mesh))(*args))
    return {"max_rel_out_diff": rel(got, want), "max_rel_grad_diff": max(map(rel, got_grads, want_grads)),
            "shard_map": "shard_map" in jaxpr, "kernels": jaxpr.count("pallas_call")}


def test_kernels_inside_head_parallel_match_oracle(tmp_path):
    r = run_with_fake_devices(__file__, 4, tmp_path / "out.json")
    assert r["shard_map"] and r["kernels"] >= 4, r  # compression, window, top-k, selection inside shard_map
    assert r["max_rel_out_diff"] < 1e-5 and r["max_rel_grad_diff"] < 1e-5, r


if __name__ == "__main__":
    import pathlib
    pathlib.Path(sys.argv[1]).write_text(json.dumps(_compare()))
