"""Flash attention with NSA's structured masks: the compression branch (keys = block means) and the sliding
window branch (keys = tokens). Forward, dq and dk/dv Pallas kernels under one `jax.custom_vjp`.

Rows are *virtual heads* v (`layout.py`): query head v % HQ reading KV head v // Gv, so mode "videonsa" runs
its two copies of each head without a padded tensor. Shapes inside: q [B, Tp, HQ, D], keys [B, N, HKV, D],
segment bounds lo / hi [B, Tp] (a token sees positions lo <= j < hi), query positions pos [B, Tp] (consecutive
in each batch row, pos[b, 0] + r: a chunk of the keys' sequence, `chunks.py`), outputs o [B, Tp, Hv, D] and
natural-log lse [B, Hv, Tp] (-inf for a row that sees nothing; its o is 0). Tp is a multiple of the query tile,
N of the key tile (the caller pads).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import (call_options, ceil_div, dot, probs_from_lse, saved, softmax_init,
                                    softmax_result, softmax_step)

MASK_KINDS = ("cmp_causal", "cmp_full", "window")
_DKV_QUERY_SPLITS = 32


@dataclasses.dataclass(frozen=True)
class MaskedFlashConfig:
    """kind: "cmp_causal" (block j ends at or before i), "cmp_full" (i <= last position of block j) or
    "window" (i - window < j <= i). block_size: positions per compressed key. Heads: see module doc."""

    kind: str
    num_q_heads: int
    virtual_heads: int
    group_size: int
    scale: float
    block_size: int = 1
    window: int = 0
    block_q: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 2


def structured_mask(kind: str, rows, cols, lo, hi, *, block_size: int = 1, window: int = 0):
    """Visibility of key `cols` [1, BK] (key indices) to query positions `rows` [BQ, 1] with segment bounds lo /
    hi [BQ, 1], for a kind of MASK_KINDS (see `MaskedFlashConfig`)."""
    if kind == "window":
        return (cols <= rows) & (cols > rows - window) & (cols >= lo)
    start = cols * block_size
    end = start + block_size - 1
    if kind == "cmp_causal":
        return (end <= rows) & (start >= lo)
    return (rows <= end) & (start < hi) & (start >= lo)


def _mask(cfg: MaskedFlashConfig, rows, cols, lo, hi):
    return structured_mask(cfg.kind, rows, cols, lo, hi, block_size=cfg.block_size, window=cfg.window)


def _key_tiles(cfg: MaskedFlashConfig, q0, lo_first, hi_last, num_k_tiles: int):
    """Key tiles [first, last) that can hold a visible key for the query rows q0 .. q0 + BQ - 1."""
    bq, bk, bs = cfg.block_q, cfg.block_k, cfg.block_size
    if cfg.kind == "window":
        first = jnp.maximum(q0 - cfg.window + 1, lo_first) // bk
        last = ceil_div(q0 + bq, bk)
    elif cfg.kind == "cmp_causal":
        first = (lo_first // bs) // bk
        last = ceil_div((q0 + bq) // bs, bk)
    else:
        first = (q0 // bs) // bk
        last = ceil_div(ceil_div(hi_last, bs), bk)
    return jnp.maximum(first, 0), jnp.minimum(last, num_k_tiles)


def _full_key_tiles(cfg: MaskedFlashConfig, q0, lo_last, hi_first, first, last):
    """Key tiles [a, b), inside [first, last), whose every key every query row q0 .. q0 + BQ - 1 sees: no mask
    needed. lo_last / hi_first: the largest segment start / smallest segment end of the rows (both grow with
    the position)."""
    bq, bk, bs = cfg.block_q, cfg.block_k, cfg.block_size
    if cfg.kind == "window":
        a = jnp.maximum(ceil_div(q0 + bq - cfg.window, bk), ceil_div(lo_last, bk))
        b = (q0 + 1) // bk
    elif cfg.kind == "cmp_causal":
        a, b = ceil_div(lo_last, bs * bk), (q0 + 1) // (bs * bk)
    else:
        a = jnp.maximum(ceil_div(q0 + bq - bs, bs * bk), ceil_div(lo_last, bs * bk))
        b = ceil_div(hi_first, bs) // bk
    a = jnp.clip(a, first, last)
    return a, jnp.clip(b, a, last)


def _key_loop(cfg: MaskedFlashConfig, body, carry, q0, lo_ref, hi_ref, nk: int):
    """Runs body(tile, carry, masked) over the key tiles the query tile at q0 can see, with masked=False on
    the tiles it sees whole."""
    bq = cfg.block_q
    first, last = _key_tiles(cfg, q0, lo_ref[0], hi_ref[bq - 1], nk)
    a, b = _full_key_tiles(cfg, q0, lo_ref[bq - 1], hi_ref[0], first, last)
    carry = jax.lax.fori_loop(first, a, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(a, b, functools.partial(body, masked=False), carry)
    return jax.lax.fori_loop(b, last, functools.partial(body, masked=True), carry)


def _query_tiles(cfg: MaskedFlashConfig, k0, num_q_tiles: int, offset):
    """Query tiles [first, last) that can see a key of the tile starting at key index k0; query row r sits at
    position offset + r."""
    bq, bk, bs = cfg.block_q, cfg.block_k, cfg.block_size
    # positions [start, end) of the queries that can see the tile
    if cfg.kind == "window":
        start, end = k0, k0 + bk + cfg.window - 1
    elif cfg.kind == "cmp_causal":
        start, end = (k0 + 1) * bs - 1, offset + num_q_tiles * bq
    else:
        start, end = offset, (k0 + bk) * bs
    first = jnp.clip((start - offset) // bq, 0, num_q_tiles)
    return first, jnp.clip(ceil_div(end - offset, bq), first, num_q_tiles)


def _fwd_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, pos_ref, o_ref, lse_ref, *, cfg: MaskedFlashConfig, nk: int):
    bq, bk = cfg.block_q, cfg.block_k
    q0 = pos_ref[0]
    q = q_ref[...]
    rows = q0 + jnp.arange(bq)[:, None]
    lo, hi = lo_ref[...][:, None], hi_ref[...][:, None]

    def body(t, carry, masked: bool):
        k = k_ref[pl.ds(t * bk, bk), :]
        v = v_ref[pl.ds(t * bk, bk), :]
        s = dot(q, k, trans_b=True) * cfg.scale
        if masked:
            s = jnp.where(_mask(cfg, rows, t * bk + jnp.arange(bk)[None, :], lo, hi), s, -jnp.inf)
        return softmax_step(carry, s, v)

    o, lse = softmax_result(_key_loop(cfg, body, softmax_init(bq, q.shape[-1]), q0, lo_ref, hi_ref, nk))
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse


def _probs(cfg, q, k, rows, cols, lo, hi, lse, masked: bool = True):
    s = dot(q, k, trans_b=True) * cfg.scale
    if masked:
        s = jnp.where(_mask(cfg, rows, cols, lo, hi), s, -jnp.inf)
    return probs_from_lse(s, lse)


def _dq_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, pos_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               cfg: MaskedFlashConfig, nk: int):
    bq, bk = cfg.block_q, cfg.block_k
    q0 = pos_ref[0]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    rows = q0 + jnp.arange(bq)[:, None]
    lo, hi = lo_ref[...][:, None], hi_ref[...][:, None]

    def body(t, dq, masked: bool):
        k = k_ref[pl.ds(t * bk, bk), :]
        v = v_ref[pl.ds(t * bk, bk), :]
        p = _probs(cfg, q, k, rows, t * bk + jnp.arange(bk)[None, :], lo, hi, lse, masked)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = _key_loop(cfg, body, jnp.zeros(q.shape, jnp.float32), q0, lo_ref, hi_ref, nk)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, lo_ref, hi_ref, pos_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                cfg: MaskedFlashConfig, nq: int, n_split: int):
    bq, bk = cfg.block_q, cfg.block_k
    kv, k0, split = pl.program_id(1), pl.program_id(2) * bk, pl.program_id(3)
    k, v = k_ref[...], v_ref[...]
    cols = k0 + jnp.arange(bk)[None, :]
    offset = pos_ref[0]
    first_q, last_q = _query_tiles(cfg, k0, nq, offset)
    per_split = ceil_div(last_q - first_q, n_split)  # this program's share of the query tiles
    first_q = first_q + split * per_split
    last_q = jnp.minimum(first_q + per_split, last_q)
    first_v = kv * cfg.group_size
    last_v = jnp.minimum(first_v + cfg.group_size, cfg.virtual_heads)

    def head_body(vr, carry):
        h = vr % cfg.num_q_heads

        def q_body(t, carry):
            dk, dv = carry
            sl = pl.ds(t * bq, bq)
            q, do = q_ref[sl, h, :], do_ref[sl, vr, :]
            lse, delta = lse_ref[vr, sl], delta_ref[vr, sl]
            rows = offset + t * bq + jnp.arange(bq)[:, None]
            p = _probs(cfg, q, k, rows, cols, lo_ref[sl][:, None], hi_ref[sl][:, None], lse)
            dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
            ds = p * (dot(do, v, trans_b=True) - delta[:, None])
            return dk + dot(ds.astype(q.dtype), q, trans_a=True), dv

        return jax.lax.fori_loop(first_q, last_q, q_body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first_v, last_v, head_body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(cfg: MaskedFlashConfig, q, k, v, lo, hi, pos):
    b, tp, hq, d = q.shape
    n = k.shape[1]
    nq, nk, hv, g = tp // cfg.block_q, n // cfg.block_k, cfg.virtual_heads, cfg.group_size
    bq = cfg.block_q
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, nk=nk),
        grid=(b, hv, nq),
        in_specs=[pl.BlockSpec((None, bq, None, d), lambda i, v_, t: (i, t, v_ % hq, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, v_, t: (i, 0, v_ // g, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, v_, t: (i, 0, v_ // g, 0)),
                  pl.BlockSpec((None, bq), lambda i, v_, t: (i, t)),
                  pl.BlockSpec((None, bq), lambda i, v_, t: (i, t)),
                  pl.BlockSpec((None, bq), lambda i, v_, t: (i, t))],
        out_specs=[pl.BlockSpec((None, bq, None, d), lambda i, v_, t: (i, t, v_, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, v_, t: (i, v_, t))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, hv, d), q.dtype), jax.ShapeDtypeStruct((b, hv, tp), jnp.float32)],
        name=f"nsa_{cfg.kind}_fwd",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q, k, v, lo, hi, pos)


def _backward(cfg: MaskedFlashConfig, q, k, v, lo, hi, pos, o, lse, do, dlse):
    b, tp, hq, d = q.shape
    n, hkv = k.shape[1], k.shape[2]
    nq, nk, hv, g = tp // cfg.block_q, n // cfg.block_k, cfg.virtual_heads, cfg.group_size
    bq, bk = cfg.block_q, cfg.block_k
    delta = (o.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1).transpose(0, 2, 1) - dlse
    row = pl.BlockSpec((None, bq), lambda i, v_, t: (i, t))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, nk=nk),
        grid=(b, hv, nq),
        in_specs=[pl.BlockSpec((None, bq, None, d), lambda i, v_, t: (i, t, v_ % hq, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, v_, t: (i, 0, v_ // g, 0)),
                  pl.BlockSpec((None, n, None, d), lambda i, v_, t: (i, 0, v_ // g, 0)),
                  row, row, row,
                  pl.BlockSpec((None, bq, None, d), lambda i, v_, t: (i, t, v_, 0)),
                  pl.BlockSpec((None, None, bq), lambda i, v_, t: (i, v_, t)),
                  pl.BlockSpec((None, None, bq), lambda i, v_, t: (i, v_, t))],
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, v_, t: (i, t, v_, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tp, hv, d), jnp.float32),
        name=f"nsa_{cfg.kind}_dq",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q, k, v, lo, hi, pos, do, lse, delta)
    # A compressed key is seen by all later queries: split that long query range over n_split programs
    # (partial dk / dv summed after) so that the grid fills the GPU. Window keys see a few query tiles.
    n_split = 1 if cfg.kind == "window" else min(nq, _DKV_QUERY_SPLITS)
    whole = lambda *shape: pl.BlockSpec((None, *shape), lambda i, h, t, s: (i,) + (0,) * len(shape))
    key = pl.BlockSpec((None, bk, None, d), lambda i, h, t, s: (i, t, h, 0))
    partial = pl.BlockSpec((None, None, bk, None, d), lambda i, h, t, s: (s, i, t, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, nq=nq, n_split=n_split),
        grid=(b, hkv, nk, n_split),
        in_specs=[whole(tp, hq, d), key, key, whole(tp), whole(tp), whole(tp), whole(tp, hv, d), whole(hv, tp),
                  whole(hv, tp)],
        out_specs=[partial, partial],
        out_shape=[jax.ShapeDtypeStruct((n_split,) + k.shape, jnp.float32)] * 2,
        name=f"nsa_{cfg.kind}_dkv",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q, k, v, lo, hi, pos, do, lse, delta)
    dk, dv = dk.sum(0), dv.sum(0)
    dq = dq.reshape(b, tp, hv // hq, hq, d).sum(2)  # the copies of a query head ("videonsa": two)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def masked_flash(cfg: MaskedFlashConfig, q, k, v, lo, hi, pos=None):
    """(o [B, Tp, Hv, D], lse [B, Hv, Tp]) of the masked attention; see the module doc for shapes (pos None:
    the rows sit at positions 0 .. Tp - 1)."""
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
    return _masked_flash(cfg, q, k, v, lo, hi, pos)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _masked_flash(cfg: MaskedFlashConfig, q, k, v, lo, hi, pos):
    return _forward(cfg, q, k, v, lo, hi, pos)


def _masked_flash_fwd(cfg, q, k, v, lo, hi, pos):
    o, lse = _forward(cfg, q, k, v, lo, hi, pos)
    q, k, v, lo, hi, pos, o, lse = saved(q, k, v, lo, hi, pos, o, lse)
    return (o, lse), (q, k, v, lo, hi, pos, o, lse)


def _masked_flash_bwd(cfg, res, cts):
    do, dlse = cts
    dq, dk, dv = _backward(cfg, *res, do, dlse)
    return dq, dk, dv, None, None, None


_masked_flash.defvjp(_masked_flash_fwd, _masked_flash_bwd)
