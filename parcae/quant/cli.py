"""`parcae quant-error`: quantization MSE / relative error per format and scale rule.

  parcae quant-error --input acts.npz [--formats mxfp4 nvfp4] [--scale-modes floor rceil]
                     [--gaussian N] [--axis -1] [--search] [--json]
Tensors are quantized along --axis (last by default); arrays whose axis length is not a multiple of
the block size are skipped with a note. nvfp4 ignores --scale-modes (one E4M3 rule) and is reported
as two-level ("nvfp4") and single-level ("nvfp4_1l"). --search adds a ScaleSearch row (scale_mode
"search", default window) after each max-based floor row, with its MSE reduction against that row.
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from parcae.quant import formats as F
from parcae.quant.quantize import quantize_dequantize
from parcae.quant.scalesearch import quantize_dequantize_search


def _load(path):
  if path.endswith(".npz"):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  if path.endswith(".npy"):
    return {path.rsplit("/", 1)[-1][:-4]: np.load(path)}
  raise ValueError(f"--input {path!r}: expected a .npy or .npz file")


def _errors(x, fmt, mode, two_level, axis):
  xj = jnp.asarray(x, jnp.float32)
  if mode == "search":
    f = jax.jit(lambda v: quantize_dequantize_search(v, fmt, axis=axis, two_level=two_level))
  else:
    f = jax.jit(lambda v: quantize_dequantize(v, fmt, axis=axis, scale_mode=mode, two_level=two_level))
  err = np.asarray(f(xj), np.float64) - np.asarray(xj, np.float64)
  mse = float(np.mean(err**2))
  power = float(np.mean(np.asarray(xj, np.float64) ** 2))
  return {"mse": mse, "rel_mse": mse / power if power else float("nan")}


def quant_error_main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="parcae quant-error", description=__doc__.splitlines()[0])
  p.add_argument("--input", help=".npy or .npz file of tensors")
  p.add_argument("--formats", nargs="+", default=list(F.FORMATS), help=f"of {list(F.FORMATS)}")
  p.add_argument("--scale-modes", nargs="+", default=list(F.MX_SCALE_MODES),
                 help=f"MX scale rules, of {list(F.MX_SCALE_MODES)}")
  p.add_argument("--gaussian", type=int, default=0, help="also report on N this many N(0,1) samples")
  p.add_argument("--axis", type=int, default=-1, help="quantization (block) axis")
  p.add_argument("--search", action="store_true", help="also ScaleSearch scales (vs max-based floor)")
  p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
  args = p.parse_args(argv)
  for fmt in args.formats:
    F.get_format(fmt)
  for m in args.scale_modes:
    if m not in F.MX_SCALE_MODES:
      p.error(f"--scale-modes: {m!r} is not one of {list(F.MX_SCALE_MODES)}")
  tensors = _load(args.input) if args.input else {}
  if args.gaussian:
    n = -(-args.gaussian // 256) * 256
    tensors["gaussian"] = np.asarray(jax.random.normal(jax.random.key(0), (n // 256, 256)))
  if not tensors:
    p.error("nothing to measure: pass --input FILE and/or --gaussian N")
  rows, notes = [], []
  for name, x in tensors.items():
    for fmt in args.formats:
      f = F.get_format(fmt)
      if x.ndim == 0 or x.shape[args.axis] % f.block:
        notes.append(f"skipped {name} for {fmt}: axis length not a multiple of {f.block}")
        continue
      variants = ([("floor", True, "nvfp4"), ("floor", False, "nvfp4_1l")] if f.scale == "e4m3"
                  else [(m, True, fmt) for m in args.scale_modes])
      for mode, two_level, label in variants:
        r = _errors(x, fmt, mode, two_level, args.axis)
        rows.append({"tensor": name, "format": label, "scale_mode": mode, **r})
        if args.search and mode == "floor":
          s = _errors(x, fmt, "search", two_level, args.axis)
          rows.append({"tensor": name, "format": label, "scale_mode": "search", **s,
                       "reduction": 1.0 - s["mse"] / r["mse"] if r["mse"] else 0.0})
  if args.json:
    print(json.dumps({"rows": rows, "notes": notes}, indent=1))
  else:
    print(f"{'tensor':>16} {'format':>11} {'scale':>6} {'mse':>11} {'rel_mse':>9} {'search gain':>11}")
    for r in rows:
      gain = f"{100 * r['reduction']:10.1f}%" if "reduction" in r else ""
      print(f"{r['tensor'][:16]:>16} {r['format']:>11} {r['scale_mode']:>6} {r['mse']:>11.4e} "
            f"{r['rel_mse']:>9.5f} {gain:>11}")
    for n in notes:
      print("note:", n)
  return 0
