"""`parcae sweep`: train a grid of runs under FLOP budgets and collect one tidy results table.

A sweep config (configs/sweeps/*.py) has `get_config()` returning the fields of `default_sweep_config()` (each
documented there); `base`, `mu` and `budgets` are required. The grid is models x quant_recipes x mu x budgets.

Per run: s = ceil(mu / 2) unless `backprop_depth` is set; FLOPs per token F from parcae.scaling.flops in the
chosen convention (reference: the reference's cost accounting with its attention term at block size =
train.seq_len; executed: the work a train step does, with the sampler's expected depths); token budget D = C / F;
train.steps = ceil(D / tokens_per_step), rounded *up* so every run spends at least its budget (the overshoot is
less than one step). The table records the tokens and FLOPs actually used (steps * tokens_per_step [* F]).

Modes (`--launch`; how each is carried out: `launch.py`):
  local  train the runs in `<out>/runs/<run>/`: one after another in this process, or `local.parallel` at a
         time in child processes, each pinned to its own GPUs (`local.gpus_per_run`). A run is finished when
         its eval rows exist for every requested loop count at its final step; finished runs are skipped,
         partly trained runs resume from their checkpoints (the trainer's resume) if their config.json holds
         the plan's config, kernel choices (model.*_impl, quant.impl) aside. results.csv is rewritten
         after every run. `--run NAME` trains that one run only.
  slurm  write `<out>/launch/sweep.sbatch` (a SLURM array, one task per run, `parcae train` under srun, so a
         task may span several hosts) and `<out>/launch/runs.txt` (one `parcae train` command per line), run
         nothing. After the array job: `parcae sweep --config X --out D --collect` writes the table.
  print  write the same files and print the commands.

Results: `<out>/results.csv` (and results.parquet when pyarrow is installed), one row per run x step x
test-time loop count: intermediate steps from the in-training validations in metrics.jsonl (the learning
rate has not cooled down there), the final step at every `eval_loops` value. Loads with
parcae.scaling.results.load_results and fits with `parcae fit`.
"""
from __future__ import annotations

import argparse
import copy
import csv
import difflib
import json
import math
import os
import sys

import ml_collections

from parcae import config as config_lib
from parcae.scaling import flops as flops_lib
from parcae.train.config import with_defaults

CONVENTIONS = ("reference", "executed")
LAUNCH_MODES = ("local", "slurm", "print")
REQUIRED = ("base", "mu", "budgets")
FIRST_COLUMNS = ("run", "model", "quant_recipe", "mu", "s", "budget", "params", "tokens", "flops", "loops",
                 "val_loss", "bpb", "rel_residual", "state_norm", "step", "steps", "tokens_per_step", "flops_per_token",
                 "flops_convention")


def default_sweep_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = ""  # run config: path of a config file (configs/*.py) or an embedded full run ConfigDict
  c.base_overrides = ()  # `section.field=value` overrides applied to a base given as a path
  c.mu = ()  # mean training recurrences (model.mean_recurrence), integers >= 1
  c.backprop_depth = 0  # s (model.mean_backprop_depth) of every run; 0 = ceil(mu / 2)
  c.budgets = ()  # training FLOP budgets C, one run per (mu, budget)
  c.flops_convention = "reference"  # FLOPs per token for D = C / F: "reference" | "executed"
  c.models = ml_collections.ConfigDict()  # optional axis: name -> {model field: value}; empty = the base model
  c.quant_recipes = ()  # optional axis: quant.recipe values; empty = the base's recipe
  c.eval_loops = "1-24"  # test-time loop counts at the final step: "1-24" (range), "1,2,4,8", "2mu" (1..2mu)
  c.intermediate_evals = 2  # in-training validations per run: every floor(steps / (n + 1)) steps (n or n + 1)
  c.min_steps = 10  # refuse a budget that gives a run fewer optimizer steps than this
  c.out = "runs/sweep"  # output directory (--out overrides)
  c.local = ml_collections.ConfigDict()
  c.local.parallel = 1  # runs trained at once by --launch local: 1 = in this process; N = N child processes
  c.local.gpus_per_run = 0  # with parallel > 1: GPUs per child (CUDA_VISIBLE_DEVICES); 0 = no pinning (CPU)
  c.slurm = ml_collections.ConfigDict()
  c.slurm.nodes = 1  # hosts per run (the trainer initializes jax.distributed from the SLURM variables)
  c.slurm.gpus_per_node = 8  # GPUs per host (0 = no --gpus-per-node line)
  c.slurm.time = "24:00:00"  # wall-time limit per run
  c.slurm.partition = ""  # partition ("" = the cluster default)
  c.slurm.account = ""  # account ("" = none)
  c.slurm.max_parallel = 0  # runs at once (the array's %N throttle; 0 = no limit)
  c.slurm.setup = ""  # shell lines run before training (module load, source .venv/bin/activate, ...)
  c.slurm.command = "parcae"  # the parcae executable on the cluster
  return c


# ------------------------------------------------------------------------------------------ config
def _fail(field, problem, fix):
  raise ValueError(f"sweep config field {field!r}: {problem}; {fix}")


def _merge(user) -> ml_collections.ConfigDict:
  """Defaults overlaid with the user's fields; unknown fields fail with the closest known name."""
  merged = default_sweep_config().to_dict()
  for key in user.keys():
    if key not in merged:
      close = difflib.get_close_matches(key, list(merged), n=1)
      _fail(key, "unknown field", f"did you mean {close[0]!r}?" if close else f"known fields: {sorted(merged)}")
    value = user[key]
    merged[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    if key in ("local", "slurm"):
      merged[key] = {**default_sweep_config()[key].to_dict(), **merged[key]}
  return ml_collections.ConfigDict(merged)


def load_sweep_config(path: str, overrides=()) -> ml_collections.ConfigDict:
  """Load configs/sweeps/X.py, apply `--config.a.b=value` overrides and validate (errors name the field)."""
  user = config_lib.load_module(path).get_config()
  cfg = _merge(user)  # unknown fields first: a misspelt required field is reported as a typo
  missing = [k for k in REQUIRED if k not in user]
  if missing:
    _fail(missing[0], "is required", f"set it in {path}'s get_config() (see default_sweep_config())")
  for item in overrides:
    config_lib.apply_override(cfg, item)
  validate_sweep_config(cfg)
  return cfg


def _int_list(field, values, lo=1):
  values = list(values) if isinstance(values, (list, tuple)) else [values]
  ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v >= lo
  if not values or not all(ok(v) for v in values):
    _fail(field, f"{values!r} must be a non-empty list of integers >= {lo}", f"e.g. {field}=(1, 2, 4, 8)")
  if len(set(values)) != len(values):
    _fail(field, f"{values!r} has duplicates", "list each value once")
  return [int(v) for v in values]


def parse_eval_loops(spec, mu: int) -> list[int]:
  """'1-24' -> 1..24, '1,2,4' -> [1, 2, 4], '2mu' -> 1..2mu; a list/tuple of ints is taken as is."""
  if isinstance(spec, (list, tuple)):
    return sorted(_int_list("eval_loops", spec))
  text = str(spec).replace(" ", "")
  try:
    if text == "2mu":
      return list(range(1, 2 * mu + 1))
    if "-" in text:
      lo, hi = (int(t) for t in text.split("-"))
      loops = list(range(lo, hi + 1))
    else:
      loops = [int(t) for t in text.split(",") if t]
  except ValueError:
    loops = []
  if not loops or min(loops) < 1:
    _fail("eval_loops", f"{spec!r} is not a loop-count list", "use '1-24', '1,2,4,8', '2mu' or a tuple of ints >= 1")
  return sorted(set(loops))


def validate_sweep_config(cfg) -> None:
  if not isinstance(cfg.base, ml_collections.ConfigDict) and not (isinstance(cfg.base, str) and cfg.base):
    _fail("base", f"{cfg.base!r} is neither a config path nor a run ConfigDict",
          "set base='configs/<recipe>.py' or an embedded full run config")
  if isinstance(cfg.base, str) and not os.path.isfile(cfg.base):
    _fail("base", f"file {cfg.base!r} does not exist", "give a path relative to the working directory")
  _int_list("mu", cfg.mu)
  budgets = list(cfg.budgets) if isinstance(cfg.budgets, (list, tuple)) else [cfg.budgets]
  if not budgets or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0 for b in budgets):
    _fail("budgets", f"{cfg.budgets!r} must be a non-empty list of FLOP counts > 0", "e.g. budgets=(1e18, 2e18)")
  if len(set(budgets)) != len(budgets):
    _fail("budgets", f"{cfg.budgets!r} has duplicates", "list each budget once")
  if cfg.flops_convention not in CONVENTIONS:
    _fail("flops_convention", f"{cfg.flops_convention!r} is not supported", f"choose one of {list(CONVENTIONS)}")
  if not isinstance(cfg.backprop_depth, int) or cfg.backprop_depth < 0:
    _fail("backprop_depth", f"{cfg.backprop_depth!r} must be an integer >= 0", "0 means ceil(mu / 2)")
  for field in ("intermediate_evals", "min_steps"):
    if not isinstance(cfg[field], int) or cfg[field] < 0:
      _fail(field, f"{cfg[field]!r} must be an integer >= 0", f"e.g. {field}=2")
  if not isinstance(cfg.models, ml_collections.ConfigDict):
    _fail("models", f"{cfg.models!r} is not a mapping", "use {'name': {'d_model': 512, ...}, ...} or {}")
  for name, over in cfg.models.items():
    if not isinstance(over, ml_collections.ConfigDict):
      _fail(f"models.{name}", f"{over!r} is not a mapping of model fields", "e.g. {'d_model': 512}")
  recipes = list(cfg.quant_recipes) if isinstance(cfg.quant_recipes, (list, tuple)) else [cfg.quant_recipes]
  if len(set(recipes)) != len(recipes):
    _fail("quant_recipes", f"{recipes!r} has duplicates", "list each recipe once")
  parse_eval_loops(cfg.eval_loops, 1)
  if not isinstance(cfg.slurm.nodes, int) or cfg.slurm.nodes < 1:
    _fail("slurm.nodes", f"{cfg.slurm.nodes!r} must be an integer >= 1", "e.g. slurm.nodes=2")
  if not isinstance(cfg.local.parallel, int) or cfg.local.parallel < 1:
    _fail("local.parallel", f"{cfg.local.parallel!r} must be an integer >= 1", "e.g. local.parallel=8")
  if not isinstance(cfg.local.gpus_per_run, int) or cfg.local.gpus_per_run < 0:
    _fail("local.gpus_per_run", f"{cfg.local.gpus_per_run!r} must be an integer >= 0", "e.g. local.gpus_per_run=1")


# -------------------------------------------------------------------------------------------- plan
def base_run_config(cfg) -> ml_collections.ConfigDict:
  if isinstance(cfg.base, str):
    return config_lib.load_config(cfg.base, [str(o) for o in cfg.base_overrides])
  if cfg.base_overrides:
    _fail("base_overrides", "only applies to a base given as a path", "edit the embedded base directly")
  return copy.deepcopy(cfg.base)


def _set_model_fields(run_cfg, name, over) -> None:
  for key, value in over.items():
    if key not in run_cfg.model:
      close = difflib.get_close_matches(key, list(run_cfg.model.keys()), n=1)
      _fail(f"models.{name}.{key}", "is not a model config field",
            f"did you mean {close[0]!r}?" if close else "see parcae.model.config.default_model_config")
    with run_cfg.model.unlocked():
      run_cfg.model[key] = value


def flops_per_token(model_cfg, seq_len: int, convention: str) -> float:
  """FLOPs per training token; the reference convention's attention term uses block size = seq_len."""
  if convention == "reference":
    return flops_lib.reference_flops_per_token(model_cfg, block_size=seq_len)
  return flops_lib.executed_flops_per_token(model_cfg, seq_len)


def budget_steps(budget: float, fpt: float, tokens_per_step: int) -> int:
  """train.steps for FLOP budget C: ceil(C / F / tokens_per_step) (at least the budget is spent)."""
  return max(1, math.ceil(budget / fpt / tokens_per_step - 1e-9))


def _budget_tag(budget: float) -> str:
  return f"C{budget:.3g}".replace("+", "")


def plan_runs(cfg) -> list[dict]:
  """Every run of the grid: name, axes, its full run config, steps, FLOPs per token, params."""
  base = base_run_config(cfg)
  if base.model.kind != "parcae":
    _fail("base", f"model.kind={base.model.kind!r}", "a recurrence sweep needs model.kind='parcae'")
  models = dict(cfg.models.items()) or {"base": ml_collections.ConfigDict()}
  recipes = list(cfg.quant_recipes) or [base.quant.recipe]
  plans = []
  for model_name, over in models.items():
    for recipe in recipes:
      for mu in _int_list("mu", cfg.mu):
        for budget in cfg.budgets:
          plans.append(_plan_one(cfg, base, model_name, over, recipe, mu, float(budget)))
  return plans


def _plan_one(cfg, base, model_name, over, recipe, mu, budget) -> dict:
  parts = ([model_name] if cfg.models else []) + ([recipe] if cfg.quant_recipes else [])
  name = "_".join(parts + [f"mu{mu}", _budget_tag(budget)])
  run = copy.deepcopy(base)
  _set_model_fields(run, model_name, over)
  s = cfg.backprop_depth or math.ceil(mu / 2)
  loops = parse_eval_loops(cfg.eval_loops, mu)
  tc = run.train
  tokens_per_step = tc.micro_batch_size * tc.grad_accum * tc.seq_len
  with run.unlocked():
    run.model.mean_recurrence, run.model.mean_backprop_depth = mu, s
    run.quant.recipe = recipe
    run.wandb.name = name
  fpt = flops_per_token(run.model, tc.seq_len, cfg.flops_convention)
  steps = budget_steps(budget, fpt, tokens_per_step)
  if steps < cfg.min_steps:
    _fail("budgets", f"C={budget:.3g} gives run {name} only {steps} step(s) of {tokens_per_step} tokens "
          f"(F={fpt:.4g} FLOPs/token)", f"raise the budget, lower the batch or lower min_steps={cfg.min_steps}")
  with run.unlocked():
    tc.steps = steps
    tc.eval_loops = tuple(loops)
    tc.eval_every = steps // (cfg.intermediate_evals + 1) if cfg.intermediate_evals else 0
  config_lib.validate(run)
  params = flops_lib.param_counts(run.model)
  return {"run": name, "model": model_name, "quant_recipe": recipe, "mu": mu, "s": s, "budget": budget,
          "params": params["params_total"], "steps": steps, "tokens_per_step": tokens_per_step,
          "flops_per_token": fpt, "flops_convention": cfg.flops_convention, "eval_loops": loops, "cfg": run}


# ------------------------------------------------------------------------------------- run status
def _read_jsonl(path):
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:  # a line cut short by a kill
        pass
  return rows


def eval_rows_by_step(workdir: str) -> dict[int, dict[int, dict]]:
  """{step: {loops: row}} from metrics.jsonl eval rows and final_eval.json (later rows win, so a resumed
  run's re-evaluated steps replace the old ones)."""
  out = {}
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  path = os.path.join(workdir, "final_eval.json")
  if os.path.isfile(path):
    with open(path) as f:
      rows += json.load(f)
  for r in rows:
    if r.get("kind", "eval") == "eval" and "loops" in r:
      out.setdefault(int(r["step"]), {})[int(r["loops"])] = r
  return out


def is_finished(plan: dict, workdir: str) -> bool:
  final = eval_rows_by_step(workdir).get(plan["steps"], {})
  return all(t in final for t in plan["eval_loops"])


def _checkpoint_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _is_kernel_choice(key: str) -> bool:
  """model.*_impl and quant.impl pick kernels for the same computation (float32 rounding apart), like running on
  another GPU: a run resumed with another choice (a default changed since, say) is still the same run."""
  return key == "quant.impl" or (key.startswith("model.") and key.endswith("_impl"))


def _check_same_config(plan: dict, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    old = _flatten(json.loads(with_defaults(json.load(f)).to_json_best_effort()))  # fields added since: defaults
  new = _flatten(json.loads(plan["cfg"].to_json_best_effort()))
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not _is_kernel_choice(k))
  if keys:
    raise ValueError(f"{workdir} holds run {plan['run']} with a different config (fields {keys[:6]}); "
                     "use another --out or delete that run directory")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def run_one(plan: dict, workdir: str) -> str:
  """Train (or resume) one run and make sure its final eval rows exist. Returns 'skipped' | 'trained'."""
  if is_finished(plan, workdir):
    return "skipped"
  _check_same_config(plan, workdir)
  if plan["steps"] not in _checkpoint_steps(workdir):
    from parcae.train.loop import train
    summary = train(plan["cfg"], workdir, progress=False)
    if summary["stopped"]:
      raise RuntimeError(f"run {plan['run']} stopped early ({summary['stopped']}); rerun the sweep to resume")
  if not is_finished(plan, workdir):  # trained, but the final evaluation is missing (e.g. killed during it)
    from parcae.eval.loss import evaluate_run
    rows = evaluate_run(workdir, loops=plan["eval_loops"], step=plan["steps"])
    with open(os.path.join(workdir, "final_eval.json"), "w") as f:
      json.dump(rows, f, indent=2)
  return "trained"


# ----------------------------------------------------------------------------------------- results
def _varying_fields(plans) -> dict[str, list]:
  """Dotted run-config fields whose value differs between runs (wandb.name excluded)."""
  flat = [_flatten(json.loads(p["cfg"].to_json_best_effort())) for p in plans]
  keys = sorted(set().union(*flat)) if flat else []
  out = {}
  for k in keys:
    values = [f.get(k) for f in flat]
    if k != "wandb.name" and len({repr(v) for v in values}) > 1:
      out[k] = values
  return out


def collect_rows(plans, out_dir: str) -> list[dict]:
  """One row per run x evaluated step x loop count, for runs that have eval rows."""
  varying = _varying_fields(plans)
  rows = []
  for i, p in enumerate(plans):
    by_step = eval_rows_by_step(os.path.join(out_dir, "runs", p["run"]))
    for step in sorted(by_step):
      if step > p["steps"]:
        continue
      for loops in sorted(by_step[step]):
        r = by_step[step][loops]
        tokens = step * p["tokens_per_step"]
        bpb = r.get("bpb")
        row = {"run": p["run"], "model": p["model"], "quant_recipe": p["quant_recipe"], "mu": p["mu"],
               "s": p["s"], "budget": p["budget"], "params": p["params"], "tokens": tokens,
               "flops": tokens * p["flops_per_token"], "loops": loops,
               "val_loss": float("nan") if r.get("val_loss") is None else r["val_loss"],
               "bpb": float("nan") if bpb is None else bpb,
               **{k: r.get(k, float("nan")) for k in ("rel_residual", "state_norm")}, "step": step, "steps": p["steps"],
               "tokens_per_step": p["tokens_per_step"], "flops_per_token": p["flops_per_token"],
               "flops_convention": p["flops_convention"]}
        for k, values in varying.items():
          v = values[i]
          row[k] = v if isinstance(v, (int, float, str)) or v is None else json.dumps(v)
        rows.append(row)
  return rows


def write_results(rows: list[dict], out_dir: str) -> list[str]:
  """<out>/results.csv (and .parquet when pyarrow is installed); returns the paths written."""
  if not rows:
    return []
  columns = list(FIRST_COLUMNS) + [k for k in rows[0] if k not in FIRST_COLUMNS]
  path = os.path.join(out_dir, "results.csv")
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)
  os.replace(tmp, path)
  paths = [path]
  try:
    import pyarrow as pa
    import pyarrow.parquet as pq
  except ImportError:
    return paths
  pq.write_table(pa.table({c: [r[c] for r in rows] for c in columns}), os.path.join(out_dir, "results.parquet"))
  return paths + [os.path.join(out_dir, "results.parquet")]


# ---------------------------------------------------------------------------------------------- CLI
def _parser():
  p = argparse.ArgumentParser(prog="parcae sweep", description="Train a mu x FLOP-budget grid; write results.csv.")
  p.add_argument("--config", required=True, help="sweep config, e.g. configs/sweeps/small_cpu.py")
  p.add_argument("--out", default=None, help="output directory (default: the config's `out`)")
  p.add_argument("--launch", default="local", choices=LAUNCH_MODES, help="local: train here; slurm/print: "
                 "write launch scripts only")
  p.add_argument("--collect", action="store_true", help="train nothing; write results.csv from finished runs")
  p.add_argument("--run", default=None, help="train only this run (a name from the plan), in this process")
  return p


def sweep_main(argv) -> int:
  """`parcae sweep --config configs/sweeps/X.py [--out DIR] [--launch local|slurm|print] [--collect]
  [--config.FIELD=VALUE ...]`. Exit code 0 on success, 2 on bad input (one line on stderr)."""
  rest = [a for a in argv if not a.startswith("--config.")]
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args(rest)
  try:
    cfg = load_sweep_config(args.config, overrides)
    out_dir = args.out or cfg.out
    os.makedirs(out_dir, exist_ok=True)
    plans = plan_runs(cfg)
    if args.collect:
      paths = write_results(collect_rows(plans, out_dir), out_dir)
      unfinished = [p["run"] for p in plans if not is_finished(p, os.path.join(out_dir, "runs", p["run"]))]
      print(f"wrote {paths or 'nothing (no run has eval rows yet)'}; unfinished runs: {unfinished or 'none'}")
      return 0
    if args.run is not None:
      by_name = {p["run"]: p for p in plans}
      if args.run not in by_name:
        raise ValueError(f"--run {args.run!r} is not a run of this sweep; its runs: {sorted(by_name)}")
      print(f"{args.run}: {run_one(by_name[args.run], os.path.join(out_dir, 'runs', args.run))}")
      return 0
    from parcae.scaling import launch
    if args.launch != "local":
      info = launch.write_launch(cfg, plans, out_dir)
      if args.launch == "print":
        print("\n".join(info["commands"]))
      print(f"wrote {info['sbatch']} and {info['runs_txt']} ({len(plans)} runs). Submit: sbatch {info['sbatch']}; "
            f"then: parcae sweep --config {args.config} --out {out_dir} --collect", file=sys.stderr)
      return 0
    if cfg.local.parallel > 1:
      done = launch.run_parallel(cfg, out_dir, ["--config", args.config, *overrides])
    else:
      done = launch.run_local(cfg, out_dir)
  except (ValueError, FileNotFoundError) as err:
    print(f"parcae sweep: error: {err}", file=sys.stderr)
    return 2
  print(f"sweep done in {done['wall_s']:.0f} s: trained {len(done['trained'])}, skipped {len(done['skipped'])} "
        f"(finished earlier); results: {done['results']}")
  if done["failed"] or done["stopped"]:
    print(f"parcae sweep: {len(done['failed'])} runs failed: {done['failed']}, {len(done['stopped'])} stopped by a "
          f"signal: {done['stopped']} (logs in {out_dir}/launch/logs; rerun the sweep to resume them)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(sweep_main(sys.argv[1:]))
