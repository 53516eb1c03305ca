"""Qwen2.5-VL image and video preprocessing in NumPy, array-for-array as in transformers 4.57.

Pipeline: ``smart_resize`` picks the target size, ``resize_pil`` / ``resize_torchvision`` resample
uint8 frames, ``normalize`` rescales by 1/255 and applies the OpenAI CLIP mean/std, ``patchify``
pads the frame count to the temporal patch and flattens to rows of ``3 * 2 * 14 * 14``.

Both transformers resampling paths are mirrored exactly (``resample=``):

* ``"pil"``: the slow ``Qwen2VLImageProcessor`` (PIL bicubic on uint8, rescale in float64 then
  cast to float32, normalize in float32). Default for images; qwen-vl-utils resizes images with PIL.
* ``"torchvision"``: ``Qwen2VLVideoProcessor`` and ``Qwen2VLImageProcessorFast`` on CPU
  (torchvision ``resize`` on uint8 tensors, which runs torch's native uint8 antialiased bicubic
  kernel, then the fused float32 ``(x - 255 * mean) / (255 * std)``). Default for videos;
  qwen-vl-utils, which VideoNSA trained and evaluated with, resizes video frames with the same call.

The named presets at the end (``get_preset``: the release's eval pipeline, float resize included, and the
training presets) choose frame sampling and sizes for eval, analyze and predecode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import numpy as np
from PIL import Image

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * MERGE_SIZE
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280
VIDEO_MIN_PIXELS = 128 * 28 * 28  # Qwen2VLVideoProcessor and qwen-vl-utils default
VIDEO_MAX_PIXELS = 28 * 28 * 768  # Qwen2VLVideoProcessor and qwen-vl-utils default
VIDEONSA_VIDEO_MAX_PIXELS = 50176  # per frame, VideoNSA training
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768

Resample = Literal["torchvision", "pil"]


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    *,
    at_least_factor: bool = False,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept.

    Same arithmetic as transformers' ``qwen2_vl.image_processing_qwen2_vl.smart_resize`` (Python's
    round-half-to-even included); ``max_pixels`` is checked first, so it wins when both bind.
    at_least_factor: each rounded side is at least ``factor``, as qwen-vl-utils' (and lmms-eval's) copy has it.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if at_least_factor:
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = 2.0,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    rule: Literal["qwen_vl_utils", "transformers"] = "qwen_vl_utils",
) -> tuple[np.ndarray, float]:
    """Indices of the frames to keep when sampling a decoded video at ``fps``, and the fps to report.

    Frame count (both rules): ``n = total_frames / video_fps * fps`` clamped to ``[min_frames,
    min(max_frames, total_frames)]`` (the upper bound first floored to a multiple of
    ``temporal_patch_size``), then floored to a multiple of ``temporal_patch_size``.
    ``"qwen_vl_utils"`` (qwen-vl-utils ``smart_nframes``; VideoNSA's ms-swift training and
    lmms-eval): ``min_frames`` is first ceiled to a multiple of the patch, indices are
    ``torch.linspace(0, total_frames - 1, n).round()`` as torch computes it in float32
    (``torch_linspace_round``), and the returned fps is the effective rate ``n / total_frames *
    video_fps``. ``"transformers"`` (``Qwen2VLVideoProcessor.sample_frames``):
    indices are ``torch.arange(0, total_frames, total_frames / n).int()`` reproduced bit for bit,
    which for some sizes yields ``n + 1`` frames; the returned fps is the requested ``fps`` (what
    ``Qwen2_5_VLProcessor`` puts in ``second_per_grid_ts``). Pass the returned fps to
    ``preprocess_video``.
    """
    if total_frames < 1 or video_fps <= 0:
        raise ValueError(f"need total_frames >= 1 and video_fps > 0, got {total_frames}, {video_fps}")
    tps = temporal_patch_size
    if rule == "qwen_vl_utils":
        min_frames = math.ceil(min_frames / tps) * tps
    elif rule != "transformers":
        raise ValueError(f"unknown rule {rule!r}")
    upper = math.floor(min(max_frames, total_frames) / tps) * tps
    n = min(min(max(total_frames / video_fps * fps, min_frames), upper), total_frames)
    n = math.floor(n / tps) * tps
    if not tps <= n <= total_frames:
        raise ValueError(f"cannot sample {n} frames (a multiple of {tps}) from a video of {total_frames} frames")
    if rule == "qwen_vl_utils":
        return torch_linspace_round(0, total_frames - 1, n), n / total_frames * video_fps
    step = total_frames / n
    count = math.ceil(total_frames / step)
    return (np.arange(count) * step).astype(np.float32).astype(np.int64), float(fps)


def torch_linspace_round(start: int, end: int, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps).round().long()`` bit for bit, as torch's CPU kernel computes it.

    float32 throughout: ``step = (end - start) / (steps - 1)``; the first ``steps // 2`` values are
    ``start + step * i``, the rest ``end - step * (steps - 1 - i)``, each a fused multiply-add (one
    rounding), as the AVX2 / AVX512 builds torch dispatches to on x86 compile it (its non-SIMD
    ``ATEN_CPU_CAPABILITY=default`` build rounds the product first); then round half to even.
    """
    f32 = np.float32
    if steps == 1:
        return np.array([start], np.int64)
    first, last = f32(start), f32(end)
    step = np.float64(f32(f32(last - first) / f32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    low = (np.float64(first) + step * i).astype(f32)  # exact in float64, then one rounding to float32
    high = (np.float64(last) - step * (steps - 1 - i)).astype(f32)
    return np.rint(np.where(i < steps // 2, low, high)).astype(np.int64)


def resize_pil(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of uint8 ``[..., H, W, 3]`` with PIL, as the slow ``Qwen2VLImageProcessor``."""
    images = _check_uint8_rgb(images)
    if images.shape[-3:-1] == (height, width):
        return images
    flat = images.reshape(-1, *images.shape[-3:])
    out = [np.asarray(Image.fromarray(f).resize((width, height), resample=Image.Resampling.BICUBIC)) for f in flat]
    return np.stack(out).reshape(*images.shape[:-3], height, width, images.shape[-1])


def resize_torchvision(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bicubic resize of uint8 ``[..., H, W, 3]``, bit-exact to torchvision on CPU.

    torchvision's ``resize`` sends uint8 bicubic to torch's native uint8 kernel
    (``_upsample_bicubic2d_aa``): per axis, Keys cubic (a = -0.5) weights with PIL's support and
    centering, normalized in float64, rounded to int16 at the largest precision the axis's largest
    weight allows; each output is ``clip((sum(x * w) + 2**(p-1)) >> p, 0, 255)``. The width pass
    runs first and its uint8 result feeds the height pass; an axis whose size is unchanged is skipped.
    """
    images = _check_uint8_rgb(images)
    in_h, in_w = images.shape[-3:-1]
    if (in_h, in_w) == (height, width):
        return images
    taps_w = _aa_bicubic_int16_taps(in_w, width) if in_w != width else None
    taps_h = _aa_bicubic_int16_taps(in_h, height) if in_h != height else None
    flat = images.reshape(-1, in_h, in_w, images.shape[-1])
    out = np.empty((len(flat), height, width, images.shape[-1]), np.uint8)
    for i, frame in enumerate(flat):  # one frame at a time bounds the int32 temporaries
        if taps_w is not None:
            frame = _resample_axis(frame, 1, *taps_w)
        if taps_h is not None:
            frame = _resample_axis(frame, 0, *taps_h)
        out[i] = frame
    return out.reshape(*images.shape[:-3], height, width, images.shape[-1])


def _aa_bicubic_int16_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Per output index: input indices [out, K], int16-valued weights [out, K], precision bits."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    index = np.zeros((out_size, taps), np.int64)
    weight = np.zeros((out_size, taps), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(max(min(int(center + support + 0.5), in_size) - xmin, 0), taps)
        w = np.array([_keys_cubic((j + xmin - center + 0.5) * invscale) for j in range(xsize)])
        total = 0.0
        for v in w:  # sequential sum, as the C++ loop
            total += v
        if total != 0.0:
            weight[i, :xsize] = w / total
        index[i, :xsize] = np.arange(xmin, xmin + xsize)
    wt_max = weight.max()
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weight * (1 << precision)
    return index, np.trunc(scaled + np.where(scaled < 0, -0.5, 0.5)).astype(np.int64), precision


def _keys_cubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2.0:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def _resample_axis(frame: np.ndarray, axis: int, index: np.ndarray, weight: np.ndarray, precision: int) -> np.ndarray:
    """One separable pass of ``resize_torchvision`` over ``axis`` of a uint8 [H, W, C] frame."""
    x = np.ascontiguousarray(np.moveaxis(frame, axis, 0)).astype(np.int32)
    acc = np.full((index.shape[0],) + x.shape[1:], 1 << (precision - 1), np.int32)
    for k in range(index.shape[1]):
        acc += x[index[:, k]] * weight[:, k, None, None].astype(np.int32)
    return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def _check_uint8_rgb(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim < 3 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [..., H, W, 3], got {images.dtype} {images.shape}")
    return images


def normalize(
    images: np.ndarray,
    fused: bool = False,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 ``(x / 255 - mean) / std``, rounded as transformers does.

    ``fused=False``: the slow image processor (``x * (1/255)`` in float64, cast to float32, then
    ``(x - mean) / std`` in float32). ``fused=True``: the torch processors (``(x - mean * 255) /
    (std * 255)`` in float32, the constants scaled in float32).
    """
    mean32, std32 = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if fused:
        return (images.astype(np.float32) - mean32 * np.float32(255.0)) / (std32 * np.float32(255.0))
    return ((images.astype(np.float64) * (1 / 255)).astype(np.float32) - mean32) / std32


def patchify(
    frames: np.ndarray,
    patch_size: int = PATCH_SIZE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Float ``[T, H, W, C]`` -> rows ``[grid_t * grid_h * grid_w, C * tps * p * p]`` and (t, h, w).

    T is padded to a multiple of ``temporal_patch_size`` by repeating the last frame. Rows come in
    transformers' order: time, then 2x2 merge groups in raster order, then the patches inside a
    group in raster order; a row is laid out (channel, time, row, column).
    """
    t, h, w, c = frames.shape
    if h % (patch_size * merge_size) or w % (patch_size * merge_size):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {patch_size * merge_size}")
    if t % temporal_patch_size:
        pad = np.repeat(frames[-1:], temporal_patch_size - t % temporal_patch_size, axis=0)
        frames = np.concatenate([frames, pad], axis=0)
    gt, gh, gw = frames.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(
        gt, temporal_patch_size, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size, c
    )
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size), (gt, gh, gw)


def _resize_and_normalize(frames: np.ndarray, height: int, width: int, resample: Resample) -> np.ndarray:
    """The resampler and the normalization of the transformers processor that uses it."""
    if resample == "torchvision":
        return normalize(resize_torchvision(frames, height, width), fused=True)
    if resample == "pil":
        return normalize(resize_pil(frames, height, width))
    raise ValueError(f"unknown resample {resample!r}")


def preprocess_images(
    images: Sequence[np.ndarray],
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    resample: Resample = "pil",
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``[H, W, 3]`` images -> ``pixel_values`` float32 [N, 1176], ``image_grid_thw`` int64 [n, 3].

    Each image is resized on its own, repeated to two frames, and its rows are concatenated in
    order. ``resample="pil"`` equals the slow ``Qwen2VLImageProcessor`` (and qwen-vl-utils' PIL
    resize); ``"torchvision"`` equals ``Qwen2VLImageProcessorFast`` on CPU, which transformers 4.57's
    ``AutoImageProcessor`` picks for Qwen2-VL checkpoints whenever torchvision is installed.
    """
    rows, grids = [], []
    for image in images:
        h, w = smart_resize(*np.shape(image)[:2], min_pixels=min_pixels, max_pixels=max_pixels)
        r, grid = patchify(_resize_and_normalize(np.asarray(image)[None], h, w, resample))
        rows.append(r)
        grids.append(grid)
    return np.concatenate(rows), np.array(grids, np.int64).reshape(-1, 3)


def preprocess_video(
    frames: np.ndarray,
    fps: float,
    min_pixels: int = VIDEO_MIN_PIXELS,
    max_pixels: int = VIDEO_MAX_PIXELS,
    resample: Resample = "torchvision",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Sampled uint8 frames ``[T, H, W, 3]`` at ``fps`` -> (pixel_values [N, 1176], video_grid_thw [1, 3],
    second_per_grid_t = temporal_patch_size / fps).

    ``resample="torchvision"`` equals ``Qwen2VLVideoProcessor`` on CPU (and ``Qwen2_5_VLProcessor``'s
    ``second_per_grid_ts`` for ``fps``); ``"pil"`` equals ``Qwen2VLImageProcessor(videos=...)``.
    """
    frames = _check_uint8_rgb(frames)
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T, H, W, 3], got {frames.shape}")
    h, w = smart_resize(*frames.shape[1:3], min_pixels=min_pixels, max_pixels=max_pixels)
    rows, grid = patchify(_resize_and_normalize(frames, h, w, resample))
    return rows, np.array([grid], np.int64), TEMPORAL_PATCH_SIZE / fps


# ---------------------------------------------------------------------------------------------- mRoPE ids


class PromptTokens(Protocol):
    """What prompts need of a model config (`nsa_jax.config.ModelConfig` has it): the vision token ids, the
    vision tower's patch layout and tokens per second, and the video time-id rule."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    video_time_ids: str  # "truncate" (int(second_per_grid_t), as trained) or "exact"
    vision: Any  # .spatial_merge_size, .tokens_per_second, .patch_dim


def _vision_span_ids(t: int, h: int, w: int, time_step: float, config: PromptTokens) -> np.ndarray:
    """Ids [3, t*h*w] of one merged-token grid relative to its start, before the offset."""
    tt = np.arange(t)
    if config.video_time_ids == "truncate":
        time = tt * int(time_step) * config.vision.tokens_per_second
    else:
        time = np.floor(tt * time_step * config.vision.tokens_per_second + 1e-9).astype(np.int64)
    t_idx = np.repeat(time, h * w)
    h_idx = np.tile(np.repeat(np.arange(h), w), t)
    w_idx = np.tile(np.arange(w), t * h)
    return np.stack([t_idx, h_idx, w_idx]).astype(np.int64)


def sequence_rope_index(tokens: np.ndarray, config: PromptTokens,
                        image_grid_thw: Sequence[Sequence[int]] = (),
                        video_grid_thw: Sequence[Sequence[int]] = (),
                        second_per_grid_ts: Sequence[float] | None = None) -> np.ndarray:
    """Position ids [3, len(tokens)] of one unpadded sequence whose vision spans use the given grids in order."""
    merge = config.vision.spatial_merge_size
    tokens = np.asarray(tokens)
    n = len(tokens)
    out = np.zeros((3, n), np.int64)
    img_i = vid_i = 0
    pos = 0  # next token index to place
    next_id = 0  # first id of the next span
    starts = np.flatnonzero(tokens[:-1] == config.vision_start_token_id) + 1
    for st in starts:
        kind = tokens[st]
        if kind == config.image_token_id:
            if img_i >= len(image_grid_thw):
                raise ValueError(f"more image spans than image_grid_thw rows ({len(image_grid_thw)})")
            t, h, w = image_grid_thw[img_i]
            time_step = 0.0
            img_i += 1
        elif kind == config.video_token_id:
            if vid_i >= len(video_grid_thw):
                raise ValueError(f"more video spans than video_grid_thw rows ({len(video_grid_thw)})")
            t, h, w = video_grid_thw[vid_i]
            time_step = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[vid_i])
            vid_i += 1
        else:
            continue
        h, w = int(h) // merge, int(w) // merge
        span = int(t) * h * w
        if st + span > n or np.any(tokens[st:st + span] != kind):
            raise ValueError(f"vision span at token {st} needs {span} pad tokens for grid {(t, h * merge, w * merge)}")
        text_len = st - pos
        out[:, pos:st] = next_id + np.arange(text_len)
        ids = _vision_span_ids(int(t), h, w, time_step, config) + next_id + text_len
        out[:, st:st + span] = ids
        next_id = int(ids.max()) + 1
        pos = st + span
    out[:, pos:] = next_id + np.arange(n - pos)
    return out


def get_rope_index(input_ids: np.ndarray, config: PromptTokens, *, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, attention_mask: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """3-D position ids [3, B, T] and rope deltas [B] for a (padded) batch, as transformers' `get_rope_index`.

    The rule Qwen2.5-VL and VideoNSA were trained with (transformers 4.49-4.57, SPEC §1): a vision span starts
    at s = (max id so far) + 1 and gets ids (s + t * int(second_per_grid_t) * tokens_per_second, s + row,
    s + col); text after it continues from the span's max id + 1. `config.video_time_ids == "exact"` uses
    floor(t * second_per_grid_t * tokens_per_second).

    Grids are consumed across the batch in order. Padded positions (attention_mask == 0) get id 1.
    """
    input_ids = np.asarray(input_ids)
    b, n = input_ids.shape
    mask = np.ones_like(input_ids, bool) if attention_mask is None else np.asarray(attention_mask) == 1
    images = [] if image_grid_thw is None else [tuple(map(int, g)) for g in np.asarray(image_grid_thw)]
    videos = [] if video_grid_thw is None else [tuple(map(int, g)) for g in np.asarray(video_grid_thw)]
    spg = None if second_per_grid_ts is None else [float(s) for s in np.asarray(second_per_grid_ts)]
    pos = np.ones((3, b, n), np.int64)
    deltas = np.zeros((b,), np.int64)
    img_used = vid_used = 0
    for i in range(b):
        toks = input_ids[i][mask[i]]
        follow = toks[np.flatnonzero(toks[:-1] == config.vision_start_token_id) + 1]
        n_img = int(np.sum(follow == config.image_token_id))
        n_vid = int(np.sum(follow == config.video_token_id))
        ids = sequence_rope_index(toks, config, images[img_used:img_used + n_img], videos[vid_used:vid_used + n_vid],
                                  None if spg is None else spg[vid_used:vid_used + n_vid])
        img_used += n_img
        vid_used += n_vid
        pos[:, i, mask[i]] = ids
        deltas[i] = (ids.max() + 1 if ids.size else 0) - n
    return pos, deltas


# ---- Named video preprocessing presets (`get_preset`): how frames are sampled and resized before patchify ----
#
# * ``videonsa_eval``: the release's evaluation (SPEC §7): lmms-eval's ``smart_nframes`` (fps, 4 to 500 frames,
#   even) with ``torch.linspace(...).round()`` indices over the frames as decord counts and numbers them
#   (data.decode.read_video_decord), its ``fetch_video`` resize (its ``smart_resize`` with the
#   wrapper's min / max pixels, torchvision's v1 tensor resize: float bicubic, clamp, round), then what the
#   transformers video processor does to those frames with the same min / max pixels (``smart_resize`` again,
#   which upscales whenever min_pixels exceeds the frame, a float bicubic resize without rounding, fused
#   normalize), and ``second_per_grid_ts`` from the processor's fps 2.0, not from the sampling rate.
# * ``videonsa_train``: SPEC §1's training data, 4 fps, 350-550 frames, at most 50,176 pixels a frame.
# * ``videonsa_train_qwen_vl_utils``: the same with the per-frame bound qwen-vl-utils' ``fetch_video`` applies
#   to the released training script's settings: [128 * 28 * 28, int(128 * 28 * 28 * 1.05)] pixels.
# The two training presets sample and resize as the predecoder does (the video path above).

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
    Preset("videonsa_train", fps=4.0, min_frames=350, max_frames=550, min_pixels=IMAGE_MIN_PIXELS,
           max_pixels=VIDEONSA_VIDEO_MAX_PIXELS, lmms_eval=False),
    Preset("videonsa_train_qwen_vl_utils", fps=4.0, min_frames=350, max_frames=550,
           min_pixels=VIDEO_MIN_PIXELS, max_pixels=int(VIDEO_MIN_PIXELS * 1.05),
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
    return sample_frame_indices(total_frames, video_fps, fps=preset.fps, min_frames=preset.min_frames,
                                           max_frames=preset.max_frames)


def fetch_size(height: int, width: int, num_frames: int, preset: Preset) -> tuple[int, int]:
    """The size lmms-eval's fetch_video resizes decoded frames to (its max_pixels bound included)."""
    bound = max(min(LMMS_VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / num_frames * 2), int(preset.min_pixels * 1.05))
    return smart_resize(height, width, IMAGE_FACTOR, preset.min_pixels,
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
    h, w = smart_resize(*frames.shape[1:3], min_pixels=preset.min_pixels, max_pixels=preset.max_pixels)
    resized = resize_float(frames.astype(np.float32), h, w)
    rows, grid = patchify(normalize(resized, fused=True))
    return rows, np.array([grid], np.int64), TEMPORAL_PATCH_SIZE / PROCESSOR_FPS
