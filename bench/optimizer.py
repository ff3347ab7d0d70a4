"""Time one optimizer update (clipping, Muon with Polar Express, AdamW) on a recipe's parameters.

The training step's cost that does not scale with the micro-batches (bench/RESULTS.md, session 19: 20.8 ms
of parcae-small's 644 ms step on an H100) is mostly this update. Times the library's update over --iters
calls (and its compile time); compare trees with the same command in an older checkout (bench/ab.sh's
.whl/old). Session 25 measured its alternatives this way: one Muon call per leaf against same-shape leaves
stacked, and Polar Express's iterations as a lax.scan against a Python loop (bench/RESULTS.md).

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


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="parcae_small")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
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
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, run=run))
    t0 = time.perf_counter()
    compiled = update.lower(grads, state, params).compile()
    compile_s = time.perf_counter() - t0
    ms, (u, _) = timed(compiled, (grads, state, params), 2 if args.smoke else args.iters)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
    row.update(ms=round(ms, 3), compile_s=round(compile_s, 1))
    print(f"{name:16s} {ms:8.3f} ms per update  compile {compile_s:5.1f} s", flush=True)
    rows.append(row)
  with open(os.path.join(os.environ.get("OUT", "."), "optimizer.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
