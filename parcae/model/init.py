"""The reference initialization ("scaled-zero" table, truncated-orthogonal matrices), spec section 2.

Every std-initialized matrix is truncated-orthogonal: draw N(0,1) truncated to [-2, 2] of shape
(max(rows, cols), min(rows, cols)), QR, fix signs by sign(diag R), scale by gain = std * sqrt(max(rows, cols)).
All singular values then equal the gain. Kernels are stored [in, out] (the transpose of the reference's
[out, in]); transposing does not change singular values.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DECAY_TARGET = math.sqrt(1 / 5)  # injection decay at init
DELTA0 = -math.log(DECAY_TARGET)  # softplus(dt_bias) at init = 0.8047190
DT_BIAS0 = DELTA0 + math.log(-math.expm1(-DELTA0))  # inverse softplus of DELTA0 = 0.2119354


def std_for(dim: int) -> float:
  """Table std of the "scaled-zero" strategy: sqrt(2 / (5 * dim))."""
  return math.sqrt(2.0 / (5.0 * dim))


def trunc_orthogonal(key, rows: int, cols: int, std: float):
  """A [rows, cols] matrix (reference layout) with every singular value std * sqrt(max(rows, cols))."""
  tall = max(rows, cols), min(rows, cols)
  z = jax.random.truncated_normal(key, -2.0, 2.0, tall, jnp.float32)
  q, r = jnp.linalg.qr(z)
  q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0)[None, :]
  w = q if rows >= cols else q.T
  return w * (std * math.sqrt(max(rows, cols)))


def kernel(key, d_in: int, d_out: int, std: float):
  """Truncated-orthogonal kernel in our [in, out] layout (reference weight is [out, in])."""
  return trunc_orthogonal(key, d_out, d_in, std).T


def zeros(d_in: int, d_out: int):
  return jnp.zeros((d_in, d_out), jnp.float32)


def embedding(key, vocab: int, dim: int):
  """Token embedding [V, d], same layout as the reference, tied to the head."""
  return trunc_orthogonal(key, vocab, dim, std_for(dim))


def value_embedding(key, vocab: int, dim: int):
  """Value-embedding table: the reference leaves it at torch's default Embedding init, N(0, 1)."""
  return jax.random.normal(key, (vocab, dim), jnp.float32)


def ve_gate(key, n_heads: int, width: int = 32):
  """Gate kernel [32, heads]: torch's default Linear init, U(-1/sqrt(32), 1/sqrt(32))."""
  bound = 1.0 / math.sqrt(width)
  return jax.random.uniform(key, (width, n_heads), jnp.float32, -bound, bound)


def state_like_init(key, shape, dim: int):
  """like-init loop state: N(0, sigma) truncated to +-3 sigma, sigma = std_for(dim)."""
  sigma = std_for(dim)
  return jax.random.truncated_normal(key, -3.0, 3.0, shape, jnp.float32) * sigma


def adapter(key, d_in: int, d_out: int, dim: int):
  """Linear-injection kernel: truncated normal std sqrt(2/(5d)) at +-3 sigma (not orthogonal)."""
  sigma = std_for(dim)
  return jax.random.truncated_normal(key, -3.0, 3.0, (d_in, d_out), jnp.float32) * sigma
