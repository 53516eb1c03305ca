"""Video decoding with PyAV: the frames a sampler picks, as RGB uint8 arrays, and an annotation's record.

The frame count a sampler sees is the number of frames that really decode (as a decoder that reads the
whole video reports it): the container's count is tried first, and if decoding disagrees the video is
decoded once more with the true count. Frames come out upright: the stream's rotation (display matrix side
data, else a `rotate` metadata tag) is applied. A variable-frame-rate video is sampled by presentation time:
the sampler's frame numbers are read as evenly spaced times and each picks the frame nearest its time.
"""

from __future__ import annotations

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


def _decode(path: str, wanted: set[int], transform: FrameTransform) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Decodes the whole video; returns every frame's time (seconds from frame 0) and {index: transformed
    upright rgb} of the `wanted` frames."""
    container, stream = _open_video(path)
    kept = {}
    times = []
    with container:
        for frame in container.decode(stream):
            count = len(times)
            times.append(float(frame.time or 0.0))
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
        if not kept.keys() >= set(indices.tolist()):
            again, kept = _decode(path, set(indices.tolist()), transform)
            if len(again) != total:
                raise VideoDecodeError(f"{path}: the frame count changes between two decodes")
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{path}: {e}") from e
    shapes = {kept[i].shape for i in set(indices.tolist())}
    if len(shapes) > 1:
        raise VideoDecodeError(f"{path}: the frame size changes within the video {sorted(shapes)}")
    frames = np.stack([kept[i] for i in indices.tolist()])
    return SampledFrames(frames=frames, timestamps=times[indices].astype(np.float32), fps=sample_fps,
                         total_frames=total, video_fps=fps)


def _sample(path: str, sampler: FrameSampler, total: int, fps: float) -> tuple[np.ndarray, float]:
    if total == 0:  # the container declares nothing: decode everything once to count
        return np.zeros(0, np.int64), 0.0
    try:
        indices, sample_fps = sampler(total, fps)
    except ValueError as e:  # e.g. fewer frames than one temporal patch
        raise VideoDecodeError(f"{path}: {e}") from e
    return np.asarray(indices, np.int64), float(sample_fps)


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
