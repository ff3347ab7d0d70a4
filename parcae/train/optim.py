"""Optimizers: AdamW and the reference's MuonAdamW, with global-norm clipping and non-finite-step skipping.

One optax transformation does everything (clip -> per-parameter AdamW or Muon step -> skip if non-finite);
apply its updates with ``optax.apply_updates``. Routing (which parameter gets which rule) is the ordered
regex table ROUTE_RULES over "/"-joined parameter paths, plus "every parameter with ndim < 2 is AdamW".

Kernel layout: our kernels are [in, out], the transpose of the reference's torch weights [out, in]. Muon's
shape rules (tall/wide, per-row/per-column statistics, the sqrt(rows/cols) lr factor) are stated for torch's
(rows = out, cols = in), so each Muon step swaps the last two axes, works on the torch-layout matrix and
swaps back; the update equals the reference's on the transposed weight. Leading axes (stacked layers) are
batch axes: every [..., in, out] slice is its own matrix.

Muon step on one matrix G (torch layout R x C), our reading of the reference's order (spec §5.3):
  1. momentum buffer m <- mom*m + (1-mom)*G;  Nesterov blend G' = (1-mom)*G + mom*m.
  2. X = G' / (||G'||_F * 1.02 + 1e-6) in ``muon_ortho_dtype`` (bf16 as the reference), then 5 Polar
     Express iterations (tall R > C: A = X^T X, X <- aX + X(bA + cA^2); else A = X X^T, X <- aX + (bA + cA^2)X).
     Matmul inputs/outputs are in that dtype, the coefficient arithmetic in float32 (torch's bf16 "opmath").
     X is cast back to float32 afterwards (the reference keeps it in bf16 through step 4; a sub-bf16-ulp
     difference). bf16 vs float64: ~2% relative on 64x256 matrices; the float32 path: ~4e-6.
  3. NorMuon: the statistics are taken from the *orthogonalized* X (not from the raw gradient):
     v_mean = mean(X^2) over columns if R >= C (one value per row) else over rows (one per column);
     v <- b2*v + (1-b2)*v_mean (zero-init, no bias correction); U = X * rsqrt(max(v, 1e-10)), rescaled so
     that ||U||_F = ||X||_F.
  4. lr_eff = muon_lr * schedule(step) * sqrt(max(1, R/C)).
  5. Cautious decay with the same U: p <- p - lr_eff*U - lr_eff*wd*p*[U*p >= 0] (U enters both terms).
AdamW (decoupled decay, bias-corrected): p <- p - lr*wd*p - lr*m_hat/(sqrt(v_hat)+eps). Weight decay is
applied to >= 2-D AdamW parameters only (the reference's no_weight_decay_for_bias_and_norm_params=True).

Step bookkeeping: ``step`` counts every update call and drives all schedules (so a skipped step does not
shift the schedule); ``count`` counts applied updates and drives AdamW bias correction (torch increments
its per-parameter step only when a step is taken). A skipped step (non-finite grad norm, or non-finite
``loss`` passed as ``update(..., loss=loss)``) returns zero updates and leaves mu, nu and count unchanged.
With skip_nonfinite=False the step is applied anyway; the caller must watch ``grad_norm`` and stop.
"""
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from parcae.train import schedules
from parcae.paths import path_str  # noqa: F401  (re-exported)

# (a, b, c) per Polar Express iteration, as in the reference.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
OPTIMIZERS = ("muon_adamw", "adamw")
ORTHO_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


# ----------------------------------------------------------------------------------------------- config

def default_optim_config() -> ml_collections.ConfigDict:
  """The reference's MuonAdamW recipe (launch YAMLs, spec §5.1, §5.3-5.5)."""
  c = ml_collections.ConfigDict()
  c.name = "muon_adamw"            # "muon_adamw" (Muon for hidden matrices, AdamW for the rest) | "adamw"
  c.lr = 8e-3                      # AdamW peak lr (reference: 8e-3 small/medium, 6e-3 large/xlarge)
  c.muon_lr = 8e-3                 # Muon peak lr (before the sqrt(max(1, rows/cols)) shape factor)
  c.b1 = 0.8                       # AdamW beta1
  c.b2 = 0.95                      # AdamW beta2
  c.eps = 1e-10                    # AdamW epsilon (added to sqrt(v_hat))
  c.weight_decay = 0.0             # AdamW decoupled weight decay, constant; >= 2-D AdamW params only
  c.muon_momentum = 0.95           # Muon momentum after warm-up
  c.muon_momentum_start = 0.85     # Muon momentum at step 0
  c.muon_momentum_warmup_steps = 300  # linear momentum warm-up length in optimizer steps (0 = none)
  c.muon_wd = 0.2                  # Muon cautious weight decay at step 0; decays linearly to 0 at total_steps
  c.muon_ns_steps = 5              # Polar Express iterations (1..5)
  c.muon_beta2 = 0.95              # NorMuon second-moment EMA decay
  c.muon_ortho_dtype = "bfloat16"  # dtype of the Polar Express iterations: "bfloat16" (reference) | "float32"
  c.grad_clip = 1.0                # global-norm clip threshold; 0 disables clipping
  c.skip_nonfinite = True          # skip (no-op) a step whose grad norm or loss is non-finite
  c.schedule = "trapezoid"         # lr schedule: one of schedules.SCHEDULES
  c.warmup_fraction = 0.0          # warm-up length as a fraction of total_steps
  c.cooldown_fraction = 0.5        # trapezoid cool-down length as a fraction of total_steps
  c.min_lr = 0.0                   # floor of the AdamW lr (absolute); Muon follows the same multiplier
  return c


def _require(ok, field, value, allowed):
  if not ok:
    raise ValueError(f"optim.{field}={value!r} is invalid; set optim.{field} to {allowed}.")


def validate_optim_config(cfg) -> None:
  """Raises ValueError naming the bad field and the allowed values."""
  _require(cfg.name in OPTIMIZERS, "name", cfg.name, f"one of {list(OPTIMIZERS)}")
  _require(cfg.schedule in schedules.SCHEDULES, "schedule", cfg.schedule,
           f"one of {sorted(schedules.SCHEDULES)}")
  _require(cfg.muon_ortho_dtype in ORTHO_DTYPES, "muon_ortho_dtype", cfg.muon_ortho_dtype,
           f"one of {sorted(ORTHO_DTYPES)}")
  for f in ("lr", "muon_lr", "eps", "weight_decay", "muon_wd", "grad_clip", "min_lr"):
    _require(cfg[f] >= 0, f, cfg[f], "a number >= 0")
  for f in ("b1", "b2", "muon_momentum", "muon_momentum_start", "muon_beta2"):
    _require(0 <= cfg[f] < 1, f, cfg[f], "a number in [0, 1)")
  for f in ("warmup_fraction", "cooldown_fraction"):
    _require(0 <= cfg[f] <= 1, f, cfg[f], "a fraction in [0, 1]")
  _require(cfg.warmup_fraction + cfg.cooldown_fraction <= 1, "cooldown_fraction", cfg.cooldown_fraction,
           f"at most 1 - warmup_fraction = {1 - cfg.warmup_fraction}")
  _require(cfg.min_lr <= cfg.lr, "min_lr", cfg.min_lr, f"at most optim.lr = {cfg.lr}")
  _require(isinstance(cfg.muon_ns_steps, int) and 1 <= cfg.muon_ns_steps <= len(POLAR_EXPRESS_COEFFS),
           "muon_ns_steps", cfg.muon_ns_steps, f"an int in [1, {len(POLAR_EXPRESS_COEFFS)}]")
  _require(isinstance(cfg.muon_momentum_warmup_steps, int) and cfg.muon_momentum_warmup_steps >= 0,
           "muon_momentum_warmup_steps", cfg.muon_momentum_warmup_steps, "an int >= 0")
  _require(isinstance(cfg.skip_nonfinite, bool), "skip_nonfinite", cfg.skip_nonfinite, "True or False")


# ---------------------------------------------------------------------------------------------- routing

# Ordered, first match wins (re.search on the "/"-joined path); ndim < 2 is AdamW before this table.
ROUTE_RULES = [
    (r"(^|/)embed/embedding$", "adamw"),        # token embedding (tied LM head)
    (r"(^|/)ve_table/embedding$", "adamw"),     # value-embedding tables
    (r"embedding$|lm_head", "adamw"),           # any other embedding / untied head
    (r"norm", "adamw"),                         # norm scales
    (r"(^|/)injection/", "adamw"),              # A_log, dt_bias, B, linear-injection W
    (r"(^|/)C/kernel$", "adamw"),               # the C projection
    (r"(^|/)attn/(q|k|v|o)/kernel$", "muon"),
    (r"(^|/)attn/ve_gate/kernel$", "muon"),
    (r"(^|/)mlp/(fc|proj)/kernel$", "muon"),
    (r".", "muon"),                             # every other >= 2-D weight (reference: Muon by default)
]


def route(path: str, x) -> str:
  """'adamw' or 'muon' for one parameter."""
  if jnp.ndim(x) < 2:
    return "adamw"
  for pattern, group in ROUTE_RULES:
    if re.search(pattern, path):
      return group
  raise AssertionError("unreachable: ROUTE_RULES ends with a catch-all")


def param_routes(params, name: str = "muon_adamw") -> list[tuple[str, str]]:
  """(path, group) for every leaf, in tree-flatten order; all 'adamw' when name == 'adamw'."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  if name == "adamw":
    return [(path_str(p), "adamw") for p, _ in flat]
  return [(path_str(p), route(path_str(p), x)) for p, x in flat]


# ------------------------------------------------------------------------------------- hyper-parameters

def hyperparams_at(cfg, step, run: dict) -> dict:
  """Per-step rates (jit-friendly in step and run): AdamW lr and wd, Muon lr, momentum and wd.
  run: the run length, ``schedules.run_length(cfg, total_steps)`` (ints or int32 scalars)."""
  step_f = jnp.asarray(step, jnp.float32)
  mult = schedules.multiplier(cfg, step_f, run)
  total = run["total_steps"]
  w = cfg.muon_momentum_warmup_steps
  ramp = jnp.minimum(1.0, step_f / w) if w > 0 else jnp.ones_like(step_f)
  return dict(
      lr=cfg.lr * mult,
      weight_decay=jnp.asarray(cfg.weight_decay, jnp.float32),
      muon_lr=cfg.muon_lr * mult,
      muon_momentum=cfg.muon_momentum_start + (cfg.muon_momentum - cfg.muon_momentum_start) * ramp,
      muon_wd=cfg.muon_wd * jnp.maximum(0.0, (total - step_f) / total),
  )


def clip_by_global_norm(grads, max_norm: float):
  """(clipped grads, pre-clip global norm); same rule as optax.clip_by_global_norm; max_norm 0 = off."""
  norm = optax.global_norm(grads)
  if max_norm <= 0:
    return grads, norm
  clip = lambda g: jnp.where(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm)
  return jax.tree.map(clip, grads), norm


# ------------------------------------------------------------------------------------- per-leaf steps

def adamw_leaf(g, p, m, v, *, count, lr, b1, b2, eps, wd):
  """One AdamW step for one leaf; returns (update, m, v). `count` is the 1-based applied-step index."""
  m = b1 * m + (1.0 - b1) * g
  v = b2 * v + (1.0 - b2) * jnp.square(g)
  m_hat = m / (1.0 - b1 ** count)
  v_hat = v / (1.0 - b2 ** count)
  u = -lr * wd * p - lr * m_hat / (jnp.sqrt(v_hat) + eps)
  return u, m, v


def polar_express(g_RxC, ns_steps: int, dtype):
  """Approximate orthogonalization (U V^T of the SVD) of the last two axes, iterated in `dtype`."""
  x = g_RxC.astype(dtype).astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
  x = (x / (norm * 1.02 + 1e-6)).astype(dtype)
  mm = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  xt = lambda a: jnp.swapaxes(a, -1, -2)
  tall = g_RxC.shape[-2] > g_RxC.shape[-1]

  # Matmuls take and return `dtype`; the scalar-coefficient arithmetic runs in float32 and is rounded to
  # `dtype` once (torch does bf16 * python-float in float32 "opmath"; rounding a = 8.1566 to bf16 first
  # would bias every iteration by 0.4%).
  f32 = lambda t: t.astype(jnp.float32)

  def iteration(x, abc):
    a, b, c = abc[0], abc[1], abc[2]
    if tall:
      gram = mm(xt(x), x)
      poly = (b * f32(gram) + c * f32(mm(gram, gram))).astype(dtype)
      return (a * f32(x) + f32(mm(x, poly))).astype(dtype), None
    gram = mm(x, xt(x))
    poly = (b * f32(gram) + c * f32(mm(gram, gram))).astype(dtype)
    return (a * f32(x) + f32(mm(poly, x))).astype(dtype), None

  # Straight-line code (a Python loop, not a lax.scan): with the same-shape kernels stacked (`_stacked`) there are
  # few bodies to copy, and on an H100 it runs 15% faster than a scan (bench/RESULTS.md, session 25).
  coeffs = jnp.asarray(POLAR_EXPRESS_COEFFS[:ns_steps], jnp.float32)
  for i in range(ns_steps):
    x, _ = iteration(x, coeffs[i])
  return x


def muon_leaf(g, p, m, v, *, lr, momentum, beta2, wd, ns_steps, ortho_dtype):
  """One Muon step for one [..., in, out] kernel; returns (update, m, v) in our layout (see module doc).

  m is param-shaped; v is the NorMuon second moment in our layout with keepdims: [..., 1, out] when the
  torch-layout matrix has rows >= cols (per-row stats), else [..., in, 1].
  """
  t = lambda a: jnp.swapaxes(a, -1, -2)  # our [in, out] <-> torch [out, in] = [R, C]
  m = momentum * m + (1.0 - momentum) * g
  x_RxC = polar_express(t((1.0 - momentum) * g + momentum * m), ns_steps, ortho_dtype).astype(jnp.float32)
  rows, cols = x_RxC.shape[-2:]
  red = -1 if rows >= cols else -2
  v_mean = jnp.mean(jnp.square(x_RxC), axis=red, keepdims=True)
  v_RxC = beta2 * t(v) + (1.0 - beta2) * v_mean
  scale = jax.lax.rsqrt(jnp.maximum(v_RxC, 1e-10))
  norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * x_RxC.shape[red])
  new_norm = jnp.sqrt(jnp.sum(v_mean * x_RxC.shape[red] * jnp.square(scale), axis=(-2, -1), keepdims=True))
  u_RxC = x_RxC * (scale * (norm / jnp.maximum(new_norm, 1e-10)))
  lr_eff = lr * max(1.0, rows / cols) ** 0.5
  p_RxC = t(p).astype(jnp.float32)
  decay = jnp.where(u_RxC * p_RxC >= 0, p_RxC, 0.0)
  return t(-lr_eff * u_RxC - lr_eff * wd * decay), m, t(v_RxC)


def _muon_nu_shape(shape):
  rows, cols = shape[-1], shape[-2]  # torch layout of an [..., in, out] kernel
  return shape[:-2] + ((1, shape[-1]) if rows >= cols else (shape[-2], 1))


def _same_shape_groups(p_leaves, routes):
  """Indices of the Muon leaves grouped by (shape, dtype), in first-appearance order."""
  groups = {}
  for i, (p, r) in enumerate(zip(p_leaves, routes)):
    if r == "muon":
      groups.setdefault((p.shape, p.dtype), []).append(i)
  return list(groups.values())


def _stacked(step, group, trees, outs):
  """outs[i] = step(leaf i of each of trees) for i in group, as one call on the leaves stacked on a new leading
  axis (a batch axis of Muon's matrices): one Polar Express GEMM per iteration for every [768, 768] kernel of
  a model instead of one each, which a single small matrix leaves mostly idle on a GPU."""
  if len(group) == 1:
    outs[group[0]] = step(*(t[group[0]] for t in trees))
    return
  res = step(*(jnp.stack([t[i] for i in group]) for t in trees))
  for j, i in enumerate(group):
    outs[i] = tuple(r[j] for r in res)


# ------------------------------------------------------------------------------------------ transform

class OptState(NamedTuple):
  step: jax.Array           # int32: update calls so far (drives every schedule)
  count: jax.Array          # int32: applied (non-skipped) updates (AdamW bias correction)
  mu: Any                   # param-shaped tree: AdamW first moment / Muon momentum buffer
  nu: Any                   # tree: AdamW second moment (param-shaped) / Muon NorMuon v (reduced shape)
  skipped_total: jax.Array  # int32: skipped updates so far
  metrics: dict             # scalars of the last call: lr, muon_lr, muon_momentum, muon_wd, grad_norm, skipped


METRIC_KEYS = ("lr", "muon_lr", "muon_momentum", "muon_wd", "grad_norm", "skipped")


def make_optimizer(optim_cfg, params, total_steps: int | None = None) -> optax.GradientTransformationExtraArgs:
  """MuonAdamW / AdamW with clipping and non-finite skipping: update(grads, state, params, *, run=None,
  loss=None). run: the run length (``schedules.run_length``), ints or int32 scalars; the trainer passes it as
  an argument of the jitted step so the compiled program does not depend on it. Without it, update uses
  the run length of ``total_steps``."""
  cfg = optim_cfg
  validate_optim_config(cfg)
  default_run = None if total_steps is None else schedules.run_length(cfg, total_steps)
  routes = [grp for _, grp in param_routes(params, cfg.name)]
  ortho_dtype = ORTHO_DTYPES[cfg.muon_ortho_dtype]

  def check(leaves, what):
    if len(leaves) != len(routes):
      raise ValueError(f"{what} has {len(leaves)} leaves but the optimizer was built for {len(routes)}; "
                       "pass the same parameter tree to make_optimizer and update.")

  def init(params):
    leaves, treedef = jax.tree.flatten(params)
    check(leaves, "params")
    mu = [jnp.zeros(p.shape, jnp.float32) for p in leaves]
    nu = [jnp.zeros(_muon_nu_shape(p.shape) if r == "muon" else p.shape, jnp.float32)
          for p, r in zip(leaves, routes)]
    zero_i, zero_f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    return OptState(step=zero_i, count=zero_i, mu=treedef.unflatten(mu), nu=treedef.unflatten(nu),
                    skipped_total=zero_i, metrics={k: zero_f for k in METRIC_KEYS})

  def update(grads, state, params=None, *, run=None, loss=None, **unused_extra_args):
    if params is None:
      raise ValueError("MuonAdamW needs the parameters: call update(grads, state, params).")
    run = default_run if run is None else run
    if run is None:
      raise ValueError("the optimizer needs the run length: pass update(..., run=schedules.run_length(cfg, "
                       "steps)) or make_optimizer(cfg, params, total_steps).")
    g_leaves, g_treedef = jax.tree.flatten(grads)
    p_leaves, m_leaves, v_leaves = (jax.tree.leaves(t) for t in (params, state.mu, state.nu))
    check(g_leaves, "grads")
    check(p_leaves, "params")
    g_leaves = [g.astype(jnp.float32) for g in g_leaves]
    g_leaves, grad_norm = clip_by_global_norm(g_leaves, cfg.grad_clip)
    hp = hyperparams_at(cfg, state.step, run)
    count = (state.count + 1).astype(jnp.float32)
    outs = [None] * len(g_leaves)
    for i, (g, p, m, v, r) in enumerate(zip(g_leaves, p_leaves, m_leaves, v_leaves, routes)):
      if r != "muon":
        wd = hp["weight_decay"] if p.ndim >= 2 else 0.0
        outs[i] = adamw_leaf(g, p.astype(jnp.float32), m, v, count=count, lr=hp["lr"], b1=cfg.b1,
                             b2=cfg.b2, eps=cfg.eps, wd=wd)
    muon = lambda g, p, m, v: muon_leaf(g, p, m, v, lr=hp["muon_lr"], momentum=hp["muon_momentum"],
                                        beta2=cfg.muon_beta2, wd=hp["muon_wd"], ns_steps=cfg.muon_ns_steps,
                                        ortho_dtype=ortho_dtype)
    for group in _same_shape_groups(p_leaves, routes):
      _stacked(muon, group, (g_leaves, p_leaves, m_leaves, v_leaves), outs)
    finite = jnp.isfinite(grad_norm)
    if loss is not None:
      finite = finite & jnp.all(jnp.isfinite(loss))
    if not cfg.skip_nonfinite:
      finite = jnp.ones((), bool)
    keep = lambda new, old: jnp.where(finite, new, old)
    updates = [jnp.where(finite, u, 0.0).astype(p.dtype) for (u, _, _), p in zip(outs, p_leaves)]
    mu = [keep(m_new, m) for (_, m_new, _), m in zip(outs, m_leaves)]
    nu = [keep(v_new, v) for (_, _, v_new), v in zip(outs, v_leaves)]
    skipped = 1 - finite.astype(jnp.int32)
    metrics = dict(lr=hp["lr"], muon_lr=hp["muon_lr"], muon_momentum=hp["muon_momentum"],
                   muon_wd=hp["muon_wd"], grad_norm=grad_norm, skipped=skipped.astype(jnp.float32))
    if cfg.name == "adamw":
      metrics.update(muon_lr=0.0, muon_momentum=0.0, muon_wd=0.0)
    m_treedef, v_treedef = jax.tree.structure(state.mu), jax.tree.structure(state.nu)
    new_state = OptState(
        step=state.step + 1, count=state.count + finite.astype(jnp.int32),
        mu=m_treedef.unflatten(mu), nu=v_treedef.unflatten(nu),
        skipped_total=state.skipped_total + skipped,
        metrics={k: jnp.asarray(metrics[k], jnp.float32) for k in METRIC_KEYS})
    return g_treedef.unflatten(updates), new_state

  return optax.GradientTransformationExtraArgs(init, update)


def optimizer_metrics(opt_state: OptState) -> dict:
  """Scalars of the last update: lr, muon_lr, muon_momentum, muon_wd, grad_norm (pre-clip), skipped (0/1),
  plus skipped_total (count so far) and step (update calls so far)."""
  out = dict(opt_state.metrics)
  out["skipped_total"] = opt_state.skipped_total
  out["step"] = opt_state.step
  return out
