"""ScaleSearch on real tensors: every GEMM input and weight of a trained Parcae, max-based vs searched scales.

  PYTHONPATH=$PWD python bench/scalesearch_activations.py                 # trains configs/demo_cpu.py first
  PYTHONPATH=$PWD python bench/scalesearch_activations.py --workdir RUN   # any `parcae train` run

Trains the demo model (CPU, a few minutes) unless --workdir already holds a checkpoint, then runs one
validation batch through the model at T = --loops with a host callback on every Linear's input (inside
the loop too), groups the inputs by role (attention q/k/v input, attention output = o input, MLP fc
input, MLP proj input: the GEMMs a recipe quantizes; the injection, C and the value-embedding gate stay
in high precision and are left out), keeps up to --rows rows per group, adds the trained weight
matrices of those GEMMs (quantized along K, as the forward GEMM reads them) and reports
`parcae quant-error --search` on them: MSE of the max-based scale and of ScaleSearch, and the
reduction, for NVFP4 (two-level and single-level), MXFP4 and MXFP8. Writes $OUT (or the workdir)
/scalesearch_activations.json and the captured tensors as scalesearch_activations.npz.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcae import data as pdata
from parcae.config import load_config
from parcae.eval.loss import load_params, load_run_config
from parcae.model import layers
from parcae.quant.cli import quant_error_main
from parcae.train.loop import train

HERE = os.path.dirname(os.path.abspath(__file__))


ROLES = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out", "fc": "mlp_in", "proj": "mlp_hidden"}


def _role(path) -> str | None:
  """"attn_in" etc. for the block GEMMs a recipe quantizes (path .../attn/q, .../mlp/fc), else None."""
  names = [str(p) for p in path]
  return ROLES.get(names[-1]) if len(names) >= 2 and names[-2] in ("attn", "mlp") else None


def capture_inputs(cfg, workdir, loops, max_rows):
  """{"in_ROLE": [rows, K], "w_ROLE": [N, K]} float32: the inputs of every quantizable GEMM over one
  validation batch at `loops` iterations (every loop iteration), and the trained weights."""
  graphdef, params, _, _ = load_params(cfg, workdir)
  acts, seen = {}, set()

  def record(label, x):
    x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
    h = hash(x.tobytes())
    if h not in seen:  # q, k and v read the same input: keep it once
      seen.add(h)
      acts.setdefault(label, []).append(x)

  orig = layers.Linear.__call__

  def patched(self, x, key=None):
    if getattr(self, "capture_role", None):
      jax.debug.callback(functools.partial(record, "in_" + self.capture_role), x)
    return orig(self, x, key)

  tc = cfg.train
  val = pdata.eval_batches(cfg.data, split=cfg.data.val_split, seq_len=tc.seq_len, batch_size=tc.eval_batch_size,
                           num_batches=1, process_index=0, process_count=1)
  batch = next(iter(val))
  layers.Linear.__call__ = patched
  try:
    model = nnx.merge(graphdef, params)
    weights = {}
    for path, node in nnx.iter_graph(model):
      if isinstance(node, layers.Linear) and _role(path):
        node.capture_role = _role(path)  # a static attribute: it survives the loop's split / merge
        weights.setdefault("w_" + node.capture_role, []).append(np.asarray(node.kernel[...], np.float32).T)
    b = batch["inputs"].shape[0]
    y, _ = model.hidden(jnp.asarray(batch["inputs"]), jnp.full((b,), loops, jnp.int32), jnp.zeros((b,), jnp.int32),
                        key=jax.random.key(0), grad_steps=0)
    jax.block_until_ready(y)
    jax.effects_barrier()
  finally:
    layers.Linear.__call__ = orig
  out = {k: np.concatenate(v)[:max_rows] for k, v in acts.items()}
  return {**out, **{k: np.concatenate(v) for k, v in weights.items()}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="runs/scalesearch_demo")
  p.add_argument("--config", default=os.path.join(HERE, "..", "configs", "demo_cpu.py"))
  p.add_argument("--loops", type=int, default=4)
  p.add_argument("--rows", type=int, default=16384, help="rows kept per activation group")
  args = p.parse_args(argv)
  if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
    train(load_config(args.config), args.workdir, progress=False)
  cfg = load_run_config(args.workdir)
  tensors = capture_inputs(cfg, args.workdir, args.loops, args.rows)
  out_dir = os.environ.get("OUT", args.workdir)
  npz = os.path.join(out_dir, "scalesearch_activations.npz")
  np.savez(npz, **tensors)
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    quant_error_main(["--input", npz, "--gaussian", "262144", "--formats", "nvfp4", "mxfp4", "mxfp8_e4m3",
                      "--scale-modes", "floor", "--search", "--json"])
  rows = json.loads(buf.getvalue())["rows"]
  print(f"{'tensor':>14} {'shape':>12} {'format':>9} {'rel MSE max':>11} {'rel MSE search':>14} {'reduction':>9}")
  for r in rows:
    if r["scale_mode"] == "search":
      shape = "x".join(map(str, tensors[r["tensor"]].shape)) if r["tensor"] in tensors else "gaussian"
      base = r["rel_mse"] / (1 - r["reduction"]) if r["reduction"] < 1 else float("nan")
      print(f"{r['tensor']:>14} {shape:>12} {r['format']:>9} {base:>11.5f} {r['rel_mse']:>14.5f} "
            f"{100 * r['reduction']:>8.1f}%")
  with open(os.path.join(out_dir, "scalesearch_activations.json"), "w") as f:
    json.dump({"workdir": args.workdir, "loops": args.loops, "rows": rows,
               "shapes": {k: list(v.shape) for k, v in tensors.items()}}, f, indent=1)


if __name__ == "__main__":
  main()
