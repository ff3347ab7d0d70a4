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
The 2-D operand rows ("rot32+mxfp4 ax1", "mxfp8 ax0", ...) are the recipes' GEMM operands (Quartet's:
32-point Hadamard, then MXFP4 with the RMS rule forward or the headroom rule + stochastic rounding backward;
the plain MX recipes': no rotation), along K = axis 1 or the tokens = axis 0: the jnp path (rotation
matmul, transposes, fused quantizer) against the one-pass kernel `kernels/rotq.py`, for each launch shape
in --rotq-tiles x --rotq-warps (the "rows" column then holds the tile). Their
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


def run_case(shape, fmt, mode, rounding, iters, interpret, block_rows, ceiling, warps=None):
  from parcae.quant import formats
  from parcae.quant.kernels.qdq import TUNING
  rows_def, warps_def = TUNING[(formats.get_format(fmt.split("+")[0]).scale, rounding)]
  block_rows, warps = block_rows or rows_def, warps or warps_def
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
  kw = dict(fmt=fmt.split("+")[0], scale_mode=mode, rounding=rounding, key=jax.random.key(1))
  if fmt.endswith("+ts"):
    from parcae.quant.quantize import nv_tensor_scale
    kw["tensor_scale"] = nv_tensor_scale(x)
  f_jnp = jax.jit(functools.partial(quantize_dequantize, **kw))
  from parcae.quant.kernels import qdq_pallas
  f_pl = jax.jit(functools.partial(qdq_pallas, interpret=interpret, block_rows=block_rows, num_warps=warps, **kw))
  row = {"shape": list(shape), "fmt": fmt, "scale_mode": mode, "rounding": rounding, "block_rows": block_rows,
         "warps": warps}
  return measure(row, f_jnp, f_pl, x, iters, ceiling)


# (format, scale rule, rounding, axis, rotated): the recipes' 2-D operands through kernels/rotq.py.
# Rotated rows are Quartet's (RMS rule forward along K; headroom + SR backward, along K and along tokens);
# the unrotated ones are the plain MX recipes' operands along K and along the tokens (the wgrad side).
ROTQ_CASES = [("mxfp4", "rms", "nearest", 1, True), ("mxfp4", "headroom", "stochastic", 1, True),
              ("mxfp4", "headroom", "stochastic", 0, True), ("mxfp8_e4m3", "rceil", "nearest", 1, False),
              ("mxfp8_e4m3", "rceil", "nearest", 0, False), ("mxfp4", "floor", "nearest", 0, False),
              ("nvfp4", "floor", "stochastic", 1, False), ("mxfp4", "floor", "stochastic", 0, False),
              ("mxfp4", "rms", "nearest", 1, True, "relu2")]  # Quartet's fc2 forward: ReLU^2 in the kernel


def relu2(x):
  r = jnp.maximum(x, 0)
  return 0.5 * r * r


def run_rotq_case(shape, case, iters, ceiling, tile, warps, time_jnp=True):
  """One 2-D operand: [32-point Hadamard +] MX quantization along `axis`, jnp path vs the rotq kernel."""
  from parcae.quant import dense, hadamard
  from parcae.quant.kernels import rotq
  fmt, mode, rounding, axis, rotated, *act = case
  act = {"relu2": relu2}[act[0]] if act else None
  tile_def, warps_def = rotq.TUNING[(axis, rotated, rounding == "stochastic")]
  tile, warps = tile or tile_def, warps or warps_def
  x = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
  op = dense.Operand(fmt, scale_mode=mode, rounding=rounding)
  rot = None
  if rotated:
    rot = (32, hadamard.random_signs(jax.random.key(2), 32) if rounding == "stochastic" else None)
  key = jax.random.key(1)
  f_jnp = jax.jit(lambda v: dense.quantize_operand(v, op, axis, key, rotation=rot, impl="jnp", act=act)[0])
  f_pl = jax.jit(lambda v: rotq.rotate_quantize(v, fmt, axis, scale_mode=mode, rounding=rounding, key=key,
                                                rotation=rot, tile=tile, num_warps=warps, act=act)[0])
  name = f"{'relu2+' if act else ''}{'rot32+' if rotated else ''}{fmt.split('_')[0]} ax{axis}"
  row = {"shape": list(shape), "fmt": name, "scale_mode": mode, "rounding": rounding, "block_rows": tile,
         "warps": warps, "rotq": True}
  return measure(row, f_jnp, f_pl, x, iters, ceiling, time_jnp)


def run_unrot_case(shape, iters, ceiling, tile, warps, act):
  """The backward's clip mask + inverse 32-point rotation [+ ReLU^2's derivative] of a token operand's
  gradient: the jnp path (select, rotation GEMM, product) against the one-pass kernel `kernels/unrot.py`.
  Bytes: dr and the result in bf16, the int8 mask, and (act) x in bf16."""
  from parcae.quant.kernels import unrot
  dr = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(jnp.bfloat16)
  mask = (jax.random.uniform(jax.random.key(1), shape) < 0.99).astype(jnp.int8)
  x = jax.random.normal(jax.random.key(2), shape, jnp.float32).astype(jnp.bfloat16)
  act = relu2 if act else None
  f_jnp = jax.jit(lambda d: unrot.reference(d, mask, x, (32, None), act))
  f_pl = jax.jit(lambda d: unrot.unrotate(d, mask, x, (32, None), act, tile=tile, num_warps=warps))
  row = {"shape": list(shape), "fmt": f"unrot32{'+relu2' if act else ''}", "scale_mode": "-", "rounding": "-",
         "block_rows": tile or unrot.TILE, "warps": warps or unrot.WARPS, "rotq": True}
  return measure(row, f_jnp, f_pl, dr, iters, ceiling, nbytes=dr.size * (5 + 2 * (act is not None)))


def measure(row, f_jnp, f_pl, x, iters, ceiling, time_jnp=True, nbytes=None):
  """Compare the two implementations on x (mismatch count) and time both (bf16 bytes in + out, or nbytes)."""
  try:
    a, b = np.asarray(f_jnp(x), np.float32), np.asarray(f_pl(x), np.float32)
    row["mismatches"] = int(np.sum(~((a == b) | (np.isnan(a) & np.isnan(b)))))
  except Exception as e:  # report and keep going: one failing format should not hide the rest
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row
  nbytes = nbytes or x.size * 2 * 2
  for name, f in (("jnp", f_jnp), ("pallas", f_pl)):
    if name == "jnp" and not time_jnp:
      continue
    t = timed(f, x, iters)
    row[f"{name}_ms"] = t * 1e3
    row[f"{name}_tbs"] = nbytes / t / 1e12
    row[f"{name}_frac_hbm"] = nbytes / t / 1e12 / ceiling
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, interpret mode (CPU)")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--block-rows", default="", help="comma-separated quant blocks per program (default: TUNING)")
  p.add_argument("--quick", action="store_true", help="only 16384x8192")
  p.add_argument("--rounding", default="nearest,stochastic")
  p.add_argument("--warps", default="", help="comma-separated Triton warps per program, qdq rows (default: TUNING)")
  p.add_argument("--no-rotq", action="store_true", help="skip the 2-D operand (rotq kernel) rows")
  p.add_argument("--rotq-tiles", default="", help="comma-separated rotq tiles along the other axis (default: TUNING)")
  p.add_argument("--rotq-warps", default="", help="comma-separated rotq warps per program (default: TUNING)")
  p.add_argument("--rotq-cases", default="", help="comma-separated indices into ROTQ_CASES (default: all)")
  p.add_argument("--formats", default="", help="comma-separated subset of the qdq formats (default: all)")
  p.add_argument("--unrot", action="store_true", help="also the backward's unrot kernel (launch shapes from "
                 "--rotq-tiles x --rotq-warps)")
  args = p.parse_args(argv)
  interpret = args.smoke or jax.default_backend() == "cpu"
  shapes = [(64, 256)] if args.smoke else [(16384, 8192)] if args.quick else [(8192, 8192), (16384, 8192)]
  iters = 3 if args.smoke else args.iters
  rows = []
  ceiling = copy_tbs(shapes[-1], iters)
  print(f"elementwise ceiling (y = -x, bf16, {shapes[-1]}): {ceiling:.2f} TB/s", flush=True)
  formats = args.formats.split(",") if args.formats else [f for f, _ in CASES]
  ints = lambda s: [int(v) for v in s.split(",")] if s else [None]  # None: the kernel's TUNING table
  for br in ints(args.block_rows):
    for warps in ints(args.warps):
      for shape in shapes:
        for fmt, mode in [c for c in CASES if c[0] in formats]:
          for rounding in args.rounding.split(","):
            rows.append(run_case(shape, fmt, mode, rounding, iters, interpret, br, ceiling, warps))
            print(json.dumps(rows[-1]), flush=True)
  if not args.no_rotq:  # mismatches here are reported, not required to be 0: see the docstring
    picked = [ROTQ_CASES[int(i)] for i in args.rotq_cases.split(",")] if args.rotq_cases else ROTQ_CASES
    for case in picked:
      if case[2] not in args.rounding:
        continue
      first = True
      for tile in ints(args.rotq_tiles):
        for warps in ints(args.rotq_warps):
          rows.append(run_rotq_case(shapes[-1], case, iters, ceiling, tile, warps, time_jnp=first))
          first = False
          print(json.dumps(rows[-1]), flush=True)
  if args.unrot:
    for act in (False, True):
      for tile in ints(args.rotq_tiles):
        for warps in ints(args.rotq_warps):
          rows.append(run_unrot_case(shapes[-1], iters, ceiling, tile, warps, act))
          print(json.dumps(rows[-1]), flush=True)
  print(f"\n{'rows':>5} {'warps':>5} {'shape':>12} {'fmt':>15} {'round':>10} {'mism':>5} {'jnp ms':>8} {'jnp TB/s':>8} "
        f"{'pl ms':>8} {'pl TB/s':>8} {'pl %ceil':>8}")
  for r in rows:
    if "error" in r:
      print(f"{r['block_rows']:>5} {r['warps']:>5} {'x'.join(map(str, r['shape'])):>12} {r['fmt']:>15} "
            f"{r['rounding']:>10}  ERROR {r['error'][:80]}")
      continue
    jnp_ms, jnp_tbs = r.get("jnp_ms", float("nan")), r.get("jnp_tbs", float("nan"))
    print(f"{r['block_rows']:>5} {r['warps']:>5} {'x'.join(map(str, r['shape'])):>12} {r['fmt']:>15} "
          f"{r['rounding']:>10} {r['mismatches']:>5} {jnp_ms:>8.3f} {jnp_tbs:>8.2f} {r['pallas_ms']:>8.3f} "
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
