"""Train a tiny Parcae on CPU with each quantization recipe and compare the losses to bf16.

  PYTHONPATH=$PWD python bench/quant_training_cpu.py                       # demo_cpu model, 300 steps
  PYTHONPATH=$PWD python bench/quant_training_cpu.py --steps 20 --recipes bf16,quartet   # quick look

Every recipe trains the same model (configs/demo_cpu.py unless --config) from the same seed on the same
data order (the embedded corpus) through the real trainer (`parcae.train.loop.train`), one CPU device.
Per recipe it records the first and final train loss (final = mean of the last --tail logged steps, the
single last step too), the validation loss at each eval loop count (the recipe's own quantized forward),
and the wall time. Checks: finite losses and final < initial for every recipe (exit status 1 otherwise).
Prints the loss gap to bf16 and writes <workdir>/quant_training_cpu.json (and $OUT/... when $OUT is set).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

DEFAULT_RECIPES = ("bf16", "mxfp8", "nvfp4", "quartet")


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def read_rows(workdir):
  train_rows, eval_rows = {}, []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r.get("kind") == "eval":
        eval_rows.append(r)
      else:
        train_rows[r["step"]] = r
  return train_rows, eval_rows


def run_recipe(cfg, recipe, workdir, tail):
  """Train one recipe from scratch in `workdir`; returns its row of the results table."""
  import jax  # pylint: disable=g-import-not-at-top
  from parcae.train.loop import train  # pylint: disable=g-import-not-at-top
  cfg = cfg.copy_and_resolve_references()
  cfg.quant.recipe = recipe
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise ValueError(f"workdir {workdir} is not empty; pass a fresh --workdir (the trainer would resume)")
  t0 = time.time()
  error = None
  try:
    summary = train(cfg, workdir, progress=False, devices=jax.devices()[:1])
  except FloatingPointError as e:  # the trainer stops on a non-finite loss: that is a divergence
    summary, error = None, str(e)
  wall = time.time() - t0
  if summary is not None and summary.get("stopped"):  # SIGTERM / SIGINT: checkpointed, not a result
    raise SystemExit(f"interrupted ({summary['stopped']}) while training {recipe}; the JSON holds the "
                     "recipes finished before it")
  rows, evals = read_rows(workdir)
  steps = sorted(rows)
  losses = [rows[s].get("loss") for s in steps]
  losses = [float("nan") if v is None else float(v) for v in losses]
  last = losses[-tail:]
  out = {"recipe": recipe, "wall_s": wall, "steps": steps[-1] if steps else 0, "error": error,
         "initial_loss": losses[0] if losses else float("nan"),
         "final_loss": sum(last) / len(last) if last else float("nan"),
         "last_step_loss": losses[-1] if losses else float("nan"),
         "loss_curve": dict(zip(steps, losses)),
         "val": {}, "val_history": [{k: r.get(k) for k in ("step", "loops", "val_loss", "bpb")} for r in evals]}
  final_eval = (summary or {}).get("eval") or []
  for r in final_eval:
    out["val"][str(r["loops"])] = r["val_loss"]
  finite = all(math.isfinite(v) for v in losses) and all(
      v is not None and math.isfinite(v) for v in out["val"].values())
  out["finite"] = finite and error is None
  out["decreased"] = out["final_loss"] < out["initial_loss"]
  out["ok"] = out["finite"] and out["decreased"] and bool(out["val"])
  return out


def table(results, eval_loops):
  base = next((r for r in results if r["recipe"] == "bf16"), None)
  head = (f"{'recipe':<10} {'init':>7} {'final':>7} {'d_final':>8} "
          + " ".join(f"{'val@' + str(t):>8} {'d_val':>7}" for t in eval_loops) + f" {'wall_s':>7} ok")
  lines = [head, "-" * len(head)]
  for r in results:
    d = r["final_loss"] - base["final_loss"] if base else float("nan")
    cols = [f"{r['recipe']:<10} {r['initial_loss']:7.4f} {r['final_loss']:7.4f} {d:+8.4f}"]
    for t in eval_loops:
      v = r["val"].get(str(t), float("nan"))
      dv = v - base["val"].get(str(t), float("nan")) if base else float("nan")
      cols.append(f"{v:8.4f} {dv:+7.4f}")
    cols.append(f"{r['wall_s']:7.0f} {'yes' if r['ok'] else 'NO'}")
    lines.append(" ".join(cols))
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.py"))
  p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated recipe names")
  p.add_argument("--steps", type=int, default=300, help="optimizer steps per recipe")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tail", type=int, default=3, help="final train loss = mean of the last TAIL logged rows")
  p.add_argument("--log-every", type=int, default=10)
  p.add_argument("--workdir", default="runs/quant_training_cpu", help="one fresh sub-directory per recipe")
  args = p.parse_args(argv)

  from parcae.quant import validate_recipe  # pylint: disable=g-import-not-at-top
  from parcae.train.loop import resolve_eval_loops  # pylint: disable=g-import-not-at-top
  recipes = [validate_recipe(r.strip()) for r in args.recipes.split(",") if r.strip()]
  cfg = load_config(args.config)
  cfg.train.steps, cfg.train.seed, cfg.train.log_every = args.steps, args.seed, args.log_every
  cfg.train.eval_every = 0  # validate once, at the end
  cfg.checkpoint.every_steps = max(args.steps, 1)
  cfg.checkpoint.async_save = False
  cfg.wandb.enabled = False
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
  eval_loops = resolve_eval_loops(cfg)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  root = os.path.join(args.workdir, stamp)
  os.makedirs(root, exist_ok=True)

  paths = [os.path.join(root, "quant_training_cpu.json")]
  if os.environ.get("OUT"):
    paths.append(os.path.join(os.environ["OUT"], "quant_training_cpu.json"))
  results = []
  t0 = time.time()
  for recipe in recipes:
    r = run_recipe(cfg, recipe, os.path.join(root, recipe), args.tail)
    results.append(r)
    print(f"[{recipe}] initial {r['initial_loss']:.4f} final {r['final_loss']:.4f} val {r['val']} "
          f"wall {r['wall_s']:.0f}s ok={r['ok']}" + (f" error: {r['error']}" if r["error"] else ""),
          flush=True)
    report = {"config": os.path.abspath(args.config), "steps": args.steps, "seed": args.seed,
              "tail": args.tail, "eval_loops": eval_loops, "total_wall_s": time.time() - t0,
              "model": cfg.model.to_dict(),
              "train": {k: cfg.train[k] for k in ("seq_len", "micro_batch_size", "grad_accum")},
              "results": results}
    for path in paths:  # rewritten after every recipe, so an interrupted run keeps what it finished
      with open(path, "w") as f:
        json.dump(report, f, indent=2, default=str)
  print()
  print(table(results, eval_loops))
  print(f"\n{args.steps} steps per recipe, seed {args.seed}, config {os.path.basename(args.config)}, "
        f"total wall {time.time() - t0:.0f}s")
  for path in paths:
    print(f"wrote {path}")
  bad = [r["recipe"] for r in results if not r["ok"]]
  if bad:
    print(f"FAILED (diverged, non-finite or no decrease): {bad}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
