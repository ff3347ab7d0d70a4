"""Quantized dense layer, forward + backward, per recipe: time, overhead over bf16, kernel count.

  PYTHONPATH=$PWD python bench/quant_gemm.py                 # GPU: parcae-small's four GEMM shapes
  PYTHONPATH=$PWD python bench/quant_gemm.py --smoke         # CPU: tiny shapes
  PYTHONPATH=other/tree python bench/quant_gemm.py --label X # the same layer from another checkout
  PYTHONPATH=$PWD python bench/quant_gemm.py --impl pallas --label pallas   # one-pass Pallas quantizers
  PYTHONPATH=$PWD python bench/quant_gemm.py --recipes bf16,mxfp8 --profile   # + the top device ops

One layer is y = qdot(x, w, recipe) with x [M, K] bf16 (M = 16 x 2048 tokens), w [K, N] f32, and the
backward pulls a fixed bf16 cotangent, i.e. the three GEMMs of a training step and all their
quantization (rotations, stochastic rounding, masks). Each recipe is checked against the plain
bf16 layer (relative error of y, dx, dw within the format's expected range) and timed as the median
of 5 repeats of `--iters` back-to-back calls. Writes $OUT/quant_gemm[_LABEL].json.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from parcae.quant import qdot

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # parcae-small: qkv, proj, fc, fc2
RECIPES = ["bf16", "mxfp8", "mxfp4", "nvfp4", "quartet", "nvidia_nvfp4"]
MAX_REL = {"bf16": 1e-4, "mxfp8": 2e-3, "mxfp4": 0.05, "nvfp4": 0.03, "quartet": 0.3, "nvidia_nvfp4": 0.08}


def layer(recipe, impl="jnp"):
  def f(x, w, g, key):
    y, pull = jax.vjp(lambda x, w: qdot(x, w, recipe, key=key, impl=impl), x, w)
    return (y, *pull(g))
  return jax.jit(f)


def timed(f, args, iters):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = f(*args)
    jax.block_until_ready(out)
    ts.append((time.perf_counter() - t0) / iters)
  return statistics.median(ts)


def kernel_count(f, args):
  """Device kernels in the optimized HLO: fusions, custom calls (GEMMs) and other top-level ops."""
  text = f.lower(*args).compile().as_text()
  entry = text[text.rfind("ENTRY"):]
  return len(re.findall(r"= \S+ (?:fusion|custom-call|dot|reduce|copy|transpose)\(", entry))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sum((a - b) ** 2) / max(np.sum(b * b), 1e-30))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--tokens", type=int, default=16 * 2048)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--recipes", default=",".join(RECIPES))
  p.add_argument("--label", default="")
  p.add_argument("--impl", default="jnp", help="jnp | pallas (one-pass rotate + quantize kernels)")
  p.add_argument("--shapes", default="", help="KxN,KxN (default: parcae-small's four)")
  p.add_argument("--no-count", action="store_true", help="skip the kernel count (one compile less)")
  p.add_argument("--profile", action="store_true", help="trace each recipe on the first shape, print its top ops")
  args = p.parse_args(argv)
  shapes = [(64, 96)] if args.smoke else SHAPES
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  m = 64 if args.smoke else args.tokens
  iters = 2 if args.smoke else args.iters
  rows = []
  for k, n in shapes:
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
    g = jax.random.normal(kg, (m, n), jnp.float32).astype(jnp.bfloat16)
    a = (x, w, g, jax.random.key(1))
    ref = layer("bf16")(*a)
    base = None
    for recipe in args.recipes.split(","):
      f = layer(recipe, "jnp" if recipe == "bf16" else args.impl)
      out = f(*a)
      errs = [rel_err(o, r) for o, r in zip(out, ref)]
      t = timed(f, a, iters)
      base = t if recipe == "bf16" else base
      row = {"label": args.label, "impl": args.impl, "K": k, "N": n, "M": m, "recipe": recipe, "ms": t * 1e3,
             "x_bf16": t / base if base else None, "kernels": None if args.no_count else kernel_count(f, a),
             "rel_err_y_dx_dw": errs, "ok": all(e < MAX_REL[recipe] for e in errs)}
      rows.append(row)
      print(json.dumps(row), flush=True)
      if args.profile and (k, n) == shapes[0]:
        from profiling import top_device_ops
        top_device_ops(lambda: [f(*a) for _ in range(iters)][-1], f"prof_{recipe}_{args.impl}", n=15,
                       what=f"{iters} calls of {recipe}@{args.impl} {k}x{n}")
  print(f"\n{'K x N':>10} {'recipe':>13} {'ms':>8} {'x bf16':>7} {'kernels':>7} {'ok':>3}")
  for r in rows:
    print(f"{r['K']:>5}x{r['N']:<5} {r['recipe']:>13} {r['ms']:>8.3f} {r['x_bf16'] or 0:>7.2f} "
          f"{r['kernels'] or 0:>7} {'yes' if r['ok'] else 'NO':>3}")
  tot = {}
  for r in rows:
    tot[r["recipe"]] = tot.get(r["recipe"], 0.0) + r["ms"]
  print("sum over shapes (ms):", {k: round(v, 3) for k, v in tot.items()},
        "ratio:", {k: round(v / tot["bf16"], 2) for k, v in tot.items()} if "bf16" in tot else "")
  out = os.environ.get("OUT", ".")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"quant_gemm{'_' + args.label if args.label else ''}.json"), "w") as fh:
    json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "rows": rows}, fh, indent=1)
  return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
