"""Trains VideoNSA: `python -m launch.train --config=configs/tiny.py --workdir=runs/tiny [--config.x=y ...]`.

Mesh axes (data, fsdp, tensor, sequence) come from `--config.mesh.*`; multi-host runs call
`jax.distributed.initialize` (coordinator flags in `--config.distributed.*`, or auto-detected on SLURM and TPU
pods) with one process per host. Re-running with the same workdir resumes from the latest checkpoint;
SIGTERM saves a checkpoint and exits 0. A bad config, bad data, an unusable checkpoint or a diverged run exits
non-zero with one line naming the field, file or step. See `nsa_jax/training/loop.py`.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/tiny.py", "Training config (ml_collections).")
flags.DEFINE_string("workdir", "runs/train", "Checkpoints, metrics.jsonl and TensorBoard events go here.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from data.errors import DataError
    from data.pipeline import training_batches
    from nsa_jax.training.checkpoint import CheckpointError
    from nsa_jax.training.loop import NonFiniteError, train
    from nsa_jax.training.validation import ConfigError
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        history = train(FLAGS.config, FLAGS.workdir, make_shard_batches=training_batches)
    except (ConfigError, DataError, CheckpointError, NonFiniteError) as e:
        sys.exit(f"error: {e}")
    if history:
        print(f"done: step {history[-1]['step']}, loss {history[-1]['loss']:.4f}; workdir {FLAGS.workdir}")


if __name__ == "__main__":
    app.run(main)
