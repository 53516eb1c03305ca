"""Chunked dense attention for selected query rows (mode native's text branch) against the one-shot masked
attention, with packed segments, padding and chunks that hold none of the rows."""

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.attention import dense_attention, dense_attention_rows


def test_rows_chunked_equals_dense_on_the_rows():
    b, t, h, kv, d, chunk = 2, 40, 4, 2, 8, 8
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(kk, (b, t, kv, d)) for kk in ks[1:])
    seg = jnp.asarray([[1] * 20 + [2] * 17 + [0] * 3, [1] * 40])
    valid = seg > 0
    rows = np.zeros((b, t), bool)
    rows[0, [0, 3, 21, 36]] = True  # chunks 0, 2 and 4 hold rows; chunks 1 (rows 8-15) and 3 none
    rows[1, 39] = True
    want = dense_attention(q, k, v, causal=True, segment_ids=seg, kv_valid=valid)
    got = jax.jit(lambda *a: dense_attention_rows(*a, chunk=chunk, segment_ids=seg, kv_valid=valid))(
        q, k, v, jnp.asarray(rows))
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want)[rows], atol=1e-6)
    assert float(jnp.abs(want[0, 8:16]).max()) > 0  # a skipped chunk really had something to skip
    np.testing.assert_array_equal(np.asarray(got)[0, 8:16], 0.0)
    # without masks: the same rows as plain causal attention
    plain = dense_attention(q, k, v, causal=True)
    got = dense_attention_rows(q, k, v, jnp.asarray(rows), chunk=chunk)
    np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(plain)[rows], atol=1e-6)


def test_masked_attention_in_query_chunks_equals_one_shot():
    b, t, s, h, kv, d = 2, 37, 45, 4, 2, 8  # the queries are the last 37 of 45 keys
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(kk, (b, s, kv, d)) for kk in ks[1:])
    k_seg = jnp.asarray([[1] * 30 + [2] * 15, [3] * 45])
    valid = jnp.asarray([[True] * 45, [False] * 5 + [True] * 40])  # left padding in row 1
    for causal in (True, False):
        kw = dict(causal=causal, segment_ids=(k_seg[:, s - t:], k_seg), kv_valid=valid)
        want = dense_attention(q, k, v, **kw, query_chunk=t)
        got = dense_attention(q, k, v, **kw, query_chunk=8)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
        assert float(jnp.abs(want).max()) > 0
