"""Video QA accuracy with greedy generation: open-ended and multiple-choice questions, JSON results.

  python -m launch.eval --model=DIR --questions=FILE --video_root=DIR --out=results.json \\
      [--fps=4 --max_frames=64 --max_pixels=50176 --max_new_tokens=16 --tokenizer=DIR]

Resumable: answers already in --out or in this process's part file are kept and not asked again. Sharded: question
i goes to process i % process_count (jax.process_index / process_count after jax.distributed.initialize, which
is auto-detected on SLURM / TPU pods or set with --coordinator_address; or --process_index / --process_count to
run shards as separate jobs); each process appends its answers to `<out>.part<i>of<n>.jsonl`, and process 0 writes
--out once every part is complete (it waits for the others under jax.distributed; a simulated process 0 that
finds parts missing says so and a later run merges).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Sequence

from absl import app, flags, logging

from nsa_jax.generate import answer
from nsa_jax.inputs import eval_tokenizer, read_video_inputs

flags.DEFINE_string("model", None, "HF or Orbax checkpoint directory.")
flags.DEFINE_string("questions", None, "Questions: JSON list or JSONL (see nsa_jax/qa.py).")
flags.DEFINE_string("video_root", "", "Directory the questions' video paths are relative to.")
flags.DEFINE_string("out", "results.json", "Results JSON.")
flags.DEFINE_string("tokenizer", None, "HF tokenizer directory (default: the model directory if it has "
                    "tokenizer.json, else the byte-level fallback).")
flags.DEFINE_float("fps", 4.0, "Frame sampling rate.")
flags.DEFINE_integer("min_frames", 4, "Fewest frames sampled.")
flags.DEFINE_integer("max_frames", 64, "Most frames sampled.")
flags.DEFINE_integer("min_pixels", 3136, "Fewest pixels per frame.")
flags.DEFINE_integer("max_pixels", 50176, "Most pixels per frame.")
flags.DEFINE_integer("max_new_tokens", 16, "Most generated tokens per answer.")
flags.DEFINE_integer("process_index", None, "This shard (default jax.process_index()).")
flags.DEFINE_integer("process_count", None, "Number of shards (default jax.process_count()).")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator host:port (multi-host without "
                    "SLURM / TPU auto-detection).")
flags.DEFINE_integer("num_processes", None, "jax.distributed process count (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "jax.distributed process id (with --coordinator_address).")
flags.DEFINE_integer("limit", None, "Only the first N questions.")
flags.mark_flags_as_required(["model", "questions"])
FLAGS = flags.FLAGS


def part_path(out: str, index: int, count: int) -> str:
    return f"{out}.part{index}of{count}.jsonl"


def read_records(path: str) -> dict[str, dict[str, Any]]:
    """Records by id of a results JSON (`records`) or a part file (JSONL; a torn last line is ignored)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        if path.endswith(".jsonl"):
            records = []
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
        else:
            records = json.load(f)["records"]
    return {r["id"]: r for r in records}


def run_shard(questions: Sequence, answer_fn: Callable[[Any], str], out: str, index: int, count: int,
              progress: bool = True) -> dict[str, dict[str, Any]]:
    """Answers this shard's questions (i % count == index) not yet in `out` or the part file; returns its records."""
    from tqdm import tqdm

    from nsa_jax.qa import score

    done = {**read_records(out), **read_records(part_path(out, index, count))}
    mine = [q for i, q in enumerate(questions) if i % count == index]
    records = {q.id: done[q.id] for q in mine if q.id in done}
    todo = [q for q in mine if q.id not in done]
    logging.info("shard %d/%d: %d questions, %d already answered", index, count, len(mine), len(records))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(part_path(out, index, count), "a") as part:
        for q in tqdm(todo, desc=f"eval {index}/{count}", disable=not progress):
            record = score(q, answer_fn(q))
            part.write(json.dumps(record) + "\n")
            part.flush()
            records[q.id] = record
    return records


def merge(questions: Sequence, out: str, count: int) -> dict[str, Any] | None:
    """Writes `out` (records in question order and the accuracy) if every question has an answer; else None."""
    from nsa_jax.qa import summarize

    found = read_records(out)
    for i in range(count):
        found.update(read_records(part_path(out, i, count)))
    missing = [q.id for q in questions if q.id not in found]
    if missing:
        logging.warning("%d questions have no answer yet (e.g. %s): not merging", len(missing), missing[:3])
        return None
    records = [found[q.id] for q in questions]
    results = {**summarize(records), "records": records}
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, out)
    return results


def main(argv) -> None:
    del argv
    import types

    import jax

    from nsa_jax import from_pretrained
    from nsa_jax.qa import load_questions, prompt_text
    from nsa_jax.training.loop import maybe_initialize_distributed

    if FLAGS.process_index is None:  # real processes; explicit shards are separate single-process jobs
        maybe_initialize_distributed(types.SimpleNamespace(coordinator_address=FLAGS.coordinator_address,
                                                           num_processes=FLAGS.num_processes,
                                                           process_id=FLAGS.process_id))
    index = jax.process_index() if FLAGS.process_index is None else FLAGS.process_index
    count = jax.process_count() if FLAGS.process_count is None else FLAGS.process_count
    questions = load_questions(FLAGS.questions)[:FLAGS.limit]
    model = from_pretrained(FLAGS.model)
    tokenizer = eval_tokenizer(FLAGS.model, model.config, FLAGS.tokenizer)

    @functools.lru_cache(maxsize=2)  # benchmarks ask several questions about one video in a row
    def video(path: str):
        return read_video_inputs(path, fps=FLAGS.fps, min_frames=FLAGS.min_frames, max_frames=FLAGS.max_frames,
                                 min_pixels=FLAGS.min_pixels, max_pixels=FLAGS.max_pixels)

    def answer_fn(q) -> str:
        return answer(model, tokenizer, video(os.path.join(FLAGS.video_root, q.video)), prompt_text(q),
                      max_new_tokens=FLAGS.max_new_tokens)

    run_shard(questions, answer_fn, FLAGS.out, index, count)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("eval shards written")
    if index == 0:
        results = merge(questions, FLAGS.out, count)
        if results is not None:
            forms = ", ".join(f"{label} {r['accuracy']:.4f} ({r['correct']}/{r['total']})" for label, r in
                              (("multiple choice", results["multiple_choice"]), ("open", results["open"]))
                              if r["total"])
            print(f"accuracy {results['accuracy']:.4f} ({results['correct']}/{results['total']}); {forms}; "
                  f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
