"""The jitted train step and eval step (pure functions of explicit state).

State: {"params": nnx.State of the model's parameters (float32), "opt": optimizer state, "step": int32,
        "key": PRNG key}. A step's randomness (depths, loop-state init, stochastic rounding) is
fold_in(key, step), so a run is a pure function of (config, seed) and resumes bit-exactly.

Depth grouping: per-sequence depths are drawn for the whole global batch, then sorted by total depth and
split into micro-batches in that order. Every sequence still receives an i.i.d. draw from the configured
sampler (rows are already in random order), but each micro-batch runs the loop only to its own deepest
sequence instead of the global one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from parcae.model.config import grad_depth
from parcae.model.loss import mean_token_nll, token_nll
from parcae.train import mesh as pmesh


def sample_step_depths(model, key, global_batch: int, accum: int, grouping: bool):
  """(n, k) of shape [accum, micro] for one optimizer step."""
  n, k = model.sample_depths(key, global_batch)
  if grouping and model.cfg.kind == "parcae":
    order = jnp.argsort(n + k, stable=True)
    n, k = n[order], k[order]
  return n.reshape(accum, -1), k.reshape(accum, -1)


def micro_loss(params, graphdef, batch, n_B, k_B, keys, train_cfg, scale=1.0):
  """Mean token NLL of one micro-batch times `scale`, and the model's loop telemetry."""
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  steps = grad_depth(cfg) if cfg.kind == "parcae" else 0
  y, aux = model.hidden(batch["inputs"], n_B, k_B, key=keys[0], grad_steps=steps,
                        quant_key=None if model.quant == "bf16" else keys[1])
  loss = mean_token_nll(y, model.embed.embedding[...], batch["targets"], model.cd, train_cfg.loss_chunk,
                        cfg.lse_impl, scale)
  return loss, aux


def _tree_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def stage_norms(params, updates):
  """L2 norm of parameters and of the update per top-level module (embed, prelude, core, coda, ...)."""
  out = {}
  for name in params.keys():
    out[f"param_norm/{name}"] = _tree_norm(params[name])
    out[f"update_norm/{name}"] = _tree_norm(updates[name])
  return out


def make_train_step(graphdef, optimizer, train_cfg):
  """train_step(state, batch, run) -> (state, metrics). batch arrays are [accum, micro, seq]; run is the run
  length (``schedules.run_length``) as int32 scalars: an argument, not a constant, so runs that differ only
  in length compile to the same program."""

  def train_step(state, batch, run):
    accum, micro = batch["inputs"].shape[:2]
    skey = jax.random.fold_in(state["key"], state["step"])
    model = nnx.merge(graphdef, state["params"])
    n, k = sample_step_depths(model, jax.random.fold_in(skey, 0), accum * micro, accum,
                              train_cfg.depth_grouping)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    # The mean over micro-batches scales each one's loss (so its gradients come out scaled) and the gradients
    # are summed as they are: the embedding tables' gradients, scatter-adds into zeros, then become scatter-adds
    # straight into the accumulator (XLA rewrites acc + scatter(0, ...), not acc + scatter(0, ...) / accum),
    # with no [V, D] zero fill and add per table and micro-batch.
    def accumulate(carry, xs):
      grads_acc, loss_acc = carry
      mb, n_B, k_B, i = xs
      keys = (jax.random.fold_in(jax.random.fold_in(skey, 1), i), jax.random.fold_in(jax.random.fold_in(skey, 2), i))
      params = pmesh.constrain_like_params(state["params"], gathered=True)  # FSDP: weights gathered at use
      (loss, aux), grads = grad_fn(params, graphdef, mb, n_B, k_B, keys, train_cfg, 1.0 / accum)
      grads = pmesh.constrain_like_params(grads, gathered=False)  # and gradients reduce-scattered
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, loss_acc + loss), (aux, aux.get("n_exec", jnp.max(n_B).astype(jnp.float32)))

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
    (grads, loss), (aux, n_exec) = jax.lax.scan(accumulate, (zeros, jnp.float32(0.0)),
                                                (batch, n, k, jnp.arange(accum)))
    updates, opt = optimizer.update(grads, state["opt"], state["params"], run=run, loss=loss)
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    metrics = {"loss": loss, **{k_: v.mean() for k_, v in aux.items()}}
    metrics["n_exec_mean"] = n_exec.astype(jnp.float32).mean()
    metrics.update(stage_norms(state["params"], updates))
    metrics.update({f"opt/{k_}": v for k_, v in opt.metrics.items()})
    return {"params": params, "opt": opt, "step": state["step"] + 1, "key": state["key"]}, metrics

  return train_step


EVAL_TELEMETRY = ("state_norm", "rel_residual")  # per loop count: is the loop state settling at this depth?


def make_eval_step(graphdef, chunk: int = 0):
  """eval_step(params, batch, loops_K) -> (sum of token NLL [K], token count, telemetry {name: [K]}) at each
  loop count of the ascending int32 loops_K, in one pass over the loop (`hidden_at`); the values of loops_K
  are traced, so one compile serves every list of K counts. telemetry (looped models; {} otherwise): batch
  means of the final loop state's norm ||h_T|| and of the last iteration's relative update per token."""

  def eval_step(params, batch, loops_K):
    model = nnx.merge(graphdef, params)

    def readout(y, aux):
      nll = token_nll(y, model.embed.embedding[...], batch["targets"], model.cd, chunk, model.cfg.lse_impl)
      return nll.sum(), {k: aux[k] for k in EVAL_TELEMETRY if k in aux}

    sums, telemetry = model.hidden_at(batch["inputs"], loops_K, readout, key=jax.random.key(0))
    return sums, jnp.float32(batch["targets"].size), telemetry

  return eval_step
