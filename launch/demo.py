"""The README's main job on its embedded default (`make demo`), on CPU in minutes:

synthetic needle videos (real mp4) -> predecode into ArrayRecord shards -> train a tiny VideoNSA (mode
`native`) with launch/train's loop -> QA eval of the untrained and the trained model on held-out videos ->
export to Hugging Face format -> reload check. Everything goes under --workdir; it prints where.
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
flags.DEFINE_integer("train_videos", 64, "Synthetic training videos.")
flags.DEFINE_integer("eval_videos", 8, "Held-out synthetic videos (other seed).")
flags.DEFINE_integer("steps", 100, "Training steps.")
flags.DEFINE_string("kinds", "colour,what", "Question kinds evaluated (what, colour, when, count).")
FLAGS = flags.FLAGS

FPS, MAX_FRAMES, MIN_PIXELS, MAX_PIXELS = 4.0, 48, 3136, 4704
SEQ_LEN, BATCH, MAX_PATCHES = 1024, 4, 4 * 1200


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def _eval(model_dir: str, questions: str, video_root: str, out: str) -> dict:
    cmd = [sys.executable, "-m", "launch.eval", f"--model={model_dir}", f"--questions={questions}",
           f"--video_root={video_root}", f"--out={out}", f"--fps={FPS}", f"--max_frames={MAX_FRAMES}",
           f"--min_pixels={MIN_PIXELS}", f"--max_pixels={MAX_PIXELS}", "--max_new_tokens=12"]
    subprocess.run(cmd, check=True)
    with open(out) as f:
        return json.load(f)


def _accuracy(results: dict) -> dict[str, float]:
    """Accuracy per (kind, form) over the records."""
    groups: dict[str, list[bool]] = {}
    for r in results["records"]:
        form = "mc" if r["options"] else "open"
        groups.setdefault(f"{r['kind']}/{form}", []).append(bool(r["correct"]))
    return {k: round(float(np.mean(v)), 3) for k, v in sorted(groups.items())}


def main(argv) -> None:
    del argv
    import configs.demo
    from data.decode import DecodeSettings
    from data.predecode import predecode
    from data.synthetic import generate
    from nsa_jax import conversion, from_pretrained, init_model
    from nsa_jax.training.loop import train
    from nsa_jax.training.model_setup import model_config, nsa_config

    work = os.path.abspath(FLAGS.workdir)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t0 = time.perf_counter()

    t = _step("1/6 synthetic needle videos")
    train_ann = generate(os.path.join(work, "videos_train"), FLAGS.train_videos, seed=0, frames_range=(64, 96))
    generate(os.path.join(work, "videos_eval"), FLAGS.eval_videos, seed=1, frames_range=(64, 96))
    kinds = set(FLAGS.kinds.split(","))
    with open(os.path.join(work, "videos_eval", "questions.json")) as f:
        questions = [q for q in json.load(f) if q["kind"] in kinds]
    eval_questions = os.path.join(work, "eval_questions.json")
    with open(eval_questions, "w") as f:
        json.dump(questions, f, indent=1)
    print(f"{FLAGS.train_videos} training videos, {len(questions)} eval questions ({time.perf_counter() - t:.0f} s)")

    t = _step("2/6 predecode into ArrayRecord shards")
    records = os.path.join(work, "records")
    predecode(train_ann, os.path.join(work, "videos_train"), records,
              DecodeSettings(fps=FPS, min_frames=4, max_frames=MAX_FRAMES, min_pixels=MIN_PIXELS,
                             max_pixels=MAX_PIXELS), shard_size=16)
    print(f"shards in {records} ({time.perf_counter() - t:.0f} s)")

    t = _step("3/6 train a tiny VideoNSA on CPU")
    config = configs.demo.get_config()
    config.model.nsa.mode = "native"
    config.data.update(source="shards", shards_dir=records, batch_size=BATCH, seq_len=SEQ_LEN,
                       max_patches=MAX_PATCHES)
    config.train.update(steps=FLAGS.steps, log_every=25)
    config.checkpoint.update(every=FLAGS.steps, keep=1)
    train_dir = os.path.join(work, "train")
    history = train(config, train_dir)
    losses = [h["loss"] for h in history]
    print(f"loss {np.mean(losses[:10]):.3f} (first 10 steps) -> {np.mean(losses[-10:]):.3f} (last 10) "
          f"({time.perf_counter() - t:.0f} s)")

    t = _step("4/6 export to Hugging Face format and reload check")
    model_cfg = model_config(config.model.preset, nsa_config(config.model.nsa))
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
    before = _accuracy(_eval(untrained_dir, eval_questions, video_root, os.path.join(work, "eval_untrained.json")))
    t = _step("6/6 QA eval on held-out videos: trained model")
    after = _accuracy(_eval(hf_dir, eval_questions, video_root, os.path.join(work, "eval_trained.json")))

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
