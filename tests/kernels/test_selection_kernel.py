"""The selection kernels alone (interpret mode on CPU, Triton on GPU) against the jnp oracle: per token, tokens
in one or several chunks, and block-sparse (one set per query block); outputs and the gradients for q, k
and v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference as ref
from pallas_kernels.backend import hopper_gpus
from pallas_kernels.block_sparse import BlockSparseConfig, block_sparse_attention
from pallas_kernels.selection import SelectionConfig, _selection_fwd, _Shapes, _work_items, selection_attention

B, T, HKV, G, GR, D, BS = 1, 96, 2, 7, 16, 16, 16


def _chosen_blocks(rng, n_sel: int) -> np.ndarray:
    """[B, T, HKV, n_sel]: the current block, then distinct random earlier ones, -1 where none are left."""
    idx = np.full((B, T, HKV, n_sel), -1, np.int32)
    for t in range(T):
        for h in range(HKV):
            cur = t // BS
            blocks = [cur] + list(rng.permutation(cur))
            blocks = blocks[:n_sel]
            idx[0, t, h, :len(blocks)] = rng.permutation(blocks)
    return idx


@pytest.mark.parametrize("n_sel,chunks,program_tiles,g", [(4, 1, 16, G), (4, 5, 16, G), (2, 3, 16, G), (4, 1, 1, G),
                                                          (4, 2, 16, GR)])
def test_selection_matches_oracle(n_sel, chunks, program_tiles, g):
    """program_tiles 1: every block's tokens split over programs of one tile (9 tokens) each. g = GR = 16 rows per
    token (mode videonsa's groups): the per-token forward, the backward block-centric over 2 chunks."""
    rng = np.random.default_rng(n_sel * 10 + chunks)
    ks = jax.random.split(jax.random.key(chunks), 4)
    q = jax.random.normal(ks[0], (B, T, HKV * g, D), jnp.float32)
    k, v = (jax.random.normal(kk, (B, T, HKV, D), jnp.float32) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, HKV * g, D), jnp.float32)
    idx = jnp.asarray(_chosen_blocks(rng, n_sel))
    # Chunks of tokens: 96 tokens' float32 partial outputs take T * HKV * n_sel * g * D * 4 bytes (5 chunks:
    # the last one padded).
    cfg = SelectionConfig(BS, D ** -0.5, rows_per_token=g, partial_bytes=-(-T * HKV * n_sel * g * D * 4 // chunks),
                          program_tiles=program_tiles)
    q_rows_shape = jax.ShapeDtypeStruct((B, T, HKV, GR, D), jnp.float32)
    chunked_idx = jax.eval_shape(lambda *a: _selection_fwd(cfg, *a)[1][-1][0], q_rows_shape, k, v, idx)
    assert chunked_idx.shape == (chunks, B, -(-T // chunks), HKV, n_sel)

    def kernel(q, k, v):
        q_rows = jnp.pad(q.reshape(B, T, HKV, g, D), ((0, 0),) * 3 + ((0, GR - g), (0, 0)))
        return selection_attention(cfg, q_rows, k, v, idx)[0][:, :, :, :g].reshape(B, T, HKV * g, D)

    _check_against_oracle(kernel, idx, q, k, v, w)


def test_work_items_split_each_blocks_entries():
    """Blocks with 5, 0 and 2 entries in runs of at most 2 (one tile of 2 tokens of 32 rows; 7 items:
    ceil(4 tokens x 2 slots / 2) + 3 blocks): block 0 as [0, 2), [2, 4), [4, 5), block 2 as [5, 7), then empty items."""
    sh = _Shapes(hkv=1, padded_rows=32, group_rows=32, n_sel=2, chunk=4, num_blocks=3, program_tiles=1)
    items = _work_items(sh, jnp.array([[[0, 5, 5, 7]]], jnp.int32))
    want = [[0, 0, 0, 2, 0, 0, 0], [0, 2, 4, 5, 0, 0, 0], [2, 4, 5, 7, 0, 0, 0]]
    np.testing.assert_array_equal(items[0, 0], want)


def _check_against_oracle(kernel, idx, q, k, v, w):
    """kernel(q, k, v) -> o and its gradients for q, k, v (through the loss sum(o * w)) against the oracle's
    with the per-token chosen blocks idx."""
    def loss(f):
        return lambda q, k, v: ((f(q, k, v) * w).sum(), f(q, k, v))

    oracle = lambda q, k, v: ref.selection_attention(q, k, v, idx, block_size=BS)
    (_, got), got_grads = jax.jit(jax.value_and_grad(loss(kernel), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    (_, want), want_grads = jax.jit(jax.value_and_grad(loss(oracle), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    tol = 2e-5 if jax.default_backend() == "cpu" else 3e-3
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
    for g, r in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, r, atol=10 * tol, rtol=10 * tol)


def test_block_sparse_matches_oracle():
    """One chosen set per query block of BS tokens (the current block, random earlier ones, -1 where none
    are left), given to the oracle per token."""
    rng = np.random.default_rng(3)
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (B, T, HKV * G, D), jnp.float32)
    k, v = (jax.random.normal(kk, (B, T, HKV, D), jnp.float32) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (B, T, HKV * G, D), jnp.float32)
    per_block = _chosen_blocks(rng, 3)[:, ::BS]  # [B, T / BS, HKV, 3]
    idx = jnp.asarray(np.repeat(per_block, BS, axis=1))
    cfg = BlockSparseConfig(BS, D ** -0.5, G)

    assert (per_block == -1).any() and (per_block >= 0).sum(-1).max() == 3  # empty slots and full sets
    _check_against_oracle(lambda q, k, v: block_sparse_attention(cfg, q, k, v, jnp.asarray(per_block))[0], idx,
                          q, k, v, w)


def _mosaic_inputs(t: int, hkv: int, g: int, d: int, n_sel: int):
    """bf16 q, k, v, output weights and [B, T / 64, HKV, n_sel] chosen sets (current block, random earlier
    ones, valid entries first) for the Mosaic GPU forward's shapes (block 64)."""
    rng = np.random.default_rng(5)
    ks = jax.random.split(jax.random.key(5), 4)
    q = jax.random.normal(ks[0], (1, t, hkv * g, d), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (1, t, hkv, d), jnp.bfloat16) for kk in ks[1:3])
    idx = np.full((1, t // 64, hkv, n_sel), -1, np.int32)
    for c in range(t // 64):
        for h in range(hkv):
            blocks = rng.permutation([c] + list(rng.permutation(c)[:n_sel - 1]))
            idx[0, c, h, :len(blocks)] = blocks
    return q, k, v, jax.random.normal(ks[3], q.shape, jnp.float32), jnp.asarray(idx)


@pytest.mark.skipif(not hopper_gpus(), reason="the Mosaic GPU kernels run on Hopper GPUs only (lowering: test below)")
def test_block_sparse_mosaic_gpu_matches_oracle():
    """The Hopper (wgmma) kernels: forward output against the oracle, lse against the Triton forward's, and the
    gradients of q (dq kernel), k and v (dk/dv kernel) against the oracle's, all reported together; G = 7 (an
    odd group: the last head pair computes one head twice), a ragged number of chosen blocks."""
    q, k, v, w, per_block = _mosaic_inputs(512, 2, 7, 128, 4)
    scale = 128 ** -0.5
    cfg = BlockSparseConfig(64, scale, 7, lowering="mosaic_gpu")
    idx = jnp.repeat(per_block, 64, axis=1)
    f32 = lambda x: np.asarray(x, np.float32)
    want = lambda q_, k_, v_: ref.selection_attention(*(x.astype(jnp.float32) for x in (q_, k_, v_)), idx,
                                                      block_size=64, scale=scale)
    rel = lambda a, b: float(np.linalg.norm(f32(a) - f32(b)) / np.linalg.norm(f32(b)))
    o, lse = jax.jit(lambda *a: block_sparse_attention(cfg, *a))(q, k, v, per_block)
    _, triton_lse = jax.jit(lambda *a: block_sparse_attention(BlockSparseConfig(64, scale, 7), *a))(
        q, k, v, per_block)
    loss = lambda f: lambda *a: (f(*a).astype(jnp.float32) * w).sum()
    got = jax.jit(jax.grad(loss(lambda *a: block_sparse_attention(cfg, *a, per_block)[0]), argnums=(0, 1, 2)))(
        q, k, v)
    wanted = jax.grad(loss(want), argnums=(0, 1, 2))(q, k, v)
    errors = {"o": rel(o, want(q, k, v)), "lse": float(np.abs(f32(lse) - f32(triton_lse)).max()),
              **{name: rel(g_, r_) for name, g_, r_ in zip(("dq", "dk", "dv"), got, wanted)}}
    assert all(e < 2e-2 for e in errors.values()), errors


def test_block_sparse_mosaic_gpu_lowers_for_h100():
    """Forward, dq and dk/dv (Mosaic GPU) lower for an abstract H100 on any machine; compiling the Mosaic GPU IR
    needs the device (`test_block_sparse_mosaic_gpu_matches_oracle`)."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from pallas_kernels.backend import lowering_for

    b, t, hkv, g, d, n_sel = 1, 1024, 4, 7, 128, 32
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16) for h in (hkv * g, hkv, hkv)]
    idx = jax.ShapeDtypeStruct((b, t // 64, hkv, n_sel), jnp.int32)
    cfg = BlockSparseConfig(64, d ** -0.5, g, lowering="mosaic_gpu")
    loss = lambda q, k, v, i: block_sparse_attention(cfg, q, k, v, i)[0].astype(jnp.float32).sum()
    h100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with lowering_for("gpu"), use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=h100)):
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args, idx).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("custom_call @mosaic_gpu") == 3 and "__gpu$xla.gpu.triton" not in text
