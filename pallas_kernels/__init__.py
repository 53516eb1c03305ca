"""NSA attention for JAX: a pure-jnp oracle and Pallas kernels (Triton on GPU, Mosaic on TPU, interpret on CPU)."""

from pallas_kernels.api import nsa_attention

__all__ = ["nsa_attention"]
