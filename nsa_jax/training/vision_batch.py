"""Fixed-shape vision layouts for padded batches, computed in numpy outside jit.

A batch holds pixel rows padded to a fixed count and a grid table padded with zero rows. The padding rows
are given dummy frames (1, 2, w) so `vision_layout` covers every row; their merged tokens come after the
real ones and are never scattered into the sequence (the sequence has no placeholder token for them). The
layout's attention segment grids are then padded up to bucketed sizes, so the jitted step recompiles only
when a batch crosses a bucket. For training on several devices the rows are split into chunks of whole
frames, one per device, each with its own layout (`frame_chunks`, `host_chunks`).
"""

from __future__ import annotations

from typing import NamedTuple

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
    s, width = np.shape(seg.gather)
    return _pad_segments_to(seg, _round_up(s, bucket_segments), _round_up(width, bucket_width))


def _pad_segments_to(seg: Segments, new_s: int, new_w: int) -> Segments:
    """seg's [S, L] grids padded to [new_s, new_w] (empty segments, wider rows); scatter indices follow."""
    gather, valid, scatter = (np.asarray(a) for a in seg)
    s, width = gather.shape
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


class FrameChunks(NamedTuple):
    """Real pixel rows split into chunks of whole frames (temporal patches), in order.

    Chunk c holds the contiguous local rows [starts[c], starts[c] + real_rows[c]), described by grids[c]
    ([n, 3] runs of frames), padded to `rows` rows.
    """

    rows: int
    starts: list[int]
    real_rows: list[int]
    grids: list[np.ndarray]


def frame_chunks(grid_thw: np.ndarray, num_chunks: int, cfg: VisionConfig, min_rows: int = 0,
                 growth: int = 256) -> FrameChunks:
    """The frames of `grid_thw`'s real grids spread in order over `num_chunks` chunks of equal row count:
    `min_rows` (a multiple of spatial_merge_size^2) if the frames fit whole, else grown by `growth` rows
    until they do (few distinct shapes, few recompilations).

    Frames are independent in the vision tower (window and full attention stay within a frame), so each
    chunk can run the tower alone and the chunks' merged tokens, concatenated, are the whole tower's.
    """
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    frames = [(int(h), int(w)) for t, h, w in grid[np.all(grid > 0, axis=1)] for _ in range(t)]
    unit = cfg.spatial_merge_size**2
    if min_rows % unit:
        raise ValueError(f"min_rows={min_rows}: must be a multiple of spatial_merge_size^2 = {unit}")
    rows = min_rows
    while (chunk_of := _fill(frames, rows, num_chunks)) is None:
        rows += growth
    starts, real, grids, offset = [], [], [], 0
    for c in range(num_chunks):
        mine = [f for f, k in zip(frames, chunk_of) if k == c]
        starts.append(offset)
        real.append(sum(h * w for h, w in mine))
        offset += real[-1]
        runs_ = []  # consecutive frames of one size form one (t, h, w) grid
        for h, w in mine:
            if runs_ and runs_[-1][1:] == [h, w]:
                runs_[-1][0] += 1
            else:
                runs_.append([1, h, w])
        grids.append(np.asarray(runs_, np.int64).reshape(-1, 3))
    return FrameChunks(rows, starts, real, grids)


def _fill(frames: list[tuple[int, int]], rows: int, num_chunks: int) -> list[int] | None:
    """Chunk index of each frame, filling chunks of `rows` rows in order; None if they do not fit."""
    out, chunk, used = [], 0, 0
    for h, w in frames:
        if h * w > rows:
            return None
        if used + h * w > rows:
            chunk, used = chunk + 1, 0
            if chunk == num_chunks:
                return None
        out.append(chunk)
        used += h * w
    return out


def host_chunks(pixels: np.ndarray, grid_thw: np.ndarray, num_chunks: int, cfg: VisionConfig, *,
                min_rows: int = 0, min_segments: tuple[int, int, int, int] = (0, 0, 0, 0)
                ) -> tuple[np.ndarray, VisionLayout, np.ndarray]:
    """Pixel rows [N, D] (real rows first, described by grid_thw) -> (chunks [K, R, D] of whole frames, their
    layouts stacked on a leading axis, real merged tokens per chunk [K]).

    R is the rows per chunk of an even split of the N rows (padding included, so the shape does not depend
    on the batch) if the frames fit whole, else more. min_rows / min_segments (window [S, L], frame [S, L])
    raise R and the padded segment grids, so that several processes can agree on one shape."""
    even = _round_up(-(-pixels.shape[0] // num_chunks), cfg.spatial_merge_size**2)
    plan = frame_chunks(grid_thw, num_chunks, cfg, min_rows=max(min_rows, even))
    layouts = [padded_vision_layout(g, plan.rows, cfg) for g in plan.grids]
    shape = np.max([np.shape(lay.window_segments.gather) + np.shape(lay.frame_segments.gather) for lay in layouts]
                   + [min_segments], axis=0)
    window = [_pad_segments_to(lay.window_segments, shape[0], shape[1]) for lay in layouts]
    frame = [_pad_segments_to(lay.frame_segments, shape[2], shape[3]) for lay in layouts]
    stack = lambda items: type(items[0])(*(np.stack(parts) for parts in zip(*items)))
    layout = VisionLayout(np.stack([lay.pos_hw for lay in layouts]), np.stack([lay.window_index for lay in layouts]),
                          np.stack([lay.reverse_index for lay in layouts]), stack(window), stack(frame))
    if pixels.shape[0] == num_chunks * plan.rows and plan.starts == [c * plan.rows for c in range(num_chunks)]:
        chunked = pixels.reshape(num_chunks, plan.rows, -1)  # the chunks are the rows as they lie: no copy
    else:
        chunked = np.zeros((num_chunks, plan.rows, pixels.shape[-1]), pixels.dtype)
        for c, (first, n) in enumerate(zip(plan.starts, plan.real_rows)):
            chunked[c, :n] = pixels[first:first + n]
    return chunked, layout, np.asarray(plan.real_rows) // cfg.spatial_merge_size**2


def token_order(real_tokens: np.ndarray, tokens_per_chunk: int) -> np.ndarray:
    """Indices into the chunks' concatenated merged tokens: every chunk's real ones in chunk order, then the rest."""
    real = [c * tokens_per_chunk + np.arange(n) for c, n in enumerate(real_tokens)]
    rest = [c * tokens_per_chunk + np.arange(n, tokens_per_chunk) for c, n in enumerate(real_tokens)]
    return np.concatenate(real + rest).astype(np.int32)
