"""NSA attention benchmark: our Pallas NSA vs cuDNN dense causal (JAX) vs fla-core `parallel_nsa` with the
VideoNSA 64-padded heads (torch), one table from one run.

Mode videonsa times the released layer's whole attention core (`nsa_jax.videonsa.videonsa_attention`: NSA over
the vision rows plus the dense branch) on a video prompt's routing: 20 text rows, then frames of 273 tokens
whose first token is routed as text (its mRoPE ids are equal), then 40 text rows.

  python -m launch.bench --seq_lens=8192,16384,32768,65536,131072 --heads=28 --kv_heads=4 --head_dim=128 \
      --passes=fwd,fwd_bwd --out=bench.json

Times are medians of `--iters` timed calls after warm-up (JAX: host clock around `block_until_ready`;
torch: CUDA events). TFLOP/s count the attention FLOPs each method really does (4 * D per query-key pair
and head; backward counted as 2.5x forward): dense causal T(T+1)/2 pairs; NSA the compressed blocks seen,
the selected keys and the window keys (the top-k scoring pass not counted).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from pallas_kernels import nsa_attention, nsa_variant
from pallas_kernels.backend import GPU_LOWERINGS, gpu_lowering, gpu_lowering_name

FLAGS = flags.FLAGS
flags.DEFINE_list("seq_lens", ["8192", "16384", "32768", "65536", "131072"], "sequence lengths")
flags.DEFINE_integer("batch", 1, "batch size")
flags.DEFINE_integer("heads", 28, "query heads")
flags.DEFINE_integer("kv_heads", 4, "KV heads")
flags.DEFINE_integer("head_dim", 128, "head dim")
flags.DEFINE_integer("block_size", 64, "NSA block size")
flags.DEFINE_integer("block_count", 32, "NSA selected blocks")
flags.DEFINE_integer("window_size", 256, "NSA sliding window")
flags.DEFINE_enum("mode", "native", ["native", "videonsa", "query_block"], "NSA mode of our kernels "
                  "(query_block: mode native with selection='query_block', SPEC §4's opt-in)")
flags.DEFINE_enum("gpu_lowering", "auto", list(GPU_LOWERINGS), "mode query_block: the selection's GPU "
                  "kernels (mosaic_gpu: Hopper wgmma; auto: mosaic_gpu on a Hopper GPU, else triton)")
flags.DEFINE_list("passes", ["fwd", "fwd_bwd"], "fwd and / or fwd_bwd")
flags.DEFINE_list("methods", ["nsa", "cudnn", "fla"], "which methods to time")
flags.DEFINE_integer("iters", 5, "timed calls (median)")
flags.DEFINE_integer("warmup", 2, "untimed calls first")
flags.DEFINE_string("out", "", "write the results as JSON here (rewritten after every method, so a run cut off "
                    "keeps what it measured)")
flags.DEFINE_float("time_budget_s", 0.0, "stop starting new measurements after this many seconds (0: no limit); "
                   "those left are recorded as skipped")
flags.DEFINE_bool("breakdown", False, "also time each stage of our NSA separately: modes native, query_block "
                  "forward and forward+backward; mode videonsa forward, with its dense branch")
flags.DEFINE_list("flash_configs", [], "breakdown: compression and window kernel settings to time besides the "
                  "default, each block_q:block_k:num_warps:num_stages (window: block_k = block_q)")
flags.DEFINE_list("selection_configs", ["4:2"], "breakdown: selection kernel settings to time, each "
                  "num_warps:num_stages (mode native: optionally :program_tiles; in mode query_block also "
                  "mosaic_gpu: the Hopper kernels), forward and "
                  "forward+backward; in mode native the first also its inverted index, forward kernels and "
                  "backward alone; mode videonsa: the forward of the default and of each other setting")


def _flops_fwd(method: str, t: int) -> float:
    b, h, d = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
    bs, s, w = FLAGS.block_size, FLAGS.block_count, FLAGS.window_size
    i = np.arange(t, dtype=np.float64)
    if method == "cudnn":
        pairs = t * (t + 1) / 2
    else:
        causal = FLAGS.mode != "videonsa" or method == "fla"
        cmp = np.maximum((i + 1) // bs, 1) if causal else np.ceil(t / bs) - i // bs
        slc = np.minimum(s, i // bs + 1) * bs
        swa = np.minimum(w, i + 1) if method == "nsa" else 0
        heads_ratio = 64 / h if method == "fla" else (2.0 if FLAGS.mode == "videonsa" else 1.0)
        pairs = (cmp.sum() + slc.sum() + np.sum(swa)) * heads_ratio
    return 4.0 * d * b * h * pairs


def _time_jax(fn, *args) -> float:
    for _ in range(FLAGS.warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(FLAGS.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _jax_inputs(t: int):
    b, hq, hkv, d = FLAGS.batch, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
    ks = jax.random.split(jax.random.key(t), 7)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.bfloat16)
    gates = [jax.nn.sigmoid(jax.random.normal(kk, (b, t, hq))).astype(jnp.bfloat16) for kk in ks[3:6]]
    return q, k, v, gates, jax.random.normal(ks[6], (b, t, hq, d), jnp.bfloat16)


def _nsa_fn():
    kw = dict(block_size=FLAGS.block_size, block_count=FLAGS.block_count, window_size=FLAGS.window_size,
              impl="pallas")
    if FLAGS.mode == "query_block":
        kw.update(selection="query_block")
    else:
        kw.update(nsa_variant(FLAGS.mode).flags())

    def nsa(q, k, v, gc, gs, gw):
        with gpu_lowering(FLAGS.gpu_lowering):
            return nsa_attention(q, k, v, gc, gs, gw, **kw)

    return nsa


def _videonsa_fn(t: int):
    from nsa_jax.config import NSAConfig
    from nsa_jax.videonsa import videonsa_attention

    nsa = NSAConfig(mode="videonsa", block_size=FLAGS.block_size, block_count=FLAGS.block_count,
                    window_size=FLAGS.window_size, impl="pallas")
    vision = _video_routing(t)
    return lambda q, k, v, gc, gs, gw: videonsa_attention(nsa, q, k, v, jnp.stack([gc, gs, gw], -1), vision)


def _video_routing(t: int) -> jax.Array:
    """[B, T] vision rows of a video prompt: 20 text rows, frames of 273 tokens whose first routes as text, 40
    text rows."""
    vision = np.ones((FLAGS.batch, t), bool)
    vision[:, :20] = vision[:, -40:] = False
    vision[:, 20:t - 40:273] = False
    return jnp.asarray(vision)


def _cudnn_fn():
    return lambda q, k, v, *_: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _time_jax_method(make, t: int, passes: str) -> float:
    q, k, v, gates, w = _jax_inputs(t)
    f = make()
    if passes == "fwd":
        return _time_jax(jax.jit(f), q, k, v, *gates)
    loss = lambda *a: (f(*a).astype(jnp.float32) * w).sum()
    return _time_jax(jax.jit(jax.grad(loss, argnums=tuple(range(6)))), q, k, v, *gates)


def _time_fla(t: int, passes: str) -> float:
    """fla-core parallel_nsa (compression + selection, as VideoNSA calls it minus the window) with VideoNSA's
    padded heads: [q, q, zeros] = 64 heads over the KV heads."""
    import torch
    from fla.ops.nsa import parallel_nsa

    b, hq, hkv, d = FLAGS.batch, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim
    gp = 1 << (-(-2 * hq // hkv) - 1).bit_length()
    hp = gp * hkv
    dev = torch.device("cuda")
    torch.manual_seed(t)
    q = torch.randn(b, t, hq, d, device=dev, dtype=torch.bfloat16)
    qp = torch.cat([q, q, torch.zeros(b, t, hp - 2 * hq, d, device=dev, dtype=q.dtype)], 2).requires_grad_()
    k = torch.randn(b, t, hkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, t, hkv, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g_cmp, g_slc = (torch.rand(b, t, hp, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn(b, t, hp, d, device=dev, dtype=torch.bfloat16)

    def run():
        o = parallel_nsa(qp, k, v, g_cmp, g_slc, None, block_counts=FLAGS.block_count,
                         block_size=FLAGS.block_size, window_size=0)
        if passes == "fwd_bwd":
            o.backward(do)

    ctx = torch.enable_grad() if passes == "fwd_bwd" else torch.no_grad()
    with ctx:
        for _ in range(FLAGS.warmup):
            run()
        times = []
        for _ in range(FLAGS.iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class _Stages:
    """The stage timings' shared inputs (`_stage_inputs`)."""
    q: jax.Array  # [B, T, HQ, D]; mode videonsa: padded to the kernels' rows, as nsa_attention pads them
    k: jax.Array
    v: jax.Array
    lo: jax.Array  # segment bounds of the rows
    hi: jax.Array
    layout: Any
    kc: jax.Array  # block means of k / v in q's dtype, padded to the compression's key tiles
    vc: jax.Array
    kc32: jax.Array  # float32 block means of k, padded likewise (the top-k scores)
    cmp_cfg: Any
    swa_cfg: Any
    lse: jax.Array  # the compression's lse
    topk: Callable  # (q, kc32, lse) -> chosen blocks
    idx: jax.Array


def _stage_inputs(t: int) -> _Stages:
    """Inputs, kernel settings, compression lse and chosen blocks for the stages of `--mode` (videonsa: the
    released layout, non-causal compression, fla's top-k with the released lse reading)."""
    from pallas_kernels.layout import head_layout
    from pallas_kernels.masked_flash import MaskedFlashConfig, masked_flash
    from pallas_kernels.nsa_pallas import choose_blocks, pad_to, padded_segment_bounds, tile_size
    from pallas_kernels.reference import mean_pool
    from pallas_kernels.segments import segment_bounds

    videonsa = FLAGS.mode == "videonsa"
    q, k, v, _, _ = _jax_inputs(t)
    b, _, hq, d = q.shape
    bs, scale = FLAGS.block_size, d ** -0.5
    layout = head_layout("videonsa" if videonsa else "gqa", hq, k.shape[2])
    bq = tile_size(t)
    kc32 = mean_pool(k, bs)
    bk = tile_size(kc32.shape[1])
    nbp = -(-kc32.shape[1] // bk) * bk
    kc, vc = (pad_to(x.astype(q.dtype), 1, nbp) for x in (kc32, mean_pool(v, bs)))
    kc32 = pad_to(kc32, 1, nbp)
    if videonsa:
        tp = -(-t // max(bq, bs)) * max(bq, bs)
        lo, hi = padded_segment_bounds(None, b, t, tp)
        q, k, v = (pad_to(x, 1, tp) for x in (q, k, v))
    else:
        lo, hi = segment_bounds(jnp.zeros((b, t), jnp.int32))
    heads = dict(num_q_heads=hq, virtual_heads=layout.virtual_heads, group_size=layout.group_size, scale=scale)
    cmp_cfg = MaskedFlashConfig("cmp_full" if videonsa else "cmp_causal", block_size=bs, block_q=bq, block_k=bk,
                                **heads)
    swa_cfg = MaskedFlashConfig("window", window=FLAGS.window_size, block_q=bq, block_k=bq, **heads)
    _, lse = jax.jit(lambda *a: masked_flash(cmp_cfg, *a))(q, kc, vc, lo, hi)
    topk = jax.jit(lambda q_, kc_, lse_: choose_blocks(
        q_, kc_, lse_, lo, hi, t=t, layout=layout, block_size=bs, block_count=FLAGS.block_count,
        tie_break="fla" if videonsa else "recent", selection="query_block" if FLAGS.mode == "query_block" else "token",
        causal=not videonsa, scale=scale, block_q=bq, lse_reading="released" if videonsa else "per_head"))
    return _Stages(q, k, v, lo, hi, layout, kc, vc, kc32, cmp_cfg, swa_cfg, lse, topk, topk(q, kc32, lse))


def _grouped_rows(q: jax.Array, layout) -> jax.Array:
    """q's virtual rows grouped per KV head [B, T, HKV, GR, D] (zero rows where a group is padded), as the
    per-token selection kernel takes them."""
    from pallas_kernels.nsa_pallas import group_rows

    rows = np.asarray(group_rows(layout))
    return jnp.where(jnp.asarray(rows >= 0)[None, None, :, :, None], q[:, :, np.maximum(rows, 0) % q.shape[2]], 0)


def _breakdown(t: int) -> dict:
    """Milliseconds of each stage of our NSA (modes native and query_block): compression, window, top-k,
    selection, forward and forward+backward."""
    from pallas_kernels.block_sparse import BlockSparseConfig, block_sparse_attention
    from pallas_kernels.masked_flash import masked_flash
    from pallas_kernels.nsa_pallas import pad_to

    st = _stage_inputs(t)
    q, k, v, lo, hi, layout = st.q, st.k, st.v, st.lo, st.hi, st.layout
    bs, scale = FLAGS.block_size, q.shape[-1] ** -0.5

    def fwd_bwd(f, *args):
        """Time of forward + backward of f's first output for its first three arguments."""
        loss = lambda *a: f(*a)[0].astype(jnp.float32).sum()
        return _time_jax(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), *args)

    times = {"topk": _time_jax(st.topk, q, st.kc32, st.lse)}
    for spec in [""] + FLAGS.flash_configs:
        tag = f"[{spec}]" if spec else ""
        if spec:
            fq, fk, warps, stages = (int(x) for x in spec.split(":"))
            tiles = dict(num_warps=warps, num_stages=stages)
            cfgs = (dataclasses.replace(st.cmp_cfg, block_q=fq, block_k=fk, **tiles),
                    dataclasses.replace(st.swa_cfg, block_q=fq, block_k=fq, **tiles))
        else:
            cfgs = (st.cmp_cfg, st.swa_cfg)
        kc_, vc_ = (pad_to(x, 1, -(-x.shape[1] // cfgs[0].block_k) * cfgs[0].block_k) for x in (st.kc, st.vc))
        branches = (("compression", cfgs[0], (q, kc_, vc_, lo, hi)), ("window", cfgs[1], (q, k, v, lo, hi)))
        for name, cfg, args in branches:
            f = lambda *a, cfg=cfg: masked_flash(cfg, *a)
            times[name + tag] = _time_jax(jax.jit(f), *args)
            times[f"{name}_fwd_bwd{tag}"] = fwd_bwd(f, *args)
    if FLAGS.mode == "query_block":
        for spec in FLAGS.selection_configs:
            if spec == "mosaic_gpu":
                cfg = BlockSparseConfig(bs, scale, layout.group_size, lowering="mosaic_gpu")
            else:
                warps, stages = (int(x) for x in spec.split(":"))
                cfg = BlockSparseConfig(bs, scale, layout.group_size, num_warps=warps, num_stages=stages)
            _time_selection(times, spec, lambda *a, cfg=cfg: block_sparse_attention(cfg, *a), fwd_bwd, q, k, v,
                            st.idx)
    else:
        times.update(_token_selection_breakdown(t, layout, _grouped_rows(q, layout), k, v, st.idx, fwd_bwd))
    return times


def _videonsa_breakdown(t: int) -> dict:
    """Milliseconds of each forward stage of mode videonsa's attention core on the bench's routing: compression
    (non-causal, 2 x HQ virtual rows), window, top-k (fla's network, the released lse reading), selection
    (each KV head's group of virtual rows) and the dense branch (closed form); the row's nsa time is the
    whole core."""
    from nsa_jax.videonsa import videonsa_dense_branch
    from pallas_kernels.masked_flash import masked_flash
    from pallas_kernels.selection import SelectionConfig, selection_attention

    st = _stage_inputs(t)
    q, k, v, lo, hi, layout = st.q, st.k, st.v, st.lo, st.hi, st.layout
    vision = _video_routing(t)
    times = {
        "compression": _time_jax(jax.jit(lambda *a: masked_flash(st.cmp_cfg, *a)), q, st.kc, st.vc, lo, hi),
        "window": _time_jax(jax.jit(lambda *a: masked_flash(st.swa_cfg, *a)), q, k, v, lo, hi),
        "topk": _time_jax(st.topk, q, st.kc32, st.lse),
        "dense_branch": _time_jax(jax.jit(lambda *a: videonsa_dense_branch(*a, vision)), q[:, :t], k[:, :t], v[:, :t]),
    }
    # The selection forward with the kernels' defaults ("selection"), then each --selection_configs setting
    # (warps:stages) apart from the default.
    default = f"{SelectionConfig.num_warps}:{SelectionConfig.num_stages}"
    for spec in ["default"] + [s for s in FLAGS.selection_configs if s != default]:
        kw = {} if spec == "default" else dict(zip(("num_warps", "num_stages"), map(int, spec.split(":")[:2])))
        cfg = SelectionConfig(FLAGS.block_size, q.shape[-1] ** -0.5, rows_per_token=layout.group_size, **kw)
        times["selection" if spec == "default" else f"selection[{spec}]"] = _time_jax(
            jax.jit(lambda *a, cfg=cfg: selection_attention(cfg, *a)), _grouped_rows(q, layout), k, v, st.idx)
    return times


def _time_selection(times: dict, spec: str, f, fwd_bwd, *args) -> bool:
    """Adds the forward and forward+backward times of selection setting `spec` to `times`; a setting that does
    not fit the device is reported there, not fatal (False)."""
    try:
        times[f"selection[{spec}]"] = _time_jax(jax.jit(f), *args)
        times[f"selection_fwd_bwd[{spec}]"] = fwd_bwd(f, *args)
    except Exception as e:  # noqa: BLE001
        times[f"selection[{spec}]"] = f"{type(e).__name__}: {str(e)[:200]}"
        return False
    return True


def _token_selection_breakdown(t, layout, q_rows, k, v, idx, fwd_bwd) -> dict:
    """Per-token selection kernel: forward and forward+backward per `--selection_configs` setting; for the
    first also its inverted index, forward kernels and backward alone."""
    from pallas_kernels.selection import SelectionConfig, selection_attention, selection_stages

    bs, d = FLAGS.block_size, q_rows.shape[-1]
    times = {}
    for n, spec in enumerate(FLAGS.selection_configs):
        warps, stages, *tiles = (int(x) for x in spec.split(":"))
        cfg = SelectionConfig(bs, d ** -0.5, num_warps=warps, num_stages=stages, rows_per_token=layout.group_size)
        if tiles:
            cfg = dataclasses.replace(cfg, program_tiles=tiles[0])
        if not _time_selection(times, spec, lambda *a, cfg=cfg: selection_attention(cfg, *a), fwd_bwd, q_rows, k,
                               v, idx):
            continue
        if n == 0:
            for stage, run in selection_stages(cfg, q_rows, k, v, idx).items():
                times[f"selection_{stage}"] = _time_jax(run)
    return times


def main(argv):
    del argv
    rows = []
    device = str(jax.devices()[0].device_kind)
    start = time.perf_counter()

    def write(current):
        if FLAGS.out:
            with open(FLAGS.out, "w") as f:
                json.dump({"device": device, "flags": FLAGS.flag_values_dict(), "rows": rows + current}, f, indent=1,
                          default=str)

    for t in map(int, FLAGS.seq_lens):
        for passes in FLAGS.passes:
            row = {"T": t, "pass": passes}
            for method in FLAGS.methods:
                if FLAGS.time_budget_s and time.perf_counter() - start > FLAGS.time_budget_s:
                    row[method] = {"error": f"skipped: --time_budget_s={FLAGS.time_budget_s:g} ran out"}
                    continue
                write([row])
                try:
                    if method == "nsa":
                        make = (lambda: _videonsa_fn(t)) if FLAGS.mode == "videonsa" else _nsa_fn
                        ms = _time_jax_method(make, t, passes)
                    elif method == "cudnn":
                        ms = _time_jax_method(_cudnn_fn, t, passes)
                    else:
                        ms = _time_fla(t, passes)
                except Exception as e:  # noqa: BLE001 - a method that cannot run is reported, not fatal
                    row[method] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                    print(f"T={t} {passes} {method}: {row[method]['error']}", flush=True)
                    continue
                flops = _flops_fwd(method, t) * (3.5 if passes == "fwd_bwd" else 1.0)
                row[method] = {"ms": ms, "tflops": flops / ms / 1e9}
                print(f"T={t} {passes} {method}: {ms:.2f} ms, {flops / ms / 1e9:.1f} TFLOP/s", flush=True)
            if FLAGS.breakdown and passes == "fwd":
                row["breakdown_ms"] = _videonsa_breakdown(t) if FLAGS.mode == "videonsa" else _breakdown(t)
                print(f"T={t} fwd stages (ms): {row['breakdown_ms']}", flush=True)
            rows.append(row)
            write([])
    with gpu_lowering(FLAGS.gpu_lowering):
        lowering = f" ({gpu_lowering_name()} selection)" if FLAGS.mode == "query_block" else ""
    print(f"\ndevice: {device}, mode {FLAGS.mode}{lowering}, B={FLAGS.batch} HQ={FLAGS.heads} "
          f"HKV={FLAGS.kv_heads} D={FLAGS.head_dim} bs={FLAGS.block_size} S={FLAGS.block_count} "
          f"W={FLAGS.window_size}, bf16")
    header = "| T | pass | " + " | ".join(f"{m} ms (TFLOP/s)" for m in FLAGS.methods) + " | cudnn/nsa | fla/nsa |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for row in rows:
        cells = [f"{row[m]['ms']:.2f} ({row[m]['tflops']:.0f})" if "ms" in row.get(m, {}) else "n/a"
                 for m in FLAGS.methods]
        ratio = lambda m: (f"{row[m]['ms'] / row['nsa']['ms']:.2f}x"
                           if "ms" in row.get(m, {}) and "ms" in row.get("nsa", {}) else "n/a")
        print(f"| {row['T']} | {row['pass']} | " + " | ".join(cells) + f" | {ratio('cudnn')} | {ratio('fla')} |")


if __name__ == "__main__":
    app.run(main)
