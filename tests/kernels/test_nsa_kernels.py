"""The Pallas NSA kernels (interpret mode on CPU, Triton on GPU) against the jnp oracle: outputs and the
gradients for q, k, v and the three gates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import nsa_attention, nsa_variant
from pallas_kernels.backend import gpu_lowering, hopper_gpus, lowering_for
from pallas_kernels.layout import head_layout
from pallas_kernels.masked_flash import MaskedFlashConfig, masked_flash
from pallas_kernels.reference import (block_importance, compression_attention, expand_heads, mean_pool,
                                      query_block_importance, read_lse, select_blocks, window_attention)
from pallas_kernels.segments import segment_bounds
from pallas_kernels.topk_fla import select_blocks_fla
from pallas_kernels.topk_fused import select_blocks_fused
from pallas_kernels.topk_query_block import select_blocks_query_block

VIDEONSA = nsa_variant("videonsa").flags()
VIDEONSA_OWN_LSE = nsa_variant("videonsa", lse_reading="per_head").flags()
QUERY_BLOCK = dict(selection="query_block")

CASES = {  # name: (dtype, b, t, hq, hkv, d, block_size, block_count, window, mode, segment lengths)
    "native_g1_f32_ragged": (jnp.float32, 1, 70, 2, 2, 16, 16, 3, 20, {}, None),
    "native_g2_bf16_count_exceeds": (jnp.bfloat16, 1, 45, 4, 2, 16, 16, 8, 9, {}, None),
    "native_g7_f32_packed": (jnp.float32, 2, 96, 7, 1, 16, 16, 2, 24, {}, (48, 48)),
    "native_g8_bf16": (jnp.bfloat16, 1, 64, 16, 2, 32, 16, 3, 16, {}, None),
    "videonsa_6x2_f32_ragged": (jnp.float32, 1, 53, 6, 2, 16, 16, 8, 7, VIDEONSA, None),
    "videonsa_g7_bf16_packed": (jnp.bfloat16, 1, 80, 7, 1, 16, 16, 2, 20, VIDEONSA, (32, 48)),
    "videonsa_own_lse_7x1_f32_packed": (jnp.float32, 1, 80, 7, 1, 16, 16, 2, 20, VIDEONSA_OWN_LSE, (32, 48)),
    "query_block_g7_f32_packed_ragged": (jnp.float32, 1, 90, 7, 1, 16, 16, 2, 20, QUERY_BLOCK, (32, 58)),
    "query_block_g2_bf16": (jnp.bfloat16, 1, 64, 4, 2, 16, 16, 3, 16, QUERY_BLOCK, None),
    # block 64, head dim 128, bf16: on a Hopper GPU its selection runs the Mosaic GPU kernels
    "query_block_g7_bf16_d128_packed": (jnp.bfloat16, 2, 300, 14, 2, 128, 64, 3, 64, QUERY_BLOCK, (128, 172)),
}
# Relative L2 error. On GPU float32 products run as tf32 (Triton's default, and XLA's for the oracle).
TOL = {jnp.float32: 2e-5 if jax.default_backend() == "cpu" else 3e-3, jnp.bfloat16: 2e-2}


def _inputs(seed, b, t, hq, hkv, d, dtype):
    ks = jax.random.split(jax.random.key(seed), 7)
    q, k, v = (jax.random.normal(kk, (b, t, h, d), dtype) for kk, h in zip(ks[:3], (hq, hkv, hkv)))
    gates = [jax.nn.sigmoid(jax.random.normal(kk, (b, t, hq))).astype(dtype) for kk in ks[3:6]]
    return (q, k, v, *gates), jax.random.normal(ks[6], (b, t, hq, d), jnp.float32)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_oracle_forward_and_gradients(name):
    dtype, b, t, hq, hkv, d, bs, count, window, mode, seg_lens = CASES[name]
    args, w = _inputs(len(name), b, t, hq, hkv, d, dtype)
    kw = dict(block_size=bs, block_count=count, window_size=window, **mode)
    if seg_lens:
        kw["segment_ids"] = jnp.asarray([np.repeat(np.arange(len(seg_lens)), seg_lens)] * b, jnp.int32)

    def loss(impl):
        return lambda *a: (nsa_attention(*a, impl=impl, **kw).astype(jnp.float32) * w).sum()

    got, got_grads = jax.jit(jax.value_and_grad(loss("pallas"), argnums=range(6)))(*args)
    want, want_grads = jax.jit(jax.value_and_grad(loss("reference"), argnums=range(6)))(*args)
    out = jax.jit(lambda *a: nsa_attention(*a, impl="pallas", **kw))(*args)
    ref = jax.jit(lambda *a: nsa_attention(*a, impl="reference", **kw))(*args)
    assert out.dtype == dtype and np.isfinite(np.asarray(out, np.float32)).all()
    assert _rel(out, ref) < TOL[dtype]
    for label, g, r in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), got_grads, want_grads):
        assert np.isfinite(np.asarray(g, np.float32)).all(), label
        assert _rel(g, r) < 3 * TOL[dtype], (label, _rel(g, r))


@pytest.mark.parametrize("kind", ["cmp_causal", "cmp_full", "window"])
@pytest.mark.parametrize("long", [False, True])
def test_masked_flash_branches_and_lse(kind, long):
    """The compression / window kernel alone, per virtual head, with its lse (gqa, G = 2, two segments). The
    long case has key tiles that whole query tiles see (run without the mask) between masked ones."""
    b, hq, hkv, d = 1, 4, 2, 16
    t, bs, window, seg_lens = (256, 4, 40, (100, 156)) if long else (64, 16, 5, (32, 32))
    (q, k, v, *_), _ = _inputs(7, b, t, hq, hkv, d, jnp.float32)
    seg = jnp.asarray([np.repeat(np.arange(2), seg_lens)], jnp.int32)
    lo, hi = segment_bounds(seg)
    layout = head_layout("gqa", hq, hkv)
    cfg = MaskedFlashConfig(kind, hq, layout.virtual_heads, layout.group_size, d ** -0.5,
                            block_size=1 if kind == "window" else bs, window=window, block_q=16, block_k=16)
    if kind == "window":
        keys_of = lambda k_, v_: (k_, v_)
        oracle = lambda q_, k_, v_: (window_attention(q_, k_, v_, window_size=window, segment_ids=seg), None)
    else:  # the kernel's keys are the block means, zero-padded to whole key tiles
        pooled = lambda x: jnp.pad(mean_pool(x, bs), ((0, 0), (0, -(t // bs) % 16), (0, 0), (0, 0)))
        keys_of = lambda k_, v_: (pooled(k_), pooled(v_))
        oracle = lambda q_, k_, v_: compression_attention(expand_heads(q_, layout), k_, v_, block_size=bs,
                                                          causal=kind == "cmp_causal", segment_ids=seg)
    ours = lambda q_, k_, v_: masked_flash(cfg, q_, *keys_of(k_, v_), lo, hi)
    (o, lse), (want, want_lse) = jax.jit(ours)(q, k, v), oracle(q, k, v)
    atol = 2e-6 if jax.default_backend() == "cpu" else 2e-2
    np.testing.assert_allclose(o, want, atol=atol)
    if want_lse is not None:
        got_lse = np.asarray(lse).transpose(0, 2, 1)
        assert (np.isfinite(got_lse) == np.isfinite(want_lse)).all()
        np.testing.assert_allclose(np.where(np.isfinite(got_lse), got_lse, 0),
                                   np.where(np.isfinite(want_lse), want_lse, 0), atol=atol)
    # gradients of q, k and v (through the mean pooling for compression) against the oracle's
    w = jax.random.normal(jax.random.key(1), want.shape, jnp.float32)
    loss = lambda f: lambda *a: (f(*a)[0] * w).sum()
    got = jax.jit(jax.grad(loss(ours), (0, 1, 2)))(q, k, v)
    for g_, r_ in zip(got, jax.grad(loss(oracle), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(g_, r_, atol=10 * atol)


TOPK_CASES = {  # name: (b, t, hq, hkv, block_size, block_count, layout, causal, block_q, segments, zero_q)
    "gqa_g2_ragged": (1, 300, 4, 2, 16, 5, "gqa", True, 64, None, False),
    "gqa_g7_query_tile_spans_blocks": (1, 200, 7, 1, 8, 4, "gqa", True, 32, None, False),
    "gqa_packed": (2, 256, 4, 2, 16, 3, "gqa", True, 64, (64, 192), False),
    "gqa_count_exceeds_blocks": (1, 96, 2, 1, 16, 12, "gqa", True, 32, None, False),
    "gqa_ties_zero_queries": (1, 300, 4, 2, 16, 5, "gqa", True, 64, None, True),
    "videonsa_layout_noncausal": (1, 200, 6, 2, 16, 8, "videonsa", False, 64, None, False),
    "videonsa_layout_ties": (1, 160, 6, 2, 16, 3, "videonsa", False, 32, (64, 96), True),
}


def _topk_case(name: str, query_block: bool):
    """(layout, q, k, segment ids, compression lse [B, T, P], the oracle's chosen blocks) of a TOPK_CASES
    entry (head dim 16)."""
    b, t, hq, hkv, bs, count, kind, causal, _, seg_lens, zero_q = TOPK_CASES[name]
    layout = head_layout(kind, hq, hkv)
    (q, k, *_), _ = _inputs(len(name), b, t, hq, hkv, 16, jnp.float32)
    q = jnp.zeros_like(q) if zero_q else q
    seg = jnp.zeros((b, t), jnp.int32) if seg_lens is None else jnp.asarray(
        [np.repeat(np.arange(len(seg_lens)), seg_lens)] * b, jnp.int32)
    qe = expand_heads(q, layout)
    _, lse = compression_attention(qe, k, k, block_size=bs, causal=causal, segment_ids=seg)
    imp = block_importance(qe, k, lse, block_size=bs, segment_ids=seg)
    imp = query_block_importance(imp, bs) if query_block else imp
    want = select_blocks(imp, block_size=bs, block_count=count, tie_break="recent",
                         group_size=layout.group_size, segment_ids=seg)
    return layout, q, k, seg, lse, want


@pytest.mark.parametrize("name", ["gqa_g2_ragged", "gqa_g7_query_tile_spans_blocks", "gqa_packed",
                                  "gqa_ties_zero_queries", "gqa_count_exceeds_blocks"])
def test_query_block_topk_matches_oracle_selection(name):
    """The query-block importance and rule kernels choose the oracle's block set for every query block
    (ragged T, G = 7, segments, exact ties, block_count > blocks)."""
    _, t, _, _, bs, count, _, causal, _, _, _ = TOPK_CASES[name]
    layout, q, k, seg, lse, want = _topk_case(name, query_block=True)
    nqb = -(-t // bs)
    pad_t = lambda x, value: jnp.pad(x, [(0, 0), (0, nqb * bs - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    kc = mean_pool(k, bs)
    kc = jnp.pad(kc, ((0, 0), (0, -kc.shape[1] % min(64, 1 << (kc.shape[1] - 1).bit_length())), (0, 0), (0, 0)))
    lo, _ = segment_bounds(seg)
    lse_rows = pad_t(lse, -jnp.inf).transpose(0, 2, 1)  # [B, HQ, Tp]
    got = jax.jit(lambda *a: select_blocks_query_block(
        *a, layout=layout, t=t, block_size=bs, block_count=count, scale=16 ** -0.5))(
        pad_t(q, 0.0), kc, lse_rows, pad_t(lo, t))
    want = np.asarray(want)
    np.testing.assert_array_equal(want, np.repeat(want[:, ::bs], bs, axis=1)[:, :t])  # one set per block
    width = got.shape[-1]
    assert width == 1 << (count - 1).bit_length()
    want = np.pad(want[:, ::bs], [(0, 0)] * 3 + [(0, width - count)], constant_values=-1)
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(want, -1))


@pytest.mark.parametrize("name", sorted(TOPK_CASES))
def test_fused_topk_matches_oracle_selection(name):
    """The fused importance + top-k kernel chooses the oracle's block set ("recent" rule) for every token,
    including exact ties (zero queries), padded zero heads, segments and block_count > blocks."""
    _, t, _, _, bs, count, _, causal, bq, _, _ = TOPK_CASES[name]
    layout, q, k, seg, lse, want = _topk_case(name, query_block=False)

    tp = -(-t // max(bq, bs)) * max(bq, bs)
    lo, hi = segment_bounds(seg)
    pad_t = lambda x, value: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    kc = mean_pool(k, bs)
    kc = jnp.pad(kc, ((0, 0), (0, -kc.shape[1] % 16), (0, 0), (0, 0)))
    lse_rows = pad_t(lse[:, :, :layout.virtual_heads], -jnp.inf).transpose(0, 2, 1)  # [B, Hv, Tp]
    got = jax.jit(lambda *a: select_blocks_fused(
        *a, layout=layout, block_size=bs, block_count=count, causal=causal, scale=16 ** -0.5, block_q=bq))(
        pad_t(q, 0.0), kc, lse_rows, pad_t(lo, t), pad_t(hi, tp))[:, :t]
    width = got.shape[-1]
    assert width == 1 << (count - 1).bit_length()
    want = np.pad(np.asarray(want), [(0, 0)] * 3 + [(0, width - want.shape[-1])], constant_values=-1)
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(want, -1))


FLA_CASES = {  # name: (t, hq, hkv, block_size, block_count, segments, zero_q, lse reading)
    # 6 heads over 2 KV heads: padded group 8 with 2 zero rows per group; 20 blocks = 3 network chunks
    "released_ragged": (155, 6, 2, 8, 3, None, False, "released"),
    "per_head_ragged": (155, 6, 2, 8, 3, None, False, "per_head"),
    "released_ties": (200, 6, 2, 8, 4, None, True, "released"),  # every score tied: the network decides
    "released_packed": (192, 7, 1, 8, 8, (40, 152), False, "released"),  # segment starts off a chunk
    "per_head_packed_ties_count_16": (512, 4, 1, 16, 16, (64, 448), True, "per_head"),
}


@pytest.mark.parametrize("name", sorted(FLA_CASES))
def test_fla_topk_kernel_matches_oracle_selection(name):
    """The fused importance + fla network kernel keeps the oracle's blocks (fla's tie order, SPEC §2.6) for every
    token: both lse readings, all-tied rows (zeroed queries), segments, block_count = block_size."""
    t, hq, hkv, bs, count, seg_lens, zero_q, reading = FLA_CASES[name]
    layout = head_layout("videonsa", hq, hkv)
    (q, k, *_), _ = _inputs(len(name), 1, t, hq, hkv, 16, jnp.float32)
    q = jnp.zeros_like(q) if zero_q else q
    seg = jnp.zeros((1, t), jnp.int32) if seg_lens is None else jnp.asarray(
        [np.repeat(np.arange(len(seg_lens)), seg_lens)], jnp.int32)
    _, lse = compression_attention(expand_heads(q, layout), k, k, block_size=bs, causal=False, segment_ids=seg)
    rows = read_lse(lse, reading, seg)  # [B, T, P]
    imp = block_importance(expand_heads(q, layout), k, rows, block_size=bs, segment_ids=seg)
    want = select_blocks(imp, block_size=bs, block_count=count, tie_break="fla", group_size=layout.group_size,
                         segment_ids=seg)
    tp = -(-t // bs) * bs
    lo, _ = segment_bounds(seg)
    pad_t = lambda x, value: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    kc = mean_pool(k, bs)
    kc = jnp.pad(kc, ((0, 0), (0, tp // bs + bs - kc.shape[1]), (0, 0), (0, 0)))
    got = jax.jit(lambda *a: select_blocks_fla(*a, layout=layout, block_size=bs, block_count=count,
                                               scale=16 ** -0.5))(
        pad_t(q, 0.0), kc, pad_t(rows, -jnp.inf).transpose(0, 2, 1), pad_t(lo, t))[:, :t]
    width = got.shape[-1]
    assert width == 1 << (count - 1).bit_length()
    sets = lambda idx: np.sort(np.pad(np.asarray(idx), [(0, 0)] * 3 + [(0, width - count)], constant_values=-1), -1)
    if zero_q:  # ties decide: the "recent" rule keeps other blocks
        assert not np.array_equal(sets(want), sets(select_blocks(
            imp, block_size=bs, block_count=count, tie_break="recent", group_size=layout.group_size,
            segment_ids=seg)))
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), sets(want))


@pytest.mark.parametrize("mode", ["native", "videonsa", "query_block", "query_block_mosaic_gpu",
                                  "query_block_auto"])
def test_kernels_lower_to_triton_for_h100(mode):
    """Forward + backward lower through Pallas' Triton backend for an abstract H100 (no GPU needed): catches
    what the interpreter accepts and Triton does not (block shapes, primitives). Compiling the Triton IR to
    PTX still needs the device. Under `gpu_lowering("mosaic_gpu")` the block-sparse selection's three kernels
    are Mosaic GPU's instead; the default ("auto") takes them where the machine's GPUs are Hoppers."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    b, t, hq, hkv, d = 1, 1000, 28, 4, 128
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16) for h in (hq, hkv, hkv)]
    args += [jax.ShapeDtypeStruct((b, t, hq), jnp.bfloat16)] * 3
    kw = QUERY_BLOCK if mode.startswith("query_block") else VIDEONSA if mode == "videonsa" else {}
    loss = lambda *a: nsa_attention(*a, impl="pallas", **kw).astype(jnp.float32).sum()
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    lowering = gpu_lowering({"query_block_mosaic_gpu": "mosaic_gpu", "query_block_auto": "auto"}.get(mode, "triton"))
    mosaic = mode == "query_block_mosaic_gpu" or (mode == "query_block_auto" and hopper_gpus())
    with lowering, lowering_for("gpu"), use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
        text = jax.jit(jax.grad(loss, argnums=range(6))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    # compression, window and selection (per token or block-sparse): fwd, dq, dk/dv each; plus the top-k of
    # the top-k: one fused kernel per token (the "recent" rule, or fla's network), importance + rule kernels per
    # query block
    kernels = {"native": 10, "videonsa": 10}.get(mode, 8 if mosaic else 11)
    assert text.count("__gpu$xla.gpu.triton") == kernels, text.count("__gpu$xla.gpu.triton")
    assert text.count("custom_call @mosaic_gpu") == (3 if mosaic else 0)


@pytest.mark.parametrize("rounded", ["block_means", "q_times_scale"])
def test_fla_topk_rounds_its_operands_as_fla(rounded):
    """Two past blocks whose order flips with fla's rounding (`parallel_nsa_kernel_topk`: q * scale and the block
    means in bf16, products summed in float32); the current block 2 and one past block are kept. "block_means":
    block 0's float32 mean is 1 + 2^-8, block 1's 1: in bf16 they tie and fla's network keeps block 1, float32
    keeps block 0. "q_times_scale" (scale 0.3): q = (1, 1.5) against block 0 = (1, 0) and block 1 = (0, 171/256):
    bf16(0.3) > 0.3 and bf16(0.45) < 0.45 make block 0 win in fla's arithmetic, block 1 in float32's. The
    kernel keeps fla's."""
    bs, t, d = 8, 24, 16
    layout = head_layout("videonsa", 2, 1)
    k = np.zeros((1, t, 1, d), np.float32)
    q = np.zeros((1, t, 2, d), np.float32)
    if rounded == "block_means":
        scale, fla_keeps, f32_keeps = d ** -0.5, [1, 2], [0, 2]
        k[0, :16, 0, 0] = 1.0
        k[0, 0, 0, 0] = 1.0 + 2.0 ** -5
        q[..., 0] = 4.0  # q * scale = 1
    else:
        scale, fla_keeps, f32_keeps = 0.3, [0, 2], [1, 2]
        k[0, :8, 0, 0] = 1.0
        k[0, 8:16, 0, 1] = 171 / 256
        q[..., 0], q[..., 1] = 1.0, 1.5
    q, k = jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    lse = jnp.full((1, t, layout.padded_heads), 5.0)  # past blocks score below the current one
    chosen = lambda operands: select_blocks(
        block_importance(expand_heads(q, layout), k, lse, block_size=bs, scale=scale, operands=operands),
        block_size=bs, block_count=2, tie_break="fla", group_size=layout.group_size)
    want = np.asarray(chosen(jnp.bfloat16))
    assert all(sorted(want[0, i, 0]) == fla_keeps for i in range(16, 24))
    assert all(sorted(np.asarray(chosen(None))[0, i, 0]) == f32_keeps for i in range(16, 24))
    kc = jnp.pad(mean_pool(k, bs), ((0, 0), (0, bs), (0, 0), (0, 0)))
    got = jax.jit(lambda *a: select_blocks_fla(*a, layout=layout, block_size=bs, block_count=2, scale=scale))(
        q, kc, lse.transpose(0, 2, 1), jnp.zeros((1, t), jnp.int32))
    np.testing.assert_array_equal(np.sort(np.asarray(got), -1), np.sort(want, -1))
