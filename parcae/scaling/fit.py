"""Scaling-law fits for looped-model sweeps at a fixed parameter count.

Laws (µ = mean training recurrence, D = training tokens, T = test-time loop count):
  training  L(µ, D)     = E + X·µ^(−x) + Y·D^(−y)
  testtime  L(T)        = L∞ + Z·exp(−z·T)                       (one fit per run)
  unified   L(T | µ, D) = E + X·µ^(−x) + Y·D^(−y) + Z·exp(−z·T/µ)
  isoflop   per FLOP budget C: µ*(C), D*(C); exponents µ* ∝ C^a, D* ∝ C^b
  precision L = E + X·(µ·effN[r])^(−x) + Y·(D·effD[r])^(−y) across quantization recipes r (see fit_precision)

Effective size N(µ). The paper writes X·N(µ)^(−x) with N(µ) "an effective size that grows with looping". We
use N(µ) = µ (effective size in units of the µ = 1 model). Reason: every run of a sweep has the same unique
parameter count, so any N(µ) = N_base·µ^φ gives X·N_base^(−x)·µ^(−xφ): N_base folds into X and φ into x,
and only (X, x) can be identified from the data. The richer N(µ) = N_noncore + N_core·µ adds one ratio
N_core/N_noncore that a single-size sweep pins down only weakly (it trades off against x), so we leave it out.
X is therefore "the loss the looping term adds at µ = 1" and x the looping exponent.

Fitting. Residual r = log L_pred − log L_obs, Huber loss with δ = 1e-3 (on r/δ, averaged), parameters in log
space where positive (E, X, Y, L∞, Z, z), L-BFGS-B with bounds and analytic gradients. Starts: many random
points in the bounds, the best few (by objective) refined. Y is fitted against D/D0 (D0 = geometric mean of D)
for conditioning and reported for raw D.

Uncertainty. Bootstrap over runs (fixed seed; resampled runs keep all their points) for training/unified; over
loop points within a run for testtime; over runs within each budget for isoflop. Percentile intervals. A
warning (`warnings.warn` and the result's `warnings` list) is raised when a parameter sits at a bound, when the
Gauss-Newton matrix is near-singular, or when a bootstrap interval spans more than two orders of magnitude
(positive parameters) or is wider than the estimate itself (exponents).

Held-out error. training/unified: leave-one-run-out mean absolute percentage error (MAPE, %), each refit
started from the full-data fit. testtime: with `fit_loops`, the fit uses only those loop counts and reports
MAPE on the others; otherwise leave-one-point-out (needs ≥ 5 points).

isoFLOP method. Per budget, a parabola of L in ln µ over the runs' final losses at their eval loop count;
µ* at its vertex, D* from a quadratic of ln D in ln µ within that budget (D is fixed by µ at fixed C), L* at
the vertex. a and b are least-squares slopes of ln µ*, ln D* against ln C. Budgets whose parabola opens down
are left out with a warning; a vertex outside the sampled µ range is kept with a warning (extrapolated).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import sys
import warnings
from typing import Callable

import numpy as np
from scipy import optimize

from parcae.scaling import results as results_lib
from parcae.scaling.results import ResultsError, Table

HUBER_DELTA = 1e-3  # Huber threshold on log-loss residuals
LN = np.log


# ----------------------------------------------------------------------------------------------- laws
def _training_fn(th, v):
  E, X, x, Y, y = np.exp(th[0]), np.exp(th[1]), th[2], np.exp(th[3]), th[4]
  tx, ty = X * v["mu"] ** -x, Y * v["d"] ** -y
  jac = np.stack([np.full_like(tx, E), tx, -tx * LN(v["mu"]), ty, -ty * LN(v["d"])], axis=1)
  return E + tx + ty, jac


def _testtime_fn(th, v):
  Linf, Z, z = np.exp(th)
  e = Z * np.exp(-z * v["t"])
  return Linf + e, np.stack([np.full_like(e, Linf), e, -e * z * v["t"]], axis=1)


def _unified_fn(th, v):
  base, jb = _training_fn(th[:5], v)
  Z, z = np.exp(th[5]), np.exp(th[6])
  s = v["t"] / v["mu"]
  e = Z * np.exp(-z * s)
  return base + e, np.concatenate([jb, np.stack([e, -e * z * s], axis=1)], axis=1)


@dataclasses.dataclass(frozen=True)
class Law:
  fn: Callable          # (theta, inputs) -> (pred_N, jac_NxP)
  names: tuple          # parameter names, in theta order
  log: tuple            # True where theta holds ln(parameter)
  bounds: tuple         # (lo, hi) per theta entry
  floor: int            # index of the additive floor (E or L∞), started below min(loss)


_LOGB = (LN(1e-6), LN(1e3))
LAWS = {
    "training": Law(_training_fn, ("E", "X", "x", "Y", "y"), (True, True, False, True, False),
                    ((LN(1e-2), LN(20.0)), _LOGB, (1e-3, 4.0), _LOGB, (1e-3, 4.0)), 0),
    "testtime": Law(_testtime_fn, ("L_inf", "Z", "z"), (True, True, True),
                    ((LN(1e-2), LN(20.0)), _LOGB, (LN(1e-3), LN(1e2))), 0),
    "unified": Law(_unified_fn, ("E", "X", "x", "Y", "y", "Z", "z"),
                   (True, True, False, True, False, True, True),
                   ((LN(1e-2), LN(20.0)), _LOGB, (1e-3, 4.0), _LOGB, (1e-3, 4.0), _LOGB,
                    (LN(1e-3), LN(1e2))), 0),
}


# -------------------------------------------------------------------------------------- robust engine
@contextlib.contextmanager
def _one_blas_thread():
  """Run tiny L-BFGS-B problems on one OpenBLAS thread.

  scipy's L-BFGS-B calls BLAS on 3-7 element vectors; with a multi-threaded OpenBLAS on a busy machine each
  call can cost milliseconds of thread wake-up (measured 50x slower fits on 2 loaded cores). The thread
  count is process-wide and restored on exit. Linux only; a no-op where no OpenBLAS is loaded.
  """
  libs = []
  try:
    with open("/proc/self/maps") as f:
      paths = {line.split()[-1] for line in f if "openblas" in line}
    for path in sorted(paths):
      lib = ctypes.CDLL(path)
      # scipy's bundled BLAS, numpy's 64-bit-index one, a system OpenBLAS
      for prefix, suffix in (("scipy_openblas", ""), ("scipy_openblas", "64_"), ("openblas", "")):
        get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
        set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
        if get is not None and set_ is not None:
          libs.append((set_, get()))
          set_(1)
          break
  except OSError:
    pass
  try:
    yield
  finally:
    for set_, n in libs:
      set_(n)


def _objective(th, law, v, logy, delta):
  pred, jac = law.fn(th, v)
  if not np.all(pred > 0):
    return 1e30, np.zeros_like(th)
  r = (LN(pred) - logy) / delta
  a = np.abs(r)
  loss = np.where(a <= 1.0, 0.5 * r * r, a - 0.5).mean()
  grad = (np.clip(r, -1.0, 1.0)[:, None] * jac / pred[:, None]).mean(axis=0) / delta
  return float(loss), grad


def _random_starts(law, y, n, rng):
  lo, hi = np.array(law.bounds).T
  th = rng.uniform(lo, hi, size=(n, len(lo)))
  th[:, law.floor] = LN(rng.uniform(0.3, 1.0, size=n) * y.min())
  return th


def _fit_theta(law, v, y, rng, n_starts=512, n_refine=6, extra=(), delta=HUBER_DELTA):
  """Best theta over: the `n_refine` best of `n_starts` random starts, plus `extra` starts."""
  logy = LN(y)
  cand = _random_starts(law, y, n_starts, rng)
  scores = np.array([_objective(t, law, v, logy, delta)[0] for t in cand])
  starts = list(extra) + list(cand[np.argsort(scores)[:n_refine]])
  best, best_f = None, np.inf
  for t0 in starts:
    res = optimize.minimize(_objective, t0, args=(law, v, logy, delta), jac=True, method="L-BFGS-B",
                            bounds=law.bounds, options={"maxiter": 3000, "ftol": 1e-12, "gtol": 1e-8})
    if res.fun < best_f:
      best, best_f = res.x, res.fun
  return best


def _named(law, th, d0=1.0):
  p = {n: float(np.exp(t)) if lg else float(t) for n, t, lg in zip(law.names, th, law.log)}
  if "Y" in p:
    p["Y"] *= d0 ** p["y"]  # fitted against D/D0; report for raw D
  return p


def _subset(v, idx):
  return {k: (a[idx] if isinstance(a, np.ndarray) else a) for k, a in v.items()}


def _bootstrap(law, v, y, groups, th_hat, n_boot, rng, min_groups, d0):
  """Refit on `n_boot` resamples of the groups; returns a list of named-parameter dicts."""
  uniq = np.unique(groups)
  members = [np.flatnonzero(groups == g) for g in uniq]
  out = []
  for _ in range(n_boot):
    pick = rng.integers(0, len(uniq), len(uniq))
    if len(np.unique(pick)) < min_groups:
      continue
    idx = np.concatenate([members[i] for i in pick])
    th = _fit_theta(law, _subset(v, idx), y[idx], rng, n_starts=32, n_refine=1, extra=[th_hat])
    out.append(_named(law, th, d0))
  return out


def _ci(samples, names, level):
  q = [50 * (1 - level), 50 * (1 + level)]
  if not samples:
    return {n: [float("nan"), float("nan")] for n in names}
  return {n: [float(x) for x in np.percentile([s[n] for s in samples], q)] for n in names}


def _diagnose(law, th, v, params, ci):
  """Human-readable reasons why the data may not pin the parameters down."""
  msgs = []
  for name, t, (lo, hi) in zip(law.names, th, law.bounds):
    if min(t - lo, hi - t) < 1e-3 * (hi - lo):
      msgs.append(f"parameter {name}={params[name]:.4g} is at a bound of its fit range; the data do not "
                  "constrain it (add points where this term matters)")
  pred, jac = law.fn(th, v)
  sv = np.linalg.svd(jac / pred[:, None], compute_uv=False)
  if sv[-1] < 1e-8 * sv[0]:
    msgs.append(f"fit is near-singular (Gauss-Newton singular-value ratio {sv[-1] / sv[0]:.1e}); "
                "some parameters are not identifiable from these points")
  for name, lg in zip(law.names, law.log):
    lo, hi = ci[name]
    if not np.isfinite(lo):
      continue
    if (lg and lo > 0 and hi / lo > 100.0) or (not lg and hi - lo > abs(params[name])):
      msgs.append(f"bootstrap interval for {name} is [{lo:.3g}, {hi:.3g}]: poorly determined")
  return msgs


def _warn(msgs, where):
  for m in msgs:
    warnings.warn(f"{where}: {m}", stacklevel=3)


def _errors(pred, y):
  return float(np.sqrt(np.mean((pred - y) ** 2))), float(100 * np.mean(np.abs(pred - y) / y))


def _inputs(rows: Table, d0: float) -> dict:
  return {"mu": rows["mu"], "d": rows["tokens"] / d0, "t": rows["loops"]}


def _fit_law(name, v, y, groups, *, n_boot, seed, level, n_starts, heldout, d0, min_groups):
  """Fit one law, bootstrap it over `groups`, and score it held-out (leave one group out)."""
  with _one_blas_thread():
    return _fit_law_body(name, v, y, groups, n_boot=n_boot, seed=seed, level=level, n_starts=n_starts,
                         heldout=heldout, d0=d0, min_groups=min_groups)


def _fit_law_body(name, v, y, groups, *, n_boot, seed, level, n_starts, heldout, d0, min_groups):
  law = LAWS[name] if isinstance(name, str) else name
  rng = np.random.default_rng(seed)
  th = _fit_theta(law, v, y, rng, n_starts=n_starts)
  params = _named(law, th, d0)
  rmse, mape = _errors(law.fn(th, v)[0], y)
  boots = _bootstrap(law, v, y, groups, th, n_boot, rng, min_groups, d0)
  ci = _ci(boots, law.names, level)
  out = dict(params, ci=ci, n_points=int(len(y)), rmse=rmse, mape=mape, n_boot=n_boot,
             n_boot_ok=len(boots), level=level, huber_delta=HUBER_DELTA, param_names=list(law.names))
  if heldout:
    errs = []
    for g in np.unique(groups):
      keep = groups != g
      if keep.sum() <= len(law.names) or len(np.unique(groups[keep])) < min_groups:
        continue
      t = _fit_theta(law, _subset(v, keep), y[keep], rng, n_starts=32, n_refine=1, extra=[th])
      errs.append(_errors(law.fn(t, _subset(v, ~keep))[0], y[~keep])[1])
    out["heldout_mape"] = float(np.mean(errs)) if errs else None
  out["warnings"] = _diagnose(law, th, v, params, ci)
  return out


def _distinct(rows: Table, col: str, need: int, what: str) -> None:
  n = len(np.unique(rows[col]))
  if n < need:
    raise ResultsError(f"{what}: {n} distinct {col} value(s), need at least {need}; widen the sweep")


def fit_training(table: Table, eval_loops="mu", n_boot=200, seed=0, level=0.95, n_starts=512,
                 heldout=True) -> dict:
  """Fit L(µ, D) = E + X·µ^(−x) + Y·D^(−y) to each run's final loss at its eval loop count."""
  rows = results_lib.eval_rows(table, eval_loops)
  results_lib.require_single(rows)
  results_lib.require_points(len(rows), 6, "training law (5 parameters; one point per run)")
  _distinct(rows, "mu", 3, "training law")
  d0 = float(np.exp(np.mean(LN(rows["tokens"]))))
  out = _fit_law("training", _inputs(rows, d0), rows["val_loss"], rows["run"], n_boot=n_boot, seed=seed,
                 level=level, n_starts=n_starts, heldout=heldout, d0=d0, min_groups=6)
  out.update(law="training", form="L = E + X*mu^-x + Y*D^-y", n_runs=len(rows), eval_loops=eval_loops)
  _warn(out["warnings"], "training fit")
  return out


def fit_unified(table: Table, n_boot=200, seed=0, level=0.95, n_starts=512, heldout=True) -> dict:
  """Fit L(T | µ, D) = E + X·µ^(−x) + Y·D^(−y) + Z·exp(−z·T/µ) to every run's final losses at all T."""
  rows = results_lib.final_rows(table)
  results_lib.require_single(rows)
  results_lib.require_points(len(rows), 8, "unified law (7 parameters)")
  _distinct(rows, "mu", 3, "unified law")
  _distinct(rows, "loops", 2, "unified law")
  d0 = float(np.exp(np.mean(LN(rows["tokens"]))))
  out = _fit_law("unified", _inputs(rows, d0), rows["val_loss"], rows["run"], n_boot=n_boot, seed=seed,
                 level=level, n_starts=n_starts, heldout=heldout, d0=d0, min_groups=4)
  out.update(law="unified", form="L = E + X*mu^-x + Y*D^-y + Z*exp(-z*T/mu)", n_runs=len(rows.runs()))
  _warn(out["warnings"], "unified fit")
  return out


def fit_testtime(table: Table, fit_loops=None, n_boot=200, seed=0, level=0.95, n_starts=256) -> list:
  """Per run, fit L(T) = L∞ + Z·exp(−z·T) to its final losses over loop counts T.

  fit_loops: loop counts to fit on (e.g. (1, 2, 4, 8)); the others are held out and scored (heldout_mape).
  Without it, every point is fitted and the held-out error is leave-one-point-out.
  """
  fin = results_lib.final_rows(table)
  fits = []
  for run in fin.runs():
    rows = fin.select(fin["run"] == run)
    use = np.ones(len(rows), bool) if fit_loops is None else np.isin(rows["loops"], np.asarray(fit_loops, float))
    fit_rows = rows.select(use)
    _distinct(fit_rows, "loops", 4, f"test-time law for run {run!r} (3 parameters)")
    v = _inputs(fit_rows, 1.0)
    out = _fit_law("testtime", v, fit_rows["val_loss"], np.arange(len(fit_rows)), n_boot=n_boot,
                   seed=seed, level=level, n_starts=n_starts, heldout=fit_loops is None and len(fit_rows) >= 5,
                   d0=1.0, min_groups=3)
    if fit_loops is not None:
      rest = rows.select(~use)
      pred = predict_testtime(out, rest["loops"])
      out["heldout_mape"] = _errors(pred, rest["val_loss"])[1] if len(rest) else None
      out["heldout_loops"] = [float(t) for t in rest["loops"]]
    out = dict(run=run, mu=float(rows["mu"][0]), **out)
    out.setdefault("heldout_mape", None)
    _warn(out["warnings"], f"test-time fit of run {run!r}")
    fits.append(out)
  return fits


def predict_training(fit: dict, mu, tokens) -> np.ndarray:
  mu, tokens = np.asarray(mu, float), np.asarray(tokens, float)
  return fit["E"] + fit["X"] * mu ** -fit["x"] + fit["Y"] * tokens ** -fit["y"]


def predict_testtime(fit: dict, loops) -> np.ndarray:
  return fit["L_inf"] + fit["Z"] * np.exp(-fit["z"] * np.asarray(loops, float))


def predict_unified(fit: dict, mu, tokens, loops) -> np.ndarray:
  mu = np.asarray(mu, float)
  return predict_training(fit, mu, tokens) + fit["Z"] * np.exp(-fit["z"] * np.asarray(loops, float) / mu)


# --------------------------------------------------------------------------------------------- isoFLOP
def _budget_groups(rows: Table) -> np.ndarray:
  """Budget per row: the `budget` column if numeric, else final FLOPs clustered within 5%."""
  if "budget" in rows and rows["budget"].dtype.kind == "f":
    return rows["budget"].copy()
  lf = LN(rows["flops"])
  order = np.argsort(lf)
  cluster = np.cumsum(np.r_[0, np.diff(lf[order]) > LN(1.05)])
  out = np.empty(len(lf))
  for c in np.unique(cluster):
    members = order[cluster == c]
    out[members] = np.exp(lf[members].mean())
  return out


def _vertex(u, L, lnD):
  """Parabola of L in u = ln µ: (ln µ*, ln D*, L*, curvature). ln D* from a quadratic of ln D in u."""
  c2, c1, c0 = np.polyfit(u, L, 2)
  if c2 <= 0:
    return None
  us = -c1 / (2 * c2)
  deg = min(2, len(np.unique(u)) - 1)
  return us, float(np.polyval(np.polyfit(u, lnD, deg), us)), float(c0 - c1 * c1 / (4 * c2)), float(c2)


def _optima(budgets, u, L, lnD, idx_by_budget):
  """ln µ*, ln D* per budget (NaN where the parabola opens down)."""
  res = []
  for b in budgets:
    i = idx_by_budget[b]
    vx = _vertex(u[i], L[i], lnD[i]) if len(np.unique(u[i])) >= 3 else None
    res.append(vx if vx is not None else (np.nan, np.nan, np.nan, np.nan))
  return np.array(res)


def _slope(lnC, vals):
  ok = np.isfinite(vals)
  if ok.sum() < 2:
    return np.nan, np.nan
  a, c = np.polyfit(lnC[ok], vals[ok], 1)
  return float(a), float(c)


def fit_isoflop(table: Table, eval_loops="mu", n_boot=200, seed=0, level=0.95) -> dict:
  """Per-budget compute-optimal µ*, D* (parabola in ln µ) and exponents µ* ∝ C^a, D* ∝ C^b with CIs."""
  rows = results_lib.eval_rows(table, eval_loops)
  results_lib.require_single(rows)
  budgets_row = _budget_groups(rows)
  budgets = np.unique(budgets_row)
  idx = {b: np.flatnonzero(budgets_row == b) for b in budgets}
  short = [f"{b:.3g}" for b in budgets if len(np.unique(rows["mu"][idx[b]])) < 3]
  if short:
    raise ResultsError(f"isoflop: budget(s) {short} have fewer than 3 distinct mu values; each budget needs "
                       "≥ 3 mu values for a parabola (add runs or drop those budgets)")
  results_lib.require_points(len(budgets), 2, "isoflop exponents (FLOP budgets)")
  u, L, lnD, lnC = LN(rows["mu"]), rows["val_loss"], LN(rows["tokens"]), LN(budgets)
  opt = _optima(budgets, u, L, lnD, idx)
  rng = np.random.default_rng(seed)
  boot_opt, boot_ab = [], []
  for _ in range(n_boot):
    bidx = {b: rng.choice(i, len(i)) for b, i in idx.items()}
    o = _optima(budgets, u, L, lnD, bidx)
    boot_opt.append(o)
    boot_ab.append((_slope(lnC, o[:, 0])[0], _slope(lnC, o[:, 1])[0]))
  boot_opt, boot_ab = np.array(boot_opt), np.array(boot_ab)
  q = [50 * (1 - level), 50 * (1 + level)]
  pct = lambda s: [float(v) for v in np.nanpercentile(s, q)] if np.isfinite(s).any() else [np.nan] * 2
  msgs, per_budget = [], []
  for j, b in enumerate(budgets):
    mus = rows["mu"][idx[b]]
    interior = bool(np.isfinite(opt[j, 0]) and mus.min() <= np.exp(opt[j, 0]) <= mus.max())
    if not np.isfinite(opt[j, 0]):
      msgs.append(f"budget {b:.3g}: loss is not convex in ln mu (parabola opens down); left out of a, b")
    elif not interior:
      msgs.append(f"budget {b:.3g}: optimum mu*={np.exp(opt[j, 0]):.3g} lies outside the sampled mu range "
                  f"[{mus.min():g}, {mus.max():g}] (extrapolated); extend the mu grid")
    per_budget.append({"budget": float(b), "mu_star": float(np.exp(opt[j, 0])), "D_star": float(np.exp(opt[j, 1])),
                       "L_star": float(opt[j, 2]), "curvature": float(opt[j, 3]), "interior": interior,
                       "n_runs": int(len(idx[b])), "mu_star_ci": [float(v) for v in np.exp(pct(boot_opt[:, j, 0]))],
                       "D_star_ci": [float(v) for v in np.exp(pct(boot_opt[:, j, 1]))]})
  a, ka = _slope(lnC, opt[:, 0])
  b_, kb = _slope(lnC, opt[:, 1])
  ci = {"a": pct(boot_ab[:, 0]), "b": pct(boot_ab[:, 1])}
  for name, val in (("a", a), ("b", b_)):
    lo, hi = ci[name]
    if np.isfinite(lo) and hi - lo > abs(val):
      msgs.append(f"bootstrap interval for {name} is [{lo:.3g}, {hi:.3g}]: poorly determined")
  if len(budgets) == 2:
    msgs.append("only 2 FLOP budgets: the exponents have no residual degrees of freedom")
  out = {"law": "isoflop", "method": "parabola of loss in ln mu per budget", "budgets": per_budget,
         "a": a, "b": b_, "mu_star_coef": float(np.exp(ka)), "D_star_coef": float(np.exp(kb)), "ci": ci,
         "n_boot": n_boot, "n_boot_ok": int(np.isfinite(boot_ab).all(axis=1).sum()), "level": level,
         "eval_loops": eval_loops, "warnings": msgs}
  _warn(msgs, "isoflop fit")
  return out


# ------------------------------------------------------------------------------------ precision-aware
def _precision_law(n_recipes: int) -> Law:
  """Training law with per-recipe efficiencies: µ -> µ·effN[r], D -> D·effD[r]; recipe 0 has eff = 1."""
  k = n_recipes - 1
  base = LAWS["training"]

  def fn(th, v):
    effN = np.exp(np.r_[0.0, th[5:5 + k]])[v["r"]]
    effD = np.exp(np.r_[0.0, th[5 + k:]])[v["r"]]
    pred, jb = _training_fn(th[:5], {"mu": v["mu"] * effN, "d": v["d"] * effD})
    onehot = (v["r"][:, None] == np.arange(1, n_recipes)[None, :]).astype(float)
    jn = -th[2] * jb[:, 1:2] * onehot  # d pred / d ln effN_r = −x·X·(µ·effN)^(−x)
    jd = -th[4] * jb[:, 3:4] * onehot  # d pred / d ln effD_r = −y·Y·(D·effD)^(−y)
    return pred, np.concatenate([jb, jn, jd], axis=1)

  return Law(fn, base.names + tuple(f"effN_{i}" for i in range(1, n_recipes)) +
             tuple(f"effD_{i}" for i in range(1, n_recipes)), base.log + (True,) * 2 * k,
             base.bounds + ((LN(1e-3), LN(10.0)),) * 2 * k, 0)


def fit_precision(table: Table, reference: str = "bf16", eval_loops="mu", n_boot=200, seed=0, level=0.95,
                  n_starts=512, heldout=True) -> dict:
  """Precision-aware training law across `quant_recipe` values (Quartet-style efficiencies, additive form):

    L = E + X·(µ·effN[r])^(−x) + Y·(D·effD[r])^(−y),   effN[reference] = effD[reference] = 1.

  effN < 1: the recipe's looping/parameter term behaves like a smaller effective depth; effD < 1: each
  token is worth less. Quartet's form L = E + (A/(N·effN)^α + B/(D·effD)^β)^γ adds γ; at one model size
  γ trades off against x and y, so we fit the additive (γ = 1) form.
  """
  rows = results_lib.eval_rows(table, eval_loops)
  results_lib.require_single(rows, cols=("params", "model"))
  recipes = [str(r) for r in np.unique(rows["quant_recipe"])]
  if reference not in recipes:
    raise ResultsError(f"reference recipe {reference!r} not in quant_recipe values {recipes}; "
                       "pass reference=<one of them>")
  recipes = [reference] + [r for r in recipes if r != reference]
  for r in recipes:
    _distinct(rows.select(rows["quant_recipe"] == r), "mu", 2, f"precision law, recipe {r!r}")
  law = _precision_law(len(recipes))
  results_lib.require_points(len(rows), len(law.names) + 1, f"precision law ({len(law.names)} parameters)")
  d0 = float(np.exp(np.mean(LN(rows["tokens"]))))
  v = dict(_inputs(rows, d0), r=np.array([recipes.index(str(q)) for q in rows["quant_recipe"]]))
  out = _fit_law(law, v, rows["val_loss"], rows["run"], n_boot=n_boot, seed=seed, level=level,
                 n_starts=n_starts, heldout=heldout, d0=d0, min_groups=len(law.names) + 1)
  out["effN"] = {reference: 1.0, **{r: out[f"effN_{i}"] for i, r in enumerate(recipes) if i}}
  out["effD"] = {reference: 1.0, **{r: out[f"effD_{i}"] for i, r in enumerate(recipes) if i}}
  out.update(law="precision", form="L = E + X*(mu*effN)^-x + Y*(D*effD)^-y", recipes=recipes,
             reference=reference, eval_loops=eval_loops, n_runs=len(rows))
  _warn(out["warnings"], "precision fit")
  return out


def predict_precision(fit: dict, mu, tokens, recipe) -> np.ndarray:
  effN = np.array([fit["effN"][str(r)] for r in np.atleast_1d(recipe)])
  effD = np.array([fit["effD"][str(r)] for r in np.atleast_1d(recipe)])
  return predict_training(fit, np.asarray(mu, float) * effN, np.asarray(tokens, float) * effD)


# ------------------------------------------------------------------------------------------------- CLI
FIT_FNS = {"training": fit_training, "testtime": fit_testtime, "unified": fit_unified, "isoflop": fit_isoflop,
           "precision": fit_precision}


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one clear line instead of usage + exit inside argparse
    raise ResultsError(f"{message} (usage: parcae fit --results FILE --law {{{','.join(FIT_FNS)}}})")


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="parcae fit", description="Fit scaling laws to a sweep results table.")
  p.add_argument("--results", required=True, help="results table (.csv or .parquet)")
  p.add_argument("--law", required=True, choices=sorted(FIT_FNS), help="which law to fit")
  p.add_argument("--json", action="store_true", help="print the fit as JSON on stdout")
  p.add_argument("--plot-dir", default=None, help="write PNG + SVG plots here")
  p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the intervals")
  p.add_argument("--seed", type=int, default=0, help="bootstrap / start seed")
  p.add_argument("--eval-loops", default="mu", help="training/isoflop: loop count per run ('mu' or an int)")
  p.add_argument("--fit-loops", default=None, help="testtime: comma-separated loop counts to fit on")
  p.add_argument("--reference", default="bf16", help="precision: quant_recipe with efficiency 1")
  p.add_argument("--nonfinite", default="drop", choices=["drop", "error"], help="rows with NaN/inf loss")
  p.add_argument("--where", action="append", default=[], metavar="COL=VALUE",
                 help="keep only rows with this column value (repeatable), e.g. --where model=parcae-small-140m")
  return p


def _run_fit(args) -> tuple[Table, object]:
  table = results_lib.load_results(args.results, on_nonfinite=args.nonfinite)
  if args.where:
    bad = [w for w in args.where if "=" not in w]
    if bad:
      raise ResultsError(f"--where {bad[0]!r}; use COL=VALUE, e.g. --where quant_recipe=bf16")
    table = results_lib.where(table, dict(w.split("=", 1) for w in args.where))
  if args.n_boot < 0:
    raise ResultsError(f"--n-boot={args.n_boot}; use 0 (no intervals) or a positive count")
  kw = {"n_boot": args.n_boot, "seed": args.seed}
  if args.law in ("training", "isoflop", "precision"):
    kw["eval_loops"] = args.eval_loops
  if args.law == "precision":
    kw["reference"] = args.reference
  if args.law == "testtime" and args.fit_loops:
    try:
      kw["fit_loops"] = [float(t) for t in args.fit_loops.split(",")]
    except ValueError as e:
      raise ResultsError(f"--fit-loops={args.fit_loops!r}; use comma-separated numbers like 1,2,4,8") from e
  return table, FIT_FNS[args.law](table, **kw)


def _summary(law: str, res) -> str:
  if law == "testtime":
    return "\n".join(f"{f['run']}: L_inf={f['L_inf']:.4f} Z={f['Z']:.4f} z={f['z']:.4f} "
                     f"rmse={f['rmse']:.2e} heldout_mape={f['heldout_mape']}" for f in res)
  if law == "isoflop":
    lines = [f"C={b['budget']:.3g}: mu*={b['mu_star']:.3g} D*={b['D_star']:.3g} L*={b['L_star']:.4f}"
             for b in res["budgets"]]
    return "\n".join(lines + [f"a={res['a']:.3f} {res['ci']['a']}  b={res['b']:.3f} {res['ci']['b']}"])
  names = res["param_names"]
  return "\n".join([f"{n} = {res[n]:.5g}  CI {res['ci'][n]}" for n in names] +
                   [f"rmse={res['rmse']:.3e} mape={res['mape']:.3f}% heldout_mape={res['heldout_mape']}"])


def _jsonable(obj):
  """NaN/inf -> None so the output is strict JSON."""
  if isinstance(obj, dict):
    return {k: _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def fit_main(argv: list[str]) -> int:
  """`parcae fit --results FILE --law training|testtime|unified|isoflop|precision [--json] [--plot-dir DIR]`.

  Exit code 0 on success, 2 on bad input (one line on stderr). Fit warnings go to stderr and into the JSON.
  """
  try:
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # fit warnings are reported in the result's "warnings" lists
      table, res = _run_fit(args)
  except ValueError as e:  # ResultsError and other bad-input errors
    print(f"parcae fit: error: {e}", file=sys.stderr)
    return 2
  if args.json:
    print(json.dumps(_jsonable({"fits": res} if args.law == "testtime" else res)))
  else:
    print(_summary(args.law, res))
  ws = [w for f in res for w in f["warnings"]] if args.law == "testtime" else res["warnings"]
  for w in ws:
    print(f"warning: {w}", file=sys.stderr)
  if args.plot_dir:
    from parcae.scaling import plots
    for path in plots.plot_law(args.law, table, res, args.plot_dir):
      print(f"wrote {path}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(fit_main(sys.argv[1:]))
