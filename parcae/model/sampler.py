"""Depth sampling for training (spec section 3) and the loop-state initialization.

With mu = mean_recurrence, s = mean_backprop_depth, t = max(mu - s, 0), each sequence (or the whole batch)
gets n no-grad iterations followed by k iterations with gradient:
- poisson-truncated-full: total = max(1, Poisson(t + s)); k = min(total, s); n = total - k.
- poisson-full: n = 0; k = max(1, Poisson(t + s)), capped at the static grad depth.
- fixed: n = t; k = s.
Sampling is on device from an explicit key, so a step's depths are a pure function of (seed, step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from parcae.model import init
from parcae.model.config import grad_depth


def sample_depths(key, batch: int, cfg):
  """(n_B, k_B) int32 for one batch of `batch` sequences."""
  mu, s = cfg.mean_recurrence, cfg.mean_backprop_depth
  t = max(mu - s, 0)
  shape = (batch,) if cfg.sampling_granularity == "per-sequence" else (1,)
  if cfg.sampling_scheme == "fixed":
    n, k = jnp.full(shape, t, jnp.int32), jnp.full(shape, s, jnp.int32)
  else:
    total = jnp.maximum(1, jax.random.poisson(key, float(t + s), shape)).astype(jnp.int32)
    if cfg.sampling_scheme == "poisson-truncated-full":
      k = jnp.minimum(total, s)
      n = total - k
    else:  # poisson-full
      k, n = jnp.minimum(total, grad_depth(cfg)), jnp.zeros(shape, jnp.int32)
  return jnp.broadcast_to(n, (batch,)), jnp.broadcast_to(k, (batch,))


def init_state(key, shape, kind: str, dim: int):
  """Loop state h_0 (float32) drawn from an explicit key; deterministic given the key."""
  if kind == "zero":
    return jnp.zeros(shape, jnp.float32)
  if kind == "like-init":
    return init.state_like_init(key, shape, dim)
  x = jax.random.normal(key, shape, jnp.float32)
  if kind == "normal":
    return x
  if kind == "embed":
    return x / jnp.sqrt(float(dim))
  # unit: per-token standardized (reference: subtract mean, divide by std + 1e-8)
  x = x - x.mean(-1, keepdims=True)
  return x / (jnp.std(x, axis=-1, keepdims=True, ddof=1) + 1e-8)
