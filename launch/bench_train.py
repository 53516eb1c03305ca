"""Training-step benchmark: tokens/s and MFU of one optimizer step (SPEC §5: 1B-class, 32K tokens, 1 H100).

    python -m launch.bench_train --config=configs/videonsa_1b.py --steps=10 --out=bench_train.json \
        --profile_dir=/tmp/trace   # optional: the step's device time by part, phase and kind of work

Runs the same jitted step as `launch/train.py` (bf16 compute, float32 master weights, AdamW, remat) on one
fixed synthetic batch (one 32,768-token row: a 192-frame video + text), so host-side batch preparation is
not timed (`nsa_jax/training/benchmark.py`). MFU = model FLOPs of the step (`nsa_jax/training/flops.py`: 6 N per
token + attention over the keys each row really needs, recompute not counted) / (step time x bf16 peak of the
devices).
CPU smoke run: `--config=configs/tiny.py --config.peak_flops_per_device=1e11`. On one 80 GB H100 the 32K step
needs `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` (it prints the compiled step's memory: ~53 GiB live at peak).
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/videonsa_1b.py", "Model / data / train config.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("out", "", "Optional JSON file for the results.")
flags.DEFINE_string("profile_dir", "", "Also trace --profile_steps steps there (jax.profiler) and report where the "
                    "device time went: part of the model, phase, kind of work (nsa_jax/training/profile.py). The "
                    "step then compiles without XLA's GPU command buffers (CUDA graphs), so that each kernel is traced "
                    "as its own HLO instruction; the timed steps run that way too.")
flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    if FLAGS.profile_dir:  # before jax starts its backend, which reads XLA_FLAGS once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
    from nsa_jax.training.benchmark import bench_train_step

    result = bench_train_step(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup,
                              report=lambda line: print(line, flush=True), profile_dir=FLAGS.profile_dir,
                              profile_steps=FLAGS.profile_steps)
    result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    print(json.dumps(result, indent=2))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
