"""A block's residual add + RMSNorm (+ cast to bf16) as one Pallas kernel each way, against XLA's fusions.

The pre-norm block computes s = x + f32(y) (residual stream x float32, branch output y bf16) and n =
bf16(rms(s) * scale), the next GEMM's operand. XLA runs the forward as two passes (add + the row's sum of
squares, then the normalized bf16 output) and the backward as a row reduction and a second pass that also
folds in the residual path's cotangent and the scale's column sums (bench/RESULTS.md, session 22: ~52 ms of
backward reductions per parcae-small step). The kernels here read and write each [rows, D] block once:
  forward : (x, y, scale) -> (s, n, r = rsqrt(mean(s^2) + eps))
  backward: (s, r, scale, ds, dn) -> (dx = ds + r * (g - xhat * mean(g * xhat)), dy = bf16(dx), dscale partials)
             with xhat = s * r, g = f32(dn) * scale: dx is the cotangent of x and of f32(y), both uses summed.
A row of D = 768 is three 256-wide column chunks (Triton arrays must have power-of-two sizes).

  PYTHONPATH=$PWD python bench/add_norm.py             # GPU: parcae-small / medium rows, launch-shape sweep
  PYTHONPATH=$PWD python bench/add_norm.py --smoke     # CPU: interpret mode, tiny shapes
Checks every output against the XLA formula (and its jax.vjp) and times forward and forward + backward.
Not used by the model (yet): it measures whether wiring it into `layers.Block` would pay.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from rope_norm import timed  # noqa: E402  (calls back to back, median of 5)

EPS = 1e-6


def xla_add_norm(x, y, scale, eps=EPS, cd=jnp.bfloat16):
  """The model's formula (layers.Block with layers.rms_norm): s = x + f32(y), n = cd(rms(s) * scale)."""
  s = x + y.astype(jnp.float32)
  r = jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + eps)
  return s, ((s * r) * scale).astype(cd)


def _width(d: int) -> int:
  w = 1
  while d % (2 * w) == 0 and 2 * w <= 512:
    w *= 2
  return w


def _fwd_kernel(x_ref, y_ref, sc_ref, s_ref, n_ref, r_ref, *, eps, w):
  d = x_ref.shape[1]
  parts, ss = [], 0.0
  for j in range(d // w):
    sl = pl.ds(j * w, w)
    s = x_ref[:, sl] + y_ref[:, sl].astype(jnp.float32)
    s_ref[:, sl] = s
    parts.append(s)
    ss = ss + jnp.sum(s * s, axis=1)
  r = jax.lax.rsqrt(ss / d + eps)
  for j, s in enumerate(parts):
    sl = pl.ds(j * w, w)
    n_ref[:, sl] = ((s * r[:, None]) * sc_ref[sl][None, :]).astype(n_ref.dtype)
  r_ref[...] = r


def _bwd_kernel(s_ref, r_ref, sc_ref, ds_ref, dn_ref, dx_ref, dy_ref, dsc_ref, *, w):
  d = s_ref.shape[1]
  r = r_ref[...]
  xs, gs, dot = [], [], 0.0
  for j in range(d // w):
    sl = pl.ds(j * w, w)
    xhat = s_ref[:, sl] * r[:, None]
    g = dn_ref[:, sl].astype(jnp.float32) * sc_ref[sl][None, :]
    xs.append(xhat)
    gs.append(g)
    dot = dot + jnp.sum(g * xhat, axis=1)
  mean = dot / d
  for j, (xhat, g) in enumerate(zip(xs, gs)):
    sl = pl.ds(j * w, w)
    dx = ds_ref[:, sl] + r[:, None] * (g - xhat * mean[:, None])
    dx_ref[:, sl] = dx
    dy_ref[:, sl] = dx.astype(dy_ref.dtype)
    dsc_ref[:, sl] = jnp.sum(dn_ref[:, sl].astype(jnp.float32) * xhat, axis=0)[None, :]


def _params(interpret, warps):
  from parcae.quant.kernels import qdq
  interpret, _, params = qdq.backend(interpret, warps)
  return interpret, params


def kernel_fwd(x, y, scale, *, rows, warps, eps=EPS, cd=jnp.bfloat16, interpret=None):
  n, d = x.shape
  interpret, params = _params(interpret, warps)
  blk = pl.BlockSpec((rows, d), lambda i: (i, 0))
  vec = pl.BlockSpec((d,), lambda i: (0,))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, eps=eps, w=_width(d)), grid=(n // rows,),
      out_shape=(jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n, d), cd),
                 jax.ShapeDtypeStruct((n,), jnp.float32)),
      in_specs=[blk, blk, vec], out_specs=(blk, blk, pl.BlockSpec((rows,), lambda i: (i,))),
      interpret=interpret, **params)(x, y, scale)


def kernel_bwd(s, r, scale, ds, dn, *, rows, warps, interpret=None):
  """(dx, dy, dscale): the cotangents of x, y and scale."""
  n, d = s.shape
  interpret, params = _params(interpret, warps)
  blk = pl.BlockSpec((rows, d), lambda i: (i, 0))
  dx, dy, part = pl.pallas_call(
      functools.partial(_bwd_kernel, w=_width(d)), grid=(n // rows,),
      out_shape=(jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n, d), dn.dtype),
                 jax.ShapeDtypeStruct((n // rows, d), jnp.float32)),
      in_specs=[blk, pl.BlockSpec((rows,), lambda i: (i,)), pl.BlockSpec((d,), lambda i: (0,)), blk, blk],
      out_specs=(blk, blk, pl.BlockSpec((1, d), lambda i: (i, 0))),
      interpret=interpret, **params)(s, r, scale, ds, dn)
  return dx, dy, jnp.sum(part, axis=0)


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
  fwd = jax.jit(functools.partial(kernel_fwd, rows=rows, warps=warps, interpret=interpret))

  def fwd_bwd(x, y, scale, ds, dn):
    s, n, r = kernel_fwd(x, y, scale, rows=rows, warps=warps, interpret=interpret)
    return (s, n), kernel_bwd(s, r, scale, ds, dn, rows=rows, warps=warps, interpret=interpret)
  return fwd, jax.jit(fwd_bwd)


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
  args = p.parse_args()
  if args.smoke:
    args.shapes, args.rows, args.warps, args.iters = "64x768", "16", "4", 2
  out = []
  for shape in args.shapes.split(","):
    n, d = map(int, shape.split("x"))
    data = inputs(n, d)
    xf, xfb = xla_paths()
    want = xfb(*data)
    t_f, t_fb = timed(xf, *data[:3], iters=args.iters), timed(xfb, *data, iters=args.iters)
    gb_f, gb_fb = n * d * (4 + 2 + 4 + 2) / 1e9, n * d * (4 + 2 + 4 + 2 + 4 + 4 + 2 + 4 + 2) / 1e9
    print(f"{n} x {d}: XLA forward {t_f * 1e3:.4f} ms, forward + backward {t_fb * 1e3:.4f} ms", flush=True)
    for rows, warps in itertools.product(*(map(int, a.split(",")) for a in (args.rows, args.warps))):
      kf, kfb = kernel_paths(rows, warps, interpret=True if args.smoke else None)
      try:
        errs = compare(kfb(*data), want)
        k_f, k_fb = timed(kf, *data[:3], iters=args.iters), timed(kfb, *data, iters=args.iters)
      except Exception as e:  # a launch shape that does not compile is reported, not fatal
        print(f"  rows {rows} warps {warps}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        continue
      print(f"  rows {rows:3d} warps {warps}: forward {k_f * 1e3:.4f} ms ({t_f / k_f:.2f}x, {gb_f / k_f:.0f} GB/s), "
            f"forward + backward {k_fb * 1e3:.4f} ms ({t_fb / k_fb:.2f}x, {gb_fb / k_fb:.0f} GB/s); max rel diff "
            f"s/n/dx/dy/dscale " + " ".join(f"{e:.1e}" for e in errs), flush=True)
      out.append({"n": n, "d": d, "rows": rows, "warps": warps, "fwd_ms": k_f * 1e3, "fwd_bwd_ms": k_fb * 1e3,
                  "xla_fwd_ms": t_f * 1e3, "xla_fwd_bwd_ms": t_fb * 1e3, "rel_diff": errs})
  with open(os.path.join(os.environ.get("OUT", "/tmp"), "add_norm.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "rows": out}, fh, indent=1)


if __name__ == "__main__":
  main()
