"""Frames as qwen-vl-utils samples them and torchvision resizes them, written out with PyAV and torch: the oracle
of the predecoded shards (tests/data/test_data_predecode.py, test_data_pipeline.py)."""

from __future__ import annotations

import math

import av
import numpy as np
import torch
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from data.decode import DecodeSettings


def reference_frames(path: str, s: DecodeSettings) -> tuple[np.ndarray, np.ndarray, float]:
    """qwen-vl-utils' sampling and torchvision's resize, written out with PyAV and torch."""
    with av.open(path) as c:
        video_fps = float(c.streams.video[0].average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    total = len(frames)
    n = min(max(total / video_fps * s.fps, math.ceil(s.min_frames / 2) * 2), math.floor(min(s.max_frames, total) / 2) * 2)
    n = math.floor(n / 2) * 2
    idx = torch.linspace(0, total - 1, n).round().long().numpy()
    h, w = hf_smart_resize(*frames[0].shape[:2], factor=28, min_pixels=s.min_pixels, max_pixels=s.max_pixels)
    nchw = torch.from_numpy(np.stack([frames[i] for i in idx])).permute(0, 3, 1, 2).contiguous()
    resized = torch.nn.functional.interpolate(nchw, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1).numpy(), idx / video_fps, n / total * video_fps
