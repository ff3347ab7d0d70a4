"""Cross-entropy of the tied head, optionally chunked so that float32 logits [B, S, V] never exist at once.

With `chunk` > 0 the tokens are processed `chunk` at a time in a rematerialized scan: the backward pass
recomputes each chunk's logits instead of storing all of them (for a 32k vocabulary the logits dominate the
activation memory of small models).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _nll_block(y_NxD, table_VxD, targets_N, cd):
  logits = jnp.dot(y_NxD.astype(cd), table_VxD.astype(cd).T).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_N[:, None], axis=-1)[:, 0]
  return lse - target_logit


def token_nll(y_BxSxD, table_VxD, targets_BxS, cd, chunk: int = 0):
  """Negative log-likelihood per token [B, S] (float32)."""
  b, s, d = y_BxSxD.shape
  n = b * s
  y, t = y_BxSxD.reshape(n, d), targets_BxS.reshape(n)
  if chunk <= 0 or chunk >= n:
    return _nll_block(y, table_VxD, t, cd).reshape(b, s)
  if n % chunk:
    raise ValueError(f"train.loss_chunk={chunk} must divide the tokens per micro-batch ({n}); pick a divisor")
  block = jax.checkpoint(lambda yc, tc: _nll_block(yc, table_VxD, tc, cd))
  _, nll = jax.lax.scan(lambda c, xs: (c, block(*xs)), None,
                        (y.reshape(n // chunk, chunk, d), t.reshape(n // chunk, chunk)))
  return nll.reshape(b, s)
