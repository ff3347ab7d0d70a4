"""Cross-entropy of the tied head, `chunk` tokens at a time, with a hand-written backward pass.

The logits are the compute-dtype GEMM's output (bf16, as the reference's autocast head) read as float32. The
forward pass keeps only each token's log-sum-exp; the backward pass recomputes a chunk's logits and turns them
into the compute-dtype logit gradient in one elementwise pass, (softmax - onehot) * g, the operand of the two
backward GEMMs. So no [tokens, V] float32 array is ever written, in either pass (autodiff of the same formula
writes the float32 gradient, subtracts the one-hot in a scatter and casts it in two more passes).
The backward GEMMs return float32 (the reference's autocast rounds them to bf16 first); the weight gradient
is summed over chunks in float32. `chunk` <= 0 means one chunk of all tokens. The forward's log-sum-exp is
one Pallas pass over the compute-dtype logits where `lse_impl` picks it (parcae.model.lse), else the two-pass
formula (max, then the sum of exponentials).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from parcae import compile_target
from parcae.model import lse


def token_nll(y_BxSxD, table_VxD, targets_BxS, cd, chunk: int = 0, lse_impl: str = "auto"):
  """Negative log-likelihood per token [B, S] (float32); lse_impl as model.lse_impl."""
  b, s, d = y_BxSxD.shape
  n = b * s
  chunk = n if chunk <= 0 or chunk >= n else chunk
  if n % chunk:
    raise ValueError(f"train.loss_chunk={chunk} must divide the tokens per micro-batch ({n}); pick a divisor")
  kernel = _use_kernel(lse_impl, chunk, table_VxD.shape[0])
  nll = _chunked_nll(y_BxSxD.reshape(n // chunk, chunk, d), table_VxD, targets_BxS.reshape(n // chunk, chunk),
                     jnp.dtype(cd), kernel)
  return nll.reshape(b, s)


def _use_kernel(impl, n, v):
  if impl == "pallas" and not lse.supported(n, v):
    raise ValueError(f"model.lse_impl='pallas' needs loss chunks of a multiple of {lse.ROWS} tokens and a "
                     f"vocabulary divisible by 64 (chunk {n}, vocabulary {v}); use lse_impl='auto' or 'xla'")
  return impl == "pallas" or (impl == "auto" and compile_target.platform() == "gpu" and lse.supported(n, v, 256))


def _logits(y_NxD, table_cd_VxD, cd):
  """The GEMM's compute-dtype logits. The barrier keeps XLA from folding a consumer's float32 cast into the
  GEMM, which would skip the rounding (it did inside this scan on the CPU) and write the logits in float32,
  twice the bytes (measured: eval 4.5% slower on the H200)."""
  return jax.lax.optimization_barrier(jnp.dot(y_NxD.astype(cd), table_cd_VxD.T))


def _row_lse(logits_NxV):
  """The two-pass log-sum-exp (float32)."""
  m_N = jnp.max(logits_NxV, axis=-1)
  return m_N + jnp.log(jnp.sum(jnp.exp(logits_NxV - m_N[:, None]), axis=-1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_nll(y_CxNxD, table_VxD, t_CxN, cd, kernel):
  return _nll_fwd(y_CxNxD, table_VxD, t_CxN, cd, kernel)[0]


def _nll_fwd(y_CxNxD, table_VxD, t_CxN, cd, kernel):
  table = table_VxD.astype(cd)

  def one(_, xs):
    y_NxD, t_N = xs
    logits = _logits(y_NxD, table, cd)
    lse_N = lse.row_lse(logits) if kernel else _row_lse(logits.astype(jnp.float32))
    target_N = jnp.take_along_axis(logits, t_N[:, None], axis=-1)[:, 0].astype(jnp.float32)
    return None, (lse_N - target_N, lse_N)

  _, (nll, lse_CxN) = jax.lax.scan(one, None, (y_CxNxD, t_CxN))
  return nll, (y_CxNxD, table_VxD, t_CxN, lse_CxN)


def _nll_bwd(cd, kernel, res, g_CxN):
  y_CxNxD, table_VxD, t_CxN, lse_CxN = res
  table = table_VxD.astype(cd)

  def one(dtable, xs):
    y_NxD, t_N, lse_N, g_N = xs
    logits = _logits(y_NxD, table, cd).astype(jnp.float32)
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_N[:, None]
    dlogits = ((jnp.exp(logits - lse_N[:, None]) - onehot) * g_N[:, None]).astype(cd)
    dy_NxD = jnp.dot(dlogits, table, preferred_element_type=jnp.float32)
    return dtable + jnp.dot(dlogits.T, y_NxD.astype(cd), preferred_element_type=jnp.float32), dy_NxD

  dtable, dy = jax.lax.scan(one, jnp.zeros(table_VxD.shape, jnp.float32), (y_CxNxD, t_CxN, lse_CxN, g_CxN))
  return dy.astype(y_CxNxD.dtype), dtable.astype(table_VxD.dtype), None


_chunked_nll.defvjp(_nll_fwd, _nll_bwd)
