"""Dense attention on a query chunk (q_offset: the sequence split of `head_parallel`): the chunk's rows equal the
same rows of the call over the whole sequence, for `dense_attention` (one shot and in query chunks),
`dense_attention_rows` and mode videonsa's dense branch (closed form and full pass), with segments and padding,
values and gradients, the offset traced."""

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.attention import dense_attention, dense_attention_rows
from nsa_jax.videonsa import videonsa_dense_branch

B, T, H, KV, D = 2, 96, 4, 2, 8
SEG = jnp.asarray([[1] * 40 + [2] * 50 + [0] * 6, [1] * 96])
VALID = SEG > 0
OFFSET, N = 37, 41  # an unaligned chunk across the segment boundary


def _inputs():
    ks = jax.random.split(jax.random.key(4), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = (jax.random.normal(kk, (B, T, KV, D)) for kk in ks[1:3])
    return (q, k, v), jax.random.normal(ks[3], (B, T, H, D))


def _vision() -> jax.Array:
    vision = np.ones((B, T), bool)
    vision[0, [0, 1, 2, 41, 42, 60, 90, 91, 92, 93, 94, 95]] = False
    vision[1, [5, 50, 70]] = False
    return jnp.asarray(vision)


def _assert_chunk_equals_rows(whole, chunk):
    """whole(q, k, v) [B, T, ...] against chunk(offset, q_chunk, k, v) [B, N, ...] on rows OFFSET + [0, N)."""
    (q, k, v), w = _inputs()
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, OFFSET, N, axis=1)
    loss_whole = lambda *a: (rows(whole(*a)) * rows(w)).sum()
    loss_chunk = lambda o, q_, k_, v_: (chunk(o, rows(q_), k_, v_) * rows(w)).sum()
    want, want_g = jax.jit(jax.value_and_grad(loss_whole, argnums=(0, 1, 2)))(q, k, v)
    got, got_g = jax.jit(jax.value_and_grad(loss_chunk, argnums=(1, 2, 3)))(jnp.int32(OFFSET), q, k, v)
    np.testing.assert_allclose(np.asarray(jax.jit(chunk)(jnp.int32(OFFSET), rows(q), k, v)),
                               np.asarray(rows(whole(q, k, v))), atol=2e-6)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, r in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-5)


def test_dense_attention_chunk():
    kw = dict(causal=True, segment_ids=SEG, kv_valid=VALID)
    for query_chunk in (N, 16):  # one shot; in query chunks
        _assert_chunk_equals_rows(lambda *a: dense_attention(*a, **kw),
                                  lambda o, *a: dense_attention(*a, **kw, q_offset=o, query_chunk=query_chunk))


def test_dense_attention_rows_chunk():
    text = ~_vision()
    kw = dict(segment_ids=SEG, kv_valid=VALID, chunk=16)
    masked = lambda o, out: jnp.where(jax.lax.dynamic_slice_in_dim(text, o, N, axis=1)[..., None, None], out, 0)
    _assert_chunk_equals_rows(lambda *a: jnp.where(text[..., None, None], dense_attention_rows(*a, text, **kw), 0),
                              lambda o, *a: masked(o, dense_attention_rows(
                                  *a, jax.lax.dynamic_slice_in_dim(text, o, N, axis=1), **kw, q_offset=o)))


def test_videonsa_dense_branch_chunk():
    vision = _vision()
    for max_rows in (16, 4):  # closed form; more text rows than that: the full pass
        kw = dict(segment_ids=SEG, kv_valid=VALID, max_text_rows=max_rows, text_chunk=4)
        _assert_chunk_equals_rows(lambda *a: videonsa_dense_branch(*a, vision, **kw),
                                  lambda o, *a: videonsa_dense_branch(
                                      *a, jax.lax.dynamic_slice_in_dim(vision, o, N, axis=1), **kw, q_offset=o))
