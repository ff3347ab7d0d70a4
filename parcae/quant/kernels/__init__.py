"""Pallas kernels: fused scale + round + dequantize (bit-identical to the jnp path)."""
from parcae.quant.kernels.qdq import qdq_pallas
