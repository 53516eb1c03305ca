"""Decodes the videos of a LLaVA-Video-178K style annotation file once into ArrayRecord shards.

  python -m launch.predecode --annotations=ANN.json --video_root=DIR --out_dir=DIR [--preset=videonsa_train
      --fps=4 --min_frames=350 --max_frames=550 --max_pixels=50176 --num_workers=8 --shard_size=64]

--preset picks SPEC §1's per-frame bound: videonsa_train (at most 50,176 pixels) or videonsa_train_qwen_vl_utils
(qwen-vl-utils' bound under the released training script, ~100K-105K pixels); the flags override its fields, and
the manifest records the settings used.

Re-running with the same --out_dir finishes an interrupted run without redoing finished shards. Unreadable
videos are logged, listed in failures.jsonl and skipped; a malformed annotation stops the run, before any
decoding, with its file and line. The directory is also a TFDS dataset (see data/tfds_builder.py).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from data.decode import DecodeSettings
from data.errors import DataError
from data.predecode import predecode
from data.shards import FAILURES
from nsa_jax.processing import PRESETS, get_preset

flags.DEFINE_string("annotations", None, "Annotation file (JSON list or JSONL).")
flags.DEFINE_string("video_root", None, "Directory the annotations' video paths are relative to.")
flags.DEFINE_string("out_dir", None, "Where shards and the manifest are written.")
flags.DEFINE_enum("preset", "videonsa_train", [n for n, p in PRESETS.items() if not p.lmms_eval],
                  "Training preprocessing preset (nsa_jax/processing.py).")
flags.DEFINE_float("fps", None, "Sampling rate (default: the preset's).")
flags.DEFINE_integer("min_frames", None, "Fewest frames sampled (default: the preset's).")
flags.DEFINE_integer("max_frames", None, "Most frames sampled (default: the preset's).")
flags.DEFINE_integer("min_pixels", None, "Fewest pixels per frame (default: the preset's).")
flags.DEFINE_integer("max_pixels", None, "Most pixels per frame (default: the preset's).")
flags.DEFINE_integer("num_workers", min(8, os.cpu_count() or 1), "Decoding processes (0: in this process).")
flags.DEFINE_integer("shard_size", 64, "Videos per shard.")
flags.mark_flags_as_required(["annotations", "video_root", "out_dir"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    p = get_preset(FLAGS.preset, fps=FLAGS.fps, min_frames=FLAGS.min_frames, max_frames=FLAGS.max_frames,
                   min_pixels=FLAGS.min_pixels, max_pixels=FLAGS.max_pixels)
    settings = DecodeSettings(fps=p.fps, min_frames=p.min_frames, max_frames=p.max_frames, min_pixels=p.min_pixels,
                              max_pixels=p.max_pixels)
    print(f"preset {p.name}: {settings}")
    try:
        manifest = predecode(FLAGS.annotations, FLAGS.video_root, FLAGS.out_dir, settings,
                             shard_size=FLAGS.shard_size, num_workers=FLAGS.num_workers)
    except DataError as e:
        sys.exit(f"error: {e}")
    records = sum(s.num_records for s in manifest.shards.values())
    print(f"{FLAGS.out_dir}: {records} records in {manifest.num_shards} shards; "
          f"{len(manifest.failures())} unreadable videos skipped (listed in {os.path.join(FLAGS.out_dir, FAILURES)})")


if __name__ == "__main__":
    app.run(main)
