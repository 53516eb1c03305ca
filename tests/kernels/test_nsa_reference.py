"""The jnp NSA oracle (`pallas_kernels.reference`) against plainly written numpy loops and hand-worked cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import nsa_attention
from pallas_kernels.layout import head_layout
from pallas_kernels.reference import mean_pool, nsa_reference, read_lse
from pallas_kernels.topk_rules import fla_topk

from tests.references.numpy_nsa import numpy_nsa


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    gates = [jax.nn.sigmoid(jax.random.normal(kk, (b, t, hq))).astype(dtype) for kk in ks[3:]]
    return q, k, v, *gates


@pytest.mark.parametrize("bits", [(32, [32], list(range(1, 33))),
                                  (40, [40], [*range(8, 12), *range(13, 41)]),
                                  (100, [100], [68, 69, *range(71, 101)]),
                                  (200, [200], [*range(160, 176), *range(184, 188), *range(189, 201)])])
def test_fla_tie_vectors(bits):
    """SPEC §2.6: all past blocks tied below the current block; which 32 blocks fla's network keeps."""
    c, _, kept = bits
    scores = jnp.full((c + 7,), 0.25, jnp.float32)
    topk = jax.jit(lambda s, c: fla_topk(s, c, group_size=16, block_count=32, chunk=64))
    out = np.asarray(topk(scores, jnp.int32(c)))
    assert sorted(out.tolist()) == kept
    assert out[0] == c  # the current block leads


def test_mean_pool_partial_last_block():
    x = jnp.arange(10, dtype=jnp.float32).reshape(1, 10, 1, 1)
    np.testing.assert_allclose(np.asarray(mean_pool(x, 4))[0, :, 0, 0], [1.5, 5.5, 8.5])


def test_videonsa_layout_generalisation():
    rel = head_layout("videonsa", 28, 4)
    assert (rel.group_size, rel.padded_heads, rel.virtual_heads) == (16, 64, 56)
    assert [rel.zero_rows_of_kv_head(h) for h in range(4)] == [0, 0, 0, 8]
    odd = head_layout("videonsa", 6, 3)  # 2 * 6 / 3 = 4 -> groups of 4 over 3 KV heads
    assert (odd.group_size, odd.padded_heads) == (4, 12)
    assert head_layout("gqa", 28, 4).group_size == 7


CASES = {  # name: (b, t, hq, hkv, d, bs, count, window, causal, layout, tie, segments)
    "native_g1": (1, 37, 2, 2, 8, 8, 2, 5, True, "gqa", "recent", None),
    "native_g2_count_exceeds": (1, 45, 4, 2, 8, 8, 9, 11, True, "gqa", "recent", None),
    "native_g7_segments": (2, 48, 7, 1, 8, 8, 3, 6, True, "gqa", "recent", [(0, 16), (1, 40), (2, 48)]),
    "videonsa_28_4": (1, 70, 28, 4, 8, 16, 3, 20, False, "videonsa", "fla", None),
    "videonsa_6_2_segments": (1, 53, 6, 2, 8, 8, 2, 7, False, "videonsa", "fla", [(3, 24), (5, 53)]),
}


def _segments(spec, b, t):
    if spec is None:
        return None
    row, s = [], 0
    for sid, end in spec:
        row += [sid] * (end - s)
        s = end
    return jnp.asarray([row] * b, jnp.int32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_numpy_loops(name):
    b, t, hq, hkv, d, bs, count, window, causal, layout, tie, segs = CASES[name]
    args = _inputs(hash(name) % 1000, b, t, hq, hkv, d)
    seg = _segments(segs, b, t)
    kw = dict(block_size=bs, block_count=count, window_size=window, segment_ids=seg,
              causal_compression=causal, head_layout=layout, tie_break=tie, impl="reference")
    got = np.asarray(jax.jit(lambda *a: nsa_attention(*a, **kw))(*args))
    want = numpy_nsa(*args, bs=bs, count=count, window=window, seg=seg, causal=causal, layout=layout, tie=tie)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal,segs", [(True, None), (True, ((0, 32), (1, 75))), (False, None)])
def test_query_block_selection_matches_numpy_loops(causal, segs):
    """selection="query_block": each block of bs queries attends one set, chosen by their summed importance
    (ragged T, packed segments, either compression mask)."""
    b, t, hq, hkv, d, bs, count, window, layout = 1, 75, 4, 2, 8, 16, 2, 10, "gqa"
    args = _inputs(11, b, t, hq, hkv, d)
    seg = _segments(segs, b, t)
    kw = dict(block_size=bs, block_count=count, window_size=window, segment_ids=seg, causal_compression=causal,
              head_layout=layout, tie_break="recent", selection="query_block", impl="reference")
    got = np.asarray(jax.jit(lambda *a: nsa_attention(*a, **kw))(*args))
    want = numpy_nsa(*args, bs=bs, count=count, window=window, seg=seg, causal=causal, layout=layout,
                     tie="recent", query_block=True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    per_token = numpy_nsa(*args, bs=bs, count=count, window=window, seg=seg, causal=causal, layout=layout,
                          tie="recent")
    assert not np.allclose(per_token, want, atol=1e-3)  # the shared sets really differ from per-token ones


def test_recent_ties_keep_the_latest_blocks():
    """Zero queries tie every past block: "recent" keeps the current block and the newest past ones."""
    b, t, hq, hkv, d, bs = 1, 64, 2, 1, 4, 8
    q, k, v, *g = _inputs(0, b, t, hq, hkv, d)
    run = jax.jit(lambda *a: nsa_reference(*a, block_size=bs, block_count=3, window_size=4,
                                           return_block_indices=True))
    _, idx = run(jnp.zeros_like(q), k, v, *g)
    idx = np.asarray(idx)
    assert sorted(idx[0, 63, 0].tolist()) == [5, 6, 7]
    assert sorted(idx[0, 9, 0].tolist()) == [-1, 0, 1]


def test_fla_ties_in_the_model_path():
    """Mode videonsa with zeroed queries: tied rows keep exactly the blocks of fla's network (c = 20)."""
    t, bs = 21 * 16 + 3, 16
    q, k, v, *g = _inputs(1, 1, t, 4, 2, 4)
    run = jax.jit(lambda *a: nsa_reference(*a, block_size=bs, block_count=8, window_size=4,
                                           causal_compression=False, head_layout_kind="videonsa",
                                           tie_break="fla", return_block_indices=True))
    _, idx = run(jnp.zeros_like(q), k, v, *g)
    kept = np.asarray(idx)[0, 20 * bs + 5]  # both KV heads, a row of block 20
    for row in kept:
        assert sorted(row.tolist()) == [8, 9, 11, 16, 17, 18, 19, 20]  # fla's order, not the 8 newest


def test_segments_must_start_on_block_boundaries():
    q, k, v, *g = _inputs(0, 1, 32, 2, 1, 4)
    seg = jnp.asarray([[0] * 10 + [1] * 22], jnp.int32)
    with pytest.raises(ValueError, match="multiple of block_size"):
        nsa_attention(q, k, v, *g, block_size=8, segment_ids=seg, impl="reference")


def test_packed_equals_separate():
    """Two samples packed in one row give the same outputs as each run alone."""
    q, k, v, *g = _inputs(3, 1, 40, 4, 2, 8)
    kw = dict(block_size=8, block_count=2, window_size=5, impl="reference")
    seg = jnp.asarray([[0] * 24 + [1] * 16], jnp.int32)
    run = jax.jit(lambda *a, segment_ids=None: nsa_attention(*a, segment_ids=segment_ids, **kw))
    packed = run(q, k, v, *g, segment_ids=seg)
    first = run(*(x[:, :24] for x in (q, k, v, *g)))
    second = run(*(x[:, 24:] for x in (q, k, v, *g)))
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-6)


def test_released_lse_is_the_buffer_read_as_torch_views_it():
    """SPEC §2.11: the released top-k reads flex_attention's contiguous [B, P, T] lse through a [B, T, P] view;
    with segments, each segment is read as its own sequence."""
    torch = pytest.importorskip("torch")
    b, p, t = 2, 8, 13
    buffer = np.random.default_rng(0).normal(size=(b, p, t)).astype(np.float32)  # [B, P, T], as flex returns
    lse = jnp.asarray(buffer.transpose(0, 2, 1))  # each row's own: [B, T, P]
    want = torch.from_numpy(buffer).contiguous().view(b, t, p).numpy()
    np.testing.assert_array_equal(np.asarray(read_lse(lse, "released")), want)
    np.testing.assert_array_equal(np.asarray(read_lse(lse, "per_head")), np.asarray(lse))
    seg = jnp.asarray([[0] * 5 + [1] * 8] * b, jnp.int32)
    packed = np.asarray(read_lse(lse, "released", seg))
    for lo, hi in ((0, 5), (5, 13)):
        part = torch.from_numpy(np.ascontiguousarray(buffer[:, :, lo:hi])).view(b, hi - lo, p).numpy()
        np.testing.assert_array_equal(packed[:, lo:hi], part)


def test_released_lse_packed_equals_separate_and_differs_from_own():
    q, k, v, *g = _inputs(5, 1, 64, 6, 2, 8)
    kw = dict(block_size=4, block_count=2, window_size=3, causal_compression=False, head_layout="videonsa",
              tie_break="fla", impl="reference")
    seg = jnp.asarray([[0] * 24 + [1] * 40], jnp.int32)
    run = jax.jit(lambda *a, segment_ids=None, reading="released": nsa_attention(
        *a, segment_ids=segment_ids, lse_reading=reading, **kw), static_argnames="reading")
    packed = run(q, k, v, *g, segment_ids=seg)
    first = run(*(x[:, :24] for x in (q, k, v, *g)))
    second = run(*(x[:, 24:] for x in (q, k, v, *g)))
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), atol=1e-6)
    own = run(q, k, v, *g, segment_ids=seg, reading="per_head")
    assert np.abs(np.asarray(own) - np.asarray(packed)).max() > 1e-3  # the reading changes the chosen blocks
