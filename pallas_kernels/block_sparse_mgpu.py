"""The query-block selection (`block_sparse.py`) as Mosaic GPU kernels for Hopper: wgmma from shared memory,
TMA copies, warp specialisation (FlashAttention-3's scheme, after jax's `pallas/ops/gpu/attention_mgpu.py`).

Forward and dq: one CTA per (query block, pair of query heads of one KV head, batch row). The pair shares the
query block's chosen KV blocks, so one memory warpgroup streams each chosen K / V block once (TMA, `_STAGES`
buffers) to two compute warpgroups, one per head; in the forward they take turns on the tensor cores (a
two-party barrier) so that one's softmax overlaps the other's matrix products. An odd group's last pair
computes its head twice and stores it once. dk / dv: one CTA per (KV block, KV head, batch row) over the
query blocks that chose it and the group's heads. Needs block_size 64, head_dim a multiple of 64, bf16 or
f16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_STAGES = 2  # K / V buffers in flight
_LOG2E = math.log2(math.e)


def _pair_head(pair, wg, group_size: int):
    """(slot of warpgroup wg's head in its group, that head: the group's last for an odd group's spare slot)
    for CTA axis `pair` = KV head * pairs + pair within the group."""
    pairs = -(-group_size // 2)
    slot_in_group = (pair % pairs) * 2 + wg
    return slot_in_group, pair // pairs * group_size + jnp.minimum(slot_in_group, group_size - 1)


def _positions(first_block, second_block):
    """WGMMA-layout [64, 64] positions of the rows (of first_block) and columns (of second_block)."""
    iota = lambda dim, blk: plgpu.broadcasted_iota(jnp.int32, (64, 64), dim, layout=plgpu.Layout.WGMMA) + blk * 64
    return iota(0, first_block), iota(1, second_block)


def supported(block_size: int, head_dim: int, dtype) -> bool:
    """Whether the Mosaic GPU forward takes these shapes."""
    return block_size == 64 and head_dim % 64 == 0 and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16),
                                                                             jnp.dtype(jnp.float16))


def block_sparse_forward_mgpu(q, k, v, idx, *, scale: float, group_size: int):
    """(o [B, Tp, HQ, D], natural-log lse [B, HQ, Tp] float32). q [B, Tp, HQ, D]; k, v [B, Tp, HKV, D]; idx
    [B, Tp // 64, HKV, S] int32 chosen blocks, valid ones first, then -1 (the query block's own block among
    them, so every query block has at least one)."""
    b, tp, hq, d = q.shape
    hkv, n_sel, bs, g = k.shape[2], idx.shape[-1], 64, group_size
    pairs = -(-g // 2)
    stages = min(_STAGES, n_sel)
    dtype = q.dtype
    scale_log2 = scale * _LOG2E

    def kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, scoped):
        (qo_smem2, k_smem, v_smem, lse_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
        bi, c, pair = lax.axis_index("batch"), lax.axis_index("q_blk"), lax.axis_index("pair")
        wg = lax.axis_index("wg")
        kvh = pair // pairs
        n = lax.fori_loop(0, n_sel, lambda i, n: n + (idx_ref[bi, c, kvh, i] >= 0).astype(jnp.int32),
                          jnp.int32(0))

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            slot_in_group, head = _pair_head(pair, wg, g)
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            rows = pl.ds(c * bs, bs)
            plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], qo_smem, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            m_i = plgpu.layout_cast(jnp.full((bs,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((bs,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bs, d), 0, jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)

            def step(i, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(i, stages)

                def scores(acc_ref):
                    plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                    take_turn()
                    return acc_ref[...]

                s = pl.run_scoped(scores, plgpu.ACC((bs, bs), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                blk = idx_ref[bi, c, kvh, i]
                r, col = _positions(c, blk)
                s = jnp.where(col <= r, s * scale_log2, -jnp.inf)  # log2 domain
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def values(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                    @pl.when(i + 1 < n)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(i + 1, stages)])

                acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, n, step, (acc, m_i, l_i))
            pl.when(wg == 0)(take_turn)
            acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
            qo_smem[...] = acc.astype(dtype)
            lse_smem[...] = (m_i + jnp.log2(l_i)) * math.log(2.0)
            plgpu.commit_smem()

            @pl.when(slot_in_group < g)
            def _store():
                plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[bi, rows, head])
                plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, head, rows])

            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(i, slot):
                keys = (bi, pl.ds(idx_ref[bi, c, kvh, i] * bs, bs), kvh)
                plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_ready.at[slot])

            for i in range(stages):
                pl.when(i < n)(lambda i=i: fetch(i, i))

            @pl.loop(stages, n)
            def _refill(i):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                fetch(i, slot)

    def entry(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref):
        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = [plgpu.SMEM((2, bs, d), dtype, transforms=tiled),
                plgpu.SMEM((stages, bs, d), dtype, transforms=tiled),
                plgpu.SMEM((stages, bs, d), dtype, transforms=tiled),
                plgpu.SMEM((2, bs), jnp.float32)]
        pl.run_scoped(
            lambda *scoped: kernel(q_ref, k_ref, v_ref, idx_ref, o_ref, lse_ref, scoped),
            smem,
            (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=2)),
            (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=2),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, dtype), jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)),
        grid=(hkv * pairs, tp // bs, b),
        grid_names=("pair", "q_blk", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, idx)


def block_sparse_dq_mgpu(q, k, v, idx, do, lse, delta, *, scale: float, group_size: int):
    """dq [B, Tp, HQ, D] in q's dtype. lse, delta [B, HQ, Tp] float32 (natural log; delta = rowsum(o * do)
    minus the lse cotangent); the rest as `block_sparse_forward_mgpu`. One CTA per (query block, head pair,
    batch row) as in the forward; a warp-specialised pipeline streams the chosen K / V blocks (an empty slot
    re-reads the query block's own block and is masked out)."""
    b, tp, hq, d = q.shape
    hkv, n_sel, bs, g = k.shape[2], idx.shape[-1], 64, group_size
    pairs = -(-g // 2)
    dtype = q.dtype
    scale_log2 = scale * _LOG2E
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kernel(q_ref, k_ref, v_ref, idx_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, ready):
        bi, c, pair, wg = (lax.axis_index(a) for a in ("batch", "q_blk", "pair", "wg"))
        kvh = pair // pairs
        q_smem2, do_smem2, lse_smem2, delta_smem2 = smem
        rows = pl.ds(c * bs, bs)

        def compute(pipeline):
            slot_in_group, head = _pair_head(pair, wg, g)
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
            for src, dst, bar in ((q_ref.at[bi, rows, head], q_smem, ready[0]),
                                  (do_ref.at[bi, rows, head], do_smem, ready[1]),
                                  (lse_ref.at[bi, head, rows], lse_smem2.at[wg], ready[2]),
                                  (delta_ref.at[bi, head, rows], delta_smem2.at[wg], ready[3])):
                plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])
            for bar in ready:
                plgpu.barrier_wait(bar.at[wg])
            lse2 = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) * _LOG2E
            dlt = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((bs, d), 0, jnp.float32), plgpu.Layout.WGMMA)
            acc, _, _ = pipeline((acc, lse2, dlt))
            q_smem[...] = (acc * scale).astype(dtype)
            plgpu.commit_smem()

            @pl.when(slot_in_group < g)
            def _store():
                plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, head])

            plgpu.wait_smem_to_gmem(0)

        def step(indices, k_smem, v_smem, k_free, v_free, carry):
            acc, lse2, dlt = carry
            i = indices[0]
            q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, k_smem.transpose((1, 0)))
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((bs, bs), jnp.float32))
            blk = idx_ref[bi, c, kvh, i]
            r, col = _positions(c, blk)
            s = jnp.where((blk >= 0) & (col <= r), s * scale_log2, -jnp.inf)
            p = jnp.exp2(s - lax.broadcast_in_dim(lse2, s.shape, [0]))

            def dprobs(acc_ref):
                plgpu.wgmma(acc_ref, do_smem, v_smem.transpose((1, 0)))
                return acc_ref[...]

            dp = pl.run_scoped(dprobs, plgpu.ACC((bs, bs), jnp.float32))
            plgpu.barrier_arrive(v_free)
            ds = p * (dp - lax.broadcast_in_dim(dlt, dp.shape, [0]))

            def accumulate(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem)

            acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(k_free)
            return acc, lse2, dlt

        def chosen(i):
            blk = idx_ref[bi, c, kvh, i]
            return jnp.where(blk >= 0, blk, c), 0

        pipeline = plgpu.emit_pipeline_warp_specialized(
            step, grid=(n_sel,), max_concurrent_steps=min(_STAGES, n_sel), num_compute_wgs=2,
            memory_registers=40, wg_axis="wg", manual_consumed_barriers=True, compute_context=compute,
            in_specs=[plgpu.BlockSpec((bs, d), chosen, transforms=tiled)] * 2)
        pipeline(k_ref.at[bi, :, kvh, :], v_ref.at[bi, :, kvh, :])

    tile = plgpu.SMEM((2, bs, d), dtype, transforms=tiled)
    rows_f32 = plgpu.SMEM((2, bs), jnp.float32)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=[(tile, tile, rows_f32, rows_f32), (plgpu.Barrier(num_barriers=2),) * 4],
        grid=(hkv * pairs, tp // bs, b),
        grid_names=("pair", "q_blk", "batch"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, idx, do, lse, delta)


def block_sparse_dkv_mgpu(q, k, v, entries, offsets, do, lse, delta, *, scale: float, group_size: int,
                          n_sel: int):
    """(dk, dv) [B, Tp, HKV, D] in k's dtype. One CTA per (KV block, KV head, batch row): a compute
    warpgroup keeps the block's K / V in shared memory and accumulates over its steps, one per (query block
    that chose it, query head of the group); a memory warpgroup streams each step's q / do tiles and lse /
    delta rows. entries [B, HKV, NQB * S] (query block * S + slot, grouped by chosen block), offsets [B, HKV,
    NB + 1] (`selection.inverted_index`); the rest as `block_sparse_dq_mgpu`."""
    b, tp, hq, d = q.shape
    hkv, bs, g = k.shape[2], 64, group_size
    dtype = k.dtype
    scale_log2 = scale * _LOG2E
    stages = _STAGES
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

    def kernel(q_ref, k_ref, v_ref, entries_ref, offsets_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem,
               bars):
        k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = smem
        kv_ready, q_ready, do_ready, lse_ready, delta_ready, step_free = bars
        bi, j, kvh, wg = (lax.axis_index(a) for a in ("batch", "kv_blk", "kv_head", "wg"))
        first = offsets_ref[bi, kvh, j]
        n_steps = (offsets_ref[bi, kvh, j + 1] - first) * g
        keys = pl.ds(j * bs, bs)

        def query_of(s):
            """(query block, query head) of step s."""
            return entries_ref[bi, kvh, first + s // g] // n_sel, kvh * g + lax.rem(s, g)

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(240, action="increase")
            plgpu.copy_gmem_to_smem(k_ref.at[bi, keys, kvh], k_smem, kv_ready.at[0])
            plgpu.copy_gmem_to_smem(v_ref.at[bi, keys, kvh], v_smem, kv_ready.at[1])
            plgpu.barrier_wait(kv_ready.at[0])
            plgpu.barrier_wait(kv_ready.at[1])
            zeros = plgpu.layout_cast(jnp.full((bs, d), 0, jnp.float32), plgpu.Layout.WGMMA)

            def step(s, carry):
                dk, dv = carry
                slot = lax.rem(s, stages)
                c, _ = query_of(s)
                for bar in (q_ready, do_ready, lse_ready, delta_ready):
                    plgpu.barrier_wait(bar.at[slot])

                def scores_t(acc_ref):
                    plgpu.wgmma(acc_ref, k_smem, q_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                s_t = pl.run_scoped(scores_t, plgpu.ACC((bs, bs), jnp.float32))  # [keys, queries]
                key, row = _positions(j, c)
                lse2 = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0)) * _LOG2E
                s_t = jnp.where(key <= row, s_t * scale_log2, -jnp.inf)
                p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse2, s_t.shape, [1]))

                def values_and_dprobs(refs):
                    dv_ref_, dp_ref_ = refs
                    plgpu.wgmma(dv_ref_, p_t.astype(dtype), do_smem.at[slot])
                    plgpu.wgmma(dp_ref_, v_smem, do_smem.at[slot].transpose((1, 0)))

                blank = plgpu.layout_cast(jnp.full((bs, bs), 0, jnp.float32), plgpu.Layout.WGMMA)
                dv, dp_t = pl.run_state(values_and_dprobs)((plgpu.ACC.init(dv), plgpu.ACC.init(blank)))
                dlt = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(dlt, dp_t.shape, [1]))

                def keys_grad(acc_ref):
                    plgpu.wgmma(acc_ref, ds_t.astype(dtype), q_smem.at[slot])

                dk = pl.run_state(keys_grad)(plgpu.ACC.init(dk))
                plgpu.barrier_arrive(step_free.at[slot])
                return dk, dv

            dk, dv = lax.fori_loop(0, n_steps, step, (zeros, zeros))
            k_smem[...] = (dk * scale).astype(dtype)
            v_smem[...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[bi, keys, kvh])
            plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[bi, keys, kvh])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, n_steps)
            def _fetch(s):
                slot = lax.rem(s, stages)
                c, head = query_of(s)
                rows = pl.ds(c * bs, bs)

                @pl.when(s >= stages)
                def _():
                    plgpu.barrier_wait(step_free.at[slot])

                plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, head], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, head], do_smem.at[slot], do_ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[bi, head, rows], lse_smem.at[slot], lse_ready.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[bi, head, rows], delta_smem.at[slot], delta_ready.at[slot])

    block = plgpu.SMEM((bs, d), dtype, transforms=tiled)
    staged = plgpu.SMEM((stages, bs, d), dtype, transforms=tiled)
    staged_rows = plgpu.SMEM((stages, bs), jnp.float32)
    ready = plgpu.Barrier(num_barriers=stages)
    return plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=[(block, block, staged, staged, staged_rows, staged_rows),
                       (plgpu.Barrier(num_barriers=2), ready, ready, ready, ready, ready)],
        grid=(tp // bs, hkv, b),
        grid_names=("kv_blk", "kv_head", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(q, k, v, entries, offsets, do, lse, delta)
