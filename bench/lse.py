"""The loss head's log-sum-exp: the one-pass Pallas kernel (parcae.model.lse) against XLA's two passes.

  PYTHONPATH=$PWD python bench/lse.py                 # GPU: bf16 logits [chunk, 32768], chunks 2048 / 4096 / 8192
  PYTHONPATH=$PWD python bench/lse.py --smoke         # CPU: tiny shape, interpret mode
  PYTHONPATH=$PWD python bench/lse.py --grad          # the training loss's kernel: lse + logit gradient

--grad times, per chunk, the training loss head's elementwise work on the bf16 logits: the log-sum-exp kernel
followed by XLA's gradient fusion (bf16((exp(x - lse) - onehot) * g), the path before `lse.row_lse_grad`)
against the one-read kernel for each launch shape in --grad-rows x --grad-cols x --warps; the kernel's lse
against the first path's and the fraction of gradient entries that differ (by one bf16 rounding at most).

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
  p.add_argument("--grad", action="store_true")
  p.add_argument("--grad-rows", default="1,2,4,8")
  p.add_argument("--grad-cols", default="1024,2048,4096")
  args = p.parse_args()
  if args.grad:
    return grad_main(args)
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


def grad_main(args):
  if args.smoke:
    args.chunks, args.vocab, args.grad_rows, args.grad_cols, args.warps, args.iters = "64", 2048, "4", "512", "4", 2
  g = 1.0 / (8 * 32768)

  def before(x, t):  # the lse kernel, then XLA's gradient fusion (loss._chunk_grads' formula)
    lse_n = lse.row_lse(x)
    hot = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == t[:, None]
    d = ((jnp.exp(x.astype(jnp.float32) - lse_n[:, None]) - hot) * g).astype(jnp.bfloat16)
    return lse_n, jnp.take_along_axis(x, t[:, None], axis=1)[:, 0].astype(jnp.float32), d

  rows_out = []
  for n in map(int, args.chunks.split(",")):
    x = (4.0 * jax.random.normal(jax.random.key(n), (n, args.vocab), jnp.float32)).astype(jnp.bfloat16)
    t = jax.random.randint(jax.random.key(n + 1), (n,), 0, args.vocab)
    f0 = jax.jit(before)
    want = [np.asarray(a, np.float32) for a in f0(x, t)]
    t0 = timed(f0, x, t, iters=args.iters)
    gb = 2 * n * args.vocab * 2 / 1e9  # logits read once, gradient written once
    print(f"chunk {n} x {args.vocab}: lse kernel + XLA gradient {t0 * 1e3:.4f} ms", flush=True)
    for r, c, w in itertools.product(*(map(int, a.split(",")) for a in (args.grad_rows, args.grad_cols, args.warps))):
      lse.GRAD_ROWS, lse.GRAD_COLS, lse.GRAD_WARPS = r, c, w
      if not lse.grad_supported(n, args.vocab):
        continue
      f = jax.jit(lambda x, t: lse.row_lse_grad(x, t, g, jnp.bfloat16))  # fresh: constants read when traced
      try:
        got = [np.asarray(a, np.float32) for a in f(x, t)]
        tk = timed(f, x, t, iters=args.iters)
      except Exception as e:  # a launch shape that does not compile is reported, not fatal
        print(f"  rows {r} cols {c} warps {w}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      dl = float(np.abs(got[0] - want[0]).max())
      same_t = bool(np.array_equal(got[1], want[1]))
      frac = float((got[2] != want[2]).mean())
      rel = float((np.abs(got[2] - want[2]) / np.maximum(np.abs(want[2]), 1e-30)).max())
      print(f"  rows {r} cols {c:5d} warps {w:2d}: {tk * 1e3:.4f} ms ({t0 / tk:.2f}x, {gb / tk:.0f} GB/s); "
            f"lse max |diff| {dl:.1e}, target equal {same_t}, gradient entries differing {frac:.1e} "
            f"(max rel {rel:.1e})", flush=True)
      rows_out.append({"chunk": n, "rows": r, "cols": c, "warps": w, "ms": tk * 1e3, "before_ms": t0 * 1e3,
                       "gb_s": gb / tk, "lse_diff": dl, "grad_frac_differ": frac, "grad_max_rel": rel})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "lse_grad.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": rows_out}, fh, indent=1)


if __name__ == "__main__":
  main()
