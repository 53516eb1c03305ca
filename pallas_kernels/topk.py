"""Block importance and fla's top-k network (tie_break "fla", mode videonsa) for the kernel path, in jnp over
chunks of tokens. (The "recent" rule has Pallas kernels: `topk_fused.py` per token, `topk_query_block.py` per
block of queries.)

Scores are computed for `chunk` tokens at a time (`lax.map`), so [B, T, H, NB] is never held at once: at
128K tokens the whole importance tensor would be gigabytes. Rows are virtual heads (`layout.py`); in the
"videonsa" layout the padded zero heads of a group are counted analytically (a zero query scores 0 against
every block, so each adds 1 / n_visible to every past block).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.layout import HeadLayout
from pallas_kernels.topk_rules import fla_topk


def _visible_blocks(pos, lo, hi, block_size: int, causal: bool):
    """Number of compressed blocks a row sees (for the zero heads' lse)."""
    if causal:
        return (pos + 1) // block_size - lo // block_size
    return -(-hi // block_size) - pos // block_size


def select_blocks_chunked(q, k_cmp, lse, lo, hi, *, layout: HeadLayout, block_size: int, block_count: int,
                          causal: bool, scale: float, chunk: int = 512) -> jax.Array:
    """Chosen blocks [B, T, HKV, block_count] int32 (-1 = empty) by fla's network.

    q [B, T, HQ, D]; k_cmp [B, NB, HKV, D] block means; lse [B, Hv, T] of the compression branch; lo, hi
    [B, T] segment bounds (every segment starts on a block boundary).
    """
    b, t, hq, d = q.shape
    nb, hkv = k_cmp.shape[1], k_cmp.shape[2]
    hv, g = layout.virtual_heads, layout.group_size
    heads = jnp.arange(hv)
    kc = k_cmp.astype(jnp.float32)[:, :, heads // g]  # [B, NB, Hv, D]
    zero_rows = np.asarray([layout.zero_rows_of_kv_head(h) for h in range(hkv)], np.float32)
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    padded = lambda x, axis: jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    qs = padded(q, 1).reshape(b, n_chunks, chunk, hq, d).swapaxes(0, 1)
    lses = padded(lse, 2).reshape(b, hv, n_chunks, chunk).transpose(2, 0, 3, 1)
    los, his = (padded(x, 1).reshape(b, n_chunks, chunk).swapaxes(0, 1) for x in (lo, hi))

    def one(args):
        c, qc, lc, loc, hic = args
        pos = c * chunk + jnp.arange(chunk)
        s = jnp.einsum("btvd,bnvd->btvn", qc.astype(jnp.float32)[:, :, heads % hq], kc) * scale
        finite = jnp.isfinite(lc)[..., None]
        p = jnp.where(finite, jnp.exp(s - jnp.where(finite, lc[..., None], 0.0)), 0.0)
        p = jnp.pad(p, ((0, 0), (0, 0), (0, hkv * g - hv), (0, 0)))
        imp = p.reshape(b, chunk, hkv, g, nb).sum(3)
        if zero_rows.any():
            n = _visible_blocks(pos, loc, hic, block_size, causal).astype(jnp.float32)
            imp = imp + jnp.where(n > 0, 1.0 / jnp.maximum(n, 1.0), 0.0)[:, :, None, None] * zero_rows[:, None]
        cur = jnp.broadcast_to((pos // block_size)[None, :, None], (b, chunk, hkv))
        first = jnp.broadcast_to((loc // block_size)[:, :, None], (b, chunk, hkv))
        rel = jnp.minimum(jnp.arange(nb) + first[..., None], nb - 1)
        shifted = jnp.take_along_axis(imp, rel, axis=-1)
        out = fla_topk(shifted, cur - first, group_size=g, block_count=block_count, chunk=block_size)
        return jnp.where(out >= 0, out + first[..., None], -1)

    idx = jax.lax.map(one, (jnp.arange(n_chunks), qs, lses, los, his))
    return idx.swapaxes(0, 1).reshape(b, n_chunks * chunk, hkv, block_count)[:, :t]
