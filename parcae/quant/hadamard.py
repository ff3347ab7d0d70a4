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


def sign_matrix(n: int, signs=None) -> jax.Array:
  """The exact +-1 matrix diag(signs) @ (sqrt(n) H_n) in f32: `matrix` without the 1/sqrt(n)."""
  pm = jnp.asarray(np.round(sylvester(n) * np.sqrt(n)), jnp.float32)
  return pm if signs is None else jnp.asarray(signs, jnp.float32)[:, None] * pm


def random_signs(key, n: int) -> jax.Array:
  return jax.random.rademacher(key, (n,), jnp.float32)


def rotate(x, n: int, signs=None, axis: int = -1, inverse: bool = False):
  """Rotate consecutive length-n blocks of x along `axis` by M = diag(signs) @ H_n/sqrt(n) (v @ M;
  inverse: v @ M^T).

  x is rounded to bf16 (what the GEMM would read anyway) and multiplied by the +-1 matrix
  on the tensor cores with f32 accumulation (every product exact), then scaled by 1/sqrt(n) in
  f32; the contraction runs on x's own layout, no transpose of x. On the H200 this formulation
  makes the quartet layer 1.5x faster than an f32 matmul at HIGHEST precision and 2.8x faster
  than butterflies (bench/quant_layouts.py).
  """
  if n not in SIZES:
    raise ValueError(f"Hadamard size {n} is not supported; use one of {SIZES}")
  ax = axis % x.ndim
  shape = x.shape
  if shape[ax] % n:
    raise ValueError(f"axis {axis} has length {shape[ax]}, not a multiple of the Hadamard size "
                     f"{n}; pad it or choose a rotation size that divides it")
  m = sign_matrix(n, signs)
  m = m.T if inverse else m
  xr = x.astype(jnp.bfloat16).reshape(shape[:ax] + (shape[ax] // n, n) + shape[ax + 1:])
  y = jax.lax.dot_general(xr, m.astype(jnp.bfloat16), (((ax + 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)  # the block axis comes out last
  y = jnp.moveaxis(y, -1, ax + 1).reshape(shape) * jnp.float32(1.0 / np.sqrt(n))
  if x.dtype != jnp.float32:  # round explicitly: XLA may skip a bare f32->bf16->f32 inside a fusion
    fi = jnp.finfo(x.dtype)
    y = jax.lax.reduce_precision(y, exponent_bits=fi.nexp, mantissa_bits=fi.nmant)
  return y.astype(x.dtype)
