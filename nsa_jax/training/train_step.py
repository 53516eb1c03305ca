"""The jitted training step: loss, gradient accumulation, AdamW update and the non-finite guard.

Parameters are a pure dict of float32 arrays (the master weights); the model runs in its own compute dtype
(bf16 in the recipes), so matmuls see bf16 copies and gradients come back in float32. A step sums token
losses and gradients over its micro-batches and divides by the total number of answer tokens once, so
accumulating A micro-batches equals one batch A times larger. A step whose loss or gradient norm is not
finite leaves parameters and optimizer state unchanged and counts a consecutive failure.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nsa_jax.training.loss import cross_entropy_sum, shifted_targets
from nsa_jax.sharding import path_names

Batch = Mapping[str, Any]  # input_ids, position_ids, labels, [segment_ids], [videos / images: VisionInput in chunks]


class TrainState(NamedTuple):
    step: jax.Array  # int32: steps taken (skipped ones included)
    params: Any  # pure dict of float32 arrays
    opt_state: Any
    bad_steps: jax.Array  # int32: consecutive non-finite steps


class StepMetrics(NamedTuple):
    loss: jax.Array
    grad_norm: jax.Array
    tokens: jax.Array  # answer tokens in the loss
    finite: jax.Array  # bool: the update was applied


class Sums(NamedTuple):
    grads: Any
    loss: jax.Array
    tokens: jax.Array


@dataclasses.dataclass
class StepFunctions:
    """Jitted functions of one model / optimizer / mesh."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    mesh: Mesh
    loss_chunk: int = 2048

    def loss_sums(self, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        """(sum of answer-token cross entropies, answer-token count) of one batch."""
        model = nnx.merge(self.graphdef, params)
        segment_ids = batch.get("segment_ids")
        vision = {k: batch[k] for k in ("images", "videos") if k in batch}
        hidden = model.forward(batch["input_ids"], batch["position_ids"], segment_ids=segment_ids,
                               return_hidden=True, **vision)
        targets, weights = shifted_targets(batch["labels"], segment_ids)
        # The token axis is split over `sequence` where it divides T (`sharding.activation_sharding`).
        shards = self.mesh.shape.get("sequence", 1)
        shards = shards if hidden.shape[1] % shards == 0 else 1
        return cross_entropy_sum(hidden, model.logits, targets, weights, self.loss_chunk, shards)

    def micro_sums(self, params: Any, batch: Batch) -> Sums:
        (loss, tokens), grads = jax.value_and_grad(self.loss_sums, has_aux=True)(params, batch)
        return Sums(grads, loss, tokens)

    def apply(self, state: TrainState, sums: Sums) -> tuple[TrainState, StepMetrics]:
        with jax.named_scope("optimizer"):  # the profile's part (profile.py)
            return self._apply(state, sums)

    def _apply(self, state: TrainState, sums: Sums) -> tuple[TrainState, StepMetrics]:
        denom = jnp.maximum(sums.tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denom, sums.grads)
        loss = sums.loss / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new = TrainState(state.step + 1, keep(params, state.params), keep(opt_state, state.opt_state),
                         jnp.where(finite, 0, state.bad_steps + 1))
        return new, StepMetrics(loss, grad_norm, sums.tokens, finite)

    def full_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, StepMetrics]:
        return self.apply(state, self.micro_sums(state.params, batch))

    # ---------------------------------------------------------------- jitted entry points

    def compile(self, state_shardings: TrainState) -> "JittedSteps":
        sums_shardings = Sums(state_shardings.params, replicated(self.mesh), replicated(self.mesh))
        return JittedSteps(
            step=jax.jit(self.full_step, out_shardings=(state_shardings, None), donate_argnums=0),
            micro=jax.jit(self.micro_sums, out_shardings=sums_shardings),
            add=jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), out_shardings=sums_shardings,
                        donate_argnums=0),
            apply=jax.jit(self.apply, out_shardings=(state_shardings, None), donate_argnums=0),
        )


@dataclasses.dataclass
class JittedSteps:
    step: Any
    micro: Any
    add: Any
    apply: Any

    def __call__(self, state: TrainState, batches: list[Batch]) -> tuple[TrainState, StepMetrics]:
        """One optimizer step over one or more micro-batches (gradient accumulation)."""
        if len(batches) == 1:
            return self.step(state, batches[0])
        sums = self.micro(state.params, batches[0])
        for batch in batches[1:]:
            sums = self.add(sums, self.micro(state.params, batch))
        return self.apply(state, sums)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(params: Any) -> Any:
    """The shardings of placed parameters (the tree of `.sharding`s)."""
    return jax.tree.map(lambda p: p.sharding, params)


def initial_state(tx: optax.GradientTransformation, params: Any) -> TrainState:
    """Step 0 of training `params` with optimizer tx."""
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.zeros((), jnp.int32))


def place_initial_state(tx: optax.GradientTransformation, params: Any, shardings: TrainState) -> TrainState:
    """`initial_state` on the devices, placed as `shardings`. The parameters are consumed: their buffers become
    the state's, not a second copy whose freeing would leave a hole in device memory (a 3B step's 75 GiB of
    temporaries then found no contiguous room on a 141 GB GPU)."""
    return jax.jit(functools.partial(initial_state, tx), out_shardings=shardings, donate_argnums=0)(params)


def state_shardings(state: TrainState, mesh: Mesh, params: Any) -> TrainState:
    """Parameters sharded as `params` (their shardings: `param_shardings` of the parameters
    `model_setup.split_for_training` placed), every parameter-shaped optimizer leaf as its parameter;
    scalars replicated."""

    # Adam moments mirror the parameter tree inside the optimizer state: match them by their key path tail.
    flat_params = {path_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(params)[0]}

    def opt_sharding(path, leaf):
        if jnp.ndim(leaf) == 0:
            return replicated(mesh)
        for n in range(len(path), 0, -1):
            hit = flat_params.get(path_names(path[-n:]))
            if hit is not None and len(hit.spec) <= jnp.ndim(leaf):
                return hit
        return replicated(mesh)

    return TrainState(replicated(mesh), params,
                      jax.tree_util.tree_map_with_path(opt_sharding, state.opt_state), replicated(mesh))
