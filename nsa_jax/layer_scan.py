"""The scan over a stack of layers with ZeRO-3 parameter prefetch (`Runtime(prefetch=True)`).

Under plain autodiff the partitioner gathers each layer's parameter shards right before the layer uses them, in
the forward and again in the backward: each gather sits between the compute that precedes it and the compute
that needs it. Here the program itself has the shape that lets a scheduler overlap them (FSDP's prefetch):

- forward: the carry holds layer i's gathered parameters; iteration i gathers layer i + 1's (nothing in the
  iteration reads them) and runs layer i; each layer's input is kept (full remat).
- backward, a reverse scan written by hand (`jax.custom_vjp`): the carry holds the hidden state's cotangent and
  layer i's gathered parameters; iteration i gathers layer i - 1's (nothing in the iteration reads them) while
  it runs layer i again from its kept input and back through it, and reduce-scatters each of layer i's
  parameter gradients as soon as it exists (the rest of the layer's backward can hide it; carrying the
  gradient to the next iteration would need it reduced in full first: an all-reduce, twice the traffic).

The cost: the last iteration of each pass has no next layer to serve and its gather is wasted, and two layers'
gathered parameters are live at once instead of one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

Params = Any  # a pytree of arrays with a leading layer axis


def prefetched_scan(fn: Callable[[Params, jax.Array], jax.Array], params: Params, x: jax.Array,
                    gather: Callable[[Params], Params], scatter: Callable[[Params], Params]) -> jax.Array:
    """h = fn(params_i, h) for the layers i of `params` in order, from h = x; returns the last h.

    gather: one layer's parameters placed for compute (all-gathered over their shards); scatter: one layer's
    gradient placed as the parameters are stored (reduce-scattered). fn must not close over
    values being differentiated (the parameters and x are its only differentiated inputs)."""
    n = jax.tree.leaves(params)[0].shape[0]

    def layer(p: Params, i: jax.Array) -> Params:
        return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), p)

    def forward(p: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        def body(carry, i):
            h, w = carry
            nxt = gather(layer(p, jnp.minimum(i + 1, n - 1)))
            return (fn(w, h), nxt), h

        (h, _), inputs = jax.lax.scan(body, (x, gather(layer(p, jnp.int32(0)))), jnp.arange(n, dtype=jnp.int32))
        return h, inputs

    @jax.custom_vjp
    def run(p: Params, x: jax.Array) -> jax.Array:
        return forward(p, x)[0]

    def run_fwd(p, x):
        h, inputs = forward(p, x)
        return h, (p, inputs)

    def run_bwd(res, dh):
        p, inputs = res

        def body(carry, i):
            dh, w = carry
            prev = gather(layer(p, jnp.maximum(i - 1, 0)))
            _, vjp = jax.vjp(fn, w, jax.lax.dynamic_index_in_dim(inputs, i, keepdims=False))
            dw, dh = vjp(dh)
            return (dh, prev), scatter(dw)

        start = (dh, gather(layer(p, jnp.int32(n - 1))))
        (dx, _), grads = jax.lax.scan(body, start, jnp.arange(n - 1, -1, -1, dtype=jnp.int32))
        return jax.tree.map(lambda g: g[::-1], grads), dx

    run.defvjp(run_fwd, run_bwd)
    return run(params, x)
