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


def test_videonsa_dense_branch_closed_form_equals_dense_pass():
    """Mode videonsa's dense branch (q with vision rows zeroed, causal GQA over everything): the prefix means of
    the vision rows plus the gathered text rows equal the full dense pass, values and gradients, with segments,
    padding and text chunks that hold no row; too many text rows take the full pass."""
    from nsa_jax.videonsa import videonsa_dense_branch

    b, t, h, kv, d = 2, 96, 4, 2, 8
    ks = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(kk, (b, t, kv, d)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (b, t, h, d))
    seg = jnp.asarray([[1] * 40 + [2] * 50 + [0] * 6, [1] * 96])
    valid = seg > 0
    vision = np.ones((b, t), bool)
    vision[0, [0, 1, 2, 41, 42, 90, 91, 92, 93, 94, 95]] = False  # text, and the padding (text: equal mRoPE ids)
    vision[1, [5, 70]] = False
    vision = jnp.asarray(vision)

    def full(q_, k_, v_):
        return dense_attention(jnp.where(vision[..., None, None], 0.0, q_), k_, v_, causal=True, segment_ids=seg,
                               kv_valid=valid)

    def fast(q_, k_, v_, max_rows):
        return videonsa_dense_branch(q_, k_, v_, vision, segment_ids=seg, kv_valid=valid, max_text_rows=max_rows,
                                     text_chunk=4)

    loss = lambda f: lambda *a: (f(*a) * w).sum()
    want, want_g = jax.value_and_grad(loss(full), argnums=(0, 1, 2))(q, k, v)
    for max_rows in (16, 8):  # 16: closed form (chunks 3 of 4 skipped in row 1); 8 < 11 text rows: full pass
        got, got_g = jax.jit(jax.value_and_grad(loss(lambda *a: fast(*a, max_rows)), argnums=(0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(jax.jit(lambda *a: fast(*a, max_rows))(q, k, v)),
                                   np.asarray(full(q, k, v)), atol=2e-6)
        for g, r in zip(got_g, want_g):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5)
