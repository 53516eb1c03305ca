"""Converts checkpoints between Hugging Face safetensors and Orbax; exports a training run to HF.

  python -m launch.convert --direction=hf_to_orbax --src=HF_DIR --dst=ORBAX_DIR --dtype=bfloat16
  python -m launch.convert --direction=orbax_to_hf --src=ORBAX_DIR --dst=HF_DIR --dtype=bfloat16
  python -m launch.convert --direction=orbax_to_hf --src=WORKDIR[/checkpoints/STEP] --dst=HF_DIR

A training workdir exports its latest step (with the run's tokenizer.json, if it had one). The result is
written into `<dst>.partial` and renamed to `--dst` when complete; a `.partial` left by an interrupted run
(a full disk, a kill) is removed by the next run.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "Conversion direction.")
flags.DEFINE_string("src", None, "Source directory (orbax_to_hf: an Orbax directory, a training workdir or one "
                    "of its checkpoints/<step> directories).")
flags.DEFINE_string("dst", None, "Destination directory (must not hold a checkpoint already).")
flags.DEFINE_enum("dtype", "keep", ["keep", "float32", "bfloat16", "float16"],
                  "Parameter dtype of the result ('keep': as stored).")
flags.mark_flags_as_required(["direction", "src", "dst"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    import jax.numpy as jnp

    from nsa_jax.conversion import convert

    if os.path.exists(FLAGS.dst) and os.listdir(FLAGS.dst):
        raise app.UsageError(f"--dst={FLAGS.dst} exists and is not empty; refusing to overwrite it")
    dtype = None if FLAGS.dtype == "keep" else jnp.dtype(FLAGS.dtype)
    convert(FLAGS.direction, FLAGS.src, FLAGS.dst, dtype)
    logging.info("wrote %s", FLAGS.dst)
    print(f"converted {FLAGS.src} -> {FLAGS.dst} ({FLAGS.direction}, dtype={FLAGS.dtype})")


if __name__ == "__main__":
    app.run(main)
