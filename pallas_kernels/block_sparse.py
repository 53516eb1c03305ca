"""Selection for `selection="query_block"`: block-sparse flash attention. Every block of `bs` consecutive
queries shares one set of chosen KV blocks per KV head, so a program takes a whole query block of one head
(bs rows, a full tensor-core tile) and runs flash attention over the set's blocks: K / V are read once per
(query block, head) instead of once per token. Forward and dq: one program per (query block, query head);
dk / dv: one per (KV block, KV head) over the query blocks that chose it (`selection.inverted_index`) and the
KV head's query heads. Shapes: q [B, Tp, HQ, D], k / v [B, Tp, HKV, D] (Tp a
multiple of bs), idx [B, Tp // bs, HKV, S] int32 (-1 = empty); head h reads KV head h // (HQ / HKV).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import (call_options, dot, probs_from_lse, saved, softmax_init, softmax_result,
                                    softmax_step)
from pallas_kernels.block_sparse_mgpu import (block_sparse_dkv_mgpu, block_sparse_dq_mgpu, block_sparse_forward_mgpu,
                                              supported)
from pallas_kernels.selection import inverted_index


@dataclasses.dataclass(frozen=True)
class BlockSparseConfig:
    """block_size (query and key block), scale, group_size (query heads per KV head); Triton's num_warps and
    num_stages; lowering: "triton" (Pallas' Triton lowering, or the interpreter) or "mosaic_gpu" (the Hopper
    wgmma kernels of `block_sparse_mgpu.py`: forward, dq, dk / dv; GPU only)."""

    block_size: int
    scale: float
    group_size: int
    num_warps: int = 4
    num_stages: int = 2
    lowering: str = "triton"


def _scores(cfg: BlockSparseConfig, q, k_ref, blk, rows):
    """Masked logits [bs, bs] of the query rows against chosen block blk (-1: nothing), with the keys."""
    bs = cfg.block_size
    start = pl.multiple_of(jnp.maximum(blk, 0) * bs, bs)
    k = k_ref[pl.ds(start, bs), :]
    cols = start + jnp.arange(bs)[None, :]
    s = jnp.where((cols <= rows) & (blk >= 0), dot(q, k, trans_b=True) * cfg.scale, -jnp.inf)
    return s, k, start


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, cfg: BlockSparseConfig, n_sel: int):
    bs = cfg.block_size
    q = q_ref[...]
    rows = pl.program_id(1) * bs + jnp.arange(bs)[:, None]

    def body(j, carry):
        s, _, start = _scores(cfg, q, k_ref, idx_ref[j], rows)
        return softmax_step(carry, s, v_ref[pl.ds(start, bs), :])

    o, lse = softmax_result(jax.lax.fori_loop(0, n_sel, body, softmax_init(bs, q.shape[-1])))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: BlockSparseConfig,
               n_sel: int):
    bs = cfg.block_size
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = pl.program_id(1) * bs + jnp.arange(bs)[:, None]

    def body(j, dq):
        s, k, start = _scores(cfg, q, k_ref, idx_ref[j], rows)
        ds = probs_from_lse(s, lse) * (dot(do, v_ref[pl.ds(start, bs), :], trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, n_sel, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, entries_ref, offsets_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cfg: BlockSparseConfig, n_sel: int):
    """dk, dv of one KV block from the query blocks that chose it, over the KV head's query heads."""
    bs, g = cfg.block_size, cfg.group_size
    h, blk = pl.program_id(1), pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    cols = blk * bs + jnp.arange(bs)[None, :]
    first, last = offsets_ref[blk], offsets_ref[blk + 1]

    def body(e, carry):
        start = pl.multiple_of(entries_ref[e] // n_sel * bs, bs)
        causal = cols <= start + jnp.arange(bs)[:, None]

        def head(j, carry):
            dk, dv = carry
            hq = h * g + j
            q, do = q_ref[pl.ds(start, bs), hq, :], do_ref[pl.ds(start, bs), hq, :]
            s = jnp.where(causal, dot(q, k, trans_b=True) * cfg.scale, -jnp.inf)
            p = probs_from_lse(s, lse_ref[hq, pl.ds(start, bs)])
            ds = p * (dot(do, v, trans_b=True) - delta_ref[hq, pl.ds(start, bs)][:, None])
            return dk + dot(ds.astype(q.dtype), q, trans_a=True), dv + dot(p.astype(do.dtype), do, trans_a=True)

        return jax.lax.fori_loop(0, g, head, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first, last, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(cfg: BlockSparseConfig, tp: int, d: int, n_sel: int):
    """BlockSpecs of the per-(query block, query head) kernels, grid (B, NQB, HQ)."""
    g, bs = cfg.group_size, cfg.block_size
    tile = pl.BlockSpec((None, bs, None, d), lambda i, t, h: (i, t, h, 0))
    return dict(
        tile=tile,
        tile_scalars=pl.BlockSpec((None, None, bs), lambda i, t, h: (i, h, t)),
        kv=pl.BlockSpec((None, tp, None, d), lambda i, t, h: (i, 0, h // g, 0)),
        idx=pl.BlockSpec((None, None, None, n_sel), lambda i, t, h: (i, t, h // g, 0)))


def _forward(cfg: BlockSparseConfig, q, k, v, idx):
    b, tp, hq, d = q.shape
    n_sel = idx.shape[-1]
    if cfg.lowering == "mosaic_gpu":
        if not supported(cfg.block_size, d, q.dtype):
            raise ValueError(f"the Mosaic GPU kernels need block_size 64, head_dim % 64 == 0 and bf16 / f16, got "
                             f"{cfg.block_size}, {d}, {q.dtype}")
        return block_sparse_forward_mgpu(q, k, v, idx, scale=cfg.scale, group_size=cfg.group_size)
    sp = _specs(cfg, tp, d, n_sel)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_sel=n_sel),
        grid=(b, tp // cfg.block_size, hq),
        in_specs=[sp["tile"], sp["kv"], sp["kv"], sp["idx"]],
        out_specs=[sp["tile"], sp["tile_scalars"]],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        name="nsa_block_sparse_fwd",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q, k, v, idx)


def _backward(cfg: BlockSparseConfig, res, do, dlse):
    q, k, v, idx, o, lse = res
    b, tp, hq, d = q.shape
    hkv, n_sel, bs = k.shape[2], idx.shape[-1], cfg.block_size
    nb = tp // bs
    delta = (o.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1).transpose(0, 2, 1) - dlse  # [B, HQ, Tp]
    entries, offsets = inverted_index(idx, nb)  # [B, HKV, NQB * S], [B, HKV, NB + 1]
    if cfg.lowering == "mosaic_gpu":
        heads = dict(scale=cfg.scale, group_size=cfg.group_size)
        dq = block_sparse_dq_mgpu(q, k, v, idx, do, lse, delta, **heads)
        dk, dv = block_sparse_dkv_mgpu(q, k, v, entries, offsets, do, lse, delta, n_sel=n_sel, **heads)
        return dq, dk, dv
    sp = _specs(cfg, tp, d, n_sel)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, n_sel=n_sel),
        grid=(b, nb, hq),
        in_specs=[sp["tile"], sp["kv"], sp["kv"], sp["idx"], sp["tile"], sp["tile_scalars"], sp["tile_scalars"]],
        out_specs=sp["tile"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="nsa_block_sparse_dq",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q, k, v, idx, do, lse, delta)
    rows = pl.BlockSpec((None, tp, hq, d), lambda i, h, j: (i, 0, 0, 0))
    scalars = pl.BlockSpec((None, hq, tp), lambda i, h, j: (i, 0, 0))
    block = pl.BlockSpec((None, bs, None, d), lambda i, h, j: (i, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, n_sel=n_sel),
        grid=(b, hkv, nb),
        in_specs=[rows, block, block,
                  pl.BlockSpec((None, None, nb * n_sel), lambda i, h, j: (i, h, 0)),
                  pl.BlockSpec((None, None, nb + 1), lambda i, h, j: (i, h, 0)),
                  rows, scalars, scalars],
        out_specs=[block, block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name="nsa_block_sparse_dkv",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q, k, v, entries, offsets, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def block_sparse_attention(cfg: BlockSparseConfig, q, k, v, idx):
    """(o [B, Tp, HQ, D], lse [B, HQ, Tp]): each query attends the keys j <= its position in its query
    block's chosen blocks."""
    return _forward(cfg, q, k, v, idx)


def _bsa_fwd(cfg, q, k, v, idx):
    o, lse = _forward(cfg, q, k, v, idx)
    q, k, v, idx, o, lse = saved(q, k, v, idx, o, lse)
    return (o, lse), (q, k, v, idx, o, lse)


def _bsa_bwd(cfg, res, cts):
    dq, dk, dv = _backward(cfg, res, *cts)
    return dq, dk, dv, None


block_sparse_attention.defvjp(_bsa_fwd, _bsa_bwd)
