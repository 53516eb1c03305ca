"""Selection branch: each token attends, causally, the tokens of the blocks chosen for its KV head.

Rows are grouped per (token, KV head): q_rows [B, Tp, HKV, GR, D] holds the virtual rows of each KV head's
group (zero-padded to GR rows, a tensor-core tile), so one program serves a whole group with one K / V load
per chosen block. Forward and dq run one program per (token, KV head), gathering `blocks_per_step` chosen
blocks per loop step (one wider load and product instead of several dependent small ones); dk / dv run one
program per (KV block, KV head) over the tokens that chose that block (an inverted index built with a sort),
so the backward does exactly the selected work. dq comes from a per-token kernel like the forward, or, with
`dq_atomic`, from the dk / dv kernel itself: each (block, token) pair adds its dq part to a float32 buffer
with atomic adds (Triton lowering and interpret mode; summation order, hence the last bits, not fixed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.backend import call_options, ceil_div, dot


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """block_size, scale: NSA's. rows_per_token: the real rows among each token's GR (the first ones; None:
    all), the only rows the dk / dv kernel gathers. num_warps, num_stages, kv_major tune the per-token
    kernels (forward, dq): Triton warps, pipeline stages, the grid order (KV head outermost; measured
    slower on the H100) and the chosen blocks gathered per loop step. dq_atomic: dq by atomic adds in the
    dk / dv kernel instead of the per-token dq kernel (GPU and interpret mode only)."""

    block_size: int
    scale: float
    num_warps: int = 4
    num_stages: int = 2
    kv_major: bool = False
    rows_per_token: int | None = None
    blocks_per_step: int = 1
    dq_atomic: bool = False


def _token_grid(cfg: SelectionConfig, b: int, tp: int, hkv: int):
    """Grid and index-map adapter of the per-token kernels: maps (i, t, h) block indices to the grid order."""
    if cfg.kv_major:
        return (b, hkv, tp), lambda f: (lambda i, h, t: f(i, t, h))
    return (b, tp, hkv), lambda f: f


def _online_softmax_step(carry, s, v):
    acc, m, l = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    corr = jnp.exp(m - m_safe)
    return acc * corr[:, None] + dot(p.astype(v.dtype), v), m_new, l * corr + p.sum(axis=1)


def _step_scores(cfg, q, k_ref, idx_ref, step, token, per_step):
    """Masked logits [GR, per_step * bs] of the rows of `token` against the step-th `per_step` chosen blocks
    (-1: nothing), with the keys and the key positions (a slice for one block, a row gather for several)."""
    bs = cfg.block_size
    if per_step == 1:
        blk = idx_ref[step]
        start = pl.multiple_of(jnp.maximum(blk, 0) * bs, bs)
        keys, cols, real = pl.ds(start, bs), start + jnp.arange(bs), blk >= 0
    else:
        j = jnp.arange(per_step * bs)
        blk = idx_ref[step * per_step + j // bs]
        cols = jnp.maximum(blk, 0) * bs + j % bs
        keys, real = cols, (blk >= 0)[None, :]
    k = k_ref[keys, :]
    s = dot(q, k, trans_b=True) * cfg.scale
    return jnp.where((cols[None, :] <= token) & real, s, -jnp.inf), k, keys


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, *, cfg: SelectionConfig, n_sel: int):
    token = pl.program_id(2 if cfg.kv_major else 1)
    q = q_ref[...]
    per_step = min(cfg.blocks_per_step, n_sel)

    def body(j, carry):
        s, _, keys = _step_scores(cfg, q, k_ref, idx_ref, j, token, per_step)
        return _online_softmax_step(carry, s, v_ref[keys, :])

    gr, d = q.shape
    init = (jnp.zeros((gr, d), jnp.float32), jnp.full((gr,), -jnp.inf, jnp.float32), jnp.zeros((gr,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, n_sel // per_step, body, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _probs(s, lse):
    finite = (lse > -jnp.inf)[:, None]
    return jnp.where(finite & (s > -jnp.inf), jnp.exp(s - jnp.where(finite, lse[:, None], 0.0)), 0.0)


def _dq_kernel(q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: SelectionConfig,
               n_sel: int):
    token = pl.program_id(2 if cfg.kv_major else 1)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    per_step = min(cfg.blocks_per_step, n_sel)

    def body(j, dq):
        s, k, keys = _step_scores(cfg, q, k_ref, idx_ref, j, token, per_step)
        ds = _probs(s, lse) * (dot(do, v_ref[keys, :], trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, n_sel // per_step, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, tokens_ref, offsets_ref, do_ref, lse_ref, delta_ref, *refs,
                cfg: SelectionConfig, padded_rows: int, group_rows: int, tile_rows: int):
    """dk, dv of one KV block from the rows of the tokens that chose it, gathered `tile_rows` at a time: the
    first `group_rows` of each token's `padded_rows` rows (no padding rows), for tile_rows // group_rows
    tokens per step. Row refs are flat: row `token * padded_rows + g`. With cfg.dq_atomic, refs are (dq
    buffer in, dk, dv, dq buffer out) and each step adds its rows' dq to the buffer (rows past the last token
    go to distinct trash rows after the real ones, so no two rows of one add share an address)."""
    dk_ref, dv_ref = refs[-3:-1] if cfg.dq_atomic else refs
    blk = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    cols = blk * cfg.block_size + jnp.arange(cfg.block_size)[None, :]
    first, last = offsets_ref[blk], offsets_ref[blk + 1]
    per_step = tile_rows // group_rows
    r = jnp.arange(tile_rows)
    slot_in_step, g = r // group_rows, r % group_rows

    def body(step, carry):
        dk, dv = carry
        slot = first + step * per_step + slot_in_step
        ok = (slot < last) & (slot_in_step < per_step)  # rows past the last token repeat it, with p = 0
        token = tokens_ref[jnp.minimum(slot, last - 1)]
        rows = token * padded_rows + g
        q, do = q_ref[rows, :], do_ref[rows, :]
        lse, delta = jnp.where(ok, lse_ref[rows], -jnp.inf), jnp.where(ok, delta_ref[rows], 0.0)
        s = jnp.where(cols <= token[:, None], dot(q, k, trans_b=True) * cfg.scale, -jnp.inf)
        p = _probs(s, lse)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        if cfg.dq_atomic:
            target = jnp.where(ok, rows, q_ref.shape[0] + r)
            plgpu.atomic_add(refs[-1], (target[:, None], jnp.arange(k.shape[1])[None, :]),
                             dot(ds.astype(k.dtype), k) * cfg.scale)
        return dk + dot(ds.astype(q.dtype), q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, ceil_div(last - first, per_step), body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _forward(cfg: SelectionConfig, q_rows, k, v, idx):
    b, tp, hkv, gr, d = q_rows.shape
    n_sel, tk = idx.shape[-1], k.shape[1]
    grid, order = _token_grid(cfg, b, tp, hkv)
    rows = pl.BlockSpec((None, None, None, gr, d), order(lambda i, t, h: (i, t, h, 0, 0)))
    whole_kv = pl.BlockSpec((None, tk, None, d), order(lambda i, t, h: (i, 0, h, 0)))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_sel=n_sel),
        grid=grid,
        in_specs=[rows, whole_kv, whole_kv,
                  pl.BlockSpec((None, None, None, n_sel), order(lambda i, t, h: (i, t, h, 0)))],
        out_specs=[rows, pl.BlockSpec((None, None, None, gr), order(lambda i, t, h: (i, t, h, 0)))],
        out_shape=[jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
                   jax.ShapeDtypeStruct((b, tp, hkv, gr), jnp.float32)],
        name="nsa_selection_fwd",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q_rows, k, v, idx)


def inverted_index(idx: jax.Array, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """For each (batch, KV head): the tokens that chose each block, grouped by block ([B, HKV, Tp * S]), and
    the offsets of each block's group ([B, HKV, num_blocks + 1])."""
    b, tp, hkv, s = idx.shape
    flat = jnp.where(idx >= 0, idx, num_blocks).transpose(0, 2, 1, 3).reshape(b, hkv, tp * s)
    order = jnp.argsort(flat, axis=-1, stable=True)
    sorted_blocks = jnp.take_along_axis(flat, order, axis=-1)
    search = jax.vmap(jax.vmap(lambda a: jnp.searchsorted(a, jnp.arange(num_blocks + 1), side="left")))
    return (order // s).astype(jnp.int32), search(sorted_blocks).astype(jnp.int32)


def _dq(cfg: SelectionConfig, q_rows, k, v, idx, do, lse, delta):
    """dq [B, Tp, HKV, GR, D] float32: one program per (token, KV head) over its chosen blocks."""
    b, tp, hkv, gr, d = q_rows.shape
    n_sel, tk = idx.shape[-1], k.shape[1]
    grid, order = _token_grid(cfg, b, tp, hkv)
    rows = pl.BlockSpec((None, None, None, gr, d), order(lambda i, t, h: (i, t, h, 0, 0)))
    row_scalars = pl.BlockSpec((None, None, None, gr), order(lambda i, t, h: (i, t, h, 0)))
    whole_kv = pl.BlockSpec((None, tk, None, d), order(lambda i, t, h: (i, 0, h, 0)))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, n_sel=n_sel),
        grid=grid,
        in_specs=[rows, whole_kv, whole_kv,
                  pl.BlockSpec((None, None, None, n_sel), order(lambda i, t, h: (i, t, h, 0))),
                  rows, row_scalars, row_scalars],
        out_specs=rows,
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, jnp.float32),
        name="nsa_selection_dq",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q_rows, k, v, idx, do, lse, delta)


def _dkv(cfg: SelectionConfig, q_rows, k, v, idx, do, lse, delta):
    """dk, dv [B, NB * bs, HKV, D] float32: one program per (KV block, KV head) over the tokens that chose it;
    with cfg.dq_atomic also dq [B, Tp, HKV, GR, D] float32 (else None)."""
    b, tp, hkv, gr, d = q_rows.shape
    n_sel, tk = idx.shape[-1], k.shape[1]
    nb = tk // cfg.block_size
    tokens, offsets = inverted_index(idx, nb)
    group_rows = cfg.rows_per_token or gr
    tile_rows = max(64, 1 << (group_rows - 1).bit_length())
    flat = lambda x: x.swapaxes(1, 2).reshape(b, hkv, tp * gr, *x.shape[4:])  # [B, HKV, Tp * GR, ...]
    all_rows = pl.BlockSpec((None, None, tp * gr, d), lambda i, h, j: (i, h, 0, 0))
    all_scalars = pl.BlockSpec((None, None, tp * gr), lambda i, h, j: (i, h, 0))
    block = pl.BlockSpec((None, cfg.block_size, None, d), lambda i, h, j: (i, j, h, 0))
    in_specs = [all_rows, block, block, pl.BlockSpec((None, None, tp * n_sel), lambda i, h, j: (i, h, 0)),
                pl.BlockSpec((None, None, nb + 1), lambda i, h, j: (i, h, 0)), all_rows, all_scalars, all_scalars]
    args = [flat(q_rows), k, v, tokens, offsets, flat(do), flat(lse), flat(delta)]
    out_specs, out_shape, aliases = [block, block], [jax.ShapeDtypeStruct(k.shape, jnp.float32)] * 2, {}
    if cfg.dq_atomic:  # the real rows, then tile_rows trash rows
        dq_rows = pl.BlockSpec((None, None, tp * gr + tile_rows, d), lambda i, h, j: (i, h, 0, 0))
        in_specs.append(dq_rows)
        args.append(jnp.zeros((b, hkv, tp * gr + tile_rows, d), jnp.float32))
        out_specs.append(dq_rows)
        out_shape.append(jax.ShapeDtypeStruct(args[-1].shape, jnp.float32))
        aliases = {len(args) - 1: 2}
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, padded_rows=gr, group_rows=group_rows, tile_rows=tile_rows),
        grid=(b, hkv, nb),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        name="nsa_selection_dkv",
        **call_options(),
    )(*args)
    if not cfg.dq_atomic:
        return (*outs, None)
    dk, dv, dq = outs
    return dk, dv, dq[:, :, :tp * gr].reshape(b, hkv, tp, gr, d).swapaxes(1, 2)


def _backward(cfg: SelectionConfig, q_rows, k, v, idx, o, lse, do, dlse):
    delta = (o.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1) - dlse
    dk, dv, dq = _dkv(cfg, q_rows, k, v, idx, do, lse, delta)
    if dq is None:
        dq = _dq(cfg, q_rows, k, v, idx, do, lse, delta)
    return dq.astype(q_rows.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def selection_attention(cfg: SelectionConfig, q_rows, k, v, idx):
    """(o_rows [B, Tp, HKV, GR, D], lse [B, Tp, HKV, GR]). k, v [B, NB * bs, HKV, D]; idx [B, Tp, HKV, S]
    int32 chosen blocks (-1 = empty); a row attends keys j <= its token in its chosen blocks."""
    return _forward(cfg, q_rows, k, v, idx)


def _selection_fwd(cfg, q_rows, k, v, idx):
    o, lse = _forward(cfg, q_rows, k, v, idx)
    return (o, lse), (q_rows, k, v, idx, o, lse)


def _selection_bwd(cfg, res, cts):
    q_rows, k, v, idx, o, lse = res
    dq, dk, dv = _backward(cfg, q_rows, k, v, idx, o, lse, *cts)
    return dq, dk, dv, None


selection_attention.defvjp(_selection_fwd, _selection_bwd)
