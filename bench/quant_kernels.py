"""Benchmark jnp vs Pallas fused quantize-dequantize on large bf16 tensors (run on the GPU).

  PYTHONPATH=$PWD python bench/quant_kernels.py            # GPU: 8192x8192 and 16384x8192
  PYTHONPATH=$PWD python bench/quant_kernels.py --smoke    # CPU: tiny sizes, interpret mode

Per format and rounding: checks Pallas == jnp bit for bit, times both (warm-up, then the median of
--iters runs, block_until_ready) and reports bandwidth (bf16 bytes read + written; stochastic
rounding reads no uniforms, it hashes element indices in the kernel) against the bandwidth of a
plain bf16 elementwise op (y = -x) measured in the same run on the same shape (2.89 TB/s on the
H100, ~4.3 TB/s on the H200). "nvfp4+ts" is NVFP4 with the FP32 tensor scale given (as when the
producer of x reports its amax): the kernel alone, without the tensor-amax read pass that plain
"nvfp4" includes. Writes $OUT/quant_kernels.json.
The "rot32+mxfp4" rows are Quartet's operands (32-point Hadamard, then MXFP4 with the RMS rule forward or
the headroom rule + stochastic rounding backward, along K = axis 1 or the tokens = axis 0): the jnp path
(rotation matmul, transposes, fused quantizer) against the one-pass kernel `kernels/rotq.py`. Their
mismatch counts are reported but not required to be 0: on a GPU the kernel's in-tile rotation dot may sum
in another order than cuBLAS, and the RMS rule's block sums may too (in interpret mode they are equal).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from parcae.quant import quantize_dequantize

CASES = [("mxfp4", "floor"), ("mxfp8_e4m3", "rceil"), ("nvfp4", "floor"), ("nvfp4+ts", "floor"),
         ("mxint8", "floor")]


def timed(f, x, iters):
  """Median over 5 repeats of the mean time of `iters` back-to-back calls (dispatch overlaps the kernels)."""
  f(x).block_until_ready()  # compile + warm-up
  f(x).block_until_ready()
  ts = []
  for _ in range(5):
    t0 = time.perf_counter()
    for _ in range(iters):
      y = f(x)
    y.block_until_ready()
    ts.append((time.perf_counter() - t0) / iters)
  return statistics.median(ts)


def copy_tbs(shape, iters):
  """Bandwidth of y = -x on bf16 (one read, one write): the elementwise ceiling on this device."""
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
  return x.size * 4 / timed(jax.jit(jnp.negative), x, iters) / 1e12


def run_case(shape, fmt, mode, rounding, iters, interpret, block_rows, ceiling):
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
  kw = dict(fmt=fmt.split("+")[0], scale_mode=mode, rounding=rounding, key=jax.random.key(1))
  if fmt.endswith("+ts"):
    from parcae.quant.quantize import nv_tensor_scale
    kw["tensor_scale"] = nv_tensor_scale(x)
  f_jnp = jax.jit(functools.partial(quantize_dequantize, **kw))
  from parcae.quant.kernels import qdq_pallas
  f_pl = jax.jit(functools.partial(qdq_pallas, interpret=interpret, block_rows=block_rows, **kw))
  row = {"shape": list(shape), "fmt": fmt, "scale_mode": mode, "rounding": rounding, "block_rows": block_rows}
  return measure(row, f_jnp, f_pl, x, iters, ceiling)


def run_rotq_case(shape, mode, rounding, axis, iters, ceiling):
  """A quartet operand: 32-point Hadamard + MXFP4 along `axis`, jnp path vs the one-pass rotq kernel."""
  from parcae.quant import dense, hadamard
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
  op = dense.Operand("mxfp4", scale_mode=mode, rounding=rounding)
  rot = (32, hadamard.random_signs(jax.random.key(2), 32) if rounding == "stochastic" else None)
  f = lambda impl: jax.jit(lambda v: dense.quantize_operand(v, op, axis, jax.random.key(1), rotation=rot,
                                                            impl=impl)[0])
  row = {"shape": list(shape), "fmt": f"rot32+mxfp4 ax{axis}", "scale_mode": mode, "rounding": rounding,
         "block_rows": 0, "rotq": True}
  return measure(row, f("jnp"), f("pallas"), x, iters, ceiling)


def measure(row, f_jnp, f_pl, x, iters, ceiling):
  """Compare the two implementations on x (mismatch count) and time both (bf16 bytes in + out)."""
  try:
    a, b = np.asarray(f_jnp(x), np.float32), np.asarray(f_pl(x), np.float32)
    row["mismatches"] = int(np.sum(~((a == b) | (np.isnan(a) & np.isnan(b)))))
  except Exception as e:  # report and keep going: one failing format should not hide the rest
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row
  nbytes = x.size * 2 * 2
  for name, f in (("jnp", f_jnp), ("pallas", f_pl)):
    t = timed(f, x, iters)
    row[f"{name}_ms"] = t * 1e3
    row[f"{name}_tbs"] = nbytes / t / 1e12
    row[f"{name}_frac_hbm"] = nbytes / t / 1e12 / ceiling
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode (CPU)")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--block-rows", default="256", help="comma-separated Pallas block sizes (quant blocks/program)")
  p.add_argument("--quick", action="store_true", help="only 16384x8192")
  p.add_argument("--rounding", default="nearest,stochastic")
  p.add_argument("--no-rotq", action="store_true", help="skip the rotate + quantize (quartet operand) rows")
  args = p.parse_args(argv)
  interpret = args.smoke or jax.default_backend() == "cpu"
  shapes = [(64, 256)] if args.smoke else [(16384, 8192)] if args.quick else [(8192, 8192), (16384, 8192)]
  iters = 3 if args.smoke else args.iters
  rows = []
  ceiling = copy_tbs(shapes[-1], iters)
  print(f"elementwise ceiling (y = -x, bf16, {shapes[-1]}): {ceiling:.2f} TB/s", flush=True)
  for br in [int(b) for b in args.block_rows.split(",")]:
    for shape in shapes:
      for fmt, mode in CASES:
        for rounding in args.rounding.split(","):
          rows.append(run_case(shape, fmt, mode, rounding, iters, interpret, br, ceiling))
          print(json.dumps(rows[-1]), flush=True)
  if not args.no_rotq:  # mismatches here are reported, not required to be 0: see the docstring
    for mode, rounding, axis in (("rms", "nearest", 1), ("headroom", "stochastic", 1), ("headroom", "stochastic", 0)):
      rows.append(run_rotq_case(shapes[-1], mode, rounding, axis, iters, ceiling))
      print(json.dumps(rows[-1]), flush=True)
  print(f"\n{'rows':>5} {'shape':>12} {'fmt':>11} {'round':>10} {'mism':>5} {'jnp ms':>8} {'jnp TB/s':>8} "
        f"{'pl ms':>8} {'pl TB/s':>8} {'pl %ceil':>8}")
  for r in rows:
    if "error" in r:
      print(f"{'x'.join(map(str, r['shape'])):>12} {r['fmt']:>11} {r['rounding']:>10}  ERROR {r['error'][:80]}")
      continue
    print(f"{r['block_rows']:>5} {'x'.join(map(str, r['shape'])):>12} {r['fmt']:>11} {r['rounding']:>10} "
          f"{r['mismatches']:>5} {r['jnp_ms']:>8.3f} {r['jnp_tbs']:>8.2f} {r['pallas_ms']:>8.3f} "
          f"{r['pallas_tbs']:>8.2f} {100 * r['pallas_frac_hbm']:>6.1f}%")
  ok = all("error" not in r and r["mismatches"] == 0 for r in rows if not r.get("rotq"))
  print("bit-identical jnp vs pallas:", "yes" if ok else "NO")
  out = os.environ.get("OUT")
  if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "quant_kernels.json"), "w") as fh:
      json.dump({"device": str(jax.devices()[0]), "jax": jax.__version__, "ceiling_tbs": ceiling,
                 "rows": rows}, fh, indent=1)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
