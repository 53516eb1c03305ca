"""Rematerialisation and activation sharding of the repeated blocks, applied to a built model.

`prepare_blocks` swaps the class of each language decoder layer and each vision block for a subclass whose
`__call__` is wrapped in `nnx.remat` (activations recomputed in the backward pass); decoder layers also
pin their input's sharding to [batch, sequence, -] (`sharding.activation_sharding`). Parameters, their
paths and checkpoints are unchanged.
"""

from __future__ import annotations

import functools

import jax
from flax import nnx
from jax.sharding import Mesh

from nsa_jax.training.sharding import activation_sharding

POLICIES = {
    "none": None,  # no remat
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache
def _wrapped_class(base: type, mesh: Mesh | None, policy: str) -> type:
    def call(self, x, *args):
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, activation_sharding(mesh, x.shape))
        return base.__call__(self, x, *args)

    if policy != "none":
        call = nnx.remat(call, policy=POLICIES[policy])
    return type(base.__name__, (base,), {"__call__": call, "__module__": base.__module__, "_remat_base": base})


def _wrap(module: nnx.Module, mesh: Mesh | None, policy: str) -> None:
    base = getattr(type(module), "_remat_base", type(module))
    module.__class__ = _wrapped_class(base, mesh, policy)


def prepare_blocks(model: nnx.Module, mesh: Mesh | None, policy: str = "full") -> None:
    """Applies remat `policy` ("none", "full", "dots") to decoder layers and vision blocks, and activation
    sharding to decoder layers."""
    if policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {sorted(POLICIES)}")
    for layer in model.language_model.layers:
        _wrap(layer, mesh, policy)
    for block in model.visual.blocks:
        _wrap(block, None, policy)
