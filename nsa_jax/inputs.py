"""Inputs of one prompt about a video: the tokenizer of a checkpoint and a video's decoded, patchified frames."""

from __future__ import annotations

import os


def eval_tokenizer(model_dir: str, config, tokenizer_dir: str | None = None):
    """The HF tokenizer of --tokenizer or the model directory, else a byte-level one with the config's vision ids."""
    from nsa_jax.tokenizer import (ENDOFTEXT, IM_END, IM_START, IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START,
                                   ByteTokenizer, load_tokenizer)

    tok_dir = tokenizer_dir or (model_dir if os.path.exists(os.path.join(model_dir, "tokenizer.json")) else None)
    if tok_dir:
        return load_tokenizer(tok_dir)
    vision = {VISION_START: config.vision_start_token_id, VISION_END: config.vision_end_token_id,
              IMAGE_PAD: config.image_token_id, VIDEO_PAD: config.video_token_id}
    free = (i for i in range(256, config.text.vocab_size) if i not in vision.values())
    return ByteTokenizer(config.text.vocab_size, {ENDOFTEXT: next(free), IM_START: next(free), IM_END: next(free),
                                                  **vision})


def read_video_inputs(path: str, *, fps: float, min_frames: int, max_frames: int, min_pixels: int,
                      max_pixels: int):
    """Frames of a video decoded with PyAV at `fps`, resized and patchified: a `VisionPrompt`."""
    from data.decode import read_video
    from nsa_jax import processing
    from nsa_jax.generate import VisionPrompt

    sampler = lambda total, video_fps: processing.sample_frame_indices(total, video_fps, fps=fps,
                                                                        min_frames=min_frames, max_frames=max_frames)
    sampled = read_video(path, sampler)
    pixels, grid, spg = processing.preprocess_video(sampled.frames, sampled.fps, min_pixels=min_pixels,
                                                    max_pixels=max_pixels)
    return VisionPrompt(pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=[spg])
