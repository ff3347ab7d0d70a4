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


def rotate(x, n: int, signs=None, axis: int = -1, inverse: bool = False):
  """Rotate consecutive length-n blocks of x along `axis` by M = diag(signs) @ H_n/sqrt(n) (v @ M;
  inverse: v @ M^T), in f32, as a fast Walsh-Hadamard transform in place.

  The butterflies are slices, adds and concatenations on the un-transposed array, so XLA fuses
  the rotation into the quantizer that reads it; no [.., K] f32 copy and no matmul. Agrees with
  v @ matrix(n, signs) to f32 rounding (log2(n) adds per element, one final scale).
  """
  if n not in SIZES:
    raise ValueError(f"Hadamard size {n} is not supported; use one of {SIZES}")
  ax = axis % x.ndim
  if x.shape[ax] % n:
    raise ValueError(f"axis {axis} has length {x.shape[ax]}, not a multiple of the Hadamard size "
                     f"{n}; pad it or choose a rotation size that divides it")
  shape = x.shape
  pre, post = shape[:ax], shape[ax + 1:]
  v = x.astype(jnp.float32).reshape(pre + (shape[ax] // n, n) + post)
  bshape = (1,) * len(pre) + (1, n) + (1,) * len(post)
  s = None if signs is None else jnp.asarray(signs, jnp.float32).reshape(bshape)
  if s is not None and not inverse:
    v = v * s
  h = n // 2
  while h >= 1:  # H_2m = [[H_m, H_m], [H_m, -H_m]]: (a, b) -> (a + b, a - b), then recurse
    w = v.reshape(pre + (shape[ax] // n, n // (2 * h), 2, h) + post)
    a = jax.lax.index_in_dim(w, 0, ax + 2, keepdims=True)
    b = jax.lax.index_in_dim(w, 1, ax + 2, keepdims=True)
    v = jnp.concatenate([a + b, a - b], axis=ax + 2).reshape(pre + (shape[ax] // n, n) + post)
    h //= 2
  v = v * jnp.float32(1.0 / np.sqrt(n))
  if s is not None and inverse:
    v = v * s
  return v.reshape(shape).astype(x.dtype)
