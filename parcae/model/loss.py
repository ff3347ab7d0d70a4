"""Cross-entropy of the tied head, `chunk` tokens at a time, with a hand-written backward pass.

The logits are the compute-dtype GEMM's output (bf16, as the reference's autocast head) read as float32. The
forward pass keeps only each token's log-sum-exp; the backward pass recomputes a chunk's logits and turns them
into the compute-dtype logit gradient in one elementwise pass, (softmax - onehot) * g, the operand of the two
backward GEMMs. So no [tokens, V] float32 array is ever written, in either pass (autodiff of the same formula
writes the float32 gradient, subtracts the one-hot in a scatter and casts it in two more passes).
The backward GEMMs return float32 (the reference's autocast rounds them to bf16 first); the weight gradient
is summed over chunks in float32. `chunk` <= 0 means one chunk of all tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_nll(y_BxSxD, table_VxD, targets_BxS, cd, chunk: int = 0):
  """Negative log-likelihood per token [B, S] (float32)."""
  b, s, d = y_BxSxD.shape
  n = b * s
  chunk = n if chunk <= 0 or chunk >= n else chunk
  if n % chunk:
    raise ValueError(f"train.loss_chunk={chunk} must divide the tokens per micro-batch ({n}); pick a divisor")
  nll = _chunked_nll(y_BxSxD.reshape(n // chunk, chunk, d), table_VxD, targets_BxS.reshape(n // chunk, chunk),
                     jnp.dtype(cd))
  return nll.reshape(b, s)


def _logits(y_NxD, table_cd_VxD, cd):
  """The GEMM's compute-dtype logits, read as float32. The barrier keeps XLA from folding the float32 cast
  into the GEMM, which would skip the rounding (it did inside this scan on the CPU) and write the logits in
  float32, twice the bytes (measured: eval 4.5% slower on the H200)."""
  return jax.lax.optimization_barrier(jnp.dot(y_NxD.astype(cd), table_cd_VxD.T)).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_nll(y_CxNxD, table_VxD, t_CxN, cd):
  return _nll_fwd(y_CxNxD, table_VxD, t_CxN, cd)[0]


def _nll_fwd(y_CxNxD, table_VxD, t_CxN, cd):
  table = table_VxD.astype(cd)

  def one(_, xs):
    y_NxD, t_N = xs
    logits = _logits(y_NxD, table, cd)
    m_N = jnp.max(logits, axis=-1)
    lse_N = m_N + jnp.log(jnp.sum(jnp.exp(logits - m_N[:, None]), axis=-1))
    return None, (lse_N - jnp.take_along_axis(logits, t_N[:, None], axis=-1)[:, 0], lse_N)

  _, (nll, lse) = jax.lax.scan(one, None, (y_CxNxD, t_CxN))
  return nll, (y_CxNxD, table_VxD, t_CxN, lse)


def _nll_bwd(cd, res, g_CxN):
  y_CxNxD, table_VxD, t_CxN, lse_CxN = res
  table = table_VxD.astype(cd)

  def one(dtable, xs):
    y_NxD, t_N, lse_N, g_N = xs
    logits = _logits(y_NxD, table, cd)
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_N[:, None]
    dlogits = ((jnp.exp(logits - lse_N[:, None]) - onehot) * g_N[:, None]).astype(cd)
    dy_NxD = jnp.dot(dlogits, table, preferred_element_type=jnp.float32)
    return dtable + jnp.dot(dlogits.T, y_NxD.astype(cd), preferred_element_type=jnp.float32), dy_NxD

  dtable, dy = jax.lax.scan(one, jnp.zeros(table_VxD.shape, jnp.float32), (y_CxNxD, t_CxN, lse_CxN, g_CxN))
  return dy.astype(y_CxNxD.dtype), dtable.astype(table_VxD.dtype), None


_chunked_nll.defvjp(_nll_fwd, _nll_bwd)
