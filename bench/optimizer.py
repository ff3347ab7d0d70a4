"""Time one optimizer update (clipping, Muon with Polar Express, AdamW) on a recipe's parameters.

The training step's cost that does not scale with the micro-batches (bench/RESULTS.md, session 19: 20.8 ms
of parcae-small's 644 ms step on an H100) is mostly this update. Variants of Polar Express's 5 iterations:
a `lax.scan` (the library's) and a Python loop (straight-line code: no while loop per matrix). Each variant
is timed over --iters calls and compared with the library's update (max difference over max |update| per
leaf): not bit for bit, as XLA orders the bf16 iterations' roundings differently in straight-line code. In
the --smoke run on the CPU the largest difference is 11% of a leaf's largest update entry; with muon_wd = 0 it
is <= 1.1% (one or two bf16 ulps of the orthogonalized matrix). The rest is Muon's cautious weight decay: an
entry whose update is near zero can change sign between the two programs, which switches its decay term
(lr * wd * p) on or off; a discontinuity of the update rule, not an error of either program.

  python bench/optimizer.py --only parcae_small,gpt_medium --iters 50
  python bench/optimizer.py --smoke       # a tiny CPU run of the whole script
Writes $OUT/optimizer.json (or ./optimizer.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def unrolled_polar_express(optim):
  """The library's polar_express with its iterations as a Python loop (same arithmetic per iteration)."""
  scan = optim.jax.lax.scan

  def run(g, ns_steps, dtype):
    def loop(body, x, coeffs):
      for i in range(coeffs.shape[0]):
        x, _ = body(x, coeffs[i])
      return x, None
    optim.jax.lax.scan = loop
    try:
      return optim_polar_express(g, ns_steps, dtype)
    finally:
      optim.jax.lax.scan = scan
  optim_polar_express = optim.polar_express
  return run




def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="parcae_small")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import train_throughput as tt
  from flax import nnx
  from profiling import timed
  from parcae.model import build
  from parcae.train import optim
  from parcae.train.schedules import run_length
  rows = []
  for name in args.only.split(","):
    kind, size, overrides = tt.VARIANTS[name]
    cfg = tt.build_config(kind, size, overrides, argparse.Namespace(micro=16, accum=8, seq=2048, smoke=args.smoke))
    if args.smoke:
      cfg.model.d_model, cfg.model.n_heads, cfg.model.vocab_size = 64, 2, 256
    params = nnx.split(build(cfg.model, jax.random.key(0)), nnx.Param)[1]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    grads = treedef.unflatten([1e-3 * jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)])
    opt = optim.make_optimizer(cfg.optim, params, total_steps=1000)
    state = opt.init(params)
    run = run_length(cfg.optim, 1000)
    row = {"variant": name, "device": jax.devices()[0].device_kind,
           "params": int(sum(x.size for x in leaves)), "leaves": len(leaves)}
    base = None
    for impl in ("scan", "unrolled"):
      polar = optim.polar_express
      if impl == "unrolled":
        optim.polar_express = unrolled_polar_express(optim)
      try:
        update = jax.jit(lambda g, s, p: opt.update(g, s, p, run=run))
        t0 = time.perf_counter()
        compiled = update.lower(grads, state, params).compile()
        compile_s = time.perf_counter() - t0
      finally:
        optim.polar_express = polar
      ms, (u, _) = timed(compiled, (grads, state, params), 2 if args.smoke else args.iters)
      u = jax.tree.leaves(u)
      if base is None:
        base, diff = u, 0.0
      else:
        diff = max(float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)) for a, b in zip(u, base))
      row[impl] = {"ms": round(ms, 3), "compile_s": round(compile_s, 1), "max_rel_diff": diff}
      print(f"{name:16s} {impl:9s} {ms:8.3f} ms per update  compile {compile_s:5.1f} s  "
            f"max |u - u_scan| / max |u| {diff:.2e}", flush=True)
    assert np.isfinite(row["scan"]["ms"])
    rows.append(row)
  with open(os.path.join(os.environ.get("OUT", "."), "optimizer.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
