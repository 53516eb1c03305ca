"""Decodes the videos of a LLaVA-Video-178K style annotation file once into ArrayRecord shards.

  python -m launch.predecode --annotations=ANN.json --video_root=DIR --out_dir=DIR [--fps=4 --min_frames=350
      --max_frames=550 --max_pixels=50176 --num_workers=8 --shard_size=64]

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

D = DecodeSettings()
flags.DEFINE_string("annotations", None, "Annotation file (JSON list or JSONL).")
flags.DEFINE_string("video_root", None, "Directory the annotations' video paths are relative to.")
flags.DEFINE_string("out_dir", None, "Where shards and the manifest are written.")
flags.DEFINE_float("fps", D.fps, "Sampling rate.")
flags.DEFINE_integer("min_frames", D.min_frames, "Fewest frames sampled.")
flags.DEFINE_integer("max_frames", D.max_frames, "Most frames sampled.")
flags.DEFINE_integer("min_pixels", D.min_pixels, "Fewest pixels per frame.")
flags.DEFINE_integer("max_pixels", D.max_pixels, "Most pixels per frame.")
flags.DEFINE_integer("num_workers", min(8, os.cpu_count() or 1), "Decoding processes (0: in this process).")
flags.DEFINE_integer("shard_size", 64, "Videos per shard.")
flags.mark_flags_as_required(["annotations", "video_root", "out_dir"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    settings = DecodeSettings(fps=FLAGS.fps, min_frames=FLAGS.min_frames, max_frames=FLAGS.max_frames,
                              min_pixels=FLAGS.min_pixels, max_pixels=FLAGS.max_pixels)
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
