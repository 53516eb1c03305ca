"""Query chunks: NSA for the query rows of one chunk of a sequence against all of its keys (context parallelism).

q [B, Tq, ...] holds positions q_offset + [0, Tq) of a sequence of T >= Tq tokens whose keys k, v [B, T, ...]
and segment ids [B, T] cover it all. Every mask is written over absolute positions, so a chunk's rows compute
exactly what the same rows compute in a call over the whole sequence. q_offset: a Python int, a traced int32
scalar (inside `shard_map`, `axis_index * Tq`) or an int32 array [B] (one offset per batch row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def query_positions(batch: int, length: int, q_offset) -> jax.Array:
    """[B, Tq] int32 absolute positions of the query rows (q_offset None: 0 .. Tq - 1)."""
    offset = jnp.zeros((batch,), jnp.int32) if q_offset is None else jnp.asarray(q_offset, jnp.int32)
    return jnp.broadcast_to(offset.reshape(-1, 1), (batch, 1)) + jnp.arange(length, dtype=jnp.int32)[None]


def rows_at(x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, T, ...] at the rows positions [B, Tq] (clamped into [0, T))."""
    idx = jnp.clip(positions, 0, x.shape[1] - 1).reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def gather_chunks(x: jax.Array, axis_name) -> jax.Array:
    """The whole sequence [B, n * Tq, ...] from each chunk's x [B, Tq, ...], chunk i at rows i * Tq (the chunks
    lie in order along the mapped axis `axis_name`, of size n)."""
    return jax.lax.all_gather(x, axis_name, axis=1, tiled=True)


def static_offset(q_offset) -> int | None:
    """q_offset as a Python int where it is a concrete scalar (None: 0), else None (traced, or one per row)."""
    if q_offset is None:
        return 0
    try:
        value = np.asarray(q_offset)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    return int(value) if value.ndim == 0 else None
