"""Forward of the query-block selection (`block_sparse.py`) as a Mosaic GPU kernel for Hopper: wgmma from
shared memory, TMA copies, warp specialisation (FlashAttention-3's scheme, after jax's
`pallas/ops/gpu/attention_mgpu.py`).

One CTA per (query block, pair of query heads of one KV head, batch row). The pair shares the query block's
chosen KV blocks, so one memory warpgroup streams each chosen K / V block once (TMA, `_STAGES` buffers) to two
compute warpgroups, one per head, which take turns on the tensor cores (a two-party barrier) so that one's
softmax overlaps the other's matrix products. An odd group's last pair computes its head twice and stores it
once. Needs block_size 64, head_dim a multiple of 64, bf16 or f16. The backward stays the Triton kernels'.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

_STAGES = 2  # K / V buffers in flight
_LOG2E = math.log2(math.e)


def supported(block_size: int, head_dim: int, dtype) -> bool:
    """Whether the Mosaic GPU forward takes these shapes."""
    return block_size == 64 and head_dim % 64 == 0 and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16),
                                                                             jnp.dtype(jnp.float16))


def block_sparse_forward_mgpu(q, k, v, idx, *, scale: float, group_size: int):
    """(o [B, Tp, HQ, D], natural-log lse [B, HQ, Tp] float32). q [B, Tp, HQ, D]; k, v [B, Tp, HKV, D]; idx
    [B, Tp // 64, HKV, S] int32 chosen blocks, valid ones first, then -1 (the query block's own block among
    them, so every query block has at least one)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

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
            slot_in_group = (pair % pairs) * 2 + wg
            head = kvh * g + jnp.minimum(slot_in_group, g - 1)
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
                r = plgpu.broadcasted_iota(jnp.int32, (bs, bs), 0, layout=plgpu.Layout.WGMMA) + c * bs
                col = plgpu.broadcasted_iota(jnp.int32, (bs, bs), 1, layout=plgpu.Layout.WGMMA) + blk * bs
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
