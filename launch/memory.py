"""Per-device memory of a training step under context parallelism, from the shapes (`nsa_jax.training.memory`).

  python -m launch.memory [--preset=qwen25vl_7b] [--mode=videonsa] [--devices=8] [--tokens=65536,262144,1048576]
"""

from __future__ import annotations

import json

from absl import app, flags

from nsa_jax.training.memory import table

flags.DEFINE_string("preset", "qwen25vl_7b", "Model preset (nsa_jax.config.MODEL_PRESETS).")
flags.DEFINE_enum("mode", "videonsa", ["videonsa", "native"], "NSA mode.")
flags.DEFINE_integer("devices", 8, "Devices on `sequence`.")
flags.DEFINE_list("tokens", ["65536", "262144", "1048576"], "Sequence lengths.")
flags.DEFINE_integer("loss_chunk", 4096, "Tokens per chunk of the LM head + cross entropy.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    out = table(FLAGS.preset, FLAGS.mode, FLAGS.devices, [int(t) for t in FLAGS.tokens], FLAGS.loss_chunk)
    lengths = list(out["GiB"])
    print(f"{out['preset']} ({out['parameters']['total'] / 1e9:.2f}B parameters), mode {out['mode']}, "
          f"{out['devices']} devices on sequence: GiB per device")
    print("| phase | term | " + " | ".join(f"{t // 1024}K" for t in lengths) + " |")
    print("| --- | --- |" + " --- |" * len(lengths))
    for phase, parts in out["GiB"][lengths[0]].items():
        for key in parts:
            print(f"| {phase} | {key} | " + " | ".join(f"{out['GiB'][t][phase][key]:.1f}" for t in lengths) + " |")
    print("| **peak** | held + largest phase | " + " | ".join(
        f"**{out['peak_GiB'][t]['total']:.1f}** ({out['peak_GiB'][t]['phase']})" for t in lengths) + " |")
    print(json.dumps(out))


if __name__ == "__main__":
    app.run(main)
