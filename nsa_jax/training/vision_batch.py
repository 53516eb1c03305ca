"""Fixed-shape vision layouts for padded batches, computed in numpy outside jit.

A batch holds pixel rows padded to a fixed count and a grid table padded with zero rows. The padding rows
are given dummy frames (1, 2, w) so `vision_layout` covers every row; their merged tokens come after the
real ones and are never scattered into the sequence (the sequence has no placeholder token for them). The
layout's attention segment grids are then padded up to bucketed sizes, so the jitted step recompiles only
when a batch crosses a bucket.
"""

from __future__ import annotations

import numpy as np

from nsa_jax.config import VisionConfig
from nsa_jax.vision import Segments, VisionLayout, vision_layout


def with_padding_frames(grid_thw: np.ndarray, num_rows: int, cfg: VisionConfig, max_frame_rows: int = 1024
                        ) -> np.ndarray:
    """The real grids (zero rows dropped) followed by dummy frames covering rows up to num_rows."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    grid = grid[np.all(grid > 0, axis=1)]
    pad = num_rows - int(np.prod(grid, axis=1).sum())
    unit = cfg.spatial_merge_size**2
    if pad < 0:
        raise ValueError(f"grid table covers {num_rows - pad} pixel rows but the batch holds {num_rows}")
    if pad % unit:
        raise ValueError(f"{pad} padding pixel rows: must be a multiple of spatial_merge_size^2 = {unit}")
    m = cfg.spatial_merge_size
    frame = max(unit, max_frame_rows // unit * unit)
    dummies = [(1, m, n // m) for n in [frame] * (pad // frame) + ([pad % frame] if pad % frame else [])]
    return np.concatenate([grid, np.asarray(dummies, np.int64).reshape(-1, 3)])


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _pad_segments(seg: Segments, bucket_segments: int, bucket_width: int) -> Segments:
    gather, valid, scatter = (np.asarray(a) for a in seg)
    s, width = gather.shape
    new_s, new_w = _round_up(s, bucket_segments), _round_up(width, bucket_width)
    g = np.zeros((new_s, new_w), np.int32)
    v = np.zeros((new_s, new_w), bool)
    g[:s, :width], v[:s, :width] = gather, valid
    scatter = (scatter // width) * new_w + scatter % width
    return Segments(g, v, scatter.astype(np.int32))


def padded_vision_layout(grid_thw: np.ndarray, num_rows: int, cfg: VisionConfig, *, bucket_segments: int = 16,
                         bucket_width: int = 64, max_frame_rows: int = 1024) -> VisionLayout:
    """A VisionLayout (numpy arrays) for `num_rows` pixel rows whose real part is described by grid_thw."""
    grid = with_padding_frames(grid_thw, num_rows, cfg, max_frame_rows)
    lay = vision_layout(grid, cfg)
    return VisionLayout(np.asarray(lay.pos_hw), np.asarray(lay.window_index), np.asarray(lay.reverse_index),
                        _pad_segments(lay.window_segments, bucket_segments, bucket_width),
                        _pad_segments(lay.frame_segments, bucket_segments, bucket_width))
