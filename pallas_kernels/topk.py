"""Block importance and fla's top-k network (tie_break "fla", mode videonsa) for the kernel path, in jnp over
chunks of tokens. (The "recent" rule has Pallas kernels: `topk_fused.py` per token, `topk_query_block.py` per
block of queries.)

Scores are computed for `chunk` tokens at a time (`lax.map`), so [B, T, H, NB] is never held at once: at
128K tokens the whole importance tensor would be gigabytes. Rows are the padded heads of the layout
(`layout.py`): the virtual rows score q . k_cmp, the padded zero rows of the "videonsa" layout score 0 against
every block (their lse comes with the others, `nsa_pallas.topk_lse`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.layout import HeadLayout
from pallas_kernels.topk_rules import fla_topk


def select_blocks_chunked(q, k_cmp, lse, lo, *, layout: HeadLayout, block_size: int, block_count: int,
                          scale: float, chunk: int = 512) -> jax.Array:
    """Chosen blocks [B, T, HKV, block_count] int32 (-1 = empty) by fla's network.

    q [B, T, HQ, D]; k_cmp [B, NB, HKV, D] block means; lse [B, T, P] the lse each padded row divides its
    scores by; lo [B, T] segment starts (every segment starts on a block boundary).
    """
    b, t, hq, d = q.shape
    nb, hkv = k_cmp.shape[1], k_cmp.shape[2]
    hv, g = layout.virtual_heads, layout.group_size
    heads = jnp.arange(hv)
    kc = k_cmp.astype(jnp.float32)[:, :, heads // g]  # [B, NB, Hv, D]
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    padded = lambda x: jnp.pad(x, [(0, pad if a == 1 else 0) for a in range(x.ndim)])
    qs = padded(q).reshape(b, n_chunks, chunk, hq, d).swapaxes(0, 1)
    lses = padded(lse).reshape(b, n_chunks, chunk, -1).swapaxes(0, 1)
    los = padded(lo).reshape(b, n_chunks, chunk).swapaxes(0, 1)

    def one(args):
        c, qc, lc, loc = args
        pos = c * chunk + jnp.arange(chunk)
        s = jnp.einsum("btvd,bnvd->btvn", qc.astype(jnp.float32)[:, :, heads % hq], kc) * scale
        s = jnp.pad(s, ((0, 0), (0, 0), (0, hkv * g - hv), (0, 0)))  # zero rows score 0
        finite = jnp.isfinite(lc)[..., None]
        p = jnp.where(finite, jnp.exp(s - jnp.where(finite, lc[..., None], 0.0)), 0.0)
        imp = p.reshape(b, chunk, hkv, g, nb).sum(3)
        cur = jnp.broadcast_to((pos // block_size)[None, :, None], (b, chunk, hkv))
        first = jnp.broadcast_to((loc // block_size)[:, :, None], (b, chunk, hkv))
        rel = jnp.minimum(jnp.arange(nb) + first[..., None], nb - 1)
        shifted = jnp.take_along_axis(imp, rel, axis=-1)
        out = fla_topk(shifted, cur - first, group_size=g, block_count=block_count, chunk=block_size)
        return jnp.where(out >= 0, out + first[..., None], -1)

    idx = jax.lax.map(one, (jnp.arange(n_chunks), qs, lses, los))
    return idx.swapaxes(0, 1).reshape(b, n_chunks * chunk, hkv, block_count)[:, :t]
