"""How a sweep's runs are executed: one after another in this process, several at once in child processes,
or on a SLURM cluster from generated scripts. The plan, run status and results table are `sweep.py`'s.

  run_local     --launch local, local.parallel = 1: each run trained in this process (`sweep.run_one`).
  run_parallel  --launch local, local.parallel = N > 1: N child processes at a time, each `parcae sweep ...
                --run NAME` (the same `run_one`), pinned to its own GPUs with local.gpus_per_run, its output in
                <out>/launch/logs/<run>.log. A failed run is reported and the others go on; rerunning the sweep
                resumes it. SIGTERM to the parent reaches the children (each checkpoints and exits). The parent
                never touches an accelerator.
  write_launch  --launch slurm | print: per-run config files, runs.txt and a SLURM array script.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from parcae.scaling import sweep


# ------------------------------------------------------------------------------------- this machine
def run_local(cfg, out_dir: str, log=print) -> dict:
  """Train every unfinished run in order; rewrite results.csv after each. Returns trained/skipped names."""
  plans = sweep.plan_runs(cfg)
  done = {"trained": [], "skipped": [], "failed": [], "stopped": []}
  start = time.time()
  for i, p in enumerate(plans):
    t0 = time.time()
    status = sweep.run_one(p, _workdir(out_dir, p))
    done[status].append(p["run"])
    log(f"[{i + 1}/{len(plans)}] {p['run']}: {status} (steps {p['steps']}, {time.time() - t0:.0f} s)")
    sweep.write_results(sweep.collect_rows(plans, out_dir), out_dir)
  return _finish(done, start, out_dir)


def run_parallel(cfg, out_dir: str, sweep_argv: list[str], log=print) -> dict:
  """Train the unfinished runs cfg.local.parallel at a time, each in a child `parcae sweep <sweep_argv> --out
  out_dir --run NAME`; rewrite results.csv after each. SIGTERM is passed on to the children (each saves a
  checkpoint and exits); SIGTERM or SIGINT (which a terminal sends to the children itself) starts no new run.
  Returns trained / skipped / failed / stopped run names."""
  plans = sweep.plan_runs(cfg)
  done = {"trained": [], "skipped": [], "failed": [], "stopped": []}
  todo = []
  for p in plans:
    (done["skipped"] if sweep.is_finished(p, _workdir(out_dir, p)) else todo).append(p)
  gpu_ids(cfg.local.parallel - 1, cfg.local.gpus_per_run, os.environ.get("CUDA_VISIBLE_DEVICES"))  # enough GPUs?
  logs = os.path.join(out_dir, "launch", "logs")
  os.makedirs(logs, exist_ok=True)
  free, running, start, signals = list(range(cfg.local.parallel)), {}, time.time(), []

  def on_signal(signum, frame):
    signals.append(signum)
    if signum == signal.SIGTERM:
      for proc in running:
        proc.send_signal(signum)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while (todo and not signals) or running:
      while todo and free and not signals:
        p, slot = todo.pop(0), free.pop(0)
        proc, log_file = _start_child(p, slot, cfg.local.gpus_per_run, out_dir, sweep_argv, logs)
        running[proc] = (p, slot, log_file, time.time())
      time.sleep(0.2)
      for proc in [q for q in running if q.poll() is not None]:
        p, slot, log_file, t0 = running.pop(proc)
        log_file.close()
        free.append(slot)
        status = "trained" if proc.returncode == 0 else "stopped" if signals else "failed"
        done[status].append(p["run"])
        log(f"{p['run']}: {status if status != 'failed' else f'FAILED (exit {proc.returncode})'} on slot {slot} "
            f"(steps {p['steps']}, {time.time() - t0:.0f} s; log {os.path.join(logs, p['run'] + '.log')})")
        sweep.write_results(sweep.collect_rows(plans, out_dir), out_dir)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    for proc in running:  # an exception here: let the children finish their checkpoint
      proc.wait()
  done["stopped"] += [p["run"] for p in todo] if signals else []
  return _finish(done, start, out_dir)


def gpu_ids(slot: int, gpus_per_run: int, visible: str | None) -> str:
  """CUDA_VISIBLE_DEVICES of the child in `slot`: its gpus_per_run GPUs, counted within the parent's own
  CUDA_VISIBLE_DEVICES when that is set (a job given GPUs 4-7 hands out 4-7, not 0-3)."""
  pool = visible.split(",") if visible else None
  lo, hi = slot * gpus_per_run, (slot + 1) * gpus_per_run
  if pool is not None and hi > len(pool):
    raise ValueError(f"local.parallel x local.gpus_per_run needs {hi} GPUs but CUDA_VISIBLE_DEVICES={visible} "
                     f"lists {len(pool)}; lower local.parallel or local.gpus_per_run")
  return ",".join(pool[lo:hi] if pool is not None else [str(i) for i in range(lo, hi)])


def _start_child(plan, slot, gpus_per_run, out_dir, sweep_argv, logs):
  env = dict(os.environ)
  if gpus_per_run:
    env["CUDA_VISIBLE_DEVICES"] = gpu_ids(slot, gpus_per_run, os.environ.get("CUDA_VISIBLE_DEVICES"))
  log = open(os.path.join(logs, plan["run"] + ".log"), "a")
  log.write(f"# parcae sweep: run {plan['run']} on slot {slot}, "
            f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '(unset)')}\n")
  log.flush()
  argv = [sys.executable, "-m", "parcae.cli", "sweep", *sweep_argv, "--out", out_dir, "--run", plan["run"]]
  return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _workdir(out_dir, plan):
  return os.path.join(out_dir, "runs", plan["run"])


def _finish(done, start, out_dir):
  done["wall_s"] = time.time() - start
  done["results"] = os.path.join(out_dir, "results.csv")
  return done


# ------------------------------------------------------------------------------------------- SLURM
def _shell_quote(s: str) -> str:
  return "'" + s.replace("'", "'\\''") + "'"


def write_launch(cfg, plans, out_dir: str) -> dict:
  """Per-run config files, runs.txt (one `parcae train` command per run) and the SLURM array script."""
  out_dir = os.path.abspath(out_dir)
  launch = os.path.join(out_dir, "launch")
  os.makedirs(os.path.join(launch, "configs"), exist_ok=True)
  os.makedirs(os.path.join(launch, "logs"), exist_ok=True)
  commands = []
  for p in plans:
    stem = os.path.join(launch, "configs", p["run"])
    with open(stem + ".json", "w") as f:
      f.write(p["cfg"].to_json_best_effort(indent=2))
    with open(stem + ".py", "w") as f:
      f.write(_RUN_CONFIG_PY.format(run=p["run"]))
    commands.append(f"{cfg.slurm.command} train --config {_shell_quote(stem + '.py')} --workdir "
                    f"{_shell_quote(os.path.join(out_dir, 'runs', p['run']))} --no-progress")
  runs_txt = os.path.join(launch, "runs.txt")
  with open(runs_txt, "w") as f:
    f.write("\n".join(commands) + "\n")
  sl = cfg.slurm
  throttle = f"%{sl.max_parallel}" if sl.max_parallel else ""
  lines = ["#!/bin/bash", f"#SBATCH --job-name=parcae-sweep", f"#SBATCH --array=0-{len(plans) - 1}{throttle}",
           f"#SBATCH --nodes={sl.nodes}", "#SBATCH --ntasks-per-node=1", f"#SBATCH --time={sl.time}",
           f"#SBATCH --output={launch}/logs/%A_%a.out"]
  lines += [f"#SBATCH --gpus-per-node={sl.gpus_per_node}"] if sl.gpus_per_node else []
  lines += [f"#SBATCH --partition={sl.partition}"] if sl.partition else []
  lines += [f"#SBATCH --account={sl.account}"] if sl.account else []
  lines += ["# One array task per run (line SLURM_ARRAY_TASK_ID + 1 of runs.txt); srun starts one process per",
            "# host and the trainer joins them with jax.distributed from the SLURM variables.",
            "set -euo pipefail", sl.setup,
            f'CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {_shell_quote(runs_txt)})',
            "export JAX_COORDINATOR_PORT=$((12355 + SLURM_ARRAY_TASK_ID % 1000))",
            'srun --ntasks-per-node=1 bash -c "$CMD"', ""]
  sbatch = os.path.join(launch, "sweep.sbatch")
  with open(sbatch, "w") as f:
    f.write("\n".join(lines))
  return {"sbatch": sbatch, "runs_txt": runs_txt, "commands": commands}


_RUN_CONFIG_PY = '''"""Run {run} of a `parcae sweep` (generated; edit the sweep config and rerun `parcae sweep`, not this)."""
import json
import os

from parcae.train.config import with_defaults


def get_config():
  with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "{run}.json")) as f:
    return with_defaults(json.load(f))  # fields added to the framework since: their defaults
'''
