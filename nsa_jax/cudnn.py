"""cuDNN flash attention: where it applies, and causal attention of a chunk of query rows at an offset.

A chunk of queries at rows [s, s + n) of a causal sequence sees the keys [0, s + n) (the diagonal at the bottom
right). jax's cuDNN attention aligns its causal mask at the top left, so that chunk would need an explicit mask,
which cuDNN reads as a bias over the whole [n, s + n] rectangle. `chunk_attention` makes two unmasked calls
instead: the keys before the chunk (no mask) and the chunk's own square (causal), merged by their log-sum-exp.
Its backward runs cuDNN's backward on each part with the merged output and log-sum-exp, which are those of the
softmax over all keys, so each part's gradient is exactly its share (dq is their sum).

The parts go through the custom-VJP rules of jax's cuDNN attention (`jax._src.cudnn.fused_attention_stablehlo`).
That module is private and its signatures differ between jax releases, so arguments go by name and
`chunk_attention_applies` says whether this jax's rules take them (else callers keep the masked path).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels import RESIDUALS

try:
    from jax._src.cudnn import fused_attention_stablehlo as _fa
except ImportError:  # a jax without cuDNN attention
    _fa = None


def cudnn_applies(q: jax.Array) -> bool:
    """cuDNN flash attention takes this query: an NVIDIA GPU, bf16 / f16, head dim a multiple of 8 up to 128."""
    d = q.shape[-1]
    return (jax.default_backend() == "gpu" and jax.devices()[0].device_kind.upper().startswith("NVIDIA")
            and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and d <= 128)


class Part(NamedTuple):
    """One unmasked attention over some of the keys. fwd(q, k, v, causal) -> (o [B, T, H, D] in q's dtype,
    lse [B, H, T] float32, natural log of the scaled scores); bwd(q, k, v, o, lse, do, causal) -> (dq, dk, dv)
    with o, lse those of the softmax over all keys."""

    fwd: Callable
    bwd: Callable


def _rule_values(q: jax.Array, causal: bool) -> dict:
    """Every argument the rules of jax's releases take, by name (operands not used: empty arrays)."""
    unused = jnp.zeros(0, q.dtype)
    return dict(bias=unused, q_seqlen=unused, kv_seqlen=unused, q_offsets=unused, kv_offsets=unused,
                page_table_k=unused, page_table_v=unused, score_mod_args=(), scale=q.shape[-1] ** -0.5, seed=0,
                dropout_rate=0.0, variadic_args=(False, False),
                mask_type=_fa.MaskType.CAUSAL if causal else _fa.MaskType.NO_MASK,
                layout=_fa.AttentionLayout.BTNH.value, sliding_window_length=None, score_mod=None,
                cudnn_version=_fa.check_cudnn_version(), return_residual=True, is_training=True)


def _call(rule, values: dict):
    return rule(**{name: values[name] for name in inspect.signature(rule).parameters})


def _operands(values: dict) -> tuple:
    """The rules' residuals before (softmax statistics, output): the forward rule's parameters before `scale`."""
    names = list(inspect.signature(_fa._dot_product_attention_fwd_rule).parameters)
    return tuple(values[name] for name in names[:names.index("scale")])


def _cudnn_fwd(q, k, v, causal: bool):
    (o, lse), _ = _call(_fa._dot_product_attention_fwd_rule, _rule_values(q, causal) | dict(query=q, key=k, value=v))
    return o, lse


def _cudnn_bwd(q, k, v, o, lse, do, causal: bool):
    values = _rule_values(q, causal) | dict(query=q, key=k, value=v)
    res = _operands(values) + (lse, o)
    return tuple(_call(_fa._dot_product_attention_bwd_rule, values | dict(res=res, grad_output=(do, None)))[:3])


CUDNN = Part(_cudnn_fwd, _cudnn_bwd)


# The names `_rule_values` and the two parts supply; a release whose rules want another is not used.
_SUPPLIED = frozenset({"query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets",
                       "page_table_k", "page_table_v", "score_mod_args", "scale", "seed", "dropout_rate",
                       "variadic_args", "mask_type", "layout", "sliding_window_length", "score_mod", "cudnn_version",
                       "return_residual", "is_training", "res", "grad_output"})


@functools.cache
def _rules_take_our_arguments() -> bool:
    rules = [getattr(_fa, f"_dot_product_attention_{kind}_rule", None) for kind in ("fwd", "bwd")]
    return _fa is not None and all(r is not None and set(inspect.signature(r).parameters) <= _SUPPLIED
                                   for r in rules)


def chunk_attention_applies(q: jax.Array, offset: int, implementation: str | None) -> bool:
    """`chunk_attention` runs here on cuDNN: implementation None or "cudnn", cuDNN takes q, this jax's rules take
    the arguments, and the parts' lengths are multiples of 8 (cuDNN's backward refuses others)."""
    return (implementation in (None, "cudnn") and cudnn_applies(q) and q.shape[1] % 8 == 0 and offset % 8 == 0
            and _rules_take_our_arguments())


def chunk_attention(q: jax.Array, k: jax.Array, v: jax.Array, offset: int, part: Part = CUDNN) -> jax.Array:
    """Causal GQA of the query rows [offset, offset + T) over the keys [0, offset + T): q [B, T, H, D], k, v
    [B, offset + T, K, D]; scale 1/sqrt(D). part: the unmasked attention the two parts run (cuDNN's)."""
    if k.shape[1] != offset + q.shape[1]:
        raise ValueError(f"chunk_attention: {k.shape[1]} keys for {q.shape[1]} rows at offset {offset}")
    return _chunk_attention(part, offset, q, k, v)


def _parts(offset: int, k, v):
    """(k, v, causal) of each part: the keys before the chunk (no mask), then the chunk's own (causal)."""
    own = [(k[:, offset:], v[:, offset:], True)]
    return ([(k[:, :offset], v[:, :offset], False)] if offset else []) + own


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunk_attention(part: Part, offset: int, q, k, v):
    return _chunk_fwd(part, offset, q, k, v)[0]


def _chunk_fwd(part: Part, offset: int, q, k, v):
    outs = [part.fwd(q, kp, vp, causal) for kp, vp, causal in _parts(offset, k, v)]
    lse = functools.reduce(jnp.logaddexp, [l for _, l in outs])
    weight = lambda l: jnp.exp(l - lse).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
    o = sum(weight(l) * o_p.astype(jnp.float32) for o_p, l in outs).astype(q.dtype)
    o, lse = checkpoint_name(o, RESIDUALS), checkpoint_name(lse, RESIDUALS)
    return o, (q, k, v, o, lse)


def _chunk_bwd(part: Part, offset: int, res, do):
    q, k, v, o, lse = res
    grads = [part.bwd(q, kp, vp, o, lse, do, causal) for kp, vp, causal in _parts(offset, k, v)]
    dq = sum(g[0].astype(jnp.float32) for g in grads).astype(q.dtype)
    return dq, jnp.concatenate([g[1] for g in grads], axis=1), jnp.concatenate([g[2] for g in grads], axis=1)


_chunk_attention.defvjp(_chunk_fwd, _chunk_bwd)
