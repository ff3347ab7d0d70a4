"""Parameter counts and FLOPs per token, in two conventions.

reference: the PyTorch reference's cost accounting (spec 5.7), used for its FLOP budgets and scaling laws:
  N_total = all parameters - embedding (so the tied head is not counted; value-embedding tables are counted
  as if they were matmuls); attention per layer = 4 * d * block_size (no causal halving);
  Parcae = 6 N_noncore + 3 (P+Co) attn + 2 N_core mu + 4 N_core s + attn R mu + 2 attn R s
  GPT    = 6 N_total + 3 L attn.
executed: the work a training step really does per token: 2 FLOPs per multiply-add of every matmul that runs
  (lookups are gathers and cost nothing; the tied head is a matmul), x3 for layers that get gradients and x1 for
  the n no-grad loop iterations, causal attention counted at half the full S x S map (stated in the output).
"""
from __future__ import annotations

import math

import jax
from flax import nnx

from parcae.model.config import ve_layout
from parcae.paths import path_str


def _blocks(cfg):
  return {"prelude": cfg.prelude_layers, "core": cfg.core_layers, "coda": cfg.coda_layers} \
      if cfg.kind == "parcae" else {"blocks": cfg.n_layers}


def block_matmul_params(cfg, with_ve: bool) -> int:
  """Matmul parameters of one block: q, k, v, o (4 d^2), fc and proj (2 * ffn_mult * d^2), the VE gate."""
  d = cfg.d_model
  return 4 * d * d + 2 * cfg.ffn_mult * d * d + (32 * cfg.n_heads if with_ve else 0)


def param_counts(cfg) -> dict:
  """Exact parameter counts (from the abstract model, no memory allocated): params_total, embedding,
  value_embeds, and stage_<name> for every top-level module without its value-embedding tables."""
  from parcae.model import build
  model = nnx.eval_shape(lambda: build(cfg, jax.random.key(0)))
  counts = {"params_total": 0, "embedding": 0, "value_embeds": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
    names = path_str(path).split("/")
    n = math.prod(leaf.shape)
    counts["params_total"] += n
    if names[:2] == ["embed", "embedding"]:
      counts["embedding"] += n
    elif "ve_table" in names:  # stage counts exclude value-embedding tables, as the reference's do
      counts["value_embeds"] += n
    else:
      counts[f"stage_{names[0]}"] = counts.get(f"stage_{names[0]}", 0) + n
  return counts


def expected_depths(cfg, tol: float = 1e-12) -> tuple[float, float]:
  """E[n], E[k] of the configured depth sampler (exact sums over the Poisson pmf)."""
  mu, s = cfg.mean_recurrence, cfg.mean_backprop_depth
  t = max(mu - s, 0)
  if cfg.sampling_scheme == "fixed":
    return float(t), float(s)
  lam, e_total, e_k, j, p = float(t + s), 0.0, 0.0, 0, math.exp(-float(t + s))
  while j < 10 * lam + 50:
    total = max(1, j)
    e_total += p * total
    e_k += p * min(total, s if cfg.sampling_scheme == "poisson-truncated-full" else total)
    j += 1
    p *= lam / j
  if cfg.sampling_scheme == "poisson-full":
    return 0.0, e_total
  return e_total - e_k, e_k


def reference_flops_per_token(cfg, block_size: int = 2048) -> float:
  counts = param_counts(cfg)
  n_total = counts["params_total"] - counts["embedding"]
  attn = 4 * cfg.d_model * block_size
  if cfg.kind == "gpt":
    return float(6 * n_total + 3 * cfg.n_layers * attn)
  n_core = counts["stage_core"]
  mu, s, r = cfg.mean_recurrence, cfg.mean_backprop_depth, cfg.core_layers
  pc = cfg.prelude_layers + cfg.coda_layers
  return float(6 * (n_total - n_core) + 3 * pc * attn + 2 * n_core * mu + 4 * n_core * s
               + attn * r * mu + 2 * attn * r * s)


def executed_flops_per_token(cfg, seq_len: int, n: float | None = None, k: float | None = None,
                             train: bool = True) -> float:
  """FLOPs per token of a train step (train=True) or a forward (train=False) with n no-grad and k grad
  iterations (defaults: the sampler's expectations for training, n = mean_recurrence, k = 0 for a forward)."""
  d, v = cfg.d_model, cfg.vocab_size
  attn = 2 * d * seq_len  # causal: QK^T and AV over on average S/2 keys, 2 FLOPs per MAC
  mult = 3 if train else 1
  ve = ve_layout(cfg)
  stage = {name: sum(block_matmul_params(cfg, f) for f in flags) for name, flags in ve.items()}
  layer_attn = {name: len(flags) * attn for name, flags in ve.items()}
  head = 2 * d * v
  if cfg.kind == "gpt":
    return float(mult * (2 * stage["blocks"] + layer_attn["blocks"] + head))
  if n is None or k is None:
    n, k = expected_depths(cfg) if train else (cfg.mean_recurrence, 0)
  inj = 0 if cfg.injection == "add" else 2 * d * d  # B e (diagonal) or the e-part of W (linear)
  inj_iter = 2 * d * d if cfg.injection == "linear" else 0  # the h-part of a linear injection, per iteration
  outer = 2 * (stage["prelude"] + stage["coda"]) + layer_attn["prelude"] + layer_attn["coda"] + head
  outer += 2 * d * d + inj  # C and the once-per-forward injection of e
  core = 2 * stage["core"] + layer_attn["core"] + inj_iter
  return float(mult * (outer + k * core) + n * core)
