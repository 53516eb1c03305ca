"""Gate values and attention sinks of a VideoNSA checkpoint on one video, per layer and branch.

  python -m launch.analyze --model=DIR --video=VIDEO.mp4 --out=DIR [--question="..."] [--fps=4]

Writes `summary.json`, `gates.png` and `sinks.png` into --out (see `nsa_jax/analysis.py` for definitions).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from absl import app, flags

flags.DEFINE_string("model", None, "HF or Orbax checkpoint directory.")
flags.DEFINE_string("video", None, "Video file.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_string("question", "Describe the video.", "User text after the video.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer directory (default: the model directory if it has "
                    "tokenizer.json, else the byte-level fallback).")
flags.DEFINE_string("preset", "videonsa_eval", "Preprocessing preset (nsa_jax/presets.py); the flags below "
                    "override its fields.")
flags.DEFINE_float("fps", None, "Sampling rate (default: the preset's).")
flags.DEFINE_integer("max_frames", 64, "Most frames sampled (analysis recomputes attention maps densely).")
flags.DEFINE_integer("min_pixels", None, "Fewest pixels per frame (default: the preset's).")
flags.DEFINE_integer("max_pixels", None, "Most pixels per frame (default: the preset's).")
flags.DEFINE_float("epsilon", 0.1, "Mean received attention weight that makes a key a sink.")
flags.mark_flags_as_required(["model", "video", "out"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from nsa_jax import from_pretrained, get_rope_index
    from nsa_jax.analysis import analyze, plot
    from nsa_jax.chat import encode_chat
    from data.video_inputs import read_video_inputs
    from nsa_jax.inputs import eval_tokenizer
    from nsa_jax.model import VisionInput
    from nsa_jax.presets import get_preset
    from nsa_jax.vision import vision_layout

    model = from_pretrained(FLAGS.model)
    cfg = model.config
    tokenizer = eval_tokenizer(FLAGS.model, cfg, FLAGS.tokenizer)
    preset = get_preset(FLAGS.preset, fps=FLAGS.fps, max_frames=FLAGS.max_frames, min_pixels=FLAGS.min_pixels,
                        max_pixels=FLAGS.max_pixels)
    vision = read_video_inputs(FLAGS.video, preset)
    grid = vision.video_grid_thw
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": FLAGS.question}]}]
    ids, _ = encode_chat(tokenizer, messages, video_grid_thw=grid, add_generation_prompt=True)
    ids = np.asarray(ids)[None]
    pos, _ = get_rope_index(ids, cfg, video_grid_thw=grid, second_per_grid_ts=vision.second_per_grid_ts)
    videos = VisionInput(np.asarray(vision.pixel_values_videos), vision_layout(grid, cfg.vision))
    summary = analyze(model, ids, pos, videos, epsilon=FLAGS.epsilon)
    summary.update(video=FLAGS.video, model=FLAGS.model, grid_thw=np.asarray(grid)[0].tolist(),
                   preset=dataclasses.asdict(preset))
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    paths = plot(summary, FLAGS.out)
    print(f"{summary['vision_tokens']} vision tokens of {summary['tokens']}; wrote "
          f"{os.path.join(FLAGS.out, 'summary.json')}, {', '.join(paths)}")


if __name__ == "__main__":
    app.run(main)
