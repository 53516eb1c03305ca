"""Converts checkpoints between Hugging Face safetensors and Orbax.

  python -m launch.convert --direction=hf_to_orbax --src=HF_DIR --dst=ORBAX_DIR --dtype=bfloat16
  python -m launch.convert --direction=orbax_to_hf --src=ORBAX_DIR --dst=HF_DIR --dtype=bfloat16
"""

from __future__ import annotations

import os

from absl import app, flags, logging

flags.DEFINE_enum("direction", None, ["hf_to_orbax", "orbax_to_hf"], "Conversion direction.")
flags.DEFINE_string("src", None, "Source directory.")
flags.DEFINE_string("dst", None, "Destination directory (must not hold a checkpoint already).")
flags.DEFINE_enum("dtype", "keep", ["keep", "float32", "bfloat16", "float16"],
                  "Parameter dtype of the result ('keep': as stored).")
flags.mark_flags_as_required(["direction", "src", "dst"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    import jax.numpy as jnp
    from nsa_jax import conversion

    if os.path.exists(FLAGS.dst) and os.listdir(FLAGS.dst):
        raise app.UsageError(f"--dst={FLAGS.dst} exists and is not empty; refusing to overwrite it")
    dtype = None if FLAGS.dtype == "keep" else jnp.dtype(FLAGS.dtype)
    if FLAGS.direction == "hf_to_orbax":
        model = conversion.load_hf(FLAGS.src, dtype=dtype)
        conversion.save_orbax(model, FLAGS.dst)
    else:
        model = conversion.load_orbax(FLAGS.src)
        conversion.save_hf(model, FLAGS.dst, dtype=dtype)
    logging.info("wrote %s", FLAGS.dst)
    print(f"converted {FLAGS.src} -> {FLAGS.dst} ({FLAGS.direction}, dtype={FLAGS.dtype})")


if __name__ == "__main__":
    app.run(main)
