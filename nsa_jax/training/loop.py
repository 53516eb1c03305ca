"""The training loop behind `launch/train.py`: setup, resume, steps, metrics, checkpoints, shutdown."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
import tqdm

from nsa_jax.conversion import save_training_files
from nsa_jax.training import flops
from nsa_jax.training.checkpoint import Checkpointer, abstract_like
from nsa_jax.training.device_batch import batch_flops, batch_token_counts, device_batch
from nsa_jax.training.events import EventWriter, open_metrics
from nsa_jax.config import NSAConfig, model_preset
from nsa_jax.training.model_setup import split_for_training
from nsa_jax.training.optimizer import learning_rate_schedule, make_optimizer
from nsa_jax.training.prefetch import Prefetched
from nsa_jax.sharding import make_mesh
from nsa_jax.training.synthetic_data import SyntheticBatches
from nsa_jax.training.train_step import (StepFunctions, initial_state, param_shardings, place_initial_state,
                                         state_shardings)
from nsa_jax.training.validation import ConfigError, validate_config

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def maybe_initialize_distributed(c: Any) -> None:
    """`jax.distributed.initialize` with coordinator flags, or auto-detected on SLURM / TPU pods."""
    if c.coordinator_address:
        jax.distributed.initialize(c.coordinator_address, num_processes=c.num_processes, process_id=c.process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ \
            or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()


def tokenizer_file(config: Any) -> str | None:
    """The tokenizer.json of `data.tokenizer` (a file or a directory), else of `model.init_from`, else None."""
    path = config.data.tokenizer or config.model.init_from
    for file in (path, os.path.join(path, "tokenizer.json")) if path else ():
        if os.path.isfile(file):
            return file
    if config.data.tokenizer:
        raise FileNotFoundError(f"data.tokenizer={config.data.tokenizer!r}: no tokenizer.json there")
    return None


def make_tokenizer(config: Any, model_cfg):
    """The tokenizer of `tokenizer_file`, else bytes with the model's vision ids (`byte_tokenizer_for`)."""
    from nsa_jax.tokenizer import load_tokenizer_or_bytes
    return load_tokenizer_or_bytes(tokenizer_file(config), model_cfg)


BatchFactory = Callable[..., Iterator[dict[str, np.ndarray]]]


def make_batches(config: Any, model_cfg, make_shard_batches: BatchFactory | None) -> Iterator[dict[str, np.ndarray]]:
    """This process's host batches (each process draws its own rows: batch_size / process_count), an iterator
    with get_state / set_state.

    "synthetic": `SyntheticBatches`; "shards": `make_shard_batches(config.data, model_cfg, tokenizer,
    process_index=..., process_count=...)`, the data pipeline the caller hands in (`launch/train.py` hands in
    `data.pipeline.training_batches`: the trainer knows no pipeline).
    """
    d = config.data
    from nsa_jax.videonsa import check_native_packing
    check_native_packing(config.model.nsa.mode, d.get("samples_per_row", 1))
    per_process, count = d.batch_size // jax.process_count(), jax.process_count()
    if d.source == "synthetic":
        return SyntheticBatches(model_cfg, batch_size=per_process, seq_len=d.seq_len,
                                video_grid=tuple(d.video_grid), max_patches=d.max_patches // count,
                                seed=d.seed * 1000 + jax.process_index(), poison_steps=tuple(d.poison_steps),
                                text_vocab=d.text_vocab)
    if make_shard_batches is None:
        raise ConfigError("config.data.source='shards' needs the data pipeline: train through launch.train, or "
                          "pass make_shard_batches=data.pipeline.training_batches")
    return make_shard_batches(d, model_cfg, make_tokenizer(config, model_cfg), process_index=jax.process_index(),
                              process_count=count)


class StopSignal:
    """Records SIGTERM (preemption) so the loop can save and exit between steps."""

    def __init__(self):
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def train(config: Any, workdir: str, make_shard_batches: BatchFactory | None = None) -> list[dict[str, float]]:
    """Trains per `config`, writing checkpoints, metrics.jsonl and TensorBoard events under workdir.

    make_shard_batches: the data pipeline over pre-decoded shards, for `data.source="shards"` (`make_batches`).

    Returns the metrics of the steps run by this call. Raises ConfigError naming the fields of a config that
    cannot work (before any work), DataError (data/errors.py) naming the file or sample of bad data,
    NonFiniteError after `train.max_bad_steps` consecutive non-finite steps and CheckpointError when the
    checkpoint to resume from is unreadable or was made by another config.
    """
    maybe_initialize_distributed(config.distributed)
    validate_config(config, jax.process_count())
    t = config.train
    mesh = make_mesh(dict(config.mesh))
    model_cfg = model_preset(config.model.preset, NSAConfig.from_dict(config.model.nsa))
    data = make_batches(config, model_cfg, make_shard_batches)  # before the model: bad data stops at once
    # The counters a batch iterator keeps in its state (e.g. samples the pipeline skipped or truncated).
    counters_of = getattr(type(data), "counters_of", lambda state: {})
    graphdef, params = split_for_training(model_cfg, mesh, compute_dtype=config.model.compute_dtype,
                                          remat=t.remat, seed=t.seed, init_from=config.model.init_from,
                                          attention_impl=config.model.attention_impl,
                                          sharding_rules=config.get("sharding_rules"), prefetch=t.prefetch_params)
    schedule = learning_rate_schedule(t.learning_rate, t.steps, t.warmup_fraction, t.end_lr_ratio)
    freeze = [f for f in t.freeze.split(",") if f]
    tx = make_optimizer(params, learning_rate=schedule, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
                        b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, freeze=freeze)
    fresh = functools.partial(initial_state, tx)
    abstract = jax.eval_shape(fresh, params)
    shardings = state_shardings(abstract, mesh, param_shardings(params))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.keep,
                        save_every=config.checkpoint.every, async_save=config.checkpoint.async_save,
                        config=json.loads(config.to_json_best_effort()))
    resume = config.checkpoint.resume_from_step
    if resume >= 0:
        abandoned = ckpt.set_aside_after(resume, os.path.join(workdir, "abandoned_checkpoints"))
        if abandoned:
            log.warning("resume_from_step=%d: moved later checkpoints %s to %s", resume, abandoned,
                        os.path.join(workdir, "abandoned_checkpoints"))
    else:
        resume = ckpt.latest_step()
    if resume is not None:
        state, data_state = ckpt.restore(resume, abstract_like(abstract, shardings))
        data.set_state(data_state)
        log.warning("resumed from %s", ckpt.step_dir(resume))
    else:
        state = place_initial_state(tx, params, shardings)
    lead = jax.process_index() == 0
    if lead:  # what from_pretrained / convert / eval need to load the checkpoints
        save_training_files(workdir, model_cfg, tokenizer_file(config))
    data = Prefetched(data)  # the next batches are prepared on the host while the device trains
    del params
    steps = StepFunctions(graphdef, tx, mesh, loss_chunk=t.loss_chunk).compile(shardings)

    peak = config.peak_flops_per_device if config.peak_flops_per_device > 0 \
        else flops.peak_flops(jax.devices()[0].device_kind)
    writer = EventWriter(os.path.join(workdir, "tensorboard")) if lead else None
    metrics_file = open_metrics(os.path.join(workdir, "metrics.jsonl"), int(state.step)) if lead else None
    stop = StopSignal()
    history: list[dict[str, float]] = []
    start = int(state.step)
    bar = tqdm.tqdm(total=t.steps, initial=start, desc="train", disable=not lead, dynamic_ncols=True)
    try:
        last = time.perf_counter()
        for step in range(start, t.steps):
            hosts = [next(data) for _ in range(t.grad_accum)]
            state, m = steps(state, [device_batch(h, model_cfg, mesh) for h in hosts])
            loss, grad_norm, finite, bad = jax.device_get((m.loss, m.grad_norm, m.finite, state.bad_steps))
            now = time.perf_counter()
            counts = [c for h in hosts for c in batch_token_counts(h, model_cfg)]
            step_flops = sum(batch_flops(h, model_cfg) for h in hosts)
            record = {"step": step + 1, "loss": float(loss), "grad_norm": float(grad_norm),
                      "finite": bool(finite), "learning_rate": float(schedule(step)),
                      "tokens_per_s": sum(a + b for a, b in counts) * jax.process_count() / (now - last),
                      "step_time_s": now - last}
            record.update(counters_of(data.get_state()))
            if peak:
                record["mfu"] = step_flops * jax.process_count() / (now - last) / (peak * jax.device_count())
            last = now
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if lead and ((step + 1) % t.log_every == 0 or not finite):
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                writer.scalars(step + 1, {k: v for k, v in record.items() if k not in ("step", "finite")})
                tqdm.tqdm.write(" ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in record.items()))
            if int(bad) >= t.max_bad_steps:
                raise NonFiniteError(f"step {step + 1}: {int(bad)} consecutive steps with a non-finite loss or "
                                     f"gradient (train.max_bad_steps={t.max_bad_steps}); last loss {float(loss)}")
            if stop.received:
                ckpt.save(step + 1, state, data.get_state(), force=True)
                log.warning("SIGTERM: saved step %d to %s, exiting", step + 1, ckpt.step_dir(step + 1))
                break
            ckpt.save(step + 1, state, data.get_state(), force=step + 1 == t.steps and config.checkpoint.save_last)
    finally:
        bar.close()
        stop.restore()
        ckpt.close()
        if lead:
            writer.close()
            metrics_file.close()
    return history
