"""NSA attention for JAX: a pure-jnp oracle and Pallas kernels (Triton on GPU, Mosaic on TPU, interpret on CPU)."""

from pallas_kernels.api import VARIANTS, NSAVariant, nsa_attention, nsa_variant
from pallas_kernels.backend import RESIDUALS

__all__ = ["NSAVariant", "RESIDUALS", "VARIANTS", "nsa_attention", "nsa_variant"]
