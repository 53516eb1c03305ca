"""Public entry point: `nsa_attention`, and the NSA variants (the modes of SPEC §2 and §3) as its flags."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import numpy as np

from pallas_kernels import layout as layouts
from pallas_kernels.backend import kernel_platform, kernel_target
from pallas_kernels.chunks import static_offset
from pallas_kernels.reference import LSE_READINGS, nsa_reference
from pallas_kernels.segments import validate_segments

IMPLS = ("auto", "reference", "pallas")


@dataclasses.dataclass(frozen=True)
class NSAVariant:
    """The semantics flags of `nsa_attention` that an NSA mode fixes (see its docstring)."""

    causal_compression: bool = True
    head_layout: str = "gqa"
    tie_break: str = "recent"
    lse_reading: str = "per_head"

    def flags(self) -> dict:
        return dataclasses.asdict(self)


VARIANTS = {
    "native": NSAVariant(),  # SPEC §3: causal compression, true GQA, ties to the most recent block
    # SPEC §2: the released VideoNSA (non-causal compression, padded 64-head layout, fla's tie order, its
    # top-k's reading of the compression lse)
    "videonsa": NSAVariant(causal_compression=False, head_layout="videonsa", tie_break="fla", lse_reading="released"),
}


def nsa_variant(mode: str, **overrides) -> NSAVariant:
    """The variant of NSA mode "native" or "videonsa", with fields overridden (e.g. lse_reading="per_head")."""
    if mode not in VARIANTS:
        raise ValueError(f"NSA mode must be one of {sorted(VARIANTS)}, got {mode!r}")
    return dataclasses.replace(VARIANTS[mode], **overrides)


def resolve_impl(impl: str, selection: str = "token") -> str:
    """"auto" is "pallas" on GPU (Triton) and, for selection "query_block", on TPU (Mosaic); "reference"
    otherwise (CPU, and per-token selection on TPU, whose row gathers Mosaic does not lower)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    target = kernel_target()
    tpu_ok = selection == "query_block"
    if impl == "auto":
        if target == "tpu" and not tpu_ok:
            warnings.warn("nsa_attention on TPU with per-token selection runs the jnp oracle (dense masks, O(T^2) "
                          "memory); selection='query_block' runs the Mosaic kernels", stacklevel=3)
        return "pallas" if kernel_platform() == "gpu" or (target == "tpu" and tpu_ok) else "reference"
    if impl == "pallas" and target == "tpu" and not tpu_ok:
        raise NotImplementedError(
            "impl='pallas' on TPU (Mosaic) needs selection='query_block': per-token selection gathers rows, which "
            "Mosaic does not lower. Use selection='query_block', or impl='reference' (pure jnp, dense masks: "
            "O(T^2) memory).")
    return impl


def nsa_attention(q: jax.Array, k: jax.Array, v: jax.Array, g_cmp: jax.Array, g_slc: jax.Array,
                  g_swa: jax.Array, *, block_size: int = 64, block_count: int = 32, window_size: int = 256,
                  segment_ids: jax.Array | None = None, causal_compression: bool = True,
                  head_layout: str = "gqa", tie_break: str = "recent", selection: str = "token",
                  lse_reading: str = "per_head", scale: float | None = None, impl: str = "auto",
                  q_offset: int | jax.Array | None = None, query_axis: str | tuple[str, ...] | None = None
                  ) -> jax.Array:
    """Native Sparse Attention: g_cmp * compression + g_slc * selection + g_swa * sliding window, per head.

    q [B, T, HQ, D]; k, v [B, T, HKV, D] (HQ a multiple of HKV); gates [B, T, HQ]; any T. Returns o
    [B, T, HQ, D] in q's dtype. scale defaults to D ** -0.5.
    q_offset: q (and the gates) hold one chunk of the sequence, Tq <= T rows at positions q_offset + [0, Tq);
      k, v and segment_ids cover the whole sequence. An int, a traced int32 scalar (inside shard_map: axis_index
      * Tq) or an int32 array [B] (one per batch row). The chunk's rows equal the same rows of the call over
      the whole sequence (`chunks.py`). Selection "token" only (so on TPU the jnp oracle).
    query_axis: with q_offset, lse_reading "released" and Tq < T: the mapped axis (shard_map or vmap) along
      which the chunks lie in order, chunk i at offset i * Tq (the released top-k reads other rows' compression
      lse: the chunks' are all-gathered along it; no gradient flows there).
    segment_ids [B, T] int: packed samples, see `segments.py` (no attention across segments; every segment
      starts at a multiple of block_size, checked when the ids are concrete).
    causal_compression: True = query i attends complete blocks ending at or before i (SPEC §3); False = the
      released mask i <= (j + 1) * block_size - 1 (SPEC §2.5).
    head_layout: "gqa" (head h reads KV head h // G) or "videonsa" (the released padded layout, `layout.py`).
    tie_break: "recent" (ties to the most recent block) or "fla" (fla's top-k, SPEC §2.6: its bitonic network,
      and its arithmetic: q * scale and the block means rounded to q's dtype, products summed in float32).
    selection: "token" (each query its own top-k, the paper's) or "query_block" (SPEC §4's opt-in: one set per
      block of block_size consecutive queries, chosen by their summed importance; tie_break "recent" and
      head_layout "gqa" only); its kernel is block-sparse flash attention (`block_sparse.py` on GPU,
      `tpu_attention.py` on TPU).
    lse_reading: the lse the top-k divides each row's block scores by: "per_head" (the row's own) or
      "released" (SPEC §2.11: the released top-k's reading of flex_attention's [P, T] lse buffer as [T, P],
      `reference.read_lse`; tie_break "fla" and selection "token" only).
    The modes' flags: `nsa_variant(mode).flags()`.
    impl: "reference" (pure jnp oracle), "pallas" (Pallas kernels: Triton on GPU, Mosaic on TPU for selection
      "query_block" only, interpret mode on CPU) or "auto" (pallas on GPU and, for "query_block", on TPU;
      reference otherwise).
    """
    b, t, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k, v must be [B, T, HKV, D] matching q {q.shape}, got {k.shape}, {v.shape}")
    _check_chunk(q_offset, t, k.shape[1], b, selection)
    for g in (g_cmp, g_slc, g_swa):
        if g.shape != (b, t, hq):
            raise ValueError(f"gates must be [B, T, HQ] = {(b, t, hq)}, got {g.shape}")
    if min(block_size, block_count, window_size) < 1:
        raise ValueError("block_size, block_count and window_size must be positive")
    layout = layouts.head_layout(head_layout, hq, k.shape[2])
    if tie_break not in ("recent", "fla"):
        raise ValueError(f"tie_break must be 'recent' or 'fla', got {tie_break!r}")
    if selection not in ("token", "query_block"):
        raise ValueError(f"selection must be 'token' or 'query_block', got {selection!r}")
    if selection == "query_block" and (tie_break, head_layout) != ("recent", "gqa"):
        raise ValueError(f"selection='query_block' needs tie_break='recent' and head_layout='gqa', got "
                         f"{tie_break!r} and {head_layout!r}")
    if lse_reading not in LSE_READINGS:
        raise ValueError(f"lse_reading must be one of {LSE_READINGS}, got {lse_reading!r}")
    if lse_reading == "released" and (tie_break, selection) != ("fla", "token"):
        raise ValueError(f"lse_reading='released' (the released top-k) needs tie_break='fla' and selection='token', "
                         f"got {tie_break!r} and {selection!r}")
    if segment_ids is not None:
        if segment_ids.shape != k.shape[:2]:
            raise ValueError(f"segment_ids must be [B, T] = {k.shape[:2]}, got {segment_ids.shape}")
        validate_segments(segment_ids, block_size)
    kwargs = dict(block_size=block_size, block_count=block_count, window_size=window_size,
                  segment_ids=segment_ids, causal_compression=causal_compression, tie_break=tie_break,
                  selection=selection, lse_reading=lse_reading, scale=scale, q_offset=q_offset,
                  query_axis=query_axis)
    if resolve_impl(impl, selection) == "reference":
        return nsa_reference(q, k, v, g_cmp, g_slc, g_swa, head_layout_kind=layout.kind, **kwargs)
    if kernel_target() == "tpu":
        from pallas_kernels.nsa_tpu import nsa_tpu
        for key in ("tie_break", "selection", "lse_reading", "q_offset", "query_axis"):
            del kwargs[key]  # "recent", "query_block", "per_head", no chunk
        return nsa_tpu(q, k, v, g_cmp, g_slc, g_swa, layout=layout, **kwargs)
    from pallas_kernels.nsa_pallas import nsa_pallas
    return nsa_pallas(q, k, v, g_cmp, g_slc, g_swa, layout=layout, **kwargs)


def _check_chunk(q_offset, tq: int, t: int, b: int, selection: str) -> None:
    """Validates a query chunk (`nsa_attention`'s q_offset) of Tq rows against T keys."""
    if q_offset is None:
        if tq != t:
            raise ValueError(f"q has {tq} rows and k {t}: pass q_offset when q is a chunk of the sequence")
        return
    if tq > t:
        raise ValueError(f"a query chunk of {tq} rows is longer than the {t} keys")
    if selection != "token":
        raise NotImplementedError(f"q_offset (a query chunk) supports selection='token' only, got {selection!r}")
    if np.shape(q_offset) not in ((), (b,)):
        raise ValueError(f"q_offset must be a scalar or [B] = [{b}], got shape {np.shape(q_offset)}")
    offset = static_offset(q_offset)
    if offset is not None and not 0 <= offset <= t - tq:
        raise ValueError(f"q_offset={offset}: a chunk of {tq} rows must lie within the {t} keys")
