"""Benchmark and video-QA evaluation with greedy generation, as the VideoNSA release ran it (SPEC §7).

  python -m launch.eval --model=DIR --task=longvideobench_val_v --data_dir=DIR --out=results.json
  python -m launch.eval --model=DIR --questions=FILE --video_root=DIR --out=results.json   # --task=generic

Tasks (data/tasks): generic, longvideobench_val_v, mlvu_test, timescope, longtimescope, tomato, vsibench.
Preprocessing: --preset (default videonsa_eval at the task's fps); --fps/--max_frames/... override its fields.
Resumable and sharded (data/tasks/runner.py): question i goes to process i % process_count (jax.distributed, or
--process_index / --process_count as separate jobs); each appends to `<out>.part<i>of<n>.jsonl`; process 0
writes --out and `<out minus .json>.table.txt` once every part is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from absl import app, flags

flags.DEFINE_string("model", None, "HF or Orbax checkpoint directory.")
flags.DEFINE_string("task", "generic", "Task name (data/tasks TASKS).")
flags.DEFINE_string("data_dir", None, "A benchmark's directory as its dataset ships (annotation files, videos).")
flags.DEFINE_string("questions", None, "Generic task: questions, a JSON list or JSONL (data/tasks/generic.py).")
flags.DEFINE_string("video_root", "", "Generic task: directory the questions' video paths are relative to.")
flags.DEFINE_string("out", "results.json", "Results JSON.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer directory (default: the model directory if it has "
                    "tokenizer.json, else the byte-level fallback).")
flags.DEFINE_string("preset", "videonsa_eval", "Preprocessing preset (nsa_jax/processing.py).")
flags.DEFINE_float("fps", None, "Frame sampling rate (default: the task's).")
flags.DEFINE_integer("min_frames", None, "Fewest frames sampled (default: the preset's).")
flags.DEFINE_integer("max_frames", None, "Most frames sampled (default: the preset's).")
flags.DEFINE_integer("min_pixels", None, "Fewest pixels per frame (default: the preset's).")
flags.DEFINE_integer("max_pixels", None, "Most pixels per frame (default: the preset's).")
flags.DEFINE_integer("max_new_tokens", None, "Most generated tokens per answer (default: the task's).")
flags.DEFINE_integer("seed", 0, "Seed of the random letters a task picks for unparsable answers.")
flags.DEFINE_bool("retry_failed", False, "Ask again the questions recorded as failed (e.g. a missing video).")
flags.DEFINE_integer("process_index", None, "This shard (default jax.process_index()).")
flags.DEFINE_integer("process_count", None, "Number of shards (default jax.process_count()).")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port (multi-host without "
                    "SLURM / TPU auto-detection).")
flags.DEFINE_integer("num_processes", None, "jax.distributed process count (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "jax.distributed process id (with --coordinator_address).")
flags.DEFINE_integer("limit", None, "Only the first N questions.")
flags.mark_flags_as_required(["model"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    import types

    import jax

    from data.tasks import get_task
    from data.tasks.base import format_table, parse_reasoning_answer
    from data.tasks.runner import merge, run_shard
    from data.video_inputs import read_video_inputs
    from nsa_jax import from_pretrained
    from nsa_jax.generate import VisionPrompt, answer
    from nsa_jax.inputs import eval_tokenizer
    from nsa_jax.processing import get_preset
    from nsa_jax.training.loop import maybe_initialize_distributed

    task = get_task(FLAGS.task)
    source = FLAGS.questions if task.name == "generic" else FLAGS.data_dir
    if not source:
        raise app.UsageError("--task=generic needs --questions" if task.name == "generic" else
                             f"--task={task.name} needs --data_dir")
    if FLAGS.process_index is None:  # real processes; explicit shards are separate single-process jobs
        maybe_initialize_distributed(types.SimpleNamespace(coordinator_address=FLAGS.coordinator_address,
                                                           num_processes=FLAGS.num_processes,
                                                           process_id=FLAGS.process_id))
    index = jax.process_index() if FLAGS.process_index is None else FLAGS.process_index
    count = jax.process_count() if FLAGS.process_count is None else FLAGS.process_count
    items = task.load(source)[:FLAGS.limit]
    preset = get_preset(FLAGS.preset, fps=FLAGS.fps or task.fps, min_frames=FLAGS.min_frames,
                        max_frames=FLAGS.max_frames, min_pixels=FLAGS.min_pixels, max_pixels=FLAGS.max_pixels)
    max_new_tokens = FLAGS.max_new_tokens or task.max_new_tokens
    model = from_pretrained(FLAGS.model)
    tokenizer = eval_tokenizer(FLAGS.model, model.config, FLAGS.tokenizer)

    @functools.lru_cache(maxsize=2)  # benchmarks ask several questions about one video in a row
    def video(path: str) -> VisionPrompt:
        v = read_video_inputs(path, preset)
        return VisionPrompt(v.pixel_values_videos, v.video_grid_thw, v.second_per_grid_ts)

    def answer_fn(item) -> str:
        text = answer(model, tokenizer, video(os.path.join(FLAGS.video_root, item.video)), item.prompt,
                      max_new_tokens=max_new_tokens, stop_strings=task.stop_strings)
        return text if task.name == "generic" else parse_reasoning_answer(text)

    run_shard(items, answer_fn, task.score, FLAGS.out, index, count, seed=FLAGS.seed,
              retry_failed=FLAGS.retry_failed)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("eval shards written")
    if index == 0:
        meta = {"task": task.name, "model": FLAGS.model, "preset": dataclasses.asdict(preset),
                "max_new_tokens": max_new_tokens, "seed": FLAGS.seed}
        results = merge(items, FLAGS.out, count, task.aggregate, meta)
        if results is not None:
            print(format_table(results))
            print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
