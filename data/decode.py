"""Video decoding with PyAV: the frames a sampler picks, as RGB uint8 arrays, and an annotation's record.

The frame count a sampler sees is the number of frames that really decode (as a decoder that reads the
whole video reports it): the container's count is tried first, and if decoding disagrees the video is
decoded once more with the true count. Frames come out upright: the stream's rotation (display matrix side
data, else a `rotate` metadata tag) is applied. A variable-frame-rate video is sampled by presentation time:
the sampler's frame numbers are read as evenly spaced times and each picks the frame nearest its time.

`read_video_decord` instead reads a video as decord 0.6.0's ``VideoReader`` (the reader of the release's eval)
hands frames to qwen-vl-utils: frame numbers are packets, not decoded frames, and are never remapped by time.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import os
from typing import Any, Callable

import av
import numpy as np

from data.annotations import Annotation
from nsa_jax import processing

# (total_frames, video_fps) -> (sorted frame indices to keep, which may repeat; the sampling fps they give)
FrameSampler = Callable[[int, float], tuple[np.ndarray, float]]
FrameTransform = Callable[[np.ndarray], np.ndarray]  # uint8 [H, W, 3] -> uint8 [H', W', 3]


class VideoDecodeError(RuntimeError):
    """A video that cannot be used: unreadable, no video stream, or no decodable frame."""


@dataclasses.dataclass(frozen=True)
class SampledFrames:
    frames: np.ndarray  # uint8 [T, H, W, 3], RGB, after the transform
    timestamps: np.ndarray  # float32 [T], seconds from the first decoded frame
    fps: float  # the sampling rate the sampler reports
    total_frames: int  # decodable frames in the video
    video_fps: float  # the container's average frame rate


def _open_video(path: str) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    container = av.open(path)
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream (zero frames)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def _probe(path: str) -> tuple[int, float]:
    """(frames the container declares, or its video packet count; average fps), without decoding."""
    container, stream = _open_video(path)
    with container:
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        if stream.frames > 0:
            return int(stream.frames), fps
        return sum(1 for packet in container.demux(stream) if packet.size), fps


def _decode(path: str, wanted: set[int], transform: FrameTransform,
            pts: list | None = None) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Decodes the whole video; returns every frame's time (seconds from frame 0) and {index: transformed
    upright rgb} of the `wanted` frames; appends each frame's pts (None if it has none) to `pts` if given."""
    container, stream = _open_video(path)
    kept = {}
    times = []
    with container:
        for frame in container.decode(stream):
            count = len(times)
            times.append(float(frame.time or 0.0))
            if pts is not None:
                pts.append(frame.pts)
            if count in wanted:
                rgb = np.rot90(frame.to_ndarray(format="rgb24"), _quarter_turns(path, stream, frame))
                try:
                    kept[count] = transform(np.ascontiguousarray(rgb))
                except ValueError as e:  # e.g. an aspect ratio smart_resize refuses
                    raise VideoDecodeError(f"{path}: frame {count}: {e}") from e
    return np.asarray(times, np.float64) - (times[0] if times else 0.0), kept


def _quarter_turns(path: str, stream: av.video.stream.VideoStream, frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that make `frame` upright: its display matrix's rotation, else the
    stream's `rotate` tag (clockwise degrees, as phones and older muxers write it)."""
    degrees = float(frame.rotation)
    if not degrees:
        tag = {k.lower(): v for k, v in stream.metadata.items()}.get("rotate", "0")
        try:
            degrees = -float(tag)
        except ValueError as e:
            raise VideoDecodeError(f"{path}: rotate tag {tag!r} is not a number of degrees") from e
    return round(degrees / 90) % 4


def _by_time(indices: np.ndarray, times: np.ndarray) -> np.ndarray:
    """`indices` (frame numbers a sampler picked assuming a constant rate) as the frames nearest to the times
    they stand for, when `times` (increasing) are not evenly spaced; else `indices` unchanged."""
    steps = np.diff(times)
    if len(steps) < 2 or np.any(steps <= 0) or steps.max() - steps.min() <= 0.1 * np.median(steps):
        return indices  # constant rate (within container rounding), or times that cannot be trusted
    targets = indices * (times[-1] / (len(times) - 1))
    right = np.clip(np.searchsorted(times, targets), 1, len(times) - 1)
    return np.where(targets - times[right - 1] <= times[right] - targets, right - 1, right)


def read_video(path: str, sampler: FrameSampler, transform: FrameTransform = lambda frame: frame) -> SampledFrames:
    """Decodes `path` and returns the frames `sampler(total_frames, fps)` picks, each passed through
    `transform` as soon as it is decoded (so full-size frames are never all held); raises VideoDecodeError."""
    try:
        total, fps = _probe(path)
        if fps <= 0:
            raise VideoDecodeError(f"{path}: no frame rate")
        indices, sample_fps = _sample(path, sampler, total, fps)
        times, kept = _decode(path, set(indices.tolist()), transform)
        if len(times) == 0:
            raise VideoDecodeError(f"{path}: no decodable frame (zero frames)")
        if len(times) != total:  # the container's count was wrong: sample again over the frames that decode
            total = len(times)
            indices, sample_fps = _sample(path, sampler, total, fps)
        indices = _by_time(indices, times)
        kept = _decoded(path, kept, indices, transform, total)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: {e}") from e
    return _stacked(path, kept, indices, times, sample_fps, total, fps)


def _decoded(path: str, kept: dict, wanted: np.ndarray, transform: FrameTransform, count: int) -> dict:
    """`kept` if it holds every wanted frame, else the wanted frames decoded again (of `count` frames)."""
    if kept.keys() >= set(wanted.tolist()):
        return kept
    again, kept = _decode(path, set(wanted.tolist()), transform)
    if len(again) != count:
        raise VideoDecodeError(f"{path}: the frame count changes between two decodes")
    return kept


def _stacked(path: str, kept: dict, positions: np.ndarray, times: np.ndarray, sample_fps: float, total: int,
             video_fps: float) -> SampledFrames:
    """The frames at `positions` of the decoded ones, one size for all."""
    shapes = {kept[i].shape for i in set(positions.tolist())}
    if len(shapes) > 1:
        raise VideoDecodeError(f"{path}: the frame size changes within the video {sorted(shapes)}")
    frames = np.stack([kept[i] for i in positions.tolist()])
    return SampledFrames(frames=frames, timestamps=times[positions].astype(np.float32), fps=sample_fps,
                         total_frames=total, video_fps=video_fps)


def _sample(path: str, sampler: FrameSampler, total: int, fps: float) -> tuple[np.ndarray, float]:
    if total == 0:  # the container declares nothing: decode everything once to count
        return np.zeros(0, np.int64), 0.0
    try:
        indices, sample_fps = sampler(total, fps)
    except ValueError as e:  # e.g. fewer frames than one temporal patch
        raise VideoDecodeError(f"{path}: {e}") from e
    return np.asarray(indices, np.int64), float(sample_fps)


def read_video_decord(path: str, sampler: FrameSampler,
                      transform: FrameTransform = lambda frame: frame) -> SampledFrames:
    """The frames ``decord.VideoReader(path).get_batch(indices)`` returns (decord 0.6.0, the reader qwen-vl-utils
    and the release's lmms-eval fork pick when it is installed), `indices` being what `sampler(len(vr),
    vr.get_avg_fps())` picks, each passed through `transform` as soon as it is decoded; raises VideoDecodeError.

    decord counts the stream's packets (``av_read_frame``, zero-size and edit-list-discarded ones included; not the
    container's frame count, not the frames that decode), takes the fps as ``avg_frame_rate`` (num / den), and
    numbers frames by packet: never by presentation time, so a variable-frame-rate video is sampled by frame
    number. It decodes with FFmpeg and converts to rgb24 through a ``scale`` filter that follows the frame's
    colourspace and range tags, which on 8-bit video gives PyAV's ``to_ndarray(format="rgb24")`` bit for bit;
    its display-matrix / ``rotate`` rotation is data.decode's. When every packet decodes to one frame (in pts
    order), frame i is the i-th decoded frame; when fewer decode (an edit list that drops frames, a broken
    packet) decord's seek-and-skip bookkeeping decides which decoded frame an index gives: `_DecordReader`
    replays it. Where decord itself fails on those indices (it reads past the end, or gives up rewinding) or the
    decoded frames' pts are not the packets', the frames are read as qwen-vl-utils then reads them, with
    torchvision's reader: every decoded frame, sampled over their count.
    """
    try:
        table = _PacketTable.scan(path)
        if table.count == 0:
            raise VideoDecodeError(f"{path}: no decodable frame (zero frames)")
        if table.fps <= 0:
            raise VideoDecodeError(f"{path}: no average frame rate")
        indices, sample_fps = _sample(path, sampler, table.count, table.fps)
        pts: list = []
        times, kept = _decode(path, set(indices.tolist()), transform, pts)
        if len(times) == 0:
            raise VideoDecodeError(f"{path}: no decodable frame (zero frames)")
        positions, total = indices, table.count
        if [table.first_rank.get(p) for p in pts] != list(range(table.count)):  # not one frame per packet
            try:
                positions = np.asarray(_DecordReader(table, pts, path).get_batch(indices.tolist()), np.int64)
            except _NotReplayed:
                total = len(times)
                positions, sample_fps = _sample(path, sampler, total, table.fps)
                kept = {}  # the transform may depend on the frame count the sampler saw
            kept = _decoded(path, kept, positions, transform, len(times))
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: {e}") from e
    return _stacked(path, kept, positions, times, sample_fps, total, table.fps)


_NOPTS = -(2**63)  # AV_NOPTS_VALUE, where decord's packet table sorts a packet without pts


class _NotReplayed(Exception):
    """decord fails to read the batch (qwen-vl-utils then falls back to torchvision), or the replay cannot follow."""


@dataclasses.dataclass(frozen=True)
class _PacketTable:
    """What decord reads of a video's packets before decoding (``IndexKeyframes``), and where FFmpeg's seeks land."""

    count: int  # the stream's packets: len(vr)
    fps: float  # avg_frame_rate: vr.get_avg_fps()
    sorted_pts: list[int]  # the packets' pts, sorted: decord's frame_ts_ (frame i's pts)
    first_rank: dict[int, int]  # pts -> its first rank in sorted_pts: decord's pts_frame_map_
    keys: list[int]  # keyframe packets' indices in demux order: decord's key_indices_
    key_pts: list[int]
    key_dts: list[int]
    # mov_seek_stream searches its index by dts for (pts - this): the first packet's pts - dts, less the lowest pts
    # from the first packet kept by the edit list on (measured on decord's FFmpeg 4.1: exact where it matters)
    seek_offset: int

    @classmethod
    def scan(cls, path: str) -> "_PacketTable":
        container, stream = _open_video(path)
        with container:
            rate = stream.average_rate
            packets = [(_NOPTS if p.pts is None else p.pts, _NOPTS if p.dts is None else p.dts, p.is_keyframe,
                        p.is_discard) for p in container.demux(stream)
                       if not (p.size == 0 and p.pts is None and p.dts is None)]  # not PyAV's flush packet
        pts = sorted(p[0] for p in packets)
        first_rank: dict[int, int] = {}
        for rank, p in enumerate(pts):
            first_rank.setdefault(p, rank)
        keys = [i for i, p in enumerate(packets) if p[2]]
        kept = next((i for i, p in enumerate(packets) if not p[3]), 0)
        offset = (packets[0][0] - packets[0][1] - min(p[0] for p in packets[kept:])) if packets else 0
        return cls(count=len(packets), fps=float(rate) if rate else 0.0, sorted_pts=pts, first_rank=first_rank,
                   keys=keys, key_pts=[packets[i][0] for i in keys], key_dts=[packets[i][1] for i in keys],
                   seek_offset=offset)


class _DecordReader:
    """decord 0.6.0's ``VideoReader::GetBatch`` (src/video/video_reader.cc) replayed over the decoded frames, for
    videos where not every packet decodes to a frame. Its state: ``curr_frame_`` (`cur`, in packet numbers), the
    decoded frame the decoder gives next (`out`; past the last one the decoder gives end-of-file markers), the
    last frame returned since the last seek (`cached`, decord's fallback at end of file) and a keyframe held back
    by a seek (`key_frame` while `overrun`). A seek to frame p asks FFmpeg for frame p's pts and decoding restarts
    at the keyframe packet mov's index search finds (forward, or backward when going back, with decord's retry);
    the first frame out is the first decoded one from that keyframe's pts on (closed GOPs). ``CheckKeyFrame``
    then renumbers by the decoded frame's pts rank, while skipping counts frames one by one, so the two
    numberings part where frames were dropped."""

    REWIND_RETRY_MAX = 16  # DECORD_REWIND_RETRY_MAX's default

    def __init__(self, table: _PacketTable, decoded_pts: list, path: str):
        ranks = [table.first_rank.get(p) for p in decoded_pts]
        if any(r is None for r in ranks) or any(a >= b for a, b in zip(ranks, ranks[1:])):  # type: ignore[operator]
            raise _NotReplayed(f"{path}: decoded frames whose pts are not the packets' in order")
        self.table, self.path, self.count = table, path, table.count
        self.ranks: list[int] = ranks  # type: ignore[assignment]
        self.decoded_pts: list[int] = decoded_pts
        self.cur, self.out, self.cached = 0, 0, None  # after the constructor's Seek(0)
        self.overrun, self.key_frame = False, 0
        self.fresh = True  # sought, and nothing taken from the decoder since: its queue is empty

    def get_batch(self, indices: list[int]) -> list[int]:
        """The decoded frame each of `indices` gives (a repeated index copies its first occurrence)."""
        got: list[int] = []
        first: dict[int, int] = {}
        for i, pos in enumerate(indices):
            if pos in first:
                got.append(got[first[pos]])
                continue
            first[pos] = i
            if self.cur != pos:
                self._seek_accurate(pos)
            got.append(self._next_frame())
        return got

    def _locate_keyframe(self, pos: int) -> int:
        keys = self.table.keys
        if not keys or pos <= keys[0]:
            return 0
        if pos >= self.count:
            return keys[-1]
        return keys[bisect.bisect_right(keys, pos) - 1]

    def _seek(self, pos: int) -> None:
        if self.cur == pos:
            return
        t = self.table
        target = t.sorted_pts[pos] - t.seek_offset
        forward = bisect.bisect_left(t.key_dts, target)  # the first keyframe at or after target
        if self.cur > pos or forward == len(t.keys):  # AVSEEK_FLAG_BACKWARD, or decord's retry with it
            land = max(bisect.bisect_right(t.key_dts, target) - 1, 0)  # the last at or before, else the first
        else:
            land = forward
        self.cached = None
        self.out = bisect.bisect_left(self.decoded_pts, t.key_pts[land]) if t.keys else 0
        self.cur = pos
        self.fresh = True

    def _check_key_frame(self) -> bool:
        j = self.out
        self.out += 1
        self.fresh = False
        if j >= len(self.ranks):  # an end-of-file marker: sought past the end
            self.cur = self.count
            return False
        if self.cur != self.ranks[j]:
            self.cur = self.ranks[j] + 1
            return False
        self.cur += 1
        self.key_frame = j
        return True

    def _skip(self, num: int) -> None:
        num = min(self.count - self.cur, num)
        if num >= 1:
            self.out += num
            self.cur += num
            self.fresh = False

    def _seek_accurate(self, pos: int) -> None:
        if self.cur == pos:
            return
        key_pos, cur_key_pos = self._locate_keyframe(pos), self._locate_keyframe(self.cur)
        self.overrun = False
        if key_pos != cur_key_pos or pos < self.cur:
            self._seek(0)
            self._seek(key_pos)
            if self._check_key_frame():
                if pos > key_pos:
                    self._skip(pos - self.cur)
                else:
                    self.overrun = True
            elif self.cur < pos:
                self._skip(pos - self.cur)
            else:
                key_pos = self._locate_keyframe(pos)
                self._seek(key_pos)
                self._skip(pos - key_pos)
        else:
            self._skip(pos - self.cur)

    def _next_frame(self) -> int:
        if self.overrun:
            self.overrun = False
            return self.key_frame
        rewind, marker = 0, False
        while True:
            if self.cur >= self.count:
                raise _NotReplayed(f"{self.path}: decord reads past the last frame")
            # NextFrameImpl keeps the frame it last popped, and Pop leaves it when the decoder's queue is empty
            # (just sought, the packet it pushed not yet decoded): an end-of-file marker seen before counts again
            if not (marker and self.fresh):
                j = self.out
                self.out += 1
                self.fresh = False
                if j < len(self.ranks):
                    break
                marker = True
            if self.cached is not None:  # at end of file decord repeats the last frame it returned
                j = self.cached
                break
            if rewind > self.REWIND_RETRY_MAX:
                raise _NotReplayed(f"{self.path}: decord gives up rewinding at end of file")
            self._seek_accurate(self.cur - rewind)
            rewind += 1
        self.cur += 1
        self.cached = j
        return j


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How frames are sampled and resized (VideoNSA's training values by default)."""

    fps: float = 4.0
    min_frames: int = 350
    max_frames: int = 550
    min_pixels: int = processing.IMAGE_MIN_PIXELS  # the video default (100352) would exceed max_pixels
    max_pixels: int = processing.VIDEONSA_VIDEO_MAX_PIXELS


def resize_frame(frame: np.ndarray, min_pixels: int, max_pixels: int) -> np.ndarray:
    """One uint8 frame [H, W, 3] resized as the video processor does (smart_resize + torchvision bicubic)."""
    height, width = processing.smart_resize(*frame.shape[:2], min_pixels=min_pixels, max_pixels=max_pixels)
    return processing.resize_torchvision(frame, height, width)


def make_record(annotation: Annotation, video_root: str, settings: DecodeSettings) -> dict[str, Any]:
    """Decodes, samples and resizes one annotation's video into a record; raises VideoDecodeError."""
    path = os.path.join(video_root, annotation.video)
    sampler = functools.partial(processing.sample_frame_indices, fps=settings.fps, min_frames=settings.min_frames,
                                max_frames=settings.max_frames)
    sampled = read_video(path, sampler, functools.partial(resize_frame, min_pixels=settings.min_pixels,
                                                          max_pixels=settings.max_pixels))
    frames = sampled.frames
    tps, patch = processing.TEMPORAL_PATCH_SIZE, processing.PATCH_SIZE
    grid = (-(-len(frames) // tps), frames.shape[1] // patch, frames.shape[2] // patch)
    return {
        "id": annotation.id,
        "video": annotation.video,
        "frames": frames,
        "grid_thw": np.array(grid, np.int32),
        "timestamps": sampled.timestamps,
        "fps": sampled.fps,
        "second_per_grid_t": tps / sampled.fps,
        "conversations": annotation.conversation_dicts(),
    }
