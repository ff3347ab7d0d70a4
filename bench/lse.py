"""The loss head's log-sum-exp: the one-pass Pallas kernel (parcae.model.lse) against XLA's two passes.

  PYTHONPATH=$PWD python bench/lse.py                 # GPU: bf16 logits [chunk, 32768], chunks 2048 / 4096 / 8192
  PYTHONPATH=$PWD python bench/lse.py --smoke         # CPU: tiny shape, interpret mode

For each chunk: the largest difference of the kernel's result from XLA's formula (float32 summation order
only; logits of std 4 and one row shifted by +80), then ms per call (--iters calls back to back, median of 5)
for XLA and for each launch shape in --rows x --cols x --warps, and the kernel's bandwidth (the bf16 logits read
once). Writes $OUT/lse.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from parcae.model import lse
from rope_norm import timed  # bench/rope_norm.py: calls back to back, median of 5


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--chunks", default="2048,4096,8192")
  p.add_argument("--vocab", type=int, default=32768)
  p.add_argument("--rows", default="8,16,32")
  p.add_argument("--cols", default="512,1024,2048")
  p.add_argument("--warps", default="4,8")
  args = p.parse_args()
  if args.smoke:
    args.chunks, args.vocab, args.rows, args.cols, args.warps, args.iters = "64", 2048, "16", "1024", "4", 2
  xla = jax.jit(lambda x: jax.nn.logsumexp(x.astype(jnp.float32), axis=1))
  rows_out = []
  for n in map(int, args.chunks.split(",")):
    x = 4.0 * jax.random.normal(jax.random.key(n), (n, args.vocab), jnp.float32)
    x = x.at[0].add(80.0).astype(jnp.bfloat16)
    want = np.asarray(xla(x))
    t_xla = timed(xla, x, iters=args.iters)
    print(f"chunk {n} x {args.vocab}: xla two-pass {t_xla * 1e3:.4f} ms", flush=True)
    for r, c, w in itertools.product(*(map(int, a.split(",")) for a in (args.rows, args.cols, args.warps))):
      lse.ROWS, lse.MAX_COLS, lse.WARPS = r, c, w
      if not lse.supported(n, args.vocab):
        continue
      f = jax.jit(lse.row_lse)  # a fresh jit per launch shape (the module constants are read at trace time)
      diff = float(np.abs(np.asarray(f(x)) - want).max())
      t = timed(f, x, iters=args.iters)
      gbs = n * args.vocab * 2 / t / 1e9
      print(f"  rows {r:3d} cols {c:5d} warps {w}: {t * 1e3:.4f} ms ({t_xla / t:.2f}x xla, {gbs:.0f} GB/s), "
            f"max |diff| {diff:.2e}", flush=True)
      rows_out.append({"chunk": n, "rows": r, "cols": c, "warps": w, "ms": t * 1e3, "xla_ms": t_xla * 1e3,
                       "gb_s": gbs, "max_abs_diff": diff})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "lse.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows_out}, fh, indent=1)


if __name__ == "__main__":
  main()
