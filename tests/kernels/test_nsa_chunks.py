"""NSA on a query chunk (`nsa_attention(..., q_offset=...)`, context parallelism): the chunk's rows and the
gradients of a loss over them (for q, k, v and the gates) equal those of the call over the whole sequence,
for both modes' variants, with packed segments; the oracle first, then the Pallas kernels (interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import nsa_attention, nsa_variant

# name: (b, t, hq, hkv, d, block_size, block_count, window, flags, segment lengths)
CASES = {
    "native_packed": (2, 80, 4, 2, 16, 16, 2, 20, nsa_variant("native").flags(), (48, 32)),
    "native_g7": (1, 80, 7, 1, 16, 16, 3, 12, nsa_variant("native").flags(), None),
    "videonsa_own_lse_packed": (2, 80, 6, 2, 16, 16, 2, 20, nsa_variant("videonsa", lse_reading="per_head").flags(),
                                (32, 48)),
}
# (offset, rows): aligned, unaligned, the tail, one offset per batch row
CHUNKS = [(0, 24), (21, 30), (48, 32), ((5, 37), 20)]


def _inputs(b, t, hq, hkv, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    q, k, v = (jax.random.normal(kk, (b, t, h, d)) for kk, h in zip(ks[:3], (hq, hkv, hkv)))
    gates = [jax.nn.sigmoid(jax.random.normal(kk, (b, t, hq))) for kk in ks[3:6]]
    return (q, k, v, *gates), jax.random.normal(ks[6], (b, t, hq, d))


def _segments(b, lens):
    return None if lens is None else jnp.asarray([np.repeat(np.arange(len(lens)), lens)] * b, jnp.int32)


def _rows(x, offset, n):
    """x [B, T, ...] at rows offset + [0, n) (offset an int or one per batch row)."""
    off = jnp.broadcast_to(jnp.asarray(offset), (x.shape[0],))
    return jax.vmap(lambda xb, o: jax.lax.dynamic_slice_in_dim(xb, o, n, axis=0))(x, off)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _check_chunk(impl, name, offset, n, traced):
    b, t, hq, hkv, d, bs, count, window, flags, lens = CASES[name]
    args, w = _inputs(b, t, hq, hkv, d)
    offset = offset[:b] if isinstance(offset, tuple) else offset
    kw = dict(block_size=bs, block_count=count, window_size=window, segment_ids=_segments(b, lens), impl=impl,
              **flags)
    off = jnp.asarray(offset, jnp.int32)

    def full(*a):
        out = _rows(nsa_attention(*a, **kw), off, n)
        return (out * _rows(w, off, n)).sum(), out

    def chunk(o, q, k, v, *gates):
        rows = lambda x: _rows(x, off, n)
        out = nsa_attention(rows(q), k, v, *map(rows, gates), q_offset=o if traced else offset, **kw)
        return (out * rows(w)).sum(), out

    (want, ref), want_grads = jax.jit(jax.value_and_grad(full, argnums=range(6), has_aux=True))(*args)
    (got, out), got_grads = jax.jit(jax.value_and_grad(chunk, argnums=range(1, 7), has_aux=True))(off, *args)
    tol = 2e-5 if impl == "pallas" else 1e-6
    assert _rel(out, ref) < tol and np.isclose(got, want, rtol=1e-4)
    for label, g, r in zip(("q", "k", "v", "g_cmp", "g_slc", "g_swa"), got_grads, want_grads):
        assert _rel(g, r) < 3 * tol, (label, _rel(g, r))


@pytest.mark.parametrize("chunk", CHUNKS, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_chunk_equals_rows_of_whole_sequence(name, chunk):
    _check_chunk("reference", name, *chunk, traced=chunk[0] == 21)


def _released_chunks(impl, n_chunks):
    """Mode videonsa's variant (the released lse reading) on n_chunks chunks under vmap (the chunks' lse
    all-gathered along the vmap axis) against the whole sequence: ((loss, out), grads) of both."""
    b, t, hq, hkv, d, bs, count, window = 1, 80, 6, 2, 16, 16, 8, 7
    args, w = _inputs(b, t, hq, hkv, d, seed=3)
    kw = dict(block_size=bs, block_count=count, window_size=window, segment_ids=_segments(b, (32, 48)),
              impl=impl, **nsa_variant("videonsa").flags())
    n = t // n_chunks
    split = lambda x: jnp.moveaxis(x.reshape(b, n_chunks, n, *x.shape[2:]), 1, 0)
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, t, *x.shape[3:])

    def chunked(q, k, v, *gates):
        attend = lambda qc, *gc: nsa_attention(qc, k, v, *gc, q_offset=jax.lax.axis_index("c") * n,
                                               query_axis="c", **kw)
        return merge(jax.vmap(attend, axis_name="c")(split(q), *map(split, gates)))

    def value_and_grads(fn):
        def loss(*a):
            out = fn(*a)
            return (out * w).sum(), out
        return jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))(*args)

    return value_and_grads(chunked), value_and_grads(lambda *a: nsa_attention(*a, **kw))


def _assert_released_match(impl):
    ((got, out), got_grads), ((want, ref), want_grads) = _released_chunks(impl, 4)
    tol = 2e-5 if impl == "pallas" else 1e-6
    assert _rel(out, ref) < tol and np.isclose(got, want, rtol=1e-4)
    for g, r in zip(got_grads, want_grads):
        assert _rel(g, r) < 3 * tol


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_released_lse_chunks_gather_the_lse(impl):
    _assert_released_match(impl)


@pytest.mark.parametrize("name, chunk", [("native_packed", CHUNKS[1]), ("native_g7", CHUNKS[2]),
                                         ("videonsa_own_lse_packed", CHUNKS[3])], ids=str)
def test_kernel_chunk_equals_rows_of_whole_sequence(name, chunk):
    """Interpret mode is slow: one chunk per case (traced and unaligned, the tail, per-row offsets)."""
    _check_chunk("pallas", name, *chunk, traced=chunk[0] == 21)


def test_released_lse_chunk_needs_its_axis():
    q = jnp.zeros((1, 16, 6, 16))
    k = jnp.zeros((1, 32, 2, 16))
    g = jnp.zeros((1, 16, 6))
    with pytest.raises(ValueError, match="query_axis"):
        nsa_attention(q, k, k, g, g, g, block_size=16, block_count=2, window_size=8, q_offset=16, impl="reference",
                      **nsa_variant("videonsa").flags())
    with pytest.raises(NotImplementedError, match="selection='token'"):
        nsa_attention(q, k, k, g, g, g, block_size=16, block_count=2, window_size=8, q_offset=16,
                      selection="query_block", impl="reference")
    with pytest.raises(ValueError, match="within"):
        nsa_attention(q, k, k, g, g, g, block_size=16, block_count=2, window_size=8, q_offset=17, impl="reference")
