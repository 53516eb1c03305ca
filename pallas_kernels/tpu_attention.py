"""NSA's three attention branches as Mosaic (TPU) kernels: one tiled flash attention whose key tiles come from
per-query-tile lists, prefetched as scalars so that each tile is a DMA'd BlockSpec block (no row gathers).

- compression ("cmp_causal" / "cmp_full"): keys are block means; static lists of the key tiles a query tile
  can see.
- window: static lists of the key tiles within the window.
- selection (block-sparse, `selection="query_block"`): the lists are the chosen blocks of each query block
  (tiles of block_size queries and keys), data-dependent.

Layout is head-major, whose blocks end in (rows, D) as Mosaic wants: q [B, HQ, Tp, D], keys k / v [B, HKV, N,
D], segment bounds lo / hi [B, Tp, 1], lse [B, HQ, Tp, 1]; query head h reads KV head h // group_size. lists
[B, HKV, NQT, S] int32 (-1 = no tile). Forward and dq: grid (B, HQ, query tile, list slot). dk / dv: grid (B,
HKV, entry, head of the group) over the (query tile, key tile) entries sorted by key tile, so that each key
tile's dk / dv block stays resident while its entries accumulate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.backend import call_options, ceil_div, dot, probs_from_lse, saved
from pallas_kernels.masked_flash import structured_mask

KINDS = ("cmp_causal", "cmp_full", "window", "selection")


@dataclasses.dataclass(frozen=True)
class TiledConfig:
    """kind (KINDS); query / key tile sizes; scale; group_size (query heads per KV head); block_size (positions
    per compressed key, and the selection block); window."""

    kind: str
    block_q: int
    block_k: int
    scale: float
    group_size: int
    block_size: int = 1
    window: int = 0


def static_lists(cfg: TiledConfig, num_q_tiles: int, num_k_tiles: int) -> np.ndarray:
    """[NQT, S] key tiles each query tile can see (compression and window; -1 pads), ignoring segments (the
    mask applies them)."""
    bq, bk, bs = cfg.block_q, cfg.block_k, cfg.block_size
    ranges = []
    for qt in range(num_q_tiles):
        q0, q1 = qt * bq, (qt + 1) * bq  # rows [q0, q1)
        if cfg.kind == "window":
            first, last = max(q0 - cfg.window + 1, 0) // bk, ceil_div(q1, bk)
        elif cfg.kind == "cmp_causal":
            first, last = 0, ceil_div(q1 // bs, bk)
        else:
            first, last = (q0 // bs) // bk, num_k_tiles
        ranges.append((first, min(last, num_k_tiles)))
    width = max(1, max(last - first for first, last in ranges))
    lists = np.full((num_q_tiles, width), -1, np.int32)
    for qt, (first, last) in enumerate(ranges):
        lists[qt, :max(0, last - first)] = np.arange(first, last)
    return lists


def _mask(cfg: TiledConfig, qt, kt, lo, hi):
    rows = qt * cfg.block_q + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.block_k), 0)
    cols = kt * cfg.block_k + jax.lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.block_k), 1)
    if cfg.kind == "selection":  # the chosen blocks lie in the query block's segment
        return cols <= rows
    return structured_mask(cfg.kind, rows, cols, lo, hi, block_size=cfg.block_size, window=cfg.window)


def _logits(cfg: TiledConfig, q, k, qt, kt, lo, hi):
    return jnp.where(_mask(cfg, qt, kt, lo, hi), dot(q, k, trans_b=True) * cfg.scale, -jnp.inf)


def _list_slot(cfg: TiledConfig, lists_ref):
    """(query tile, list slot, last slot, key tile or -1) of a program of the grid (B, HQ, query tile, slot)."""
    b, h, qt, s = (pl.program_id(i) for i in range(4))
    return qt, s, pl.num_programs(3) - 1, lists_ref[b, h // cfg.group_size, qt, s]


def _fwd_kernel(lists_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                cfg: TiledConfig):
    qt, s, last, kt = _list_slot(cfg, lists_ref)

    @pl.when(s == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(kt >= 0)
    def _step():
        logits = _logits(cfg, q_ref[...], k_ref[...], qt, kt, lo_ref[...], hi_ref[...])
        m = m_sc[...]
        m_new = jnp.maximum(m, logits.max(axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(logits - m_safe)
        corr = jnp.exp(m - m_safe)
        l_sc[...] = l_sc[...] * corr + p.sum(axis=1, keepdims=True)
        acc_sc[...] = acc_sc[...] * corr + dot(p.astype(v_ref.dtype), v_ref[...])
        m_sc[...] = m_new

    @pl.when(s == last)
    def _finish():
        l = l_sc[...]
        l_safe = jnp.where(l > 0, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l > 0, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(lists_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
               cfg: TiledConfig):
    qt, s, last, kt = _list_slot(cfg, lists_ref)

    @pl.when(s == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(kt >= 0)
    def _step():
        k = k_ref[...]
        p = probs_from_lse(_logits(cfg, q_ref[...], k, qt, kt, lo_ref[...], hi_ref[...]), lse_ref[...])
        ds = p * (dot(do_ref[...], v_ref[...], trans_b=True) - delta_ref[...])
        dq_sc[...] += dot(ds.astype(k.dtype), k)

    @pl.when(s == last)
    def _finish():
        dq_ref[...] = (dq_sc[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(entry_q_ref, entry_k_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, cfg: TiledConfig):
    b, h, e, g = (pl.program_id(i) for i in range(4))
    n_entries, last_head = pl.num_programs(2), pl.num_programs(3) - 1
    qt, kt = entry_q_ref[b, h, e], entry_k_ref[b, h, e]
    first_of_tile = (e == 0) | (entry_k_ref[b, h, jnp.maximum(e - 1, 0)] != kt)
    last_of_tile = (e == n_entries - 1) | (entry_k_ref[b, h, jnp.minimum(e + 1, n_entries - 1)] != kt)

    @pl.when(first_of_tile & (g == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(qt >= 0)
    def _step():
        q, do, k, v = q_ref[...], do_ref[...], k_ref[...], v_ref[...]
        p = probs_from_lse(_logits(cfg, q, k, qt, kt, lo_ref[...], hi_ref[...]), lse_ref[...])
        ds = p * (dot(do, v, trans_b=True) - delta_ref[...])
        dk_sc[...] += dot(ds.astype(q.dtype), q, trans_a=True)
        dv_sc[...] += dot(p.astype(do.dtype), do, trans_a=True)

    @pl.when(last_of_tile & (g == last_head))
    def _finish():
        dk_ref[...] = (dk_sc[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def sorted_entries(lists: jax.Array, num_k_tiles: int) -> tuple[jax.Array, jax.Array]:
    """(query tile, key tile) of every list entry, [B, HKV, E] each, sorted by key tile (E = NQT * S + NKT).
    Every key tile gets one extra entry with query tile -1 (no work) so that its dk / dv are written even if
    no query tile sees it; empty list slots become such entries of the last key tile."""
    b, hkv, nqt, s = lists.shape
    flat = lists.reshape(b, hkv, nqt * s)
    q_tiles = jnp.broadcast_to(jnp.arange(nqt * s, dtype=jnp.int32) // s, flat.shape)
    extra = jnp.broadcast_to(jnp.arange(num_k_tiles, dtype=jnp.int32), (b, hkv, num_k_tiles))
    k_all = jnp.concatenate([flat, extra], -1)
    q_all = jnp.concatenate([jnp.where(flat >= 0, q_tiles, -1), jnp.full_like(extra, -1)], -1)
    k_all = jnp.where(k_all >= 0, k_all, num_k_tiles - 1)
    order = jnp.argsort(k_all, axis=-1, stable=True)
    return jnp.take_along_axis(q_all, order, -1), jnp.take_along_axis(k_all, order, -1)


_PARALLEL_LAST_SEQUENTIAL = ("parallel", "parallel", "parallel", "arbitrary")


def _specs(cfg: TiledConfig, d: int):
    """BlockSpecs of the per-(query tile, query head) kernels, grid (b, h, query tile, list slot). An empty
    slot re-reads slot 0's key tile (no new DMA when the block index repeats)."""
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group_size

    def kv_of(b, h, qt, s, lists):
        kt = lists[b, h // g, qt, s]
        return b, h // g, jnp.maximum(jnp.where(kt >= 0, kt, lists[b, h // g, qt, 0]), 0), 0

    return dict(
        q=pl.BlockSpec((None, None, bq, d), lambda b, h, qt, s, lists: (b, h, qt, 0)),
        kv=pl.BlockSpec((None, None, bk, d), kv_of),
        rows=pl.BlockSpec((None, bq, 1), lambda b, h, qt, s, lists: (b, qt, 0)),
        row_scalars=pl.BlockSpec((None, None, bq, 1), lambda b, h, qt, s, lists: (b, h, qt, 0)))


def _forward(cfg: TiledConfig, lists, q, k, v, lo, hi):
    b, hq, tp, d = q.shape
    nqt, n_slots = tp // cfg.block_q, lists.shape[-1]
    sp = _specs(cfg, d)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, hq, nqt, n_slots),
        in_specs=[sp["q"], sp["kv"], sp["kv"], sp["rows"], sp["rows"]],
        out_specs=[sp["q"], sp["row_scalars"]],
        scratch_shapes=[pltpu.VMEM((cfg.block_q, 1), jnp.float32), pltpu.VMEM((cfg.block_q, 1), jnp.float32),
                        pltpu.VMEM((cfg.block_q, d), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg), grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, tp, 1), jnp.float32)],
        name=f"nsa_tpu_{cfg.kind}_fwd",
        **call_options(dimension_semantics=_PARALLEL_LAST_SEQUENTIAL),
    )(lists, q, k, v, lo, hi)


def _backward(cfg: TiledConfig, res, do, dlse):
    lists, q, k, v, lo, hi, o, lse = res
    b, hq, tp, d = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    bq, bk, g = cfg.block_q, cfg.block_k, cfg.group_size
    nqt, nkt, n_slots = tp // bq, n_keys // bk, lists.shape[-1]
    delta = (o.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1, keepdims=True) - dlse
    sp = _specs(cfg, d)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, hq, nqt, n_slots),
            in_specs=[sp["q"], sp["kv"], sp["kv"], sp["rows"], sp["rows"], sp["q"], sp["row_scalars"],
                      sp["row_scalars"]],
            out_specs=sp["q"], scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name=f"nsa_tpu_{cfg.kind}_dq",
        **call_options(dimension_semantics=_PARALLEL_LAST_SEQUENTIAL),
    )(lists, q, k, v, lo, hi, do, lse, delta)

    entry_q, entry_k = sorted_entries(lists, nkt)
    # grid (b, KV head, entry, head of the group); a no-work entry (query tile -1) reads query tile 0
    q_of = lambda b_, h, e, g_, eq, ek: (b_, h * g + g_, jnp.maximum(eq[b_, h, e], 0), 0)
    q_spec, scalars = pl.BlockSpec((None, None, bq, d), q_of), pl.BlockSpec((None, None, bq, 1), q_of)
    rows = pl.BlockSpec((None, bq, 1), lambda b_, h, e, g_, eq, ek: (b_, jnp.maximum(eq[b_, h, e], 0), 0))
    keys = pl.BlockSpec((None, None, bk, d), lambda b_, h, e, g_, eq, ek: (b_, h, ek[b_, h, e], 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(b, hkv, entry_q.shape[-1], g),
            in_specs=[q_spec, keys, keys, rows, rows, q_spec, scalars, scalars],
            out_specs=[keys, keys],
            scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        name=f"nsa_tpu_{cfg.kind}_dkv",
        **call_options(dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary")),
    )(entry_q, entry_k, q, k, v, lo, hi, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tiled_attention(cfg: TiledConfig, lists, q, k, v, lo, hi):
    """(o [B, HQ, Tp, D], lse [B, HQ, Tp, 1]) of one branch; gradients for q, k, v."""
    return _forward(cfg, lists, q, k, v, lo, hi)


def _tiled_fwd(cfg, lists, q, k, v, lo, hi):
    o, lse = _forward(cfg, lists, q, k, v, lo, hi)
    lists, q, k, v, lo, hi, o, lse = saved(lists, q, k, v, lo, hi, o, lse)
    return (o, lse), (lists, q, k, v, lo, hi, o, lse)


def _tiled_bwd(cfg, res, cts):
    dq, dk, dv = _backward(cfg, res, *cts)
    return None, dq, dk, dv, None, None


tiled_attention.defvjp(_tiled_fwd, _tiled_bwd)
