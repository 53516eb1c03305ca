"""The query-block top-k as a Mosaic (TPU) kernel: block importance summed over each block of queries and the
query heads of a KV head, then the "recent" rule (`topk_rules.recent_topk`) in XLA on the small
[B, HKV, NQB, NB] result.

Grid (B, KV head, tile of query blocks, key tile, head of the group): each step scores a tile of queries
against a tile of block means (exp(scale q . k_cmp - lse), tokens past t and rows that saw nothing add 0)
and adds its per-query-block column sums into the resident output block; key tiles wholly in the future
of the query tile are skipped (the rule reads only past blocks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import call_options, dot
from pallas_kernels.topk_rules import recent_topk


def _kernel(q_ref, kc_ref, lse_ref, out_ref, *, block_size: int, blocks_per_tile: int, block_k: int,
            t: int, scale: float):
    qt, kt, g = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    bs, nq = block_size, blocks_per_tile
    rows = nq * bs

    @pl.when(g == 0)
    def _init():
        out_ref[...] = jnp.zeros(out_ref.shape, jnp.float32)

    @pl.when(kt * block_k < (qt + 1) * nq)  # some block of this key tile precedes a query block of the tile
    def _step():
        s = dot(q_ref[...], kc_ref[...].astype(q_ref.dtype), trans_b=True) * scale  # [rows, BK], q's dtype
        lse = lse_ref[...]  # [rows, 1]
        pos = qt * rows + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
        ok = (pos < t) & (lse > -jnp.inf)
        p = jnp.where(ok, jnp.exp(s - jnp.where(ok, lse, 0.0)), 0.0)
        out_ref[...] += p.reshape(nq, bs, block_k).sum(axis=1)


def query_block_importance_tpu(q, kc32, lse, *, t: int, group_size: int, block_size: int,
                               scale: float) -> jax.Array:
    """Importance [B, HKV, NQB, NBp] float32 of each block for each query block (all blocks; the rule masks
    the future and other segments). q [B, HQ, Tp, D]; kc32 [B, HKV, NBp, D] float32 block means; lse [B, HQ,
    Tp, 1] of the compression branch; Tp // block_size at most 8 or a multiple of 8."""
    b, hq, tp, d = q.shape
    hkv, nbp = kc32.shape[1], kc32.shape[2]
    nqb = tp // block_size
    if nqb % 8 and nqb > 8:
        raise ValueError(f"query blocks ({nqb}) must be at most 8 or a multiple of 8 (the caller pads)")
    nq = min(8, nqb)
    block_k = 128 if nbp % 128 == 0 else nbp
    g = group_size
    kernel = functools.partial(_kernel, block_size=block_size, blocks_per_tile=nq, block_k=block_k, t=t,
                               scale=scale)
    rows = nq * block_size
    return pl.pallas_call(
        kernel,
        grid=(b, hkv, nqb // nq, nbp // block_k, g),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, h, qt, kt, j: (i, h * g + j, qt, 0)),
                  pl.BlockSpec((None, None, block_k, d), lambda i, h, qt, kt, j: (i, h, kt, 0)),
                  pl.BlockSpec((None, None, rows, 1), lambda i, h, qt, kt, j: (i, h * g + j, qt, 0))],
        out_specs=pl.BlockSpec((None, None, nq, block_k), lambda i, h, qt, kt, j: (i, h, qt, kt)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, nqb, nbp), jnp.float32),
        name="nsa_tpu_query_block_importance",
        **call_options(dimension_semantics=("parallel", "parallel", "parallel", "parallel", "arbitrary")),
    )(q, kc32, lse)


def query_block_topk_tpu(q, kc32, lse, lo, *, t: int, group_size: int, block_size: int, block_count: int,
                         scale: float) -> jax.Array:
    """Chosen blocks [B, HKV, NQB, block_count] of each query block (-1 = empty): its own block, then its
    segment's past blocks by importance, ties to the most recent. lo [B, Tp] segment starts; the rest as
    `query_block_importance_tpu`."""
    imp = query_block_importance_tpu(q, kc32, lse, t=t, group_size=group_size, block_size=block_size, scale=scale)
    b, hkv, nqb, _ = imp.shape
    cur = jnp.broadcast_to(jnp.arange(nqb)[None, None], (b, hkv, nqb))
    first = jnp.broadcast_to((lo[:, ::block_size] // block_size)[:, None], (b, hkv, nqb))
    return recent_topk(imp, cur, first, block_count=block_count)
