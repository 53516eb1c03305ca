"""Named video preprocessing presets: how frames are sampled and resized before patchify (numpy only).

* ``videonsa_eval``: the release's evaluation (SPEC §7): lmms-eval's ``smart_nframes`` (fps, 4 to 500 frames,
  even) with ``torch.linspace(...).round()`` indices over the frames as decord counts and numbers them
  (data.decode.read_video_decord), its ``fetch_video`` resize (its ``smart_resize`` with the
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
    """float32 [T, H, W, C] resized bit for bit as torch's CPU ``interpolate(mode="bicubic", antialias=True)``
    resizes float32 NCHW: both of the release's resizes (qwen-vl-utils' ``fetch_video`` casts the uint8 frames to
    float32 first; the video processor is handed float32 frames).

    ATen's separable kernel: the width pass, then the height pass on its float32 result (an axis whose size is
    unchanged is skipped), with ``_aa_taps``' weights. Its loop ``acc = x[0] * w[0]; acc += x[j] * w[j]`` as GCC
    13 compiled it in torch's AVX2 build (read in the binaries of torch 2.8.0, the release's lock, and 2.14.1; CPUs
    with AVX512 run it too, the kernel has no AVX512 build): of an output's n taps, the 4 * ((n - 1) // 4) after
    the first go four at a time, four float32 products then four in-order float32 adds; each later tap is one
    fused multiply-add. (A CPU without AVX2 runs torch's plain scalar build, which this does not reproduce.)
    """
    frames = np.asarray(frames, np.float32)
    out = np.empty(frames.shape[:1] + (height, width) + frames.shape[3:], np.float32)
    for t, frame in enumerate(frames):  # one frame at a time bounds the temporaries
        for axis, size in ((1, width), (0, height)):
            if frame.shape[axis] == size:
                continue
            index, weight, unfused = _aa_taps(frame.shape[axis], size)
            x = np.moveaxis(frame, axis, 0)
            acc = x[index[:, 0]] * weight[:, 0, None, None]  # numpy's float32 ops round each result once
            for k in range(1, index.shape[1]):
                if not weight[:, k].any():  # past every output's support: a tap of weight 0 leaves acc as it is
                    continue
                xk, wk, uk = x[index[:, k]], weight[:, k, None, None], unfused[:, k]
                if uk.all():
                    acc = acc + xk * wk
                elif not uk.any():
                    acc = _fma32(xk, wk, acc)
                else:
                    acc = np.where(uk[:, None, None], acc + xk * wk, _fma32(xk, wk, acc))
            frame = np.moveaxis(acc, 0, axis)
        out[t] = frame
    return out


@functools.lru_cache(maxsize=32)
def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Input indices [out, K], float32 weights [out, K] and which taps are added unfused [out, K] of one axis, as
    ATen's ``_compute_indices_min_size_weights_aa`` computes them in float32: scale = in / out, PIL's support and
    centering, Keys cubic (a = -0.5) weights (its polynomials as FMAs), normalised by their sequential sum.
    Weights past an output's support are 0, their indices clipped into range."""
    f32, f64 = np.float32, np.float64
    scale = f32(f32(in_size) / f32(out_size))
    support = f32(2.0 * f64(scale)) if scale >= 1.0 else f32(2.0)
    invscale = f32(1.0 / f64(scale)) if scale >= 1.0 else f32(1.0)
    taps = int(np.ceil(support)) * 2 + 1
    center = (f64(scale) * (np.arange(out_size) + 0.5)).astype(f32)
    xmin = np.maximum((center - support).astype(f64) + 0.5, 0).astype(np.int64)  # float32 difference, then trunc
    xsize = np.clip(np.minimum(((center + support).astype(f64) + 0.5).astype(np.int64), in_size) - xmin, 0, taps)
    j = np.arange(taps)
    arg = (((xmin[:, None] + j).astype(f32) - center[:, None]).astype(f64) + 0.5) * f64(invscale)
    x = np.abs(arg.astype(f32))
    a = f32(-0.5)  # Keys: ((a + 2) x - (a + 3)) x x + 1 below 1, ((a x - 5 a) x + 8 a) x - 4 a below 2, as FMAs
    near = _fma32((_fma32(f32(a + 2), x, -f32(a + 3)) * x), x, f32(1))
    far = _fma32(_fma32(_fma32(a, x, -f32(5 * a)), x, f32(8 * a)), x, -f32(4 * a))
    w = np.where(j < xsize[:, None], np.where(x < 1, near, np.where(x < 2, far, f32(0))), f32(0))
    total = np.zeros(out_size, f32)
    for k in range(taps):  # the sequential float32 sum of the C++ loop
        total = total + w[:, k]
    w = np.where(total[:, None] != 0, w / np.where(total == 0, f32(1), total)[:, None], w)
    index = np.minimum(xmin[:, None] + j, in_size - 1)
    unfused = (j >= 1) & (j <= (xsize[:, None] - 1) // 4 * 4)
    return index, w.astype(f32), unfused


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, as an FMA instruction. The float32 product is exact in float64; the
    float64 sum s then rounds to the float32 the exact sum does unless s is a float32 halfway point (low 29
    fraction bits 1000...) or nonzero below float32's normal range. Only there the error of s is taken (TwoSum):
    s made round-to-odd rounds to float32 as the exact sum does (53 >= 24 + 2 bits)."""
    p = np.multiply(a, b, dtype=np.float64)
    s = np.add(p, c, dtype=np.float64)
    bits = s.view(np.int64)
    tiny = ((bits & 0x7FF0000000000000) < (1023 - 125) << 52) & (s != 0)
    doubtful = ((bits & 0x1FFFFFFF) == 0x10000000) | tiny
    if doubtful.any():
        at = np.nonzero(doubtful)
        ps, cs, ss = p[at], np.broadcast_to(c, s.shape)[at].astype(np.float64), s[at]
        pv = ss - cs
        e = (ps - pv) + (cs - (ss - pv))  # ss + e == ps + cs exactly
        inexact = e != 0
        bits[at] = (bits[at] - (inexact & ((e < 0) != (ss < 0)))) | inexact  # toward zero, then the odd bit
    return s.astype(np.float32)


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
