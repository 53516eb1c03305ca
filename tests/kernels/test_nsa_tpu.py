"""The Mosaic (TPU) kernels under the TPU interpreter (`pltpu.InterpretParams`) against the jnp oracle: each
branch alone with several query and key tiles, the whole NSA (selection "query_block") with its gradients,
and the lowering for an abstract TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import nsa_attention
from pallas_kernels.api import resolve_impl
from pallas_kernels.backend import interpret_with, lowering_for
from pallas_kernels.reference import (block_importance, compression_attention, mean_pool, query_block_importance,
                                      select_blocks, window_attention)
from pallas_kernels.segments import segment_bounds
from pallas_kernels.tpu_attention import TiledConfig, static_lists, tiled_attention
from pallas_kernels.tpu_topk import query_block_topk_tpu


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _qkv(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), dtype) for kk, h in zip(ks[:3], (hq, hkv, hkv)))
    return q, k, v, jax.random.normal(ks[3], (b, t, hq, d), jnp.float32)


@pytest.mark.parametrize("kind", ["cmp_causal", "cmp_full", "window"])
def test_branch_kernel_matches_oracle_over_tiles(kind):
    """Compression (causal / released mask) and window with 16-row query tiles and 8-key tiles: 6 query
    tiles, several key tiles per query tile, two packed segments, G = 2; output, lse and gradients."""
    b, t, hq, hkv, d, bs, window = 1, 96, 4, 2, 16, 4, 20
    q, k, v, w = _qkv(len(kind), b, t, hq, hkv, d)
    seg = jnp.asarray([[0] * 40 + [1] * 56], jnp.int32)
    lo, hi = (x[..., None] for x in segment_bounds(seg))
    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    if kind == "window":
        cfg = TiledConfig(kind, 16, 8, d ** -0.5, hq // hkv, window=window)
        keys = lambda k_, v_: (heads_first(k_), heads_first(v_))
        oracle = lambda q_, k_, v_: (window_attention(q_, k_, v_, window_size=window, segment_ids=seg), None)
    else:
        cfg = TiledConfig(kind, 16, 8, d ** -0.5, hq // hkv, block_size=bs)
        keys = lambda k_, v_: (heads_first(mean_pool(k_, bs)), heads_first(mean_pool(v_, bs)))
        oracle = lambda q_, k_, v_: compression_attention(q_, k_, v_, block_size=bs, causal=kind == "cmp_causal",
                                                          segment_ids=seg)
    n_keys = t if kind == "window" else t // bs
    table = static_lists(cfg, t // 16, n_keys // 8)
    lists = jnp.broadcast_to(jnp.asarray(table), (b, hkv) + table.shape)

    def ours(q_, k_, v_):
        o, lse = tiled_attention(cfg, lists, heads_first(q_), *keys(k_, v_), lo, hi)
        return heads_first(o), lse[..., 0].transpose(0, 2, 1)

    loss = lambda f: lambda *a: (f(*a)[0] * w).sum()
    with interpret_with(pltpu.InterpretParams()):
        (o, lse), grads = ours(q, k, v), jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    want_o, want_lse = oracle(q, k, v)
    want_grads = jax.grad(loss(oracle), argnums=(0, 1, 2))(q, k, v)
    assert _rel(o, want_o) < 1e-5
    if want_lse is not None:
        assert (np.isfinite(lse) == np.isfinite(want_lse)).all()
        np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0), np.where(np.isfinite(want_lse), want_lse, 0),
                                   atol=1e-5)
    for got, want in zip(grads, want_grads):
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("zero_queries", [False, True])
def test_query_block_topk_kernel_matches_oracle_selection(zero_queries):
    """The Mosaic importance kernel + "recent" rule choose the oracle's set for every query block: 20 tiles of
    8 query blocks, 2 key tiles of 128 blocks, G = 3, two segments, ragged T; zero queries make every score
    tie (the rule's order decides)."""
    b, t, hq, hkv, d, bs, count, tp = 1, 600, 6, 2, 16, 4, 5, 640
    q, k, _, _ = _qkv(7, b, t, hq, hkv, d)
    q = jnp.zeros_like(q) if zero_queries else q
    seg = jnp.asarray([[0] * 256 + [1] * 344], jnp.int32)
    _, lse = compression_attention(q, k, k, block_size=bs, causal=True, segment_ids=seg)  # lse [B, T, HQ]
    imp = query_block_importance(block_importance(q, k, lse, block_size=bs, segment_ids=seg), bs)
    want = np.asarray(select_blocks(imp, block_size=bs, block_count=count, tie_break="recent", group_size=hq // hkv,
                                    segment_ids=seg))[:, ::bs].transpose(0, 2, 1, 3)  # [B, HKV, NQB, S]
    pad_t = lambda x, value: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    kc = jnp.pad(mean_pool(k, bs), ((0, 0), (0, 256 - t // bs), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    lo, _ = segment_bounds(seg)
    with interpret_with(pltpu.InterpretParams()):
        got = query_block_topk_tpu(pad_t(q, 0.0).transpose(0, 2, 1, 3), kc,
                                   pad_t(lse, -jnp.inf).transpose(0, 2, 1)[..., None], pad_t(lo, t), t=t,
                                   group_size=hq // hkv, block_size=bs, block_count=count, scale=d ** -0.5)
    np.testing.assert_array_equal(np.sort(np.asarray(got)[:, :, :t // bs], -1), np.sort(want, -1))


CASES = {  # name: (dtype, t, hq, hkv, d, block_size, block_count, window, causal compression, segment lengths)
    "g2_f32_ragged_packed": (jnp.float32, 90, 4, 2, 16, 16, 2, 20, True, (32, 58)),
    "g7_bf16": (jnp.bfloat16, 80, 7, 1, 16, 16, 3, 24, True, None),
    "g1_f32_released_mask_many_tiles": (jnp.float32, 300, 2, 2, 16, 16, 3, 40, False, None),
    "g8_f32_shorter_than_a_block": (jnp.float32, 10, 8, 1, 16, 16, 3, 8, True, None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_nsa_query_block_on_mosaic_matches_oracle(name):
    """The whole NSA with selection "query_block" through the Mosaic kernels (TPU interpreter): output and the
    gradients for q, k, v and the three gates (G 1 / 2 / 7 / 8, f32 / bf16, segments, ragged and tiny T)."""
    dtype, t, hq, hkv, d, bs, count, window, causal, seg_lens = CASES[name]
    q, k, v, w = _qkv(len(name), 1, t, hq, hkv, d, dtype)
    gates = [jax.nn.sigmoid(jax.random.normal(jax.random.key(i), (1, t, hq))).astype(dtype) for i in range(3)]
    kw = dict(block_size=bs, block_count=count, window_size=window, selection="query_block",
              causal_compression=causal)
    if seg_lens:
        kw["segment_ids"] = jnp.asarray([np.repeat(np.arange(len(seg_lens)), seg_lens)], jnp.int32)
    loss = lambda impl: lambda *a: (nsa_attention(*a, impl=impl, **kw).astype(jnp.float32) * w).sum()
    with interpret_with(pltpu.InterpretParams()):
        got, got_grads = jax.jit(jax.value_and_grad(loss("pallas"), argnums=range(6)))(q, k, v, *gates)
    want, want_grads = jax.jit(jax.value_and_grad(loss("reference"), argnums=range(6)))(q, k, v, *gates)
    tol = 2e-5 if dtype == jnp.float32 else 2e-2
    assert abs(float(got) - float(want)) <= tol * max(1.0, abs(float(want)))
    for i, (g_, w_) in enumerate(zip(got_grads, want_grads)):
        assert _rel(g_, w_) < tol, (i, _rel(g_, w_))


def test_nsa_query_block_lowers_for_tpu():
    """Forward + backward lower to Mosaic for an abstract TPU on CPU: compression, window and selection, each
    forward, dq and dk/dv, and the top-k importance (10 kernels). (Compiling the Mosaic IR needs the TPU.)"""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    b, t, hq, hkv, d = 1, 1000, 28, 4, 128
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16) for h in (hq, hkv, hkv)]
    args += [jax.ShapeDtypeStruct((b, t, hq), jnp.bfloat16)] * 3
    loss = lambda *a: nsa_attention(*a, impl="pallas", selection="query_block").astype(jnp.float32).sum()
    tpu = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    with lowering_for("tpu"), use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=tpu)):
        text = jax.jit(jax.grad(loss, argnums=range(6))).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 10


def test_impl_choice_per_platform():
    """auto: the kernels on GPU, and on TPU for selection "query_block"; per-token selection on TPU is refused
    with the reason (Mosaic does not lower its row gathers) instead of failing inside the lowering."""
    with lowering_for("gpu"):
        assert resolve_impl("auto") == resolve_impl("auto", "query_block") == "pallas"
    with lowering_for("tpu"):
        with pytest.warns(UserWarning, match="O\\(T\\^2\\) memory.*query_block"):
            assert resolve_impl("auto") == "reference"
        assert resolve_impl("auto", "query_block") == "pallas"
        assert resolve_impl("pallas", "query_block") == "pallas"
        with pytest.raises(NotImplementedError, match="query_block"):
            resolve_impl("pallas")
    with interpret_with(pltpu.InterpretParams()):
        assert resolve_impl("auto", "query_block") == "pallas"
    with lowering_for("cpu"):
        assert (resolve_impl("auto"), resolve_impl("pallas")) == ("reference", "pallas")
