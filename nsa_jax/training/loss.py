"""Next-token cross entropy on answer tokens, computed in sequence chunks so full logits never exist."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def shifted_targets(labels: jax.Array, segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Targets [B, T] and weights [B, T] for the prediction made at each position.

    labels [B, T] follow the Hugging Face convention: the token itself where it is to be learned (answer
    tokens), a negative value (-100) elsewhere. Position t predicts labels[t + 1]; it counts only when that
    label is set and, for packed rows, position t + 1 belongs to the same segment (and is not padding, id 0).
    """
    nxt = labels[:, 1:]
    weight = nxt >= 0
    if segment_ids is not None:
        weight &= (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    pad = ((0, 0), (0, 1))
    return jnp.pad(jnp.maximum(nxt, 0), pad), jnp.pad(weight, pad)


def cross_entropy_sum(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets: jax.Array,
                      weights: jax.Array, chunk: int, shards: int = 1) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, number of weighted tokens), both float32.

    hidden [B, T, E]; `logits_fn` maps hidden rows to logits. The sequence is processed `chunk` tokens at a
    time under remat, so only [B, chunk, vocab] logits are live at once (T must be a multiple of chunk); a chunk
    with no weighted token (a prompt, a video) is skipped at run time: its logits are never computed.
    shards: the pieces the token axis is split into over devices (context parallelism); each chunk then takes
    chunk / shards tokens from every piece, so every device works on every chunk (contiguous chunks would each
    lie on one device, and the partitioner would gather them: every device computing every chunk).
    """
    with jax.named_scope("loss"):  # the profile's part (profile.py)
        return _cross_entropy_sum(hidden, logits_fn, targets, weights, chunk, shards)


def _cross_entropy_sum(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets: jax.Array,
                       weights: jax.Array, chunk: int, shards: int) -> tuple[jax.Array, jax.Array]:
    b, t, e = hidden.shape
    chunk = min(chunk, t)
    if t % chunk:
        raise ValueError(f"sequence length {t} is not a multiple of the loss chunk {chunk}")
    n = t // chunk
    shards = shards if chunk % shards == 0 else 1

    def loss(h, tgt, w):
        logits = logits_fn(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - picked) * w)

    @jax.checkpoint
    def one(args):
        return jax.lax.cond(args[2].any(), loss, lambda *_: jnp.zeros((), jnp.float32), *args)

    # Token s * (T / shards) + j * (chunk / shards) + u goes to chunk j: [B, shards, n, chunk / shards] -> [n, B,
    # chunk].
    split = lambda a: jnp.moveaxis(a.reshape(b, shards, n, chunk // shards, *a.shape[2:]), 2, 0).reshape(
        n, b, chunk, *a.shape[2:])
    losses = jax.lax.map(one, (split(hidden), split(targets), split(weights.astype(jnp.float32))))
    return jnp.sum(losses), jnp.sum(weights.astype(jnp.float32))
