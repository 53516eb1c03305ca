"""Rematerialisation and activation sharding of the decoder layers, applied to a built model.

`prepare_decoder_layers` swaps each decoder layer's class for a subclass whose `__call__` is wrapped in
`nnx.remat` (activations recomputed in the backward pass) and pins the layer input's sharding to
[batch, sequence, -] (`sharding.activation_sharding`). Parameters, their paths and checkpoints are unchanged.
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
    def call(self, x, ctx):
        if mesh is not None:
            x = jax.lax.with_sharding_constraint(x, activation_sharding(mesh, x.shape))
        return base.__call__(self, x, ctx)

    if policy != "none":
        call = nnx.remat(call, policy=POLICIES[policy])
    return type(base.__name__, (base,), {"__call__": call, "__module__": base.__module__})


def prepare_decoder_layers(model: nnx.Module, mesh: Mesh | None, policy: str = "full") -> None:
    """Applies remat `policy` ("none", "full", "dots") and activation sharding to every decoder layer."""
    if policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {sorted(POLICIES)}")
    for layer in model.language_model.layers:
        base = getattr(type(layer), "_remat_base", type(layer))
        cls = _wrapped_class(base, mesh, policy)
        cls._remat_base = base
        layer.__class__ = cls
