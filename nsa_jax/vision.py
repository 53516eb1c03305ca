"""Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window / full attention blocks, 2x2 merger.

The irregular parts (window reordering, per-window and per-frame attention segments, rotary positions)
depend only on `grid_thw`; `vision_layout` computes them once in numpy so the tower itself is a fixed-shape,
jittable function of (pixel rows, layout).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nsa_jax.cudnn import cudnn_applies
from nsa_jax.config import VisionConfig
from nsa_jax.layers import GatedMLP, RMSNorm, Runtime, linear, make_blocks, run_blocks, runs
from nsa_jax.rope import rotate_half


class Segments(NamedTuple):
    """Attention segments of a token sequence, gathered into a padded [S, L] grid."""

    gather: jax.Array  # [S, L] token index (0 where padded)
    valid: jax.Array  # [S, L] bool
    scatter: jax.Array  # [N] flat position of each token in the [S*L] grid


class VisionLayout(NamedTuple):
    """Everything the tower needs besides pixels, for one batch of images or videos."""

    pos_hw: jax.Array  # [N, 2] row / column of each patch (window order)
    window_index: jax.Array  # [N / merge^2] merged-token permutation into window order
    reverse_index: jax.Array  # its inverse
    window_segments: Segments
    frame_segments: Segments


def _segments(lengths: Sequence[int]) -> Segments:
    lengths = [int(n) for n in lengths if n > 0]
    width = -(-max(lengths) // 8) * 8  # cuDNN's attention takes even lengths; the real ones are multiples of 64
    gather = np.zeros((len(lengths), width), np.int32)
    valid = np.zeros((len(lengths), width), bool)
    scatter = np.zeros((sum(lengths),), np.int32)
    start = 0
    for s, n in enumerate(lengths):
        gather[s, :n] = np.arange(start, start + n)
        valid[s, :n] = True
        scatter[start:start + n] = s * width + np.arange(n)
        start += n
    return Segments(jnp.asarray(gather), jnp.asarray(valid), jnp.asarray(scatter))


def vision_layout(grid_thw: np.ndarray | Sequence[Sequence[int]], config: VisionConfig) -> VisionLayout:
    """Rotary positions, window permutation and attention segments for patches of these grids (numpy)."""
    m = config.spatial_merge_size
    win = config.window_size // m // config.patch_size  # window side in merged tokens
    pos, window_index, window_lens, frame_lens = [], [], [], []
    offset = 0
    for t, h, w in np.asarray(grid_thw, np.int64).reshape(-1, 3):
        if t <= 0 or h <= 0 or w <= 0 or h % m or w % m:
            raise ValueError(f"grid_thw {(t, h, w)}: sizes must be positive and h, w multiples of {m}")
        hm, wm = h // m, w // m
        # Patch (row, col) in merged order: blocks of m x m patches, row-major over blocks.
        rows = np.arange(h).reshape(hm, m, 1, 1).repeat(wm, 2).repeat(m, 3).transpose(0, 2, 1, 3)
        cols = np.arange(w).reshape(1, 1, wm, m).repeat(hm, 0).repeat(m, 1).transpose(0, 2, 1, 3)
        hw = np.stack([rows.reshape(-1), cols.reshape(-1)], -1)
        pos.append(np.tile(hw, (t, 1)))
        # Window permutation of merged tokens: windows of win x win merged tokens, per frame.
        idx = np.arange(t * hm * wm).reshape(t, hm, wm)
        ph, pw = -hm % win, -wm % win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
        nh, nw = (hm + ph) // win, (wm + pw) // win
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        counts = (padded >= 0).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        window_index.append(flat[flat >= 0] + offset)
        window_lens.extend((counts * m * m).tolist())
        frame_lens.extend([h * w] * t)
        offset += t * hm * wm
    window_index = np.concatenate(window_index)
    unit = m * m
    patch_order = (window_index[:, None] * unit + np.arange(unit)).reshape(-1)
    pos_hw = np.concatenate(pos)[patch_order]
    return VisionLayout(jnp.asarray(pos_hw, jnp.int32), jnp.asarray(window_index, jnp.int32),
                        jnp.asarray(np.argsort(window_index), jnp.int32), _segments(window_lens),
                        _segments(frame_lens))


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, seg: Segments) -> jax.Array:
    """Full attention within each segment; q, k, v [N, H, D] -> [N, H, D]. Segments are padded to one width,
    each valid for its length: a padding mask, run by cuDNN's flash attention where it applies."""
    n, h, d = q.shape
    qs, ks, vs = (x[seg.gather] for x in (q, k, v))  # [S, L, H, D]
    lengths = seg.valid.sum(-1).astype(jnp.int32)
    out = jax.nn.dot_product_attention(qs, ks, vs, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                       implementation="cudnn" if cudnn_applies(qs) else None)
    return out.reshape(-1, h, d)[seg.scatter]


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.num_heads = cfg.num_heads
        self.qkv = linear(cfg.hidden_size, 3 * cfg.hidden_size, kernel_axes=("embed", "heads"), bias=True,
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = linear(cfg.hidden_size, cfg.hidden_size, kernel_axes=("heads", "embed"), bias=True, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, seg: Segments) -> jax.Array:
        n = x.shape[0]
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(n, 3, self.num_heads, -1), 1, 0)
        rot = lambda t: (t.astype(jnp.float32) * cos[:, None] + rotate_half(t.astype(jnp.float32)) * sin[:, None]
                         ).astype(t.dtype)
        out = segment_attention(rot(q), rot(k), v, seg)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype, runtime: Runtime = Runtime()):
        self.runtime = runtime
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True, rngs=rngs,
                            dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, seg: Segments):
        return self.runtime.call(VisionBlock._forward, self, x, cos, sin, seg)

    def _forward(self, x, cos, sin, seg: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, seg)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then groups of merge^2 neighbouring patches -> MLP(GELU) -> LLM width."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        wide = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, 1e-6, param_dtype=param_dtype)
        self.mlp_0 = linear(wide, wide, kernel_axes=("embed", "mlp"), bias=True, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)
        self.mlp_2 = linear(wide, cfg.out_hidden_size, kernel_axes=("mlp", "embed"), bias=True, rngs=rngs,
                            dtype=dtype, param_dtype=param_dtype)
        self.wide = wide

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.wide)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class PatchEmbed(nnx.Module):
    """The Conv3d with stride == kernel, as one matrix over flattened (C, T, P, P) patch rows."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.proj = linear(cfg.patch_dim, cfg.hidden_size, kernel_axes=(None, "embed"), bias=False, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        return self.proj(pixels)


class VisionTower(nnx.Module):
    """Pixel rows [N, C*T*P*P] -> merged tokens [N / merge^2, out_hidden_size] in the original order."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 runtime: Runtime = Runtime()):
        """runtime: only its remat policy applies here (the tower's pixel rows are sharded by the caller)."""
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = nnx.List(make_blocks([None] * cfg.depth, lambda _, r: VisionBlock(
            cfg, rngs=r, dtype=dtype, param_dtype=param_dtype, runtime=Runtime(remat=runtime.remat)), rngs))
        self.merger = PatchMerger(cfg, **kw)
        self.dtype = dtype

    def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        with jax.named_scope("vision_tower"):  # the profile's part (nsa_jax/training/profile.py)
            return self._forward(pixel_values, layout)

    def _forward(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
        cfg = self.cfg
        unit = cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values.astype(self.dtype))
        x = x.reshape(-1, unit, x.shape[-1])[layout.window_index].reshape(-1, x.shape[-1])
        quarter = cfg.head_dim // 4
        inv_freq = 1.0 / (10000.0 ** (np.arange(0, 2 * quarter, 2).astype(np.float32) / np.float32(2 * quarter)))
        freqs = layout.pos_hw.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [N, 2, D/4]
        freqs = freqs.reshape(freqs.shape[0], -1)
        emb = jnp.concatenate([freqs, freqs], -1)
        cos, sin = jnp.cos(emb), jnp.sin(emb)
        # Runs of consecutive blocks with the same attention (windows / whole frames), each run one scan.
        full = [i in cfg.fullatt_block_indexes for i in range(len(self.blocks))]
        for start, stop in runs(full):
            seg = layout.frame_segments if full[start] else layout.window_segments
            x, _ = run_blocks(self.blocks[start:stop], x, lambda blk, h, _, seg=seg: (blk(h, cos, sin, seg), None))
        return self.merger(x)[layout.reverse_index]
