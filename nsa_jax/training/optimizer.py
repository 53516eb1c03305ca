"""AdamW with linear warmup + cosine decay, decoupled weight decay, global-norm clipping and freezing."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import optax
from nsa_jax.sharding import dotted_path

# Which top-level parts of the model a freeze name covers (dotted path prefixes of the parameters).
FREEZE_GROUPS = {
    "vision_tower": ("visual.patch_embed", "visual.blocks"),
    "merger": ("visual.merger",),
    "llm": ("language_model", "lm_head"),
}


def learning_rate_schedule(peak: float, total_steps: int, warmup_fraction: float, end_ratio: float
                           ) -> optax.Schedule:
    """0 -> peak linearly over warmup_fraction * total_steps, then cosine down to end_ratio * peak."""
    warmup = max(1, int(round(warmup_fraction * total_steps)))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total_steps, warmup + 1),
                                              end_value=peak * end_ratio)


def trainable_labels(params: Any, freeze: Sequence[str]) -> Any:
    """A tree of "train" / "frozen" labels for the parameters, freezing the named FREEZE_GROUPS."""
    unknown = set(freeze) - set(FREEZE_GROUPS)
    if unknown:
        raise ValueError(f"freeze {sorted(unknown)}: expected names among {sorted(FREEZE_GROUPS)}")
    prefixes = tuple(p for name in freeze for p in FREEZE_GROUPS[name])
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if dotted_path(path).startswith(prefixes) else "train", params)


def make_optimizer(params: Any, *, learning_rate: optax.Schedule, weight_decay: float, grad_clip: float,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, freeze: Sequence[str] = ()
                   ) -> optax.GradientTransformation:
    """AdamW on trainable parameters (decay on matrices only, not on biases / norms); frozen ones get 0."""
    decay_mask = lambda tree: jax.tree.map(lambda p: p.ndim >= 2, tree)
    train = optax.chain(
        optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
    )
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()},
                                 trainable_labels(params, freeze))
