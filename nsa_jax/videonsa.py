"""The VideoNSA hybrid attention layer: vision tokens through NSA, text tokens through dense attention.

Two modes (SPEC §2, §3):
- "videonsa": the released model exactly. Vision rows are those whose three mRoPE ids are not all equal;
  NSA runs over the whole sequence with text rows of q, k, v zeroed (they still take softmax mass), the
  released non-causal compression mask, the padded 64-head layout (as kernel parameters, never copies) and
  fla's top-k tie order; the dense branch runs with vision rows of q zeroed; every row gets o_nsa + o_dense.
- "native": routing by token id (image / video pad tokens are vision); each sample's vision tokens are
  gathered in order into one contiguous sequence for NSA (causal compression, true GQA), text rows get dense
  attention over everything before them; each row gets only its own branch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nsa_jax.attention import DenseAttention, TokenContext, dense_attention, dense_attention_rows
from nsa_jax.config import ModelConfig, NSAConfig
from nsa_jax.head_parallel import QueryChunk, head_parallel
from nsa_jax.layers import Runtime, linear
from pallas_kernels import NSAVariant, nsa_attention, nsa_variant
from pallas_kernels.segments import segment_bounds


def mrope_vision_rows(position_ids: jax.Array) -> jax.Array:
    """[B, T] bool: rows whose three mRoPE ids are not all equal (the released model's routing)."""
    t, h, w = position_ids[0], position_ids[1], position_ids[2]
    return ~((t == h) & (t == w))


def kernel_variant(nsa: NSAConfig) -> NSAVariant:
    """The kernel flags of an NSA config's mode (mode videonsa with its lse reading)."""
    if nsa.mode == "videonsa":
        return nsa_variant("videonsa", lse_reading=nsa.videonsa_lse)
    return nsa_variant(nsa.mode)


def nsa_rows(nsa: NSAConfig, ctx: TokenContext) -> jax.Array:
    """[B, T] bool: the rows an NSA layer routes to its NSA branch (mode videonsa: by mRoPE ids; native: the
    image / video tokens)."""
    return mrope_vision_rows(ctx.position_ids) if nsa.mode == "videonsa" else ctx.vision_mask


def nsa_branch(nsa: NSAConfig, q, k, v, gates, segment_ids, chunk: QueryChunk | None = None,
               q_offset: jax.Array | None = None) -> jax.Array:
    """The NSA branch of a config: `nsa_attention` with its block size, count, window, selection, kernel
    implementation and mode's flags; gates [B, T, H, 3] (cmp, slc, swa). chunk: q and the gates are a chunk of
    the keys' sequence (`head_parallel`), at q_offset (default chunk.offset)."""
    if chunk is not None:
        q_offset = chunk.offset if q_offset is None else q_offset
    return nsa_attention(q, k, v, gates[..., 0], gates[..., 1], gates[..., 2], block_size=nsa.block_size,
                         block_count=nsa.block_count, window_size=nsa.window_size, segment_ids=segment_ids,
                         selection=nsa.selection, impl=nsa.impl, q_offset=q_offset,
                         query_axis=None if chunk is None else chunk.axis, **kernel_variant(nsa).flags())


def videonsa_attention(nsa: NSAConfig, q: jax.Array, k: jax.Array, v: jax.Array, gate_logits: jax.Array,
                       vision: jax.Array, *, segment_ids: jax.Array | None = None, kv_valid: jax.Array | None = None,
                       implementation: str | None = None, chunk: QueryChunk | None = None) -> jax.Array:
    """Mode videonsa's attention core (SPEC §2) on [B, T] rows: q [B, T, H, D], k, v [B, T, K, D], gate logits
    [B, T, H, 3] and the vision rows [B, T]. As the release's `_mixed_attention`, a call whose rows are all
    vision takes NSA alone (no dense branch). chunk: q and the gate logits are the chunk's rows
    (`head_parallel`'s sequence split); k, v and the [B, T] rows the whole sequence."""
    all_vision = vision.all()
    q_vision = vision if chunk is None else chunk.rows(vision)
    rows, k_rows = q_vision[..., None, None], vision[..., None, None]  # [B, T, 1, 1]
    gates = jax.nn.sigmoid(jnp.where(rows, gate_logits, 0.0))
    zero = jnp.zeros((), q.dtype)
    o_nsa = nsa_branch(nsa, jnp.where(rows, q, zero), jnp.where(k_rows, k, zero), jnp.where(k_rows, v, zero), gates,
                       nsa_segments(segment_ids), chunk)
    o_dense = videonsa_dense_branch(q, k, v, q_vision, segment_ids=segment_ids, kv_valid=kv_valid,
                                    implementation=implementation, q_offset=None if chunk is None else chunk.offset)
    return jnp.where(all_vision, o_nsa, o_nsa + o_dense)


class NSAAttention(DenseAttention):
    """Qwen2.5-VL attention with the VideoNSA gates (`g_proj_1`, `g_proj_2`) and hybrid routing."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype, param_dtype, runtime: Runtime = Runtime()):
        super().__init__(cfg.text, rngs=rngs, dtype=dtype, param_dtype=param_dtype, runtime=runtime)
        hidden = cfg.text.hidden_size
        self.nsa = cfg.nsa
        self.g_proj_1 = linear(hidden, hidden, kernel_axes=("embed", "mlp"), bias=True, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype)
        # Bias logit(0.5) = 0: gates start at 0.5 (the released initialisation).
        self.g_proj_2 = linear(hidden, self.num_heads * 3, kernel_axes=("mlp", None), bias=True, rngs=rngs,
                               dtype=dtype, param_dtype=param_dtype)

    def gate_logits(self, x: jax.Array) -> jax.Array:
        """Gate logits [B, T, H, 3] (cmp, slc, swa), already divided by the temperature."""
        g = self.g_proj_2(jax.nn.gelu(self.g_proj_1(x), approximate=False))
        return g.reshape(*x.shape[:2], self.num_heads, 3) / self.nsa.gate_temperature

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, x: jax.Array, ctx: TokenContext) -> jax.Array:
        """The hybrid over the chunk itself: NSA for the rows `nsa_rows` routes there, dense for the others."""
        rows = dict(segment_ids=ctx.segment_ids, kv_valid=ctx.kv_valid, vision=nsa_rows(self.nsa, ctx))
        if self.nsa.mode == "videonsa":
            # The padded layout pairs query heads with several KV heads: heads stay whole on each device.
            core = functools.partial(videonsa_attention, self.nsa, implementation=self.runtime.attention_impl)
            return head_parallel(self.runtime.mesh, core, (q, k, v, self.gate_logits(x)), rows,
                                 num_kv_heads=self.num_kv_heads, split_heads=False)
        native = functools.partial(self._native, vision_tokens=ctx.vision_tokens)
        return head_parallel(self.runtime.mesh, native, (q, k, v, jax.nn.sigmoid(self.gate_logits(x))), rows,
                             num_kv_heads=self.num_kv_heads)

    def _native(self, q, k, v, gates, *, vision, segment_ids, kv_valid, chunk: QueryChunk | None = None,
                vision_tokens: int | None = None) -> jax.Array:
        """Mode native on [B, T] rows: q, k, v, gates [B, T, H, 3] and the vision-token mask [B, T]. chunk: q and
        the gates are the chunk's rows (`head_parallel`'s sequence split), k, v and the [B, T] rows the whole.
        vision_tokens: no row has more vision tokens (static; `TokenContext.vision_tokens`)."""
        # Vision tokens first, in order: NSA runs over them as one contiguous sequence. The text rows moved
        # behind them are never visible to a vision query (causality). With segment ids, each sample's vision
        # run is its own NSA segment; the kernels require every segment to start at a multiple of the block
        # size, which holds for one sample per row (`check_native_packing` refuses more).
        # A chunk's vision rows are consecutive in that order too: they follow the vision tokens before the chunk.
        order = jnp.argsort(~vision, axis=1, stable=True)
        q_vision = vision if chunk is None else chunk.rows(vision)
        q_order = order if chunk is None else jnp.argsort(~q_vision, axis=1, stable=True)
        inverse = jnp.argsort(q_order, axis=1)
        take = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
        seg = None if segment_ids is None else nsa_segments(take(segment_ids, order))
        before = None if chunk is None else (vision & (jnp.arange(vision.shape[1]) < chunk.offset)).sum(1)
        q_o, k_o, v_o, gates_o = take(q, q_order), take(k, order), take(v, order), take(gates, q_order)
        # Without a chunk, NSA runs over the first n rows of that order only: they hold each row's vision tokens,
        # and the keys those see (the text rows behind take the dense branch).
        t, bs = q.shape[1], self.nsa.block_size
        n = t if chunk is not None or vision_tokens is None else min(t, -(-vision_tokens // bs) * bs)
        prefix = lambda a: None if a is None else a[:, :n]
        if n == 0:
            o_nsa = jnp.zeros_like(q)
        elif n < t:
            o_nsa = nsa_branch(self.nsa, *map(prefix, (q_o, k_o, v_o, gates_o, seg)))
            o_nsa = take(jnp.pad(o_nsa, ((0, 0), (0, t - n), (0, 0), (0, 0))), inverse)
        else:
            o_nsa = take(nsa_branch(self.nsa, q_o, k_o, v_o, gates_o, seg, chunk, q_offset=before), inverse)
        o_dense = dense_attention_rows(q, k, v, ~q_vision, segment_ids=segment_ids, kv_valid=kv_valid,
                                       implementation=self.runtime.attention_impl,
                                       q_offset=None if chunk is None else chunk.offset)
        return jnp.where(q_vision[..., None, None], o_nsa, o_dense)


def videonsa_dense_branch(q: jax.Array, k: jax.Array, v: jax.Array, vision: jax.Array, *,
                          segment_ids: jax.Array | None = None, kv_valid: jax.Array | None = None,
                          implementation: str | None = None, max_text_rows: int = 1024,
                          text_chunk: int = 128, q_offset: jax.Array | None = None) -> jax.Array:
    """Mode videonsa's dense branch (SPEC §2.9): causal GQA over all k, v of q with its vision rows zeroed.

    A zeroed query scores 0 against every key, so a vision row attends uniformly: its output is the mean of v
    over the keys it sees (a prefix mean, per segment). Only the text rows (~ vision, a few hundred in a video
    prompt) need attention: they are gathered in order, `text_chunk` rows at a time against every key (chunks
    past the last text row skipped at run time). A call with more than `max_text_rows` text rows in some batch
    row takes the full dense pass instead. q [B, T, H, D]; k, v [B, T, K, D]; vision [B, T] bool. q_offset: q
    and vision are the rows q_offset + [0, T) of the keys' sequence of S tokens (k, v, segment_ids and kv_valid
    [B, S])."""
    b, t, h, d = q.shape
    s, g = k.shape[1], h // k.shape[2]
    full = lambda: dense_attention(jnp.where(vision[..., None, None], jnp.zeros((), q.dtype), q), k, v, causal=True,
                                   segment_ids=segment_ids, kv_valid=kv_valid, implementation=implementation,
                                   q_offset=q_offset)
    rows = min(t, max_text_rows)
    if rows == t:
        return full()
    n_text = (~vision).sum(1).max()  # text rows of the batch row that has the most

    def closed_form():
        seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids
        valid = jnp.ones((b, s), bool) if kv_valid is None else kv_valid
        # prefix mean of the visible v: (sum over [segment start, i]) / count, from running sums
        total = jnp.cumsum(jnp.where(valid[..., None, None], v.astype(jnp.float32), 0.0), axis=1)
        count = jnp.cumsum(valid.astype(jnp.float32), axis=1)
        start, _ = segment_bounds(seg)
        before = lambda c: jnp.where((start > 0).reshape(start.shape + (1,) * (c.ndim - 2)), jnp.take_along_axis(
            c, jnp.maximum(start - 1, 0).reshape(start.shape + (1,) * (c.ndim - 2)), axis=1), 0.0)
        n = count - before(count)
        mean = (total - before(total)) / jnp.maximum(n, 1.0)[..., None, None]
        mean = jnp.where((n > 0)[..., None, None], mean, 0.0)
        if q_offset is not None:
            mean = jax.lax.dynamic_slice_in_dim(mean, q_offset, t, axis=1)
        o_vision = jnp.repeat(mean, g, axis=2).astype(q.dtype)

        order = jnp.argsort(vision, axis=1, stable=True)[:, :rows]  # text rows first, in order
        q_text = jnp.take_along_axis(q, order[..., None, None], axis=1)
        keys = jnp.arange(s)
        shift = 0 if q_offset is None else q_offset  # a query row's position among the keys

        def attend(qc, pos):
            mask = (keys[None, None, :] <= pos[:, :, None]) & valid[:, None, :]
            mask &= jnp.take_along_axis(seg, pos, axis=1)[:, :, None] == seg[:, None, :]
            out = jax.nn.dot_product_attention(qc, k, v, mask=mask[:, None])
            return jnp.where(mask.any(-1)[..., None, None], out, 0).astype(q.dtype)

        outs = []
        for c0 in range(0, rows, text_chunk):
            args = (q_text[:, c0:c0 + text_chunk], order[:, c0:c0 + text_chunk] + shift)
            outs.append(jax.lax.cond(n_text > c0, attend, lambda qc, pos: jnp.zeros_like(qc), *args))
        o_text = jnp.zeros_like(q).at[jnp.arange(b)[:, None], order].set(jnp.concatenate(outs, axis=1))
        return jnp.where(vision[..., None, None], o_vision, o_text)

    return jax.lax.cond(n_text <= rows, closed_form, full)


def check_native_packing(mode: str, samples_per_row: int) -> None:
    """Mode "native" packs one sample per row for now: its gathered vision runs must be block aligned."""
    if mode == "native" and samples_per_row > 1:
        raise ValueError(f"nsa mode 'native' with samples_per_row={samples_per_row}: packing several samples "
                         "into a row is supported in mode 'videonsa' only (native NSA segments must start at "
                         "block multiples); use samples_per_row=1")


def nsa_segments(segment_ids: jax.Array | None) -> jax.Array | None:
    """Segment ids for the NSA branch: trailing padding (id 0) joins the sample before it.

    Padding never precedes a token of its row, so causality keeps it out of every real query's keys.
    """
    return None if segment_ids is None else jax.lax.associative_scan(jnp.maximum, segment_ids, axis=1)
