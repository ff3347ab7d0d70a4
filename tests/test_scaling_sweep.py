"""parcae sweep: budget arithmetic against flops.py, config errors, launch scripts, and the 4-run micro sweep
on CPU (results table loads and fits, reruns skip finished runs, partial runs resume)."""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from parcae import config as config_lib
from parcae.scaling import fit as fit_lib
from parcae.scaling import flops as flops_lib
from parcae.scaling import results as results_lib
from parcae.scaling import launch, sweep
from conftest import shared_once, xla_flags
from train_helpers import write_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = os.path.join(ROOT, "configs", "sweeps", "micro_cpu.py")
SMALL = os.path.join(ROOT, "configs", "sweeps", "small_cpu.py")


def _shard_overrides(path):
  return [f"--config.base.data.kind=shards", f"--config.base.data.path={path}", "--config.base.model.vocab_size=128"]


def _model_at(mu, s):
  """The micro sweep's model at (mu, s), built from the config module, not from the sweep code."""
  m = config_lib.load_module(MICRO).base_config().model
  m.mean_recurrence, m.mean_backprop_depth = mu, s
  return m


# ---------------------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("convention", ["reference", "executed"])
def test_budget_arithmetic_matches_flops(convention):
  cfg = sweep.load_sweep_config(MICRO, [f"--config.flops_convention={convention}", "--config.mu=(1, 2, 5)",
                                        "--config.min_steps=1"])
  plans = sweep.plan_runs(cfg)
  assert len(plans) == 3 * len(cfg.budgets)
  for p in plans:
    s = math.ceil(p["mu"] / 2)
    m = _model_at(p["mu"], s)
    seq = p["cfg"].train.seq_len
    f = (flops_lib.reference_flops_per_token(m, block_size=seq) if convention == "reference"
         else flops_lib.executed_flops_per_token(m, seq))
    tps = p["cfg"].train.micro_batch_size * p["cfg"].train.grad_accum * seq
    assert p["s"] == s and p["cfg"].model.mean_backprop_depth == s and p["cfg"].model.mean_recurrence == p["mu"]
    np.testing.assert_allclose(p["flops_per_token"], f, rtol=1e-12)
    assert p["tokens_per_step"] == tps
    # smallest step count that spends the budget: steps*tps*F >= C > (steps-1)*tps*F
    assert p["steps"] * tps * f >= p["budget"] > (p["steps"] - 1) * tps * f
    assert p["cfg"].train.steps == p["steps"]
    assert p["params"] == flops_lib.param_counts(m)["params_total"]


def test_backprop_depth_and_eval_loops_fields():
  cfg = sweep.load_sweep_config(MICRO, ["--config.backprop_depth=2", "--config.mu=(3,)", "--config.eval_loops=2mu"])
  (p, _) = sweep.plan_runs(cfg)
  assert p["s"] == 2 and p["cfg"].model.mean_backprop_depth == 2
  assert p["eval_loops"] == [1, 2, 3, 4, 5, 6] and tuple(p["cfg"].train.eval_loops) == (1, 2, 3, 4, 5, 6)
  assert sweep.parse_eval_loops("1-24", 4) == list(range(1, 25))
  assert sweep.parse_eval_loops("8,1,2", 4) == [1, 2, 8]


def test_small_sweep_plan():
  plans = sweep.plan_runs(sweep.load_sweep_config(SMALL))
  assert sorted({p["mu"] for p in plans}) == [1, 2, 4, 6, 8] and len({p["budget"] for p in plans}) == 3
  assert len({p["params"] for p in plans}) == 1  # one model size: the fixed-size laws accept the table
  assert all(p["cfg"].data.kind == "embedded" for p in plans)


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("override, field", [
    ("--config.mu=(0, 2)", "mu"),
    ("--config.mu=(2, 2)", "mu"),
    ("--config.budgets=(-1.0,)", "budgets"),
    ("--config.budgets=(1e3,)", "budgets"),  # fewer than min_steps steps
    ("--config.flops_convention=real", "flops_convention"),
    ("--config.eval_loops=abc", "eval_loops"),
    ("--config.eval_loops=0-4", "eval_loops"),
    ("--config.backprop_depth=-1", "backprop_depth"),
    ("--config.base=missing.py", "base"),
    ("--config.quant_recipes=('fp3',)", "quant"),
])
def test_bad_config_names_the_field(override, field, tmp_path, capsys):
  rc = sweep.sweep_main(["--config", MICRO, "--out", str(tmp_path), "--launch", "print", override])
  err = capsys.readouterr().err
  assert rc == 2 and field in err and "Traceback" not in err


def _write_config(tmp_path, body):
  path = tmp_path / "bad_sweep.py"
  path.write_text("import ml_collections\n\ndef get_config():\n  c = ml_collections.ConfigDict()\n" + body +
                  "  return c\n")
  return str(path)


def test_unknown_missing_and_model_fields(tmp_path):
  with pytest.raises(ValueError, match="'budget'.*did you mean 'budgets'"):
    sweep.load_sweep_config(_write_config(tmp_path, f"  c.base = {MICRO!r}\n  c.mu = (1,)\n  c.budget = (1e9,)\n"))
  with pytest.raises(ValueError, match="'budgets'.*required"):
    sweep.load_sweep_config(_write_config(tmp_path, f"  c.base = {MICRO!r}\n  c.mu = (1,)\n"))
  cfg = sweep.load_sweep_config(MICRO, ["--config.mu=(1,)"])
  with cfg.unlocked():
    cfg.models = {"wide": {"d_modle": 64}}
  with pytest.raises(ValueError, match=r"models\.wide\.d_modle.*did you mean 'd_model'"):
    sweep.plan_runs(cfg)


def test_models_and_quant_axes_name_runs(tmp_path):
  cfg = sweep.load_sweep_config(MICRO, ["--config.mu=(2,)", "--config.budgets=(6e8,)",
                                        "--config.quant_recipes=('bf16', 'mxfp8')"])
  with cfg.unlocked():
    cfg.models = {"d32": {"d_model": 32}, "d64": {"d_model": 64, "n_heads": 2}}
  plans = sweep.plan_runs(cfg)
  names = sorted(p["run"] for p in plans)
  assert names == ["d32_bf16_mu2_C6e08", "d32_mxfp8_mu2_C6e08", "d64_bf16_mu2_C6e08", "d64_mxfp8_mu2_C6e08"]
  wide = [p for p in plans if p["model"] == "d64"]
  assert all(p["cfg"].model.d_model == 64 for p in wide)
  assert wide[0]["flops_per_token"] > plans[0]["flops_per_token"]  # bigger model, fewer steps at equal C
  assert wide[0]["steps"] < plans[0]["steps"]
  varying = sweep._varying_fields(plans)
  assert "model.d_model" in varying and "quant.recipe" in varying and "model.mean_recurrence" not in varying


# ------------------------------------------------------------------------------------------- launch
def test_slurm_mode_writes_scripts_and_trains_nothing(tmp_path):
  out = tmp_path / "sw"
  rc = sweep.sweep_main(["--config", MICRO, "--out", str(out), "--launch", "slurm", "--config.slurm.nodes=2",
                         "--config.slurm.partition=gpu"])
  assert rc == 0
  sbatch = (out / "launch" / "sweep.sbatch").read_text()
  lines = (out / "launch" / "runs.txt").read_text().splitlines()
  plans = sweep.plan_runs(sweep.load_sweep_config(MICRO))
  assert "#SBATCH --array=0-3" in sbatch and "#SBATCH --nodes=2" in sbatch and "--partition=gpu" in sbatch
  assert "srun" in sbatch and "runs.txt" in sbatch
  assert len(lines) == 4
  for p, line in zip(plans, lines):
    assert line.startswith("parcae train --config ") and f"runs/{p['run']}'" in line
    run_cfg = config_lib.load_config(os.path.join(out, "launch", "configs", p["run"] + ".py"))
    assert run_cfg.train.steps == p["steps"] and run_cfg.model.mean_recurrence == p["mu"]
  assert not (out / "runs").exists() and not (out / "results.csv").exists()


def test_print_mode_prints_commands(tmp_path, capsys):
  assert sweep.sweep_main(["--config", MICRO, "--out", str(tmp_path), "--launch", "print"]) == 0
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed == (tmp_path / "launch" / "runs.txt").read_text().strip().splitlines()


# -------------------------------------------------------------------------------- the micro sweep
def _micro_argv(root):
  return ["--config", MICRO, "--out", os.path.join(root, "sweep")] + _shard_overrides(os.path.join(root, "data"))


def one_device_env():
  """The environment of a child process with one CPU device (the suite's processes have 8: a data-parallel mesh
  of 8 saves a tiny run's checkpoint in 0.45 s against 0.18 s on one, and these tests check nothing about it)."""
  return {**os.environ, "XLA_FLAGS": xla_flags(1)}


@pytest.fixture(scope="module")
def micro_sweep():
  """The micro sweep, trained once per test session whichever xdist worker asks first (tests that change it
  work on a copy), by `parcae sweep` in a child process with one device (this file's four sweep-running tests:
  46.9 -> 39.0 s alone on a 2-core machine, 2026-12-07)."""
  def build(root):
    write_dataset(os.path.join(root, "data"))
    subprocess.run([sys.executable, "-m", "parcae.cli", "sweep", *_micro_argv(root)], env=one_device_env(),
                   check=True, stdout=subprocess.DEVNULL, timeout=600)
  argv = _micro_argv(shared_once("micro_sweep", build))
  return argv[3], argv


def _csv_rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:test-time fit of run")  # barely trained runs: L(T) is nearly flat
def test_micro_sweep_table_loads_and_fits(micro_sweep):
  out, argv = micro_sweep
  cfg = sweep.load_sweep_config(MICRO, argv[4:])
  plans = {p["run"]: p for p in sweep.plan_runs(cfg)}
  table = results_lib.load_results(os.path.join(out, "results.csv"))
  assert sorted(table.runs()) == sorted(plans)
  for col in ("run", "mu", "params", "tokens", "flops", "loops", "val_loss", "bpb", "step", "budget", "s", "model",
              "quant_recipe", "model.mean_recurrence", "train.steps"):
    assert col in table, col
  np.testing.assert_array_equal(table["tokens"], table["step"] * 128)
  np.testing.assert_allclose(table["flops"], table["tokens"] * table["flops_per_token"], rtol=1e-12)
  assert len(np.unique(table["params"])) == 1
  for run, p in plans.items():
    rows = table.select(table["run"] == run)
    final = rows.select(rows["step"] == p["steps"])
    assert sorted(final["loops"].tolist()) == [1, 2, 3, 4]
    assert (rows["step"] < p["steps"]).any()  # in-training validation rows
    assert final["flops"][0] >= p["budget"]
  # the final rows are the run's real evaluation: recompute one independently (here on this process's 8 devices,
  # the sweep's on one: another float32 summation order, 1e-7 relative measured)
  from parcae.eval.loss import evaluate_run
  run = "mu2_C6e08"
  fresh = evaluate_run(os.path.join(out, "runs", run), loops=[1, 4])
  rows = table.select((table["run"] == run) & (table["step"] == plans[run]["steps"]))
  for r in fresh:
    np.testing.assert_allclose(rows["val_loss"][rows["loops"] == r["loops"]], r["val_loss"], rtol=1e-6)
    for k in ("rel_residual", "state_norm"):  # the loop telemetry of each evaluation reaches the table
      np.testing.assert_allclose(rows[k][rows["loops"] == r["loops"]], r[k], rtol=1e-6)
  fits = fit_lib.fit_testtime(table, n_boot=5, n_starts=16)
  assert len(fits) == 4 and all(np.isfinite(f["L_inf"]) for f in fits)
  assert fit_lib.fit_main(["--results", os.path.join(out, "results.csv"), "--law", "testtime", "--n-boot", "0"]) == 0
  if os.path.exists(os.path.join(out, "results.parquet")):
    assert len(results_lib.load_results(os.path.join(out, "results.parquet"))) == len(table)


def _snapshot(out):
  runs = os.path.join(out, "runs")
  return {r: open(os.path.join(runs, r, "metrics.jsonl")).read() for r in sorted(os.listdir(runs))}


@pytest.mark.slow
def test_rerun_skips_finished_runs(micro_sweep, capsys):
  out, argv = micro_sweep
  before = _snapshot(out)
  capsys.readouterr()
  assert sweep.sweep_main(argv) == 0
  assert "trained 0, skipped 4" in capsys.readouterr().out
  assert _snapshot(out) == before


@pytest.mark.slow
def test_partial_runs_resume(micro_sweep, tmp_path):
  out, argv = micro_sweep
  work = str(tmp_path / "sweep")
  shutil.copytree(out, work)
  cfg = sweep.load_sweep_config(MICRO, argv[4:])
  plans = {p["run"]: p for p in sweep.plan_runs(cfg)}
  # run A: killed during its final evaluation (final checkpoint written, final eval rows missing)
  # run B: killed between checkpoints (latest checkpoint 15 of 19)
  a, b = "mu2_C2.5e08", "mu1_C6e08"
  for run in (a, b):
    path = os.path.join(work, "runs", run, "metrics.jsonl")
    rows = [json.loads(l) for l in open(path)]
    keep = [r for r in rows if not (r.get("kind") == "eval" and r["step"] == plans[run]["steps"])]
    if run == b:
      keep = [r for r in keep if r["step"] <= 15]
      shutil.rmtree(os.path.join(work, "runs", run, "checkpoints", str(plans[run]["steps"])))
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in keep)
    assert not sweep.is_finished(plans[run], os.path.join(work, "runs", run))
  res = launch.run_local(cfg, work, log=lambda *_: None)
  assert sorted(res["trained"]) == sorted([a, b]) and len(res["skipped"]) == 2
  # A was evaluated, not retrained; B resumed from step 15 (its early steps are logged once)
  rows_a = [json.loads(l) for l in open(os.path.join(work, "runs", a, "metrics.jsonl"))]
  assert not any(r.get("kind") == "eval" and r["step"] == plans[a]["steps"] for r in rows_a)
  assert os.path.exists(os.path.join(work, "runs", a, "final_eval.json"))
  rows_b = [json.loads(l) for l in open(os.path.join(work, "runs", b, "metrics.jsonl"))]
  assert sum(r["step"] == 1 and r.get("kind") is None for r in rows_b) == 1
  assert all(sweep.is_finished(p, os.path.join(work, "runs", r)) for r, p in plans.items())
  old = results_lib.load_results(os.path.join(out, "results.csv"))
  new = results_lib.load_results(os.path.join(work, "results.csv"))
  assert len(new) == len(old)
  # A's re-evaluated final rows equal the original ones (the same checkpoint evaluated again, here on 8 devices
  # against the fixture's one: float32 summation order, up to 5e-8 relative measured)
  sel = lambda t: t.select((t["run"] == a) & (t["step"] == plans[a]["steps"]))
  np.testing.assert_allclose(sel(new)["val_loss"], sel(old)["val_loss"], rtol=1e-6)


def test_gpu_slots_count_within_the_parents_visible_gpus():
  assert [launch.gpu_ids(s, 2, None) for s in range(3)] == ["0,1", "2,3", "4,5"]
  assert [launch.gpu_ids(s, 2, "4,5,6,7") for s in range(2)] == ["4,5", "6,7"]
  with pytest.raises(ValueError, match="local.gpus_per_run"):
    launch.gpu_ids(2, 2, "4,5,6,7")


@pytest.mark.slow
def test_parallel_children_give_the_sequential_results(micro_sweep, tmp_path, capsys, monkeypatch):
  """local.parallel=2: the runs (here mu = 1's two) train at once in child processes, each pinned to its own
  GPU slot (CUDA_VISIBLE_DEVICES), with the sequential sweep's results; a run that fails (its directory holds
  another config) is reported with exit code 1 while the other finishes, and `--run` names bad runs."""
  out, argv = micro_sweep
  monkeypatch.setenv("XLA_FLAGS", xla_flags(1))  # the children: one device, as the sequential sweep had
  work = str(tmp_path / "sweep")
  par = [a if a != out else work for a in argv] + ["--config.mu=(1,)", "--config.local.parallel=2",
                                                   "--config.local.gpus_per_run=1"]
  plans = {p["run"]: p for p in sweep.plan_runs(sweep.load_sweep_config(MICRO, [a for a in par if "--config." in a]))}
  bad = "mu1_C6e08"
  assert sorted(plans) == ["mu1_C2.5e08", bad]
  os.makedirs(os.path.join(work, "runs", bad))
  with open(os.path.join(work, "runs", bad, "config.json"), "w") as f:
    f.write(json.dumps({"train": {"seed": 12345}}))
  capsys.readouterr()
  assert sweep.sweep_main(par) == 1
  assert f"1 runs failed: ['{bad}']" in capsys.readouterr().err
  logs = os.path.join(work, "launch", "logs")
  assert "different config" in open(os.path.join(logs, bad + ".log")).read()
  slots = {open(os.path.join(logs, r + ".log")).readline().split("CUDA_VISIBLE_DEVICES=")[1].strip() for r in plans}
  assert slots == {"0", "1"}
  key = lambda t: sorted(zip(t["run"], t["step"], t["loops"], t["val_loss"]))
  old = [r for r in key(results_lib.load_results(os.path.join(out, "results.csv"))) if r[0] == "mu1_C2.5e08"]
  new = key(results_lib.load_results(os.path.join(work, "results.csv")))
  assert [r[:3] for r in new] == [r[:3] for r in old] and new
  np.testing.assert_array_equal([r[3] for r in new], [r[3] for r in old])  # same programs, same numbers
  assert sweep.sweep_main(argv[:2] + ["--out", work, "--run", "mu9"] + argv[4:]) == 2
  assert "not a run of this sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_to_a_parallel_sweep_checkpoints_its_children(tmp_path):
  """SIGTERM to the parent of a parallel sweep reaches the children: each saves a checkpoint at the step it
  was on and exits, unfinished; the parent exits with 1 once they are done (one child here, to keep it short)."""
  import time
  write_dataset(str(tmp_path / "data"))
  work = str(tmp_path / "sweep")
  args = _micro_argv(str(tmp_path)) + ["--config.local.parallel=2", "--config.budgets=(2e10,)",
                                                    "--config.intermediate_evals=0", "--config.mu=(1,)"]
  plans = sweep.plan_runs(sweep.load_sweep_config(MICRO, [a for a in args if a.startswith("--config.")]))
  assert len(plans) == 1 and plans[0]["steps"] > 300  # a run long enough to be caught midway
  parent = subprocess.Popen([sys.executable, "-m", "parcae.cli", "sweep", *args], stderr=subprocess.PIPE, text=True,
                            env=one_device_env())

  def rows(p):
    path = os.path.join(work, "runs", p["run"], "metrics.jsonl")
    return [r for r in sweep._read_jsonl(path) if r.get("kind") is None] if os.path.exists(path) else []
  deadline = time.time() + 180
  while not all(rows(p) and rows(p)[-1]["step"] >= 10 for p in plans):
    assert parent.poll() is None and time.time() < deadline, "the children did not start training"
    time.sleep(0.5)
  parent.send_signal(signal.SIGTERM)
  _, err = parent.communicate(timeout=180)
  assert parent.returncode == 1 and "1 stopped by a signal" in err, err
  for p in plans:
    workdir = os.path.join(work, "runs", p["run"])
    assert not sweep.is_finished(p, workdir)
    last = rows(p)[-1]["step"]
    assert 10 <= last < p["steps"] and sweep._checkpoint_steps(workdir)[-1] == last  # saved where it stopped


def test_run_configs_written_before_a_new_field_still_match(tmp_path):
  """A run directory whose config.json predates a config field (here model.block_remat) is the same run
  when the plan holds that field's default, and a different run when it does not."""
  from parcae.model import size_config
  from parcae.scaling import sweep as sw
  from parcae.train.config import default_config
  cfg = default_config(size_config("parcae", "small"))
  old = json.loads(cfg.to_json_best_effort())
  del old["model"]["block_remat"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  sw._check_same_config({"cfg": cfg, "run": "r0"}, str(tmp_path))  # pylint: disable=protected-access
  cfg.model.block_remat = "full"
  with pytest.raises(ValueError, match="model.block_remat"):
    sw._check_same_config({"cfg": cfg, "run": "r0"}, str(tmp_path))  # pylint: disable=protected-access
  from parcae.eval.loss import load_run_config
  assert load_run_config(str(tmp_path)).model.block_remat == "none"
  # kernel choices (model.*_impl, quant.impl) are the same run: a run written before qkv_impl's default became
  # "auto" resumes; the quantization recipe is not a kernel choice
  cfg.model.block_remat = "none"
  old["model"]["qkv_impl"], old["quant"]["impl"] = "xla", "jnp"
  (tmp_path / "config.json").write_text(json.dumps(old))
  sw._check_same_config({"cfg": cfg, "run": "r0"}, str(tmp_path))  # pylint: disable=protected-access
  cfg.quant.recipe = "mxfp8"
  with pytest.raises(ValueError, match=r"\['quant.recipe'\]"):
    sw._check_same_config({"cfg": cfg, "run": "r0"}, str(tmp_path))  # pylint: disable=protected-access
  assert load_run_config(str(tmp_path)).model.d_model == 768
