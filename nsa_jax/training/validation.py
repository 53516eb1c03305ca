"""Up-front checks of a training config: a mistake stops the run before any work, naming the field."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

from nsa_jax.training.optimizer import FREEZE_GROUPS
from nsa_jax.layers import REMAT_POLICIES
from nsa_jax.sharding import logical_rules

DATA_SOURCES = ("synthetic", "shards")
TOO_LONG_POLICIES = ("skip", "truncate")  # what the data pipeline does with a sample that does not fit


class ConfigError(ValueError):
    """A training config field with a value that cannot work; the message names the field."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: _number(v) and v >= low


def _between(low: float, high: float, *, open_high: bool = False) -> Callable[[Any], bool]:
    return lambda v: _number(v) and low <= v and (v < high if open_high else v <= high)


_POSITIVE = (_at_least(1), "an integer >= 1")
_NON_NEGATIVE = (_at_least(0), "a number >= 0")
_FRACTION = (_between(0, 1), "a number in [0, 1]")
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "data.source": (lambda v: v in DATA_SOURCES, f"one of {DATA_SOURCES}"),
    "data.batch_size": _POSITIVE,
    "data.samples_per_row": _POSITIVE,
    "data.seq_len": _POSITIVE,
    "data.max_patches": _POSITIVE,
    "data.too_long": (lambda v: v in TOO_LONG_POLICIES, f"one of {TOO_LONG_POLICIES}"),
    "data.max_skip_fraction": _FRACTION,
    "train.steps": _POSITIVE,
    "train.grad_accum": _POSITIVE,
    "train.learning_rate": _NON_NEGATIVE,
    "train.warmup_fraction": _FRACTION,
    "train.end_lr_ratio": _NON_NEGATIVE,
    "train.weight_decay": _NON_NEGATIVE,
    "train.grad_clip": (_at_least(0), "a number >= 0 (0: no clipping)"),
    "train.adam_b1": (_between(0, 1, open_high=True), "a number in [0, 1)"),
    "train.adam_b2": (_between(0, 1, open_high=True), "a number in [0, 1)"),
    "train.adam_eps": (lambda v: _number(v) and v > 0, "a number > 0"),
    "train.freeze": (lambda v: set(filter(None, v.split(","))) <= set(FREEZE_GROUPS),
                     f"comma-separated names among {sorted(FREEZE_GROUPS)}"),
    "train.remat": (lambda v: v in REMAT_POLICIES, f"one of {sorted(REMAT_POLICIES)}"),
    "train.loss_chunk": _POSITIVE,
    "train.max_bad_steps": _POSITIVE,
    "train.log_every": _POSITIVE,
    "checkpoint.every": _POSITIVE,
    "checkpoint.keep": _POSITIVE,
    "checkpoint.resume_from_step": (_at_least(-1), "-1 (the latest checkpoint) or a step >= 0"),
}


def _get(config: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        config = config[key]
    return config


def config_problems(config: Any, process_count: int = 1) -> list[str]:
    """Each field of `config` that cannot work, as "config.FIELD=VALUE: expected ..."."""
    problems = []
    for field, (ok, expected) in RULES.items():
        value = _get(config, field)
        if not ok(value):
            problems.append(f"config.{field}={value!r}: expected {expected}")
    try:
        logical_rules(config.get("sharding_rules"))
    except (TypeError, ValueError) as e:
        problems.append(f"config.sharding_rules: {e}")
    if config.train.prefetch_params and config.train.remat != "full":
        problems.append(f"config.train.prefetch_params=True: expected config.train.remat='full' (got "
                        f"{config.train.remat!r}; the prefetching layer scan recomputes each layer itself)")
    d = config.data
    if _number(d.batch_size) and d.batch_size % process_count:
        problems.append(f"config.data.batch_size={d.batch_size}: expected a multiple of the {process_count} "
                        "processes")
    if d.source == "shards" and not os.path.isdir(d.shards_dir):
        problems.append(f"config.data.shards_dir={d.shards_dir!r}: not a directory (data.source='shards' needs "
                        "a launch/predecode.py output directory)")
    return problems


def validate_config(config: Any, process_count: int = 1) -> None:
    """Raises ConfigError naming every field of `config` that cannot work (see `config_problems`)."""
    problems = config_problems(config, process_count)
    if problems:
        raise ConfigError("invalid training config: " + "; ".join(problems))
