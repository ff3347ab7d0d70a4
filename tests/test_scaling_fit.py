"""Scaling-law fits recover known parameters from synthetic sweeps; bad tables give clear errors.

Synthetic sweep (seed 0): a parcae-like run grid at fixed size. FLOPs per token = K·µ, so at budget C the
tokens are D = C/(K·µ) and the training law L = E + X·µ^(−x) + Y·D^(−y) has its exact optimum at
µ* ∝ C^(y/(x+y)), D* ∝ C^(x/(x+y)). Losses carry multiplicative log-normal noise (σ stated per test).
Tolerances are stated per parameter; the Y/y pair trades off against E in any finite D range, hence the
wider tolerance on Y.
"""
import json
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest

from parcae.scaling import fit, results
from parcae.scaling.results import ResultsError

TRUE = {"E": 1.8, "X": 0.5, "x": 0.6, "y": 0.4, "Z": 0.8, "z": 1.5}
K, C0, MU0 = 2e8, 1e18, 2.0  # FLOPs/token per unit µ; reference budget; µ* at C0
# Y chosen so that the optimum at C0 is µ = MU0: x·X·µ^-x = y·Y·(Kµ/C0)^y
TRUE["Y"] = TRUE["x"] * TRUE["X"] * MU0 ** -TRUE["x"] / (TRUE["y"] * (K * MU0 / C0) ** TRUE["y"])
A_TRUE = TRUE["y"] / (TRUE["x"] + TRUE["y"])  # 0.4
B_TRUE = TRUE["x"] / (TRUE["x"] + TRUE["y"])  # 0.6
MU_GRID = np.array([1, 1.5, 2, 3, 4, 6, 8, 11, 16, 23, 32.0])
BUDGETS = C0 * np.array([1, 2, 4, 8, 16, 32.0])
COLS = ("run", "mu", "params", "tokens", "flops", "loops", "val_loss", "budget")


def _sweep(noise, loops_fn, unified=False, seed=0):
  """Runs on the µ grid within 4x of each budget's optimum; rows at loops_fn(µ) test-time loop counts."""
  rng = np.random.default_rng(seed)
  p = TRUE
  cols = {c: [] for c in COLS}
  for C in BUDGETS:
    mu_star = MU0 * (C / C0) ** A_TRUE
    for mu in MU_GRID[(MU_GRID >= mu_star / 4) & (MU_GRID <= mu_star * 4)]:
      D = C / (K * mu)
      base = p["E"] + p["X"] * mu ** -p["x"] + p["Y"] * D ** -p["y"]
      for T in loops_fn(mu):
        L = base + (p["Z"] * np.exp(-p["z"] * T / mu) if unified else 0.0)
        row = (f"C{C:.0e}_mu{mu:g}", mu, 1.4e8, D, C, T, L * np.exp(rng.normal(0, noise)), C)
        for c, v in zip(COLS, row):
          cols[c].append(v)
  return results.table_from_columns(cols)


@pytest.fixture(scope="module")
def train_table():
  return _sweep(noise=0.002, loops_fn=lambda mu: [round(mu)])  # σ = 0.2 %


def test_training_law_recovers_parameters(train_table):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a well-posed synthetic sweep must not warn
    res = fit.fit_training(train_table, n_boot=50, n_starts=128)
  tol = {"E": 0.05, "X": 0.05, "Y": 0.35}  # relative
  for k, t in tol.items():
    assert abs(res[k] / TRUE[k] - 1) < t, (k, res[k], TRUE[k])
  for k in ("x", "y"):
    assert abs(res[k] - TRUE[k]) < 0.03, (k, res[k])
    lo, hi = res["ci"][k]
    assert lo <= TRUE[k] <= hi, (k, lo, hi)
  assert res["warnings"] == []
  assert res["mape"] < 0.4 and res["heldout_mape"] < 0.5  # noise is 0.2 % (mean |err| ≈ 0.16 %)
  assert res["n_boot_ok"] == 50


def test_isoflop_recovers_exponents(train_table):
  res = fit.fit_isoflop(train_table, n_boot=100)
  assert len(res["budgets"]) == len(BUDGETS)
  for name, true in (("a", A_TRUE), ("b", B_TRUE)):
    assert abs(res[name] - true) < 0.03, (name, res[name])
    lo, hi = res["ci"][name]
    assert lo <= true <= hi, (name, lo, hi)
  for b in res["budgets"]:  # per-budget optimum within 10 % of the exact one
    assert b["interior"]
    assert abs(b["mu_star"] / (MU0 * (b["budget"] / C0) ** A_TRUE) - 1) < 0.1
    assert abs(b["D_star"] * K * b["mu_star"] / b["budget"] - 1) < 0.05  # D* consistent with C = K·µ·D
  assert res["warnings"] == []


def _testtime_table(loops, noise, seed=0, z_by_run=(0.3, 0.6, 1.0)):
  rng = np.random.default_rng(seed)
  cols = {c: [] for c in COLS}
  for i, z in enumerate(z_by_run):
    L_inf, Z = 2.6 + 0.1 * i, 0.9 - 0.2 * i
    for T in loops:
      L = (L_inf + Z * np.exp(-z * T)) * np.exp(rng.normal(0, noise))
      for c, v in zip(COLS, (f"r{i}", 8.0, 1.4e8, 1e9, 1e18, T, L, 1e18)):
        cols[c].append(v)
  return results.table_from_columns(cols), z_by_run


def test_testtime_from_four_points_predicts_other_loop_counts():
  table, zs = _testtime_table([1, 2, 3, 4, 6, 8, 12, 16, 20, 24], noise=0.001)  # σ = 0.1 %
  fits = fit.fit_testtime(table, fit_loops=(1, 2, 4, 8), n_boot=50, n_starts=64)
  assert [f["run"] for f in fits] == ["r0", "r1", "r2"]
  for f, z in zip(fits, zs):
    assert f["n_points"] == 4 and f["heldout_loops"] == [3, 6, 12, 16, 20, 24]
    assert f["heldout_mape"] < 0.5, f  # stated: < 0.5 % held-out error from 4 points at 0.1 % noise
    assert abs(f["z"] / z - 1) < 0.25, (f["z"], z)


def test_testtime_all_points_recovers_and_covers_exponent():
  table, zs = _testtime_table([1, 2, 3, 4, 6, 8, 12, 16, 20, 24], noise=0.001)
  fits = fit.fit_testtime(table, n_boot=50, n_starts=64)
  for i, (f, z) in enumerate(zip(fits, zs)):
    assert abs(f["L_inf"] / (2.6 + 0.1 * i) - 1) < 0.01
    assert abs(f["z"] / z - 1) < 0.1
    assert f["ci"]["z"][0] <= z <= f["ci"]["z"][1]
    assert f["heldout_mape"] is not None and f["heldout_mape"] < 0.3  # leave-one-point-out


def test_testtime_flat_curve_warns():
  # every T far past 1/z: Z·exp(−z·T) is invisible, so Z and z cannot be pinned down
  table, _ = _testtime_table([20, 22, 24, 26], noise=0.001, z_by_run=(1.0,))
  with pytest.warns(UserWarning, match="test-time fit of run 'r0'"):
    fits = fit.fit_testtime(table, n_boot=20, n_starts=64)
  assert fits[0]["warnings"]


def test_unified_law_recovers_parameters():
  table = _sweep(noise=0.002, loops_fn=lambda mu: [1, 2, 4, 8, 16, 24], unified=True)
  res = fit.fit_unified(table, n_boot=20, n_starts=128)
  tol = {"E": 0.05, "X": 0.1, "Y": 0.35, "Z": 0.1}
  for k, t in tol.items():
    assert abs(res[k] / TRUE[k] - 1) < t, (k, res[k], TRUE[k])
  for k, t in (("x", 0.05), ("y", 0.03), ("z", 0.1)):
    assert abs(res[k] - TRUE[k]) < t, (k, res[k])
    lo, hi = res["ci"][k]
    assert lo <= TRUE[k] <= hi, (k, lo, hi)
  assert res["mape"] < 0.4 and res["heldout_mape"] < 0.5  # noise σ = 0.2 %


def test_predict_matches_formula():
  p = dict(TRUE, L_inf=2.0)
  mu, D, T = np.array([1.0, 4.0]), np.array([1e9, 3e9]), np.array([2.0, 8.0])
  base = 1.8 + 0.5 * mu ** -0.6 + p["Y"] * D ** -0.4
  np.testing.assert_allclose(fit.predict_training(p, mu, D), base, rtol=1e-12)
  np.testing.assert_allclose(fit.predict_unified(p, mu, D, T), base + 0.8 * np.exp(-1.5 * T / mu), rtol=1e-12)
  np.testing.assert_allclose(fit.predict_testtime(p, T), 2.0 + 0.8 * np.exp(-1.5 * T), rtol=1e-12)


# ------------------------------------------------------------------------------------- bad input / CLI
def _write_csv(path, table_or_rows):
  cols = table_or_rows.columns if isinstance(table_or_rows, results.Table) else table_or_rows
  names = list(cols)
  n = len(cols[names[0]])
  lines = [",".join(names)] + [",".join(str(cols[c][i]) for c in names) for i in range(n)]
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_load_results_errors(tmp_path):
  p = tmp_path / "empty.csv"
  p.write_text("run,mu,params,tokens,flops,loops,val_loss\n")
  with pytest.raises(ResultsError, match="empty"):
    results.load_results(str(p))
  p = _write_csv(tmp_path / "missing.csv", {"run": ["a"], "mu": [1], "val_loss": [3.0]})
  with pytest.raises(ResultsError, match=r"missing column\(s\) \['params', 'tokens', 'flops', 'loops'\]"):
    results.load_results(p)
  (tmp_path / "x.txt").write_text("run\n")
  with pytest.raises(ResultsError, match="extension"):
    results.load_results(str(tmp_path / "x.txt"))


def test_nonfinite_losses_dropped_with_warning_or_refused(train_table):
  cols = {k: v.copy() for k, v in train_table.columns.items()}
  cols["val_loss"][[0, 5]] = [np.nan, np.inf]
  bad_runs = sorted({str(cols["run"][0]), str(cols["run"][5])})
  with pytest.warns(UserWarning, match=r"2 row\(s\) with non-finite.*" + re.escape(str(bad_runs))):
    t = results.validate(results.Table(dict(cols)))
  assert len(t) == len(train_table) - 2 and np.isfinite(t["val_loss"]).all()
  with pytest.raises(ResultsError, match="non-finite"):
    results.validate(results.Table(dict(cols)), on_nonfinite="error")


def test_too_few_points_errors(train_table):
  table, _ = _testtime_table([1, 2, 4], noise=0.0)
  with pytest.raises(ResultsError, match="need at least 4"):
    fit.fit_testtime(table, n_boot=0)
  two_mu = train_table.select(np.isin(train_table["mu"], [2.0, 4.0]))
  with pytest.raises(ResultsError, match="distinct mu"):
    fit.fit_training(two_mu, n_boot=0)
  one_budget = train_table.select(train_table["budget"] == C0)
  with pytest.raises(ResultsError, match="isoflop exponents"):
    fit.fit_isoflop(one_budget, n_boot=0)


def test_cli_json_outputs(tmp_path, capsys, train_table):
  path = _write_csv(tmp_path / "train.csv", train_table)
  assert fit.fit_main(["--results", path, "--law", "training", "--json", "--n-boot", "5"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert {"E", "X", "x", "Y", "y"} <= set(out) and abs(out["y"] - TRUE["y"]) < 0.03
  assert fit.fit_main(["--results", path, "--law", "isoflop", "--json", "--n-boot", "20"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert len(out["budgets"]) == len(BUDGETS) and "mu_star" in out["budgets"][0]
  assert len(out["ci"]["a"]) == 2 and abs(out["a"] - A_TRUE) < 0.03
  table, _ = _testtime_table([1, 2, 4, 8, 16], noise=0.001)
  path = _write_csv(tmp_path / "tt.csv", table)
  assert fit.fit_main(["--results", path, "--law", "testtime", "--json", "--n-boot", "5"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert list(out) == ["fits"] and [f["run"] for f in out["fits"]] == ["r0", "r1", "r2"]
  assert all({"run", "L_inf", "Z", "z"} <= set(f) for f in out["fits"])


@pytest.mark.parametrize("case,message", [
    ("empty", "empty"), ("missing", "missing column"), ("nan", "non-finite"), ("few", "need at least 4"),
    ("nofile", "does not exist"), ("badlaw", "invalid choice"),
])
def test_cli_bad_input_exit_2(tmp_path, capsys, case, message):
  p = tmp_path / "r.csv"
  header = "run,mu,params,tokens,flops,loops,val_loss\n"
  rows = {"empty": header, "missing": "run,mu\na,1\n", "nan": header + "a,8,1,1e9,1e18,8,nan\n",
          "few": header + "".join(f"a,8,1,1e9,1e18,{t},{3 + 1 / t}\n" for t in (1, 2, 4))}
  p.write_text(rows.get(case, header))
  argv = ["--results", str(p) if case != "nofile" else str(tmp_path / "none.csv"),
          "--law", "bogus" if case == "badlaw" else "testtime"]
  if case == "nan":
    argv += ["--nonfinite", "error"]
  assert fit.fit_main(argv) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_subprocess_no_traceback(tmp_path):
  p = tmp_path / "r.csv"
  p.write_text("run,mu\na,1\n")
  proc = subprocess.run([sys.executable, "-m", "parcae.scaling.fit", "--results", str(p), "--law", "training"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "missing column" in proc.stderr and "Traceback" not in proc.stderr


def test_parquet_roundtrip(tmp_path, train_table):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  path = str(tmp_path / "r.parquet")
  pq.write_table(pa.table({k: v.tolist() for k, v in train_table.columns.items()}), path)
  t = results.load_results(path)
  assert t.runs() == train_table.runs()
  np.testing.assert_array_equal(t["val_loss"], train_table["val_loss"])


def test_mixed_model_sizes_refused_and_where_selects(tmp_path, capsys, train_table):
  cols = {k: np.concatenate([v, v]) for k, v in train_table.columns.items()}
  n = len(train_table)
  cols["run"] = np.concatenate([train_table["run"], np.char.add(train_table["run"], "_big")])
  cols["params"] = np.r_[np.full(n, 1.4e8), np.full(n, 3.9e8)]
  cols["model"] = np.array(["small"] * n + ["medium"] * n)
  mixed = results.Table(cols)
  with pytest.raises(ResultsError, match="mixes 2 params values.*--where params=VALUE"):
    fit.fit_isoflop(mixed, n_boot=0)
  only = results.where(mixed, {"model": "medium"})
  assert len(only) == n and set(only["params"]) == {3.9e8}
  path = _write_csv(tmp_path / "mixed.csv", mixed)
  assert fit.fit_main(["--results", path, "--law", "isoflop", "--json", "--n-boot", "5",
                       "--where", "model=small", "--where", "params=1.4e8"]) == 0
  assert abs(json.loads(capsys.readouterr().out)["a"] - A_TRUE) < 0.03
  assert fit.fit_main(["--results", path, "--law", "isoflop", "--where", "model=large"]) == 2
  assert "no rows match" in capsys.readouterr().err


def test_precision_law_recovers_recipe_efficiencies(tmp_path, capsys):
  eff = {"bf16": (1.0, 1.0), "fp8": (0.9, 0.95), "nvfp4": (0.6, 0.8)}  # (effN, effD), truth
  rng = np.random.default_rng(0)
  cols = {c: [] for c in COLS + ("quant_recipe",)}
  for q, (en, ed) in eff.items():
    for C in BUDGETS[::2]:
      for mu in (1, 2, 4, 8, 16.0):
        D = C / (K * mu)
        L = TRUE["E"] + TRUE["X"] * (mu * en) ** -TRUE["x"] + TRUE["Y"] * (D * ed) ** -TRUE["y"]
        row = (f"{q}_C{C:.0e}_mu{mu:g}", mu, 1.4e8, D, C, round(mu), L * np.exp(rng.normal(0, 0.002)), C, q)
        for c, v in zip(COLS + ("quant_recipe",), row):
          cols[c].append(v)
  table = results.table_from_columns(cols)  # σ = 0.2 %
  res = fit.fit_precision(table, reference="bf16", n_boot=20, n_starts=64, heldout=False)
  assert res["recipes"] == ["bf16", "fp8", "nvfp4"]
  for q, (en, ed) in eff.items():
    assert abs(res["effN"][q] - en) < 0.05 and abs(res["effD"][q] - ed) < 0.05, (q, res["effN"], res["effD"])
  for k in ("x", "y"):
    assert abs(res[k] - TRUE[k]) < 0.03 and res["ci"][k][0] <= TRUE[k] <= res["ci"][k][1], (k, res[k])
  with pytest.raises(ResultsError, match="reference recipe 'fp32' not in"):
    fit.fit_precision(table, reference="fp32", n_boot=0)
  with pytest.raises(ResultsError, match="mixes 3 quant_recipe"):
    fit.fit_training(table, n_boot=0)
