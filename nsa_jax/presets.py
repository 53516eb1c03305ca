"""Named video preprocessing presets: how frames are sampled and resized before patchify (numpy only).

* ``videonsa_eval``: the release's evaluation (SPEC §7): lmms-eval's ``smart_nframes`` (fps, 4 to 500 frames,
  even) with ``torch.linspace(...).round()`` indices, its ``fetch_video`` resize (its ``smart_resize`` with the
  wrapper's min / max pixels, torchvision's v1 tensor resize: float bicubic, clamp, round), then what the
  transformers video processor does to those frames with the same min / max pixels (``smart_resize`` again,
  which upscales whenever min_pixels exceeds the frame, a float bicubic resize without rounding, fused
  normalize), and ``second_per_grid_ts`` from the processor's fps 2.0, not from the sampling rate.
* ``videonsa_train``: SPEC §1's training data, 4 fps, 350-550 frames, at most 50,176 pixels a frame.
* ``videonsa_train_qwen_vl_utils``: the same with the per-frame bound qwen-vl-utils' ``fetch_video`` applies
  to the released training script's settings: [128 * 28 * 28, int(128 * 28 * 28 * 1.05)] pixels.
The two training presets sample and resize as the predecoder does (``processing``'s video path).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from nsa_jax import processing

PROCESSOR_FPS = 2.0  # Qwen2_5_VLProcessor's default videos_kwargs fps: second_per_grid_ts = 2 / 2.0
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # lmms-eval vision_process default
LMMS_VIDEO_MAX_PIXELS = 768 * 28 * 28


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    fps: float
    min_frames: int
    max_frames: int
    min_pixels: int
    max_pixels: int
    lmms_eval: bool  # the release's eval pipeline (else the training / predecode one)


PRESETS = {p.name: p for p in (
    Preset("videonsa_eval", fps=4.0, min_frames=4, max_frames=500, min_pixels=256 * 28 * 28, max_pixels=50176,
           lmms_eval=True),
    Preset("videonsa_train", fps=4.0, min_frames=350, max_frames=550, min_pixels=processing.IMAGE_MIN_PIXELS,
           max_pixels=processing.VIDEONSA_VIDEO_MAX_PIXELS, lmms_eval=False),
    Preset("videonsa_train_qwen_vl_utils", fps=4.0, min_frames=350, max_frames=550,
           min_pixels=processing.VIDEO_MIN_PIXELS, max_pixels=int(processing.VIDEO_MIN_PIXELS * 1.05),
           lmms_eval=False),
)}


def get_preset(name: str, **overrides: Any) -> Preset:
    """The named preset with the fields in `overrides` that are not None replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def frame_indices(total_frames: int, video_fps: float, preset: Preset) -> tuple[np.ndarray, float]:
    """The frames to decode and the sampling rate: lmms-eval's smart_nframes + torch's float32 linspace for
    ``lmms_eval`` presets (whose fps the processor ignores), else the predecoder's sampler."""
    return processing.sample_frame_indices(total_frames, video_fps, fps=preset.fps, min_frames=preset.min_frames,
                                           max_frames=preset.max_frames)


def fetch_size(height: int, width: int, num_frames: int, preset: Preset) -> tuple[int, int]:
    """The size lmms-eval's fetch_video resizes decoded frames to (its max_pixels bound included)."""
    bound = max(min(LMMS_VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / num_frames * 2), int(preset.min_pixels * 1.05))
    return processing.smart_resize(height, width, processing.IMAGE_FACTOR, preset.min_pixels,
                                   min(preset.max_pixels, bound), at_least_factor=True)


def resize_float(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of float32 [T, H, W, C] as torch's CPU ``interpolate(..., antialias=True)``:
    float32 weights, width pass then height pass, each output one fused multiply-add chain."""
    frames = np.asarray(frames, np.float32)
    if frames.shape[2] != width:
        frames = _float_pass(frames, 2, width)
    if frames.shape[1] != height:
        frames = _float_pass(frames, 1, height)
    return frames


def _float_pass(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    moved = np.moveaxis(x, axis, 0).astype(np.float64)
    out = np.empty((out_size,) + moved.shape[1:], np.float32)
    for i, (xmin, weights) in enumerate(_float_taps(moved.shape[0], out_size)):
        acc = (moved[xmin] * weights[0]).astype(np.float32)
        for j in range(1, len(weights)):
            acc = (acc.astype(np.float64) + moved[xmin + j] * weights[j]).astype(np.float32)  # one rounding
        out[i] = acc
    return np.moveaxis(out, 0, axis)


@functools.lru_cache(maxsize=32)
def _float_taps(in_size: int, out_size: int) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Per output index: (first input index, float32 weights as float64)."""
    f32 = np.float32
    scale = f32(in_size / out_size)
    support = f32(2.0 * scale) if scale >= 1.0 else f32(2.0)
    invscale = f32(1.0 / scale) if scale >= 1.0 else f32(1.0)
    taps = []
    for i in range(out_size):
        center = f32(np.float64(scale) * (i + 0.5))
        xmin = max(int(np.float64(center) - np.float64(support) + 0.5), 0)
        xsize = min(int(np.float64(center) + np.float64(support) + 0.5), in_size) - xmin
        w = [_keys_f32(f32((np.float64(f32(j + xmin) - center) + 0.5) * np.float64(invscale))) for j in range(xsize)]
        total = f32(0.0)
        for v in w:
            total = f32(total + v)
        taps.append((xmin, tuple(float(f32(v / total)) if total != 0.0 else float(v) for v in w)))
    return tuple(taps)


def _keys_f32(x: np.float32) -> np.float32:
    f32, a = np.float32, np.float32(-0.5)
    x = abs(x)
    if x < 1.0:
        return f32(f32(f32(f32(a + 2) * x - f32(a + 3)) * x) * x + 1)
    if x < 2.0:
        return f32(f32(f32(f32(a * x - f32(5 * a)) * x) + f32(8 * a)) * x - f32(4 * a))
    return f32(0.0)


def fetch_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """One uint8 frame [H, W, 3] through torchvision v1's tensor resize (float bicubic, clamp, round)."""
    out = resize_float(frame[None].astype(np.float32), height, width)[0]
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def processor_video(frames: np.ndarray, preset: Preset) -> tuple[np.ndarray, np.ndarray, float]:
    """Fetched uint8 frames [T, H, W, 3] through the transformers video processor with the preset's pixel bounds:
    (pixel_values [N, 1176], video_grid_thw [1, 3], second_per_grid_t)."""
    h, w = processing.smart_resize(*frames.shape[1:3], min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)
    resized = resize_float(frames.astype(np.float32), h, w)
    rows, grid = processing.patchify(processing.normalize(resized, fused=True))
    return rows, np.array([grid], np.int64), processing.TEMPORAL_PATCH_SIZE / PROCESSOR_FPS
