"""A block's residual add + RMSNorm (+ cast to bf16) as one Pallas kernel each way (parcae.model.add_norm),
against XLA's fusions of the same formula.

The pre-norm block computes s = x + f32(y) (residual stream x float32, branch output y bf16) and n =
bf16(rms(s) * scale), the next GEMM's operand. XLA runs the forward as two passes (add + the row's sum of
squares, then the normalized bf16 output) and the backward as a row reduction and a second pass that also
folds in the residual path's cotangent and the scale's column sums (bench/RESULTS.md, session 22: ~52 ms of
backward reductions per parcae-small step). The kernels here read and write each [rows, D] block once:
  forward : (x, y, scale) -> (s, n, r = rsqrt(mean(s^2) + eps))
  backward: (s, r, scale, ds, dn) -> (dx = ds + r * (g - xhat * mean(g * xhat)), dy = bf16(dx), dscale partials)
             with xhat = s * r, g = f32(dn) * scale: dx is the cotangent of x and of f32(y), both uses summed.

  PYTHONPATH=$PWD python bench/add_norm.py             # GPU: parcae-small / medium rows, launch-shape sweep
  PYTHONPATH=$PWD python bench/add_norm.py --smoke     # CPU: interpret mode, tiny shapes
  PYTHONPATH=$PWD python bench/add_norm.py --rows 4 --warps 8 --sustain 5   # + energy per call at the power limit
Checks every output against the XLA formula (and its jax.vjp) and times forward and forward + backward;
`model.norm_impl` puts the kernels into the model (bench/train_throughput.py: parcae_small_norm_pallas).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from parcae.model import add_norm  # noqa: E402
from rope_norm import timed  # noqa: E402  (calls back to back, median of 5)
from profiling import sustained, sustained_text  # noqa: E402

EPS = 1e-6


def xla_add_norm(x, y, scale, eps=EPS, cd=jnp.bfloat16):
  """The model's formula (layers.Block with layers.rms_norm): s = x + f32(y), n = cd(rms(s) * scale)."""
  s = x + y.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + eps)
  return s, ((s * r) * scale).astype(cd)


def inputs(n, d, seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = 3.0 * jax.random.normal(ks[0], (n, d), jnp.float32)
  y = jax.random.normal(ks[1], (n, d), jnp.float32).astype(jnp.bfloat16)
  scale = 1.0 + 0.1 * jax.random.normal(ks[2], (d,), jnp.float32)
  ds = jax.random.normal(ks[3], (n, d), jnp.float32)
  dn = jax.random.normal(ks[4], (n, d), jnp.float32).astype(jnp.bfloat16)
  return x, y, scale, ds, dn


def xla_paths():
  fwd = jax.jit(xla_add_norm)

  def fwd_bwd(x, y, scale, ds, dn):
    out, vjp = jax.vjp(xla_add_norm, x, y, scale)
    return out, vjp((ds, dn))
  return fwd, jax.jit(fwd_bwd)


def kernel_paths(rows, warps, interpret=None):
  """Jitted (forward, forward + backward) of the library's kernels (parcae.model.add_norm) at a launch shape
  (fresh jits: the module's ROWS / WARPS are read when traced)."""
  def launch(fn):
    def run(*a):
      add_norm.ROWS, add_norm.WARPS = rows, warps
      return fn(*a)
    return jax.jit(run)

  def fwd(x, y, scale):
    return add_norm.forward(x, y, scale, EPS, jnp.bfloat16, interpret)

  def fwd_bwd(x, y, scale, ds, dn):
    s, n, r = add_norm.forward(x, y, scale, EPS, jnp.bfloat16, interpret)
    return (s, n), add_norm.backward(s, r, scale, ds, dn, dn.dtype, interpret)
  return launch(fwd), launch(fwd_bwd)


def compare(got, want):
  """Largest difference of each output, relative to its largest entry: (s, n, dx, dy, dscale)."""
  (gs, gn), (gdx, gdy, gsc) = got
  (ws, wn), (wdx, wdy, wsc) = want
  rel = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))) /
                           max(np.max(np.abs(np.asarray(b, np.float64))), 1e-30))
  return [rel(a, b) for a, b in ((gs, ws), (gn, wn), (gdx, wdx), (gdy, wdy), (gsc, wsc))]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--shapes", default="32768x768,32768x1024")
  p.add_argument("--rows", default="4,8,16,32")
  p.add_argument("--warps", default="4,8")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--sustain", type=float, default=0.0, help="also time forward + backward over this many seconds "
                 "of back-to-back calls, with the GPU's clock, power and energy per call (profiling.sustained)")
  args = p.parse_args()
  if args.smoke:
    args.shapes, args.rows, args.warps, args.iters = "64x768", "16", "4", 2
  sustain = lambda fn, data, sec: sustained(fn, data, max(1, int(args.sustain / sec))) if args.sustain else {}
  out = []
  for shape in args.shapes.split(","):
    n, d = map(int, shape.split("x"))
    data = inputs(n, d)
    xf, xfb = xla_paths()
    want = xfb(*data)
    t_f, t_fb = timed(xf, *data[:3], iters=args.iters), timed(xfb, *data, iters=args.iters)
    gb_f, gb_fb = n * d * (4 + 2 + 4 + 2) / 1e9, n * d * (4 + 2 + 4 + 2 + 4 + 4 + 2 + 4 + 2) / 1e9
    xs = sustain(xfb, data, t_fb)
    print(f"{n} x {d}: XLA forward {t_f * 1e3:.4f} ms, forward + backward {t_fb * 1e3:.4f} ms"
          + (sustained_text(xs) if xs else ""), flush=True)
    for rows, warps in itertools.product(*(map(int, a.split(",")) for a in (args.rows, args.warps))):
      kf, kfb = kernel_paths(rows, warps, interpret=True if args.smoke else None)
      try:
        errs = compare(kfb(*data), want)
        k_f, k_fb = timed(kf, *data[:3], iters=args.iters), timed(kfb, *data, iters=args.iters)
        ks = sustain(kfb, data, k_fb)
      except Exception as e:  # a launch shape that does not compile is reported, not fatal
        print(f"  rows {rows} warps {warps}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      print(f"  rows {rows:3d} warps {warps}: forward {k_f * 1e3:.4f} ms ({t_f / k_f:.2f}x, {gb_f / k_f:.0f} GB/s), "
            f"forward + backward {k_fb * 1e3:.4f} ms ({t_fb / k_fb:.2f}x, {gb_fb / k_fb:.0f} GB/s); max rel diff "
            f"s/n/dx/dy/dscale " + " ".join(f"{e:.1e}" for e in errs) + (sustained_text(ks) if ks else ""), flush=True)
      out.append({"n": n, "d": d, "rows": rows, "warps": warps, "fwd_ms": k_f * 1e3, "fwd_bwd_ms": k_fb * 1e3,
                  "xla_fwd_ms": t_f * 1e3, "xla_fwd_bwd_ms": t_fb * 1e3, "rel_diff": errs,
                  **({"sustained": ks, "xla_sustained": xs} if ks else {})})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "add_norm.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": out}, fh, indent=1)


if __name__ == "__main__":
  main()
