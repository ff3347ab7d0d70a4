"""How the prelude output e enters the loop state h: u = Inject(h, e), then h' = Core(u).

- diagonal (Parcae): u = decay * h + delta * (e B^T), delta = softplus(dt_bias), decay = exp(-delta * exp(A_log))
  in (0, 1) per channel, so the linear part of the loop is a contraction.
- linear: u = [h ; e] W (the concat-linear injection of earlier looped models; can be unstable).
- add: u = h + e (marginally stable).
Everything that depends only on e is computed once by `prepare` and reused by every iteration.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from parcae.model import init
from parcae.model.layers import Linear


class Diagonal(nnx.Module):
  reads_e_in_cd = True  # prepare casts e to the compute dtype first (so the prelude's norm may write it so)

  def __init__(self, d: int, cd):
    self.A_log = nnx.Param(jnp.zeros((d,), jnp.float32))
    self.dt_bias = nnx.Param(jnp.full((d,), init.DT_BIAS0, jnp.float32))
    self.B = Linear(jnp.eye(d, dtype=jnp.float32), cd)

  def delta_decay(self):
    delta = jax.nn.softplus(self.dt_bias[...])
    return delta, jnp.exp(-delta * jnp.exp(self.A_log[...]))

  def prepare(self, e_BxSxD):
    delta, decay = self.delta_decay()
    return decay, delta * self.B(e_BxSxD).astype(jnp.float32)

  @staticmethod
  def step(h_BxSxD, ctx):
    decay, be = ctx
    return decay * h_BxSxD + be


class LinearInjection(nnx.Module):
  reads_e_in_cd = True

  def __init__(self, d: int, key, cd):
    self.W = Linear(init.adapter(key, 2 * d, d, d), cd)
    self.d, self.cd = d, cd

  def prepare(self, e_BxSxD):
    w = self.W.kernel[...].astype(self.cd)
    return w[: self.d], jnp.dot(e_BxSxD.astype(self.cd), w[self.d:]).astype(jnp.float32)

  @staticmethod
  def step(h_BxSxD, ctx):
    w_h, e_part = ctx
    return jnp.dot(h_BxSxD.astype(w_h.dtype), w_h).astype(jnp.float32) + e_part


class Add(nnx.Module):
  reads_e_in_cd = False  # e joins the float32 state as it is
  def prepare(self, e_BxSxD):
    return e_BxSxD

  @staticmethod
  def step(h_BxSxD, ctx):
    return h_BxSxD + ctx


def make_injection(cfg, key, cd):
  if cfg.injection == "diagonal":
    return Diagonal(cfg.d_model, cd)
  if cfg.injection == "linear":
    return LinearInjection(cfg.d_model, key, cd)
  return Add()
