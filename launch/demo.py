"""The README's main job on its embedded default (`make demo`), on CPU in minutes:

synthetic needle videos (real mp4) -> predecode into ArrayRecord shards -> train a tiny VideoNSA (mode
`native`) with launch/train's loop -> export to Hugging Face format -> reload check -> QA eval of the
untrained and the trained model on held-out videos (another seed). Everything goes under --workdir; it prints
where.

The set-up is chosen so that a model this small learns the needle's content within the time: short videos
whose shape fills the frame for a few frames, one question per training sample with the loss on its short
answer only, every batch exactly as many pixel rows as its videos have, and the question kinds (colour, shape)
the evaluation asks, open-ended by default (--forms=open,mc adds multiple choice, scored by option letter).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

flags.DEFINE_string("workdir", "runs/demo", "Where everything is written (the demo's own outputs of an earlier "
                    "run there are replaced).")
flags.DEFINE_integer("train_videos", 1024, "Synthetic training videos (one sample per video and question kind).")
flags.DEFINE_integer("eval_videos", 24, "Held-out synthetic videos (other seed).")
flags.DEFINE_integer("steps", 500, "Training steps.")
flags.DEFINE_string("kinds", "colour,what", "Question kinds trained and evaluated (what, colour, when, count).")
flags.DEFINE_string("forms", "open", "Question forms trained and evaluated: open, mc or open,mc.")
FLAGS = flags.FLAGS

# Every video: 32 frames of 56 x 56 at 8 fps, read at 4 fps -> 16 frames -> an (8, 4, 4) patch grid: 128 pixel
# rows and 32 vision tokens, as `configs/demo.py` budgets. The shape fills most of the frame (radius 0.45,
# centred) on a dark background for 6-8 frames (3-4 sampled frames) once to three times.
VIDEO = {"frames_range": (32, 32), "fps": 8, "duration_range": (6, 8), "sizes": ((56, 56),),
         "radius_range": (0.45, 0.45), "background_level": 50.0}
FPS, MAX_FRAMES, MIN_PIXELS, MAX_PIXELS = 4.0, 16, 3136, 3136


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _eval(model_dir: str, questions: str, video_root: str, out: str) -> dict[str, float]:
    """`launch.eval` of the model on the questions; its accuracy per question kind and form."""
    from data.tasks.generic import accuracy_by_kind_and_form

    cmd = [sys.executable, "-m", "launch.eval", f"--model={model_dir}", f"--questions={questions}",
           f"--video_root={video_root}", f"--out={out}", "--preset=videonsa_train", f"--fps={FPS}", "--min_frames=4",
           f"--max_frames={MAX_FRAMES}",
           f"--min_pixels={MIN_PIXELS}", f"--max_pixels={MAX_PIXELS}", "--max_new_tokens=12", "--verbosity=-1"]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return accuracy_by_kind_and_form(json.load(f)["records"])


def main(argv) -> None:
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # Orbax and Grain log every save and read at INFO
    import configs.demo
    from data.decode import DecodeSettings
    from data.pipeline import training_batches
    from data.predecode import predecode
    from data.synthetic import train_and_eval_sets
    from nsa_jax import conversion, from_pretrained, init_model
    from nsa_jax.training.loop import train
    from nsa_jax.config import NSAConfig, model_preset

    work = os.path.abspath(FLAGS.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t0 = time.perf_counter()

    t = _step("1/6 synthetic needle videos")
    kinds, forms = FLAGS.kinds.split(","), set(FLAGS.forms.split(","))
    if not forms or forms - {"open", "mc"}:
        raise SystemExit(f"--forms={FLAGS.forms}: expected open, mc or open,mc")
    # Training: one single-question sample per video and kind (seed 0); held-out: other videos (seed 1).
    train_ann, eval_questions, num_questions = train_and_eval_sets(work, FLAGS.train_videos, FLAGS.eval_videos,
                                                                   kinds=kinds, forms=forms, **VIDEO)
    print(f"{FLAGS.train_videos} training videos, {num_questions} eval questions ({time.perf_counter() - t:.0f} s)")

    t = _step("2/6 predecode into ArrayRecord shards")
    records = os.path.join(work, "records")
    predecode(train_ann, os.path.join(work, "videos_train"), records,
              DecodeSettings(fps=FPS, min_frames=4, max_frames=MAX_FRAMES, min_pixels=MIN_PIXELS,
                             max_pixels=MAX_PIXELS), shard_size=256)
    print(f"shards in {records} ({time.perf_counter() - t:.0f} s)")

    t = _step("3/6 train a tiny VideoNSA on CPU")
    config = configs.demo.get_config()
    config.model.nsa.mode = "native"
    # Pixel rows and an open question (up to 160 tokens) fit the config's budget; a multiple-choice prompt
    # (question, four options, instruction) is up to 256 tokens.
    config.data.update(source="shards", shards_dir=records)
    if "mc" in forms:
        config.data.seq_len = 272
    config.train.update(steps=FLAGS.steps, log_every=50)
    config.checkpoint.update(every=FLAGS.steps, keep=1)
    train_dir = os.path.join(work, "train")
    history = train(config, train_dir, make_shard_batches=training_batches)
    losses = [h["loss"] for h in history]
    print(f"loss {np.mean(losses[:10]):.3f} (first 10 steps) -> {np.mean(losses[-10:]):.3f} (last 10) "
          f"({time.perf_counter() - t:.0f} s)")

    t = _step("4/6 export to Hugging Face format and reload check")
    model_cfg = model_preset(config.model.preset, NSAConfig.from_dict(config.model.nsa))
    trained = conversion.load_training_params(os.path.join(train_dir, "checkpoints", str(FLAGS.steps), "state"),
                                              model_cfg)
    hf_dir = os.path.join(work, "hf_trained")
    conversion.save_hf(trained, hf_dir)
    reloaded = from_pretrained(hf_dir)
    ids = np.array([[1, 2, 3, 4, 5]])
    same = np.array_equal(np.asarray(reloaded(ids)), np.asarray(trained(ids)))
    if not same:
        raise SystemExit("reload check failed: the exported model's logits differ")
    untrained_dir = os.path.join(work, "hf_untrained")
    conversion.save_hf(init_model(model_cfg, seed=config.train.seed), untrained_dir)
    print(f"exported {hf_dir}; reloaded logits identical ({time.perf_counter() - t:.0f} s)")

    t = _step("5/6 QA eval on held-out videos: untrained model")
    video_root = os.path.join(work, "videos_eval")
    before = _eval(untrained_dir, eval_questions, video_root, os.path.join(work, "eval_untrained.json"))
    t = _step("6/6 QA eval on held-out videos: trained model")
    after = _eval(hf_dir, eval_questions, video_root, os.path.join(work, "eval_trained.json"))

    chance = {"colour/open": 1 / 6, "what/open": 1 / 5, "when/open": 1 / 3, "count/open": 1 / 4}
    print("\naccuracy by question kind/form (untrained -> trained; chance: 0.25 for multiple choice)")
    for k in after:
        print(f"  {k:14s} {before.get(k, 0):.3f} -> {after[k]:.3f}   chance {chance.get(k, 0.25):.3f}")
    summary = {"untrained": before, "trained": after, "losses_first10": float(np.mean(losses[:10])),
               "losses_last10": float(np.mean(losses[-10:])), "seconds": time.perf_counter() - t0}
    with open(os.path.join(work, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nwrote: videos {work}/videos_*, shards {records}, training {train_dir} (metrics.jsonl, TensorBoard), "
          f"models {untrained_dir} and {hf_dir}, eval {work}/eval_*.json, summary {work}/summary.json "
          f"({summary['seconds']:.0f} s in all)")


if __name__ == "__main__":
    app.run(main)
