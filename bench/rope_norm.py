"""RoPE + QK-norm of the q/k/v GEMM output: the Pallas kernels (parcae.model.rope_norm) against XLA's fusion.

  PYTHONPATH=$PWD python bench/rope_norm.py            # GPU: parcae-small's attention (16 x 2048, 6 x 128)
  PYTHONPATH=$PWD python bench/rope_norm.py --smoke    # CPU: tiny shape, interpret mode

Checks the kernels against the jnp path (fraction of elements that differ and the largest difference
relative to the tensor's largest value, for q / k / v and the y gradient), then times the forward and the
forward + backward (the vjp with all three cotangents) of both, for each launch shape in --rows x --warps
(--iters calls back to back after a warm-up, median of 5). Bandwidth: bf16 bytes the kernels must move per
second (forward: read and write q, k, v; under the vjp the forward also writes q's and k's RoPE output, which
the backward reads with the three cotangents before writing the gradient).
Writes $OUT/rope_norm.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from parcae.model import layers, rope_norm


def timed(fn, *args, iters):
  """Seconds per call: `iters` calls dispatched back to back (launch latency hidden behind the previous
  call), median of 5 such runs."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    ts.append((time.perf_counter() - t0) / iters)
  return statistics.median(ts)


def jnp_path(y, cos, sin, h):
  b, s, t, _, g = y.shape
  q, k, v = (y[:, :, :, i].reshape(b, s, h, t * g // h) for i in range(3))
  return layers.qk_norm(layers.apply_rope(q, cos, sin)), layers.qk_norm(layers.apply_rope(k, cos, sin)), v


def compare(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return {"differ": float((a != b).mean()), "max_rel": float(np.abs(a - b).max() / np.abs(b).max())}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--rows", default="32,64,128")
  p.add_argument("--warps", default="4,8")
  args = p.parse_args()
  b, s, h, k = (2, 64, 2, 64) if args.smoke else (16, 2048, 6, 128)
  y = (3 * jax.random.normal(jax.random.key(0), (b, s, 1, 3, h * k))).astype(jnp.bfloat16)
  cos, sin = layers.rope_tables(s, k, 50000.0)
  cts = tuple(jax.random.normal(jax.random.key(i + 1), (b, s, h, k)).astype(jnp.bfloat16) for i in range(3))
  fused = lambda y: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True)
  plain = lambda y: jnp_path(y, cos, sin, h)
  grad = lambda f: jax.jit(lambda y, cts: jax.vjp(f, y)[1](cts)[0])
  mib = b * s * h * k * 2  # bytes of one of q, k, v
  fwd_bytes, bwd_bytes = 6 * mib, 2 * mib + 8 * mib  # bwd: the residual's write and the backward kernel
  rows = [{"variant": "xla", "fwd_ms": 1e3 * timed(jax.jit(plain), y, iters=args.iters),
           "fwd_bwd_ms": 1e3 * timed(grad(plain), y, cts, iters=args.iters)}]
  want, want_g = jax.jit(plain)(y), grad(plain)(y, cts)
  for r in map(int, args.rows.split(",")):
    for w in map(int, args.warps.split(",")):
      if s % r:
        continue
      rope_norm.ROWS, rope_norm.WARPS = r, w
      f, g = jax.jit(lambda y: fused(y)), grad(lambda y: fused(y))  # fresh traces: ROWS / WARPS are read there
      row = {"variant": f"pallas rows={r} warps={w}", "fwd_ms": 1e3 * timed(f, y, iters=args.iters),
             "fwd_bwd_ms": 1e3 * timed(g, y, cts, iters=args.iters)}
      row["check"] = {n: compare(a, bb) for n, a, bb in zip("qkv", f(y), want)}
      row["check"]["dy"] = compare(g(y, cts), want_g)
      rows.append(row)
  for row in rows:
    row["fwd_TBps"] = fwd_bytes / row["fwd_ms"] / 1e9
    row["fwd_bwd_TBps"] = (fwd_bytes + bwd_bytes) / row["fwd_bwd_ms"] / 1e9
    print(f"{row['variant']:28s} fwd {row['fwd_ms']:7.3f} ms ({row['fwd_TBps']:4.2f} TB/s)  fwd+bwd "
          f"{row['fwd_bwd_ms']:7.3f} ms ({row['fwd_bwd_TBps']:4.2f} TB/s)  {json.dumps(row.get('check', ''))}")
  out = os.environ.get("OUT", ".")
  with open(os.path.join(out, "rope_norm.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind, "shape": [b, s, h, k], "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
