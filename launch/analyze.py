"""Gate values and attention sinks of a VideoNSA checkpoint on one video, per layer and branch.

  python -m launch.analyze --model=DIR --video=VIDEO.mp4 --out=DIR [--question="..."] [--fps=4]

Writes `summary.json`, `gates.png` and `sinks.png` into --out (see `nsa_jax/analysis.py` for definitions).
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

flags.DEFINE_string("model", None, "HF or Orbax checkpoint directory.")
flags.DEFINE_string("video", None, "Video file.")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_string("question", "Describe the video.", "User text after the video.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer directory (default: the model directory if it has "
                    "tokenizer.json, else the byte-level fallback).")
flags.DEFINE_string("preset", "videonsa_eval", "Preprocessing preset (nsa_jax/processing.py); the flags below "
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
    from data.video_inputs import read_video_inputs
    from nsa_jax import from_pretrained
    from nsa_jax.analysis import analyze_video, save
    from nsa_jax.inputs import eval_tokenizer
    from nsa_jax.processing import get_preset

    model = from_pretrained(FLAGS.model)
    tokenizer = eval_tokenizer(FLAGS.model, model.config, FLAGS.tokenizer)
    preset = get_preset(FLAGS.preset, fps=FLAGS.fps, max_frames=FLAGS.max_frames, min_pixels=FLAGS.min_pixels,
                        max_pixels=FLAGS.max_pixels)
    summary = analyze_video(model, tokenizer, read_video_inputs(FLAGS.video, preset), FLAGS.question,
                            epsilon=FLAGS.epsilon)
    summary.update(video=FLAGS.video, model=FLAGS.model, preset=dataclasses.asdict(preset))
    paths = save(summary, FLAGS.out)
    print(f"{summary['vision_tokens']} vision tokens of {summary['tokens']}; wrote {', '.join(paths)}")


if __name__ == "__main__":
    app.run(main)
