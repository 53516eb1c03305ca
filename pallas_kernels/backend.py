"""Where Pallas kernels run: Triton on GPU, Mosaic on TPU, interpret mode on CPU."""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_INTERPRET = contextvars.ContextVar("nsa_pallas_interpret", default=None)
_PLATFORM = contextvars.ContextVar("nsa_pallas_platform", default=None)
_GPU_LOWERING = contextvars.ContextVar("nsa_pallas_gpu_lowering", default="auto")
GPU_LOWERINGS = ("auto", "triton", "mosaic_gpu")
# The name of every NSA kernel's residuals (`saved`): a remat policy that saves it keeps them from the forward,
# so the backward runs no forward kernel again.
RESIDUALS = "nsa_residuals"


def saved(*residuals):
    """The residuals of a kernel's custom VJP (arrays or pytrees of them), named `RESIDUALS` for remat."""
    return jax.tree.map(lambda a: checkpoint_name(a, RESIDUALS), residuals)


@contextlib.contextmanager
def interpret_with(params):
    """Runs kernels traced inside in interpret mode with `params` (True, or e.g. `pltpu.InterpretParams()`
    to emulate the TPU / Mosaic semantics on CPU)."""
    token = _INTERPRET.set(params)
    try:
        yield
    finally:
        _INTERPRET.reset(token)


@contextlib.contextmanager
def lowering_for(platform: str):
    """Kernels traced inside take `platform`'s options ("gpu" / "tpu") whatever the default backend, e.g. to
    lower for an abstract H100 on a CPU-only machine (`jax.sharding.use_abstract_mesh`)."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


@contextlib.contextmanager
def gpu_lowering(name: str):
    """Kernels traced inside use `name` on GPU: "triton", "mosaic_gpu" (Hopper wgmma kernels, where a kernel
    has them, today the query-block selection's) or "auto" (the default: "mosaic_gpu" on a Hopper GPU, else
    "triton")."""
    if name not in GPU_LOWERINGS:
        raise ValueError(f"gpu lowering must be one of {GPU_LOWERINGS}, got {name!r}")
    token = _GPU_LOWERING.set(name)
    try:
        yield
    finally:
        _GPU_LOWERING.reset(token)


def gpu_lowering_name(mosaic_gpu_fits: bool = True) -> str:
    """The lowering of kernels traced now: `gpu_lowering`'s choice on GPU, "auto" resolved ("mosaic_gpu" where
    the default backend's GPUs are Hoppers and the kernel's Mosaic GPU version takes the shapes,
    `mosaic_gpu_fits`); elsewhere "triton" (Pallas' Triton-style kernels, run by the interpreter on CPU).
    Lowering for an abstract GPU (`lowering_for`) on a CPU-only machine resolves "auto" to "triton"."""
    if kernel_platform() != "gpu":
        return "triton"
    name = _GPU_LOWERING.get()
    if name == "auto":
        return "mosaic_gpu" if mosaic_gpu_fits and hopper_gpus() else "triton"
    return name


def hopper_gpus() -> bool:
    """Whether the default backend's devices are Hopper GPUs (compute capability 9.0: wgmma, TMA)."""
    devices = jax.devices()
    return devices[0].platform == "gpu" and all(getattr(d, "compute_capability", "") == "9.0" for d in devices)


def kernel_platform() -> str:
    """Where kernels traced now run: "interpret", "gpu", "tpu" or "cpu" (`interpret_with` and `lowering_for`
    override the default backend)."""
    if _INTERPRET.get() is not None:
        return "interpret"
    p = _PLATFORM.get() or jax.default_backend()
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


def kernel_target() -> str:
    """Which kernels run: "tpu" (Mosaic's, on a TPU or under the TPU interpreter `pltpu.InterpretParams`) or
    "triton" (Triton's, on GPU or under the generic interpreter)."""
    params = _INTERPRET.get()
    if params is not None:
        from jax.experimental.pallas import tpu as pltpu
        return "tpu" if isinstance(params, pltpu.InterpretParams) else "triton"
    return "tpu" if kernel_platform() == "tpu" else "triton"


def call_options(num_warps: int = 4, num_stages: int = 2, dimension_semantics: tuple[str, ...] | None = None
                 ) -> dict:
    """Keyword arguments of `pl.pallas_call` for the default backend: Triton's warps and stages on GPU, Mosaic's
    grid dimension semantics ("parallel" / "arbitrary") on TPU."""
    platform = kernel_platform()
    if platform == "interpret":
        return dict(interpret=_INTERPRET.get())
    if platform == "gpu":
        from jax.experimental.pallas import triton as plgpu
        return dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages))
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=dimension_semantics))
    return dict(interpret=True)


def ceil_div(a, b):
    return (a + b - 1) // b


def softmax_init(rows: int, d: int):
    """(acc, running max, running sum) of an online softmax over `rows` query rows."""
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_step(carry, s: jax.Array, v: jax.Array):
    """One key tile of an online softmax: masked logits s [rows, keys] (-inf = masked), values v [keys, D]."""
    acc, m, l = carry
    m_new = jnp.maximum(m, s.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_safe[:, None])
    corr = jnp.exp(m - m_safe)
    return acc * corr[:, None] + dot(p.astype(v.dtype), v), m_new, l * corr + p.sum(axis=1)


def softmax_result(carry) -> tuple[jax.Array, jax.Array]:
    """(o [rows, D] float32, natural-log lse [rows]) of an online softmax; a row that saw nothing gets o = 0
    and lse = -inf."""
    acc, m, l = carry
    l_safe = jnp.where(l > 0, l, 1.0)
    return acc / l_safe[:, None], jnp.where(l > 0, m + jnp.log(l_safe), -jnp.inf)


def probs_from_lse(s: jax.Array, lse: jax.Array) -> jax.Array:
    """Softmax probabilities of masked logits s [rows, keys] given each row's lse, [rows] or [rows, 1] (the
    2-D form Mosaic keeps); 0 where masked or where the row saw nothing."""
    lse = lse if lse.ndim == 2 else lse[:, None]
    finite = lse > -jnp.inf
    return jnp.where(finite & (s > -jnp.inf), jnp.exp(s - jnp.where(finite, lse, 0.0)), 0.0)


def dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """2-D matrix product with float32 accumulation, lowering on Triton, Mosaic and interpret mode."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
