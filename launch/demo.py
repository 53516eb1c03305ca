"""The README's main job on its embedded default (`make demo`).

Until the training pipeline lands this runs the smallest end-to-end path that works: a tiny random
Qwen2.5-VL, one forward pass on a synthetic video, export to Hugging Face format, Orbax round trip and reload.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from absl import app, flags

flags.DEFINE_string("workdir", "runs/demo", "Where everything is written.")
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    from nsa_jax import from_pretrained, init_model, save_hf, save_orbax, tiny_config

    cfg = tiny_config()
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    grid = np.array([[4, 8, 8]])
    ids = np.array([[1, 2, cfg.vision_start_token_id] + [cfg.video_token_id] * (grid.prod() // 4)
                    + [cfg.vision_end_token_id, 3, 4]])
    pixels = rng.standard_normal((int(grid.prod()), cfg.vision.patch_dim)).astype(np.float32)
    logits = np.asarray(model(ids, pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=[0.5]))
    hf_dir, orbax_dir = os.path.join(FLAGS.workdir, "hf"), os.path.join(FLAGS.workdir, "orbax")
    for d in (hf_dir, orbax_dir):  # the demo's own outputs of an earlier run
        shutil.rmtree(d, ignore_errors=True)
    save_hf(model, hf_dir)
    save_orbax(from_pretrained(hf_dir), orbax_dir)
    again = np.asarray(from_pretrained(orbax_dir)(ids, pixel_values_videos=pixels, video_grid_thw=grid,
                                                  second_per_grid_ts=[0.5]))
    assert np.array_equal(logits, again), "reloaded model differs"
    print(f"logits {logits.shape}; HF export: {hf_dir}; Orbax: {orbax_dir}; reload check: identical")


if __name__ == "__main__":
    app.run(main)
