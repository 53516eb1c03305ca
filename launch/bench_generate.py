"""Generation benchmark (SPEC §5): prefill seconds and decode tokens/s of one video prompt, per NSA mode.

    python -m launch.bench_generate --preset=qwen25vl_7b --video_tokens=65536 --modes=dense,native,videonsa \\
        --decode_tokens=32 --out=bench_generate.json

A 7B-shaped model (the Qwen2.5-VL-7B config; random weights in --dtype, shared by the modes) answers one prompt:
a system / user text, one video of `grid` (t, 26, 42) patches (273 merged tokens per frame pair, as the
paper's eval frames give) and a question; `nsa_jax/benchmark.py` says what is timed (the prefill after the
compiling call, `--prefill_iters` times; `--decode_tokens` greedy decode steps; the vision tower alone).
CPU smoke run: `--preset=tiny --video_tokens=64`.
"""

from __future__ import annotations

import json

from absl import app, flags

flags.DEFINE_enum("preset", "qwen25vl_7b", ["qwen25vl_7b", "tiny"], "Model shapes.")
flags.DEFINE_integer("video_tokens", 65536, "Merged video tokens of the prompt (rounded up to whole frame pairs).")
flags.DEFINE_list("modes", ["dense", "native", "videonsa"], "NSA modes to time, in order.")
flags.DEFINE_integer("decode_tokens", 32, "Timed decode steps.")
flags.DEFINE_integer("prefill_iters", 2, "Timed prefills after the compiling one.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and activations.")
flags.DEFINE_string("out", "", "Optional JSON file for the results.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from nsa_jax.benchmark import bench_generation

    for result in bench_generation(FLAGS.preset, FLAGS.video_tokens, FLAGS.modes, decode_tokens=FLAGS.decode_tokens,
                                   prefill_iters=FLAGS.prefill_iters, dtype=FLAGS.dtype):
        if not result["rows"]:
            print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
            continue
        print(json.dumps(result["rows"][-1]), flush=True)
        if FLAGS.out:  # after each mode, so a run cut short keeps what it measured
            with open(FLAGS.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
