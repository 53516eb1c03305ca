"""Packed samples: segment ids.

Rule: a segment is a maximal run of equal consecutive `segment_ids`; each id value forms one run. Tokens only
attend keys of their own segment in every branch; blocks and windows restart per segment. Every segment must
start at a multiple of `block_size` (position 0 or t % block_size == 0 wherever ids[t] != ids[t - 1]), so each
block lies in one segment and block indices stay global. `validate_segments` checks this whenever the ids
are concrete (not under `jit`); under `jit` it is the caller's contract.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def default_segments(batch: int, length: int) -> jax.Array:
    return jnp.zeros((batch, length), jnp.int32)


def validate_segments(segment_ids: jax.Array, block_size: int) -> None:
    """Raises ValueError if some segment starts off a block boundary (only for concrete ids)."""
    try:
        ids = np.asarray(segment_ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    if ids.ndim != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {ids.shape}")
    starts = np.argwhere(ids[:, 1:] != ids[:, :-1])
    bad = starts[(starts[:, 1] + 1) % block_size != 0]
    if len(bad):
        b, t = bad[0]
        raise ValueError(f"segment_ids: a segment starts at position {t + 1} of row {b}, not a multiple of "
                         f"block_size={block_size}; pad each packed sample to a multiple of block_size")


def segment_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per token, the start (inclusive) and end (exclusive) position of its segment, each [B, T] int32.

    The running max / min are associative scans (O(T log T)): `lax.cummax` lowers to a reduce-window over
    the whole row on GPU, O(T^2), which XLA spent minutes constant-folding at T = 64K.
    """
    b, t = segment_ids.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    new = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.associative_scan(jnp.maximum, jnp.where(new, pos, 0), axis=1)
    last = jnp.concatenate([segment_ids[:, 1:] != segment_ids[:, :-1], jnp.ones((b, 1), bool)], axis=1)
    end = jax.lax.associative_scan(jnp.minimum, jnp.where(last, pos + 1, t), axis=1, reverse=True)
    return start, end
