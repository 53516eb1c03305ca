"""A video's model inputs under a preprocessing preset: decoded with PyAV, sampled, resized and patchified."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from data.decode import SampledFrames, read_video, read_video_decord
from nsa_jax import processing


@dataclasses.dataclass(frozen=True)
class VideoInputs:
    pixel_values_videos: np.ndarray  # float32 [N, 1176]
    video_grid_thw: np.ndarray  # int64 [1, 3]
    second_per_grid_ts: list[float]


def read_video_inputs(path: str, preset: processing.Preset) -> VideoInputs:
    """The patchified frames of `path` under `preset`; raises data.decode.VideoDecodeError."""
    if not preset.lmms_eval:
        sampled = read_video(path, functools.partial(processing.frame_indices, preset=preset))
        pixels, grid, spg = processing.preprocess_video(sampled.frames, sampled.fps, min_pixels=preset.min_pixels,
                                                        max_pixels=preset.max_pixels)
        return VideoInputs(pixels, grid, [spg])
    pixels, grid, spg = processing.processor_video(fetch_video(path, preset).frames, preset)
    return VideoInputs(pixels, grid, [spg])


def fetch_video(path: str, preset: processing.Preset) -> SampledFrames:
    """What lmms-eval's ``fetch_video`` hands the processor under an ``lmms_eval`` preset: the frames decord picks
    (frame count, fps and numbering as decord's ``VideoReader`` has them: data.decode.read_video_decord), each
    resized (uint8) as soon as it is decoded; raises data.decode.VideoDecodeError."""
    num_frames = 0

    def counting_sampler(total: int, video_fps: float) -> tuple[np.ndarray, float]:
        nonlocal num_frames
        indices, fps = processing.frame_indices(total, video_fps, preset)
        num_frames = len(indices)
        return indices, fps

    def fetch(frame: np.ndarray) -> np.ndarray:  # the frame count is known before any frame is decoded
        return processing.fetch_frame(frame, *processing.fetch_size(*frame.shape[:2], num_frames, preset))

    return read_video_decord(path, counting_sampler, fetch)
