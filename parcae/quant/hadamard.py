"""Block-diagonal Hadamard rotations along one axis (the GEMM reduction axis).

Rotating both GEMM operands along their contraction axis by the same orthogonal block matrix
leaves the product unchanged: (X H)(W H)^T = X W^T. Rotations spread block outliers before
quantization (Quartet forward: fixed Sylvester H_32; backward: random signs re-drawn per call).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (16, 32, 64, 128)
# Transformer Engine's fixed NVFP4 RHT sign vector (one for all layers, whole run).
TE_SIGNS_16 = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


def sylvester(n: int) -> np.ndarray:
  """Orthonormal Sylvester Hadamard matrix H_n / sqrt(n) (float64)."""
  if n not in SIZES:
    raise ValueError(f"Hadamard size {n} is not supported; use one of {SIZES}")
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


def matrix(n: int, signs=None) -> jax.Array:
  """f32 rotation M = diag(signs) @ H_n/sqrt(n) (signs None -> fixed Sylvester); used as v @ M."""
  h = jnp.asarray(sylvester(n), jnp.float32)
  if signs is None:
    return h
  return jnp.asarray(signs, jnp.float32)[:, None] * h


def random_signs(key, n: int) -> jax.Array:
  return jax.random.rademacher(key, (n,), jnp.float32)


def rotate(x, m, axis: int = -1, inverse: bool = False):
  """Apply m (n x n, orthogonal) to consecutive length-n blocks of x along axis (f32 math)."""
  n = m.shape[0]
  ax = axis % x.ndim
  if x.shape[ax] % n:
    raise ValueError(f"axis {axis} has length {x.shape[ax]}, not a multiple of the Hadamard size "
                     f"{n}; pad it or choose a rotation size that divides it")
  xm = jnp.moveaxis(x.astype(jnp.float32), ax, -1)
  xb = xm.reshape(xm.shape[:-1] + (xm.shape[-1] // n, n))
  mm = m.T if inverse else m
  yb = jnp.einsum("...i,ij->...j", xb, mm, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(yb.reshape(xm.shape), -1, ax).astype(x.dtype)
