"""The `parcae` command: train | eval | sweep | fit | info | convert | quant-error | demo.

Config overrides follow the config file: `--config.model.mean_recurrence=16` (unknown keys fail).
Bad input ends with one message on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _split_overrides(argv):
  rest, overrides = [], []
  for a in argv:
    (overrides if a.startswith("--config.") else rest).append(a)
  return rest, overrides


def cmd_train(argv):
  p = argparse.ArgumentParser(prog="parcae train", description="Train (or resume) a run.")
  p.add_argument("--config", required=True, help="config file, e.g. configs/demo_cpu.py")
  p.add_argument("--workdir", required=True, help="run directory; resumed if it holds checkpoints")
  p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
  args, overrides = _parse(p, argv)
  from parcae.config import load_config
  from parcae.train.loop import train
  cfg = load_config(args.config, overrides)
  summary = train(cfg, args.workdir, progress=not args.no_progress)
  print(json.dumps(summary))
  return 0


def cmd_info(argv):
  p = argparse.ArgumentParser(prog="parcae info", description="Parameter counts and FLOPs per token.")
  p.add_argument("--config", required=True)
  p.add_argument("--json", action="store_true")
  p.add_argument("--compile", action="store_true",
                 help="also compile the train step for the config's mesh on this machine's devices (no array is "
                      "allocated) and report its memory per device: does it fit, before a run starts")
  p.add_argument("--target", default=None,
                 help="compile for GPUs this machine does not have (implies --compile): [HOSTSx]KIND[xDEVICES], "
                      "KIND h100 or h200, e.g. h100x8; needs jax's CUDA plugin (jax-cuda13-plugin[with-cuda]), "
                      "not a GPU")
  args, overrides = _parse(p, argv)
  if args.target:
    from parcae.train.targets import parse_target
    parse_target(args.target)  # a bad target fails before the config is loaded
    import jax
    jax.config.update("jax_platforms", "cpu")  # compile-only GPU devices; no GPU backend is started here
  from parcae.config import load_config
  from parcae.scaling.info import model_info
  cfg = load_config(args.config, overrides)
  info = model_info(cfg)
  if args.compile or args.target:
    from parcae.train.loop import aot_compile
    info.update({f"compile.{k}": v for k, v in aot_compile(cfg, target=args.target).items()})
  if args.json:
    print(json.dumps(info, indent=2))
  else:
    for k, v in info.items():
      print(f"{k:42s} {v:,}" if isinstance(v, int) else
            f"{k:42s} {v:.3f}" if isinstance(v, float) and k.startswith("compile.") else f"{k:42s} {v}")
  return 0


def cmd_eval(argv):
  p = argparse.ArgumentParser(prog="parcae eval", description="Validation loss and bits per byte per loop count.")
  p.add_argument("--workdir", required=True, help="a run directory written by `parcae train`")
  p.add_argument("--loops", default="", help="comma-separated loop counts, e.g. 1,2,4,8,16 (default: 1..2*mean)")
  p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's train.eval_batches)")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--json", action="store_true", help="one JSON row per loop count")
  p.add_argument("--plot", default="", help="write validation loss against loop count to this PNG")
  args, _ = _parse(p, argv)
  from parcae.eval.loss import evaluate_run
  loops = [int(x) for x in args.loops.split(",") if x.strip()] if args.loops else None
  rows = evaluate_run(args.workdir, loops=loops, num_batches=args.batches, step=args.step)
  for r in rows:
    tel = "".join(f"  {k} {r[k]:.4g}" for k in ("rel_residual", "state_norm") if k in r)
    print(json.dumps(r) if args.json else f"loops {r['loops']:3d}  val_loss {r['val_loss']:.4f}  bpb {r['bpb']}{tel}")
  if args.plot:
    from parcae.eval.loss import plot_loss_vs_loops
    plot_loss_vs_loops(rows, args.plot)
  return 0


def cmd_demo(argv):
  p = argparse.ArgumentParser(prog="parcae demo", description="Train the CPU demo, evaluate at 1..2*mean, plot.")
  p.add_argument("--workdir", default="runs/demo")
  p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.py"))
  args, overrides = _parse(p, argv)
  from parcae.eval.loss import run_demo
  run_demo(args.config, args.workdir, overrides)
  return 0


def _delegate(module, fn):
  def run(argv):
    mod = __import__(module, fromlist=[fn])
    return getattr(mod, fn)(argv)
  return run


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "info": cmd_info,
    "demo": cmd_demo,
    "sweep": _delegate("parcae.scaling.sweep", "sweep_main"),
    "fit": _delegate("parcae.scaling.fit", "fit_main"),
    "convert": _delegate("parcae.convert", "convert_main"),
    "quant-error": _delegate("parcae.quant.cli", "quant_error_main"),
}


def _parse(parser, argv):
  rest, overrides = _split_overrides(argv)
  return parser.parse_args(rest), overrides


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
    print(__doc__.strip() + "\n\ncommands: " + ", ".join(COMMANDS) + "\nrun `parcae <command> --help` for options",
          file=sys.stderr)
    return 0 if argv and argv[0] in ("-h", "--help") else 2
  try:
    return COMMANDS[argv[0]](argv[1:]) or 0
  except (ValueError, FileNotFoundError, ImportError) as err:
    if os.environ.get("PARCAE_TRACEBACK"):  # full traceback for debugging the framework itself
      raise
    print(f"parcae {argv[0]}: error: {err} (set PARCAE_TRACEBACK=1 for the traceback)", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
