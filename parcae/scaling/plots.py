"""Scaling-law plots (matplotlib, Agg backend). Each function writes `<stem>.png` and `<stem>.svg` and returns
the two paths.

  plot_isoflop      loss vs µ per FLOP budget, fitted parabola and optimum µ*
  plot_frontier     loss vs FLOPs per µ with the fitted training law and its compute frontier
  plot_testtime     L(T) per run with its fitted saturating exponential
  plot_pred_vs_obs  predicted against observed loss for a training / unified / testtime fit
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from parcae.scaling import fit as fit_lib  # noqa: E402
from parcae.scaling import results as results_lib  # noqa: E402
from parcae.scaling.results import Table  # noqa: E402


def _save(fig, stem: str) -> list[str]:
  os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
  paths = [f"{stem}.png", f"{stem}.svg"]
  for p in paths:
    fig.savefig(p, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return paths


def plot_isoflop(table: Table, iso: dict, stem: str) -> list[str]:
  """Loss vs µ (log axis) per budget with each budget's fitted parabola in ln µ and its optimum."""
  rows = results_lib.eval_rows(table, iso.get("eval_loops", "mu"))
  budget_row = fit_lib._budget_groups(rows)
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(iso["budgets"])))
  for b, c in zip(iso["budgets"], colors):
    sel = budget_row == b["budget"]
    mu, L = rows["mu"][sel], rows["val_loss"][sel]
    ax.scatter(mu, L, color=c, s=14, label=f"C={b['budget']:.2g}")
    u = np.log(mu)
    grid = np.linspace(u.min(), u.max(), 100)
    ax.plot(np.exp(grid), np.polyval(np.polyfit(u, L, 2), grid), color=c, lw=1)
    if np.isfinite(b["L_star"]):
      ax.scatter([b["mu_star"]], [b["L_star"]], color=c, marker="*", s=120, edgecolor="k", zorder=3)
  ax.set(xscale="log", xlabel="mean recurrence µ", ylabel="validation loss",
         title=f"isoFLOP: µ* ∝ C^{iso['a']:.2f}, D* ∝ C^{iso['b']:.2f}")
  ax.legend(fontsize=7)
  return _save(fig, stem)


def plot_frontier(table: Table, train: dict, stem: str) -> list[str]:
  """Loss vs training FLOPs per µ with the fitted law per µ and the compute-optimal frontier."""
  rows = results_lib.eval_rows(table, train.get("eval_loops", "mu"))
  mu, C, L = rows["mu"], rows["flops"], rows["val_loss"]
  fpt = rows["flops"] / rows["tokens"]  # FLOPs per token, linear in µ at fixed size
  coef = np.polyfit(mu, fpt, 1) if len(np.unique(mu)) > 1 else np.array([0.0, fpt.mean()])
  grid_C = np.geomspace(C.min() / 2, C.max() * 2, 100)
  fig, ax = plt.subplots(figsize=(6, 4))
  mus = np.unique(mu)
  colors = plt.cm.plasma(np.linspace(0, 0.9, len(mus)))
  for m, c in zip(mus, colors):
    sel = mu == m
    ax.scatter(C[sel], L[sel], color=c, s=14, label=f"µ={m:g}")
    ax.plot(grid_C, fit_lib.predict_training(train, m, grid_C / np.polyval(coef, m)), color=c, lw=0.8)
  mu_fine = np.geomspace(mus.min(), mus.max(), 200)
  pred = fit_lib.predict_training(train, mu_fine[None, :], grid_C[:, None] / np.polyval(coef, mu_fine)[None, :])
  ax.plot(grid_C, pred.min(axis=1), "k--", lw=1.5, label="frontier")
  ax.set(xscale="log", xlabel="training FLOPs", ylabel="validation loss", title="training law")
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, stem)


def plot_testtime(table: Table, fits: list, stem: str) -> list[str]:
  """Final loss against test-time loop count per run, with each run's fitted L∞ + Z·exp(−z·T).

  Loop counts held out of the fit (`fit_testtime(..., fit_loops=...)`) are drawn hollow.
  """
  fin = results_lib.final_rows(table)
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = plt.cm.tab10(np.arange(len(fits)) % 10)
  for f, c in zip(fits, colors):
    sel = fin["run"] == f["run"]
    T, L = fin["loops"][sel], fin["val_loss"][sel]
    held = np.isin(T, f.get("heldout_loops") or [])  # points the fit did not see: hollow
    ax.scatter(T[~held], L[~held], color=c, s=14)
    ax.scatter(T[held], L[held], facecolor="none", edgecolor=c, s=14)
    grid = np.linspace(T.min(), T.max(), 100)
    ax.plot(grid, fit_lib.predict_testtime(f, grid), color=c, lw=1, label=f"{f['run']} (z={f['z']:.2f})")
  ax.set(xlabel="test-time loops T", ylabel="validation loss", title="test-time law")
  ax.legend(fontsize=6)
  return _save(fig, stem)


def _pred_obs(table: Table, res) -> tuple[np.ndarray, np.ndarray]:
  if isinstance(res, list):  # test-time fits, one per run
    fin = results_lib.final_rows(table)
    by_run = {f["run"]: f for f in res}
    keep = np.isin(fin["run"], list(by_run))
    fin = fin.select(keep)
    pred = np.array([fit_lib.predict_testtime(by_run[r], t) for r, t in zip(fin["run"], fin["loops"])])
    return pred, fin["val_loss"]
  if res["law"] == "precision":
    rows = results_lib.eval_rows(table, res.get("eval_loops", "mu"))
    keep = np.isin(rows["quant_recipe"], res["recipes"])
    rows = rows.select(keep)
    return fit_lib.predict_precision(res, rows["mu"], rows["tokens"], rows["quant_recipe"]), rows["val_loss"]
  if res["law"] == "unified":
    rows = results_lib.final_rows(table)
    return fit_lib.predict_unified(res, rows["mu"], rows["tokens"], rows["loops"]), rows["val_loss"]
  rows = results_lib.eval_rows(table, res.get("eval_loops", "mu"))
  return fit_lib.predict_training(res, rows["mu"], rows["tokens"]), rows["val_loss"]


def plot_pred_vs_obs(table: Table, res, stem: str) -> list[str]:
  """Predicted against observed loss (identity line dashed) for a training/unified/precision/testtime fit."""
  pred, obs = _pred_obs(table, res)
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.scatter(obs, pred, s=12)
  lo, hi = min(obs.min(), pred.min()), max(obs.max(), pred.max())
  ax.plot([lo, hi], [lo, hi], "k--", lw=1)
  mape = 100 * np.mean(np.abs(pred - obs) / obs)
  ax.set(xlabel="observed loss", ylabel="predicted loss", title=f"predicted vs observed (MAPE {mape:.2f}%)")
  return _save(fig, stem)


def plot_law(law: str, table: Table, res, out_dir: str) -> list[str]:
  """The plots that belong to one law's fit (used by `parcae fit --plot-dir`)."""
  stem = lambda name: os.path.join(out_dir, name)
  if law == "isoflop":
    return plot_isoflop(table, res, stem("isoflop"))
  if law == "training":
    return plot_frontier(table, res, stem("training_frontier")) + plot_pred_vs_obs(table, res, stem("training_pred_obs"))
  if law == "testtime":
    return plot_testtime(table, res, stem("testtime")) + plot_pred_vs_obs(table, res, stem("testtime_pred_obs"))
  return plot_pred_vs_obs(table, res, stem(f"{law}_pred_obs"))
