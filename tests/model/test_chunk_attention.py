"""`cudnn.chunk_attention` (a causal query chunk at an offset as two unmasked parts merged by log-sum-exp, the
backward of each part fed the merged output and lse) against masked attention, values and gradients: on CPU with
the parts in jnp, on an NVIDIA GPU with cuDNN's; and the routing of `dense_attention_rows` to it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsa_jax import attention
from nsa_jax.attention import dense_attention, dense_attention_rows
from nsa_jax.cudnn import Part, chunk_attention, chunk_attention_applies


def _scores(q, k, causal):
    b, t, h, d = q.shape
    kv = k.shape[2]
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(b, t, kv, h // kv, d), k) * d ** -0.5
    return jnp.where(jnp.tril(jnp.ones((t, k.shape[1]), bool)), s, -jnp.inf) if causal else s


def _jnp_fwd(q, k, v, causal):
    b, t, h, d = q.shape
    s = _scores(q, k, causal)
    lse = jax.nn.logsumexp(s, axis=-1)  # [B, K, G, T]
    o = jnp.einsum("bkgts,bskd->btkgd", jnp.exp(s - lse[..., None]), v)
    return o.reshape(b, t, h, d).astype(q.dtype), lse.reshape(b, h, t)


def _jnp_bwd(q, k, v, o, lse, do, causal):
    """The flash-attention backward of one part, with the softmax statistics lse and output o of all keys."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    split = lambda x: x.reshape(b, t, kv, h // kv, d)
    p = jnp.exp(_scores(q, k, causal) - lse.reshape(b, kv, h // kv, t)[..., None])
    delta = (split(do) * split(o)).sum(-1).transpose(0, 2, 3, 1)  # [B, K, G, T]
    ds = p * (jnp.einsum("btkgd,bskd->bkgts", split(do), v) - delta[..., None]) * d ** -0.5
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k).reshape(q.shape)
    return dq, jnp.einsum("bkgts,btkgd->bskd", ds, split(q)), jnp.einsum("bkgts,btkgd->bskd", p, split(do))


JNP = Part(_jnp_fwd, _jnp_bwd)


def _inputs(t, s, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (2, t, 4, 16), dtype)
    k, v = (jax.random.normal(kk, (2, s, 2, 16), dtype) for kk in ks[1:3])
    return q, k, v, jax.random.normal(ks[3], (2, t, 4, 16), dtype)


def _assert_matches_masked(chunk, t, offset, dtype, atol, implementation=None):
    """chunk(q, k, v) against masked attention of the rows at `offset`; float32 matmuls at full precision (a GPU
    would take TF32)."""
    with jax.default_matmul_precision("float32"):
        _compare(chunk, *_inputs(t, offset + t, dtype, seed=offset), offset, atol, implementation)


def _compare(chunk, q, k, v, w, offset, atol, implementation):
    loss = lambda f: lambda *a: (f(*a).astype(jnp.float32) * w).sum()
    masked = lambda a, b, c: dense_attention(a, b, c, causal=True, q_offset=offset, implementation=implementation)
    for f in (masked, chunk):
        assert f(q, k, v).shape == q.shape
    np.testing.assert_allclose(np.asarray(chunk(q, k, v), np.float32), np.asarray(masked(q, k, v), np.float32),
                               atol=atol)
    got = jax.grad(loss(chunk), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(masked), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=atol * 4)


@pytest.mark.parametrize("offset", [0, 24])
def test_chunk_attention_parts_merge_to_masked_attention(offset):
    chunk = jax.jit(lambda a, b, c: chunk_attention(a, b, c, offset, part=JNP))
    _assert_matches_masked(chunk, 16, offset, jnp.float32, 2e-5)


def test_rows_take_chunk_attention_where_one_segment_holds(monkeypatch):
    """A part that doubles its output marks the chunks that took `chunk_attention`: with one segment every chunk;
    with a second segment from row 16 (or padding there) the chunks before it, the others masked."""
    doubled = Part(lambda *a: (lambda o, lse: (2 * o, lse))(*_jnp_fwd(*a)), _jnp_bwd)
    monkeypatch.setattr(attention, "chunk_attention_applies", lambda *a: True)
    monkeypatch.setattr(attention, "chunk_attention", functools.partial(chunk_attention, part=doubled))
    q, k, v, _ = _inputs(32, 32, jnp.float32)
    rows = jnp.ones((2, 32), bool)
    one = jnp.ones((2, 32), jnp.int32)
    two = jnp.concatenate([one[:, :16], 2 * one[:, 16:]], axis=1)
    run = jax.jit(lambda seg: dense_attention_rows(q, k, v, rows, chunk=8, segment_ids=seg))
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(np.asarray(run(one)), 2 * np.asarray(dense_attention(q, k, v, causal=True)),
                                   atol=1e-5)
        for seg in (two, one.at[:, 16:].set(0)):
            want = np.asarray(dense_attention(q, k, v, causal=True, segment_ids=seg))
            got = np.asarray(run(seg))
            np.testing.assert_allclose(got[:, :16], 2 * want[:, :16], atol=1e-5)
            np.testing.assert_allclose(got[:, 16:], want[:, 16:], atol=1e-5)


@pytest.mark.skipif(not chunk_attention_applies(jnp.zeros((1, 8, 1, 16), jnp.bfloat16), 8, None),
                    reason="cuDNN's parts need an NVIDIA GPU (and a jax whose cuDNN rules take the arguments)")
@pytest.mark.parametrize("offset", [0, 256])
def test_chunk_attention_on_cudnn(offset):
    chunk = jax.jit(lambda a, b, c: chunk_attention(a, b, c, offset))
    _assert_matches_masked(chunk, 128, offset, jnp.bfloat16, 2e-2, implementation="xla")
