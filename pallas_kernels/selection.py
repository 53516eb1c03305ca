"""Selection branch: each token attends, causally, the tokens of the blocks chosen for its KV head.

Rows are grouped per (token, KV head): q_rows [B, Tp, HKV, GR, D] holds the virtual rows of each KV head's
group (zero-padded to GR rows). Forward and dk / dv are block-centric: a program loads one KV block of one KV
head and runs over tokens that chose it (an inverted index built with a sort), gathering the real rows of
several tokens into 64-row tiles, so each does exactly the selected work. A block's tokens are split into
programs of at most `program_tiles` tiles (work items): a block that most tokens choose would otherwise hold
one program many times the average, and the kernel as long as that program. The forward writes a partial
output and log-sum-exp per (token, slot), merged by log-sum-exp over the slots; tokens run in chunks whose
partials fit `partial_bytes`, and the backward reuses the chunks' inverted indexes, adding each chunk's part to
dk / dv. The dk / dv kernel also writes each (token, slot)'s ds in q's dtype (what the
dq product takes anyway); dq then runs one program per (token, KV head), summing ds @ K over its chosen
blocks: K read once per (token, block), V not at all. Where each token has more than 8 real rows per KV head
(mode videonsa's padded groups of 16), the forward is per token too: one program per (token, KV head) folds its
chosen blocks by online softmax, so no partials are written or merged (their traffic grows with the rows, the
per-token reads of K and V do not, up to a 16-row tile). (The alternatives these choices beat, per-token
forward and dq, dq as partials or atomic adds, are timed in BENCHMARKS.md.)"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.backend import call_options, ceil_div, dot, probs_from_lse, saved


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """block_size, scale: NSA's. rows_per_token: the real rows among each token's GR (the first ones; None:
    all), the only rows the block-centric kernels gather. num_warps, num_stages: Triton's. partial_bytes:
    bound on the forward's partial outputs of one chunk of tokens (the backward's ds rows take half).
    program_tiles: most row tiles one program runs (a block's tokens past that go to further programs)."""

    block_size: int
    scale: float
    num_warps: int = 4
    num_stages: int = 2
    rows_per_token: int | None = None
    partial_bytes: int = 2 << 30
    program_tiles: int = 16


def inverted_index(idx: jax.Array, num_blocks: int) -> tuple[jax.Array, jax.Array]:
    """For each (batch, KV head): the entries `token * S + slot` of idx [B, C, HKV, S] grouped by chosen block,
    tokens in order within a block ([B, HKV, C * S]; empty entries last), and the offsets of each block's
    group ([B, HKV, num_blocks + 1])."""
    b, c, hkv, s = idx.shape
    flat = jnp.where(idx >= 0, idx, num_blocks).transpose(0, 2, 1, 3).reshape(b, hkv, c * s)
    order = jnp.argsort(flat, axis=-1, stable=True)
    sorted_blocks = jnp.take_along_axis(flat, order, axis=-1)
    search = jax.vmap(jax.vmap(lambda a: jnp.searchsorted(a, jnp.arange(num_blocks + 1), side="left")))
    return order.astype(jnp.int32), search(sorted_blocks).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Shapes:
    """Static shapes of the block-centric kernels. Rows are flat over (token, KV head, padded row)."""
    hkv: int
    padded_rows: int  # GR
    group_rows: int  # the real rows among each token's GR: the only ones gathered
    n_sel: int
    chunk: int  # tokens per chunk
    num_blocks: int
    program_tiles: int

    @property
    def tile_rows(self) -> int:
        return max(64, 1 << (self.group_rows - 1).bit_length())

    @property
    def token_forward(self) -> bool:
        """The forward runs per (token, KV head) (`_fwd_token_kernel`) rather than block-centric."""
        return self.group_rows > 8

    @property
    def item_entries(self) -> int:
        """Most (token, slot) entries of one work item: program_tiles tiles of tile_rows // group_rows tokens."""
        return self.program_tiles * (self.tile_rows // self.group_rows)

    @property
    def items(self) -> int:
        """Work items per (batch, KV head) and chunk: enough for any split of the chunk's entries by block."""
        return ceil_div(self.chunk * self.n_sel, self.item_entries) + self.num_blocks

    @property
    def partial_rows(self) -> int:
        """One partial row per (token, KV head, slot, real row) of a chunk; tile_rows trash rows follow."""
        return self.chunk * self.hkv * self.n_sel * self.group_rows


def _shapes(cfg: SelectionConfig, q_rows, n_sel: int, num_blocks: int) -> _Shapes:
    b, tp, hkv, gr, d = q_rows.shape
    group_rows = cfg.rows_per_token or gr
    token_bytes = b * hkv * n_sel * group_rows * d * q_rows.dtype.itemsize
    n_chunks = max(1, ceil_div(tp * token_bytes, cfg.partial_bytes))
    return _Shapes(hkv, gr, group_rows, n_sel, ceil_div(tp, n_chunks), num_blocks, cfg.program_tiles)


def _work_items(sh: _Shapes, offsets):
    """[B, HKV, 3, sh.items] int32: each work item's KV block and first / last (exclusive) entry of the
    inverted index (offsets [B, HKV, NB + 1]): each block's entries in runs of at most sh.item_entries, items
    of no entries (first == last, block 0) after the last."""
    counts = offsets[..., 1:] - offsets[..., :-1]
    pieces = ceil_div(counts, sh.item_entries)  # [B, HKV, NB]: work items of each block
    ends = jnp.cumsum(pieces, axis=-1)
    item = jnp.arange(sh.items, dtype=jnp.int32)
    block = jax.vmap(jax.vmap(lambda e: jnp.searchsorted(e, item, side="right")))(ends)
    used = block < sh.num_blocks
    block = jnp.minimum(block, sh.num_blocks - 1)
    at = lambda a, i: jnp.take_along_axis(a, i, axis=-1)
    piece = item - (at(ends, block) - at(pieces, block))  # the item's place among its block's
    first = at(offsets, block) + piece * sh.item_entries
    last = jnp.minimum(first + sh.item_entries, at(offsets, block + 1))
    zero = jnp.zeros((), jnp.int32)
    return jnp.stack([jnp.where(used, block, zero), jnp.where(used, first, zero), jnp.where(used, last, zero)],
                     axis=2).astype(jnp.int32)


def _chunked_index(sh: _Shapes, idx):
    """(idx in chunks of sh.chunk tokens [N, B, C, HKV, S], -1 past the end; each chunk's inverted index
    entries [N, B, HKV, C * S] and work items [N, B, HKV, 3, sh.items]; each chunk's first token [N])."""
    b, tp, hkv, n_sel = idx.shape
    n = ceil_div(tp, sh.chunk)
    idx = jnp.pad(idx, ((0, 0), (0, n * sh.chunk - tp), (0, 0), (0, 0)), constant_values=-1)
    chunks = idx.reshape(b, n, sh.chunk, hkv, n_sel).swapaxes(0, 1)
    entries, offsets = jax.vmap(lambda i: inverted_index(i, sh.num_blocks))(chunks)
    items = jax.vmap(functools.partial(_work_items, sh))(offsets)
    return chunks, entries, items, jnp.arange(n, dtype=jnp.int32) * sh.chunk


def _unchunk(x, tp: int):
    """[N, B, C, ...] -> [B, tp, ...]."""
    return x.swapaxes(0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :tp]


def _tile_loop(cfg: SelectionConfig, sh: _Shapes, item, q_ref, entries_ref, base_ref, pos_ref, k, tile_fn, init):
    """Folds tile_fn over the program's work item (tokens of the chunk that chose its KV block), `tile_rows`
    gathered rows at a time (the real rows of tile_rows // group_rows tokens). tile_fn(carry, q, rows, ok, out, s) gets
    the gathered q, their row numbers, which are real (rows past the last token repeat it), the partial
    rows to write ((token * HKV + head) * S + slot) * group_rows + g (trash rows where not ok) and the
    causally masked scores s [tile_rows, bs] (a token sees the keys up to its position pos_ref[token]). item:
    the program's (KV head, KV block, first entry, last entry)."""
    h, blk, first, last = item
    base = base_ref[0]
    cols = blk * cfg.block_size + jnp.arange(cfg.block_size)[None, :]
    per_step = sh.tile_rows // sh.group_rows
    r = jnp.arange(sh.tile_rows)
    pos, g = r // sh.group_rows, r % sh.group_rows

    def body(step, carry):
        e = first + step * per_step + pos
        ok = (e < last) & (pos < per_step)
        entry = entries_ref[jnp.minimum(e, last - 1)]
        local, slot = entry // sh.n_sel, entry % sh.n_sel
        rows = ((base + local) * sh.hkv + h) * sh.padded_rows + g
        out = jnp.where(ok, ((local * sh.hkv + h) * sh.n_sel + slot) * sh.group_rows + g, sh.partial_rows + r)
        q = q_ref[rows, :]
        s = jnp.where(cols <= pos_ref[base + local][:, None], dot(q, k, trans_b=True) * cfg.scale, -jnp.inf)
        return tile_fn(carry, q, rows, ok, out, s)

    return jax.lax.fori_loop(0, ceil_div(last - first, per_step), body, init)


def _program(cfg: SelectionConfig, items_ref, k_ref, v_ref):
    """(KV head, KV block, first entry, last entry) of this program's work item (read outside conditionals:
    interpret mode needs it), and its block's keys and values."""
    h, j = pl.program_id(1), pl.program_id(2)
    blk = items_ref[0, j]
    keys = pl.ds(pl.multiple_of(blk * cfg.block_size, cfg.block_size), cfg.block_size)
    return (h, blk, items_ref[1, j], items_ref[2, j]), k_ref[keys, :], v_ref[keys, :]


def _fwd_blocks_kernel(q_ref, k_ref, v_ref, entries_ref, items_ref, base_ref, pos_ref, o_ref, lse_ref, *,
                       cfg: SelectionConfig, sh: _Shapes):
    """Partial output and log-sum-exp of each (token, slot) of this program's work item."""
    item, k, v = _program(cfg, items_ref, k_ref, v_ref)

    @pl.when(item[3] > item[2])
    def _():

        def tile(carry, q, rows, ok, out, s):
            m = s.max(axis=1)
            m_safe = jnp.where(m == -jnp.inf, 0.0, m)
            p = jnp.exp(s - m_safe[:, None])
            l = p.sum(axis=1)
            l_safe = jnp.where(l > 0, l, 1.0)
            o_ref[out, :] = (dot(p.astype(v.dtype), v) / l_safe[:, None]).astype(o_ref.dtype)
            lse_ref[out] = jnp.where(l > 0, m_safe + jnp.log(l_safe), -jnp.inf)
            return carry

        _tile_loop(cfg, sh, item, q_ref, entries_ref, base_ref, pos_ref, k, tile, 0)


def _dkv_blocks_kernel(q_ref, k_ref, v_ref, entries_ref, items_ref, base_ref, pos_ref, do_ref, lse_ref,
                       delta_ref, dk_ref, dv_ref, ds_ref, *, cfg: SelectionConfig, sh: _Shapes):
    """This work item's part of its KV block's dk, dv (zeros for an empty item), and each of its (token,
    slot)'s ds [group_rows, bs] (in q's dtype, as it enters the dq product) for `_dq_kernel`."""
    item, k, v = _program(cfg, items_ref, k_ref, v_ref)

    def tile(carry, q, rows, ok, out, s):
        dk, dv = carry
        do = do_ref[rows, :]
        p = probs_from_lse(s, jnp.where(ok, lse_ref[rows], -jnp.inf))
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        ds = (p * (dot(do, v, trans_b=True) - jnp.where(ok, delta_ref[rows], 0.0)[:, None])).astype(q.dtype)
        ds_ref[out, :] = ds
        return dk + dot(ds, q, trans_a=True), dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _tile_loop(cfg, sh, item, q_ref, entries_ref, base_ref, pos_ref, k, tile, (zeros, zeros))
    dk_ref[...] = dk * cfg.scale
    dv_ref[...] = dv


def _dq_kernel(ds_ref, k_ref, idx_ref, dq_ref, *, cfg: SelectionConfig, sh: _Shapes):
    """dq of one (token, KV head)'s rows of a chunk: its chosen blocks' keys weighted by the ds the dk / dv
    kernel wrote, so K is read once per (token, block) and V not at all."""
    local, h, bs = pl.program_id(1), pl.program_id(2), cfg.block_size
    g = jnp.arange(sh.padded_rows)
    real = (g < sh.group_rows)[:, None]

    def body(j, dq):
        blk = idx_ref[j]
        k = k_ref[pl.ds(pl.multiple_of(jnp.maximum(blk, 0) * bs, bs), bs), :]
        rows = ((local * sh.hkv + h) * sh.n_sel + j) * sh.group_rows + jnp.minimum(g, sh.group_rows - 1)
        ds = jnp.where(real & (blk >= 0), ds_ref[rows, :], jnp.zeros((), ds_ref.dtype))  # empty slots: unwritten
        return dq + dot(ds, k)

    dq = jax.lax.fori_loop(0, sh.n_sel, body, jnp.zeros(dq_ref.shape, jnp.float32))
    dq_ref[...] = dq * cfg.scale


def _block_call(kernel, name: str, cfg: SelectionConfig, sh: _Shapes, q_flat, k, v, pos, chunk_index, extra_in,
                out_kinds):
    """pallas_call of a block-centric kernel over grid (B, HKV, work items) for one chunk: inputs q_flat, k,
    v (all keys of the program's KV head), the chunk's inverted index, work items and first token (entries,
    items, base), the tokens' positions pos [B, Tp], then `extra_in` as (array, kind);
    outputs of `out_kinds`, each (kind, dtype). Kinds: "rows" / "row_scalars" (all rows of the batch),
    "item" (this work item's [bs, D]), "partial" / "partial_scalars" / "partial_keys" (the chunk's partial
    rows by D, by 1 or by bs, then trash rows)."""
    b, n_rows, d = q_flat.shape
    n_partial = sh.partial_rows + sh.tile_rows
    specs = {
        "rows": ((n_rows, d), pl.BlockSpec((None, n_rows, d), lambda i, h, j: (i, 0, 0))),
        "row_scalars": ((n_rows,), pl.BlockSpec((None, n_rows), lambda i, h, j: (i, 0))),
        "keys": (None, pl.BlockSpec((None, k.shape[1], None, d), lambda i, h, j: (i, 0, h, 0))),
        "item": ((sh.hkv, sh.items, cfg.block_size, d),
                 pl.BlockSpec((None, None, None, cfg.block_size, d), lambda i, h, j: (i, h, j, 0, 0))),
        "partial": ((n_partial, d), pl.BlockSpec((None, n_partial, d), lambda i, h, j: (i, 0, 0))),
        "partial_scalars": ((n_partial,), pl.BlockSpec((None, n_partial), lambda i, h, j: (i, 0))),
        "partial_keys": ((n_partial, cfg.block_size),
                         pl.BlockSpec((None, n_partial, cfg.block_size), lambda i, h, j: (i, 0, 0))),
    }
    entries, items, base = chunk_index
    in_specs = [specs["rows"][1], specs["keys"][1], specs["keys"][1],
                pl.BlockSpec((None, None, sh.chunk * sh.n_sel), lambda i, h, j: (i, h, 0)),
                pl.BlockSpec((None, None, 3, sh.items), lambda i, h, j: (i, h, 0, 0)),
                pl.BlockSpec((1,), lambda i, h, j: (0,)),
                pl.BlockSpec((None, pos.shape[1]), lambda i, h, j: (i, 0))] + [specs[kind][1] for _, kind in extra_in]
    out_shape = [jax.ShapeDtypeStruct((b, *specs[kind][0]), dtype) for kind, dtype in out_kinds]
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg, sh=sh),
        grid=(b, sh.hkv, sh.items),
        in_specs=in_specs,
        out_specs=[specs[kind][1] for kind, _ in out_kinds],
        out_shape=out_shape,
        name=name,
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q_flat, k, v, entries, items, base[None], pos, *(x for x, _ in extra_in))


def _fwd_token_kernel(q_ref, k_ref, v_ref, idx_ref, pos_ref, o_ref, lse_ref, *, cfg: SelectionConfig, n_sel: int):
    """Output and log-sum-exp of one (token, KV head)'s rows: its chosen blocks folded by online softmax."""
    bs, pos = cfg.block_size, pos_ref[0]
    q = q_ref[...]

    def body(j, carry):
        acc, m, l = carry
        blk = idx_ref[j]
        keys = pl.ds(pl.multiple_of(jnp.maximum(blk, 0) * bs, bs), bs)
        cols = jnp.maximum(blk, 0) * bs + jnp.arange(bs)[None, :]
        s = jnp.where((cols <= pos) & (blk >= 0), dot(q, k_ref[keys, :], trans_b=True) * cfg.scale, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[:, None])
        corr = jnp.exp(m - m_safe)
        return acc * corr[:, None] + dot(p.astype(q.dtype), v_ref[keys, :]), m_new, l * corr + p.sum(axis=1)

    gr, d = q.shape
    init = (jnp.zeros((gr, d), jnp.float32), jnp.full((gr,), -jnp.inf, jnp.float32), jnp.zeros((gr,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, n_sel, body, init)
    l_safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def _fwd_tokens(cfg: SelectionConfig, q_rows, k, v, idx, pos):
    """(o [B, Tp, HKV, GR, D], lse [B, Tp, HKV, GR]): one program per (token, KV head)."""
    b, tp, hkv, gr, d = q_rows.shape
    n_sel, tk = idx.shape[-1], k.shape[1]
    rows = pl.BlockSpec((None, None, None, gr, d), lambda i, t, h: (i, t, h, 0, 0))
    whole_kv = pl.BlockSpec((None, tk, None, d), lambda i, t, h: (i, 0, h, 0))
    return pl.pallas_call(
        functools.partial(_fwd_token_kernel, cfg=cfg, n_sel=n_sel),
        grid=(b, tp, hkv),
        in_specs=[rows, whole_kv, whole_kv, pl.BlockSpec((None, None, None, n_sel), lambda i, t, h: (i, t, h, 0)),
                  pl.BlockSpec((None, 1), lambda i, t, h: (i, t))],
        out_specs=[rows, pl.BlockSpec((None, None, None, gr), lambda i, t, h: (i, t, h, 0))],
        out_shape=[jax.ShapeDtypeStruct(q_rows.shape, q_rows.dtype),
                   jax.ShapeDtypeStruct((b, tp, hkv, gr), jnp.float32)],
        name="nsa_selection_fwd_tokens",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(q_rows, k, v, idx, pos)


def _partials(sh: _Shapes, idx, x):
    """The chunk's partial rows [B, C, HKV, S, group_rows, ...] of x; idx [B, C, HKV, S] says which exist."""
    b, c = idx.shape[:2]
    return x[:, :sh.partial_rows].reshape(b, c, sh.hkv, sh.n_sel, sh.group_rows, *x.shape[2:])


def _pad_rows(sh: _Shapes, x, value=0.0):
    """[B, C, HKV, group_rows, ...] -> [B, C, HKV, GR, ...]."""
    widths = [(0, 0)] * x.ndim
    widths[3] = (0, sh.padded_rows - sh.group_rows)
    return jnp.pad(x, widths, constant_values=value)


def _fwd_chunk(cfg: SelectionConfig, sh: _Shapes, q_flat, k, v, pos, idx, chunk_index):
    """(o [B, C, HKV, GR, D], lse [B, C, HKV, GR]) of one chunk: block-centric partials merged by log-sum-exp
    over the slots. idx [B, C, HKV, S]: the chunk's chosen blocks. Partials of empty slots were never
    written: masked before any arithmetic."""
    o_p, lse_p = _block_call(_fwd_blocks_kernel, "nsa_selection_fwd", cfg, sh, q_flat, k, v, pos, chunk_index, [],
                             [("partial", q_flat.dtype), ("partial_scalars", jnp.float32)])
    lse_p = jnp.where((idx >= 0)[..., None], _partials(sh, idx, lse_p), -jnp.inf)
    m = lse_p.max(axis=3, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    w = jnp.exp(lse_p - m)
    den = w.sum(axis=3)
    o = jnp.where(w[..., None] > 0, w[..., None] * _partials(sh, idx, o_p).astype(jnp.float32), 0.0).sum(axis=3)
    o = o / jnp.where(den > 0, den, 1.0)[..., None]
    lse = jnp.where(den > 0, m[:, :, :, 0] + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    return _pad_rows(sh, o.astype(q_flat.dtype)), _pad_rows(sh, lse, -jnp.inf)


def _dkv_chunk(cfg: SelectionConfig, sh: _Shapes, q_flat, k, v, pos, do_flat, lse_flat, delta_flat, chunk_index,
               dk, dv):
    """(dk, dv) float32 plus this chunk's parts (each work item's added to its block), and the chunk's ds
    partial rows."""
    extra = [(do_flat, "rows"), (lse_flat, "row_scalars"), (delta_flat, "row_scalars")]
    dk_items, dv_items, ds = _block_call(_dkv_blocks_kernel, "nsa_selection_dkv", cfg, sh, q_flat, k, v, pos,
                                         chunk_index, extra, [("item", jnp.float32)] * 2 + [("partial_keys",
                                                                                             q_flat.dtype)])
    blocks = chunk_index[1][:, :, 0]  # [B, HKV, items]
    return _add_items(sh, dk, blocks, dk_items), _add_items(sh, dv, blocks, dv_items), ds


def _add_items(sh: _Shapes, acc, blocks, parts):
    """acc [B, NB * bs, HKV, D] plus the work items' parts [B, HKV, items, bs, D], each at its block
    (blocks [B, HKV, items])."""
    per_block = jax.vmap(jax.vmap(lambda blk, x: jax.ops.segment_sum(x, blk, num_segments=sh.num_blocks)))
    summed = per_block(blocks, parts)  # [B, HKV, NB, bs, D]
    return acc + summed.reshape(acc.shape[0], sh.hkv, -1, acc.shape[-1]).swapaxes(1, 2)


def _dq_chunk(cfg: SelectionConfig, sh: _Shapes, ds, k, idx):
    """dq [B, C, HKV, GR, D] float32 of a chunk's tokens choosing idx [B, C, HKV, S], from their ds rows."""
    b, c, hkv, n_sel = idx.shape
    tk, d = k.shape[1], k.shape[3]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, sh=sh),
        grid=(b, c, hkv),
        in_specs=[pl.BlockSpec((None, *ds.shape[1:]), lambda i, t, h: (i, 0, 0)),
                  pl.BlockSpec((None, tk, None, d), lambda i, t, h: (i, 0, h, 0)),
                  pl.BlockSpec((None, None, None, n_sel), lambda i, t, h: (i, t, h, 0))],
        out_specs=pl.BlockSpec((None, None, None, sh.padded_rows, d), lambda i, t, h: (i, t, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, c, hkv, sh.padded_rows, d), jnp.float32),
        name="nsa_selection_dq",
        **call_options(cfg.num_warps, cfg.num_stages),
    )(ds, k, idx)


def _forward(cfg: SelectionConfig, q_rows, k, v, idx, pos, *, index: bool = True):
    """(o_rows, lse, the chunked idx with the chunks' inverted indexes, which the backward reuses; None with
    index=False where the forward itself needs none)."""
    b, tp, hkv, gr, d = q_rows.shape
    sh = _shapes(cfg, q_rows, idx.shape[-1], k.shape[1] // cfg.block_size)
    chunks = _chunked_index(sh, idx) if index or not sh.token_forward else None
    if sh.token_forward:
        o, lse = _fwd_tokens(cfg, q_rows, k, v, idx, pos)
        return o, lse, chunks
    q_flat = q_rows.reshape(b, tp * hkv * gr, d)
    o, lse = jax.lax.map(lambda a: _fwd_chunk(cfg, sh, q_flat, k, v, pos, a[0], a[1:]), chunks)
    return _unchunk(o, tp), _unchunk(lse, tp), chunks


def _backward(cfg: SelectionConfig, res, do, dlse):
    q_rows, k, v, pos, o, lse, index = res
    b, tp, hkv, gr, d = q_rows.shape
    sh = _shapes(cfg, q_rows, index[0].shape[-1], k.shape[1] // cfg.block_size)
    delta = (o.astype(jnp.float32) * do.astype(jnp.float32)).sum(-1) - dlse
    flat = lambda x: x.reshape(b, tp * hkv * gr, *x.shape[4:])

    def chunk(carry, chunk):
        idx, *chunk_index = chunk
        dk, dv, ds = _dkv_chunk(cfg, sh, flat(q_rows), k, v, pos, flat(do), flat(lse), flat(delta), chunk_index,
                                *carry)
        return (dk, dv), _dq_chunk(cfg, sh, ds, k, idx)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(chunk, (zeros, zeros), index)
    return _unchunk(dq, tp).astype(q_rows.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def _positions(q_rows, pos):
    return jnp.broadcast_to(jnp.arange(q_rows.shape[1], dtype=jnp.int32), q_rows.shape[:2]) if pos is None else pos


def selection_attention(cfg: SelectionConfig, q_rows, k, v, idx, pos=None):
    """(o_rows [B, Tp, HKV, GR, D], lse [B, Tp, HKV, GR]). k, v [B, NB * bs, HKV, D]; idx [B, Tp, HKV, S]
    int32 chosen blocks (-1 = empty); a row attends keys j <= its token's position in its chosen blocks. pos
    [B, Tp] int32: the tokens' positions in the keys' sequence (None: 0 .. Tp - 1)."""
    return _selection(cfg, q_rows, k, v, idx, _positions(q_rows, pos))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _selection(cfg: SelectionConfig, q_rows, k, v, idx, pos):
    return _forward(cfg, q_rows, k, v, idx, pos, index=False)[:2]


def _selection_fwd(cfg, q_rows, k, v, idx, pos=None):
    pos = _positions(q_rows, pos)
    o, lse, index = _forward(cfg, q_rows, k, v, idx, pos)
    q_rows, k, v, pos, o, lse, index = saved(q_rows, k, v, pos, o, lse, index)
    return (o, lse), (q_rows, k, v, pos, o, lse, index)


def _selection_bwd(cfg, res, cts):
    dq, dk, dv = _backward(cfg, res, *cts)
    return dq, dk, dv, None, None


_selection.defvjp(_selection_fwd, _selection_bwd)


def selection_stages(cfg: SelectionConfig, q_rows, k, v, idx) -> dict[str, Callable[[], Any]]:
    """Jitted thunks of the selection's stages on these inputs, for timing (`launch/bench.py --breakdown`):
    "index" (the chunked inverted index), "index_and_fwd_kernel" (it and the forward block kernels' partials,
    no merge) and "bwd" (the backward alone, fed do = o)."""
    b, t, d = q_rows.shape[0], k.shape[1], q_rows.shape[-1]
    res = jax.jit(lambda *a: _selection_fwd(cfg, *a)[1])(q_rows, k, v, idx)
    sh = _shapes(cfg, q_rows, idx.shape[-1], t // cfg.block_size)
    index = jax.jit(lambda i: _chunked_index(sh, i))
    pos = _positions(q_rows, None)
    partials = lambda ci: _block_call(_fwd_blocks_kernel, "fwd", cfg, sh, q_rows.reshape(b, -1, d), k, v, pos, ci, [],
                                      [("partial", q_rows.dtype), ("partial_scalars", jnp.float32)])[1][:, :8]
    index_and_fwd = jax.jit(lambda i: jax.lax.map(lambda ci: partials(ci[1:]), _chunked_index(sh, i)))
    bwd = jax.jit(lambda r: _backward(cfg, r, r[4], jnp.zeros_like(r[5])))
    return {"index": lambda: index(idx), "index_and_fwd_kernel": lambda: index_and_fwd(idx), "bwd": lambda: bwd(res)}
