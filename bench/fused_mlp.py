"""The ReLU^2 MLP's GEMMs with their elementwise step fused (bench/triton_gemm.py, model/mlp_kernels.py) vs XLA.

For each shape (tokens M = micro-batch 16 x 2048, width D, MLP width F) and each Pallas tile shape, times:
  gemm : x[M, D] @ w[D, F] -> bf16             (XLA: cuBLAS; Pallas: the same kernel without the epilogue)
  gemmT: g[M, D] @ w2[F, D]^T -> bf16          (the backward's GEMM without its h operand; Mosaic GPU only)
  fwd  : relu2(x @ w)                           (XLA: GEMM + fusion; Pallas: relu2_matmul)
  bwd  : (g[M, D] @ w2[F, D]^T) * max(h, 0)     (XLA: GEMM + fusion; Pallas: relu_grad_matmul)
  pair : (h, relu2(h)), h = x @ w                 (XLA: GEMM + fusion; Mosaic GPU only: pair_matmul)
and checks each result against float64 on 512 rows drawn across all M (every row tile's turn in the kernels'
tile order is as likely to be checked; max |err| / max |ref|; bf16's half ulp is 2^-9).
The library's Mosaic GPU kernels (parcae/model/mlp_kernels.py: wgmma + TMA, warp-specialized) run too on a
Hopper GPU (persistent: one program per SM), without and with 2- and 4-SM clusters sharing the weight tile
(--impls).

  python bench/fused_mlp.py                       # both model sizes, the tile sweep
  python bench/fused_mlp.py --smoke               # tiny shapes, interpret mode (CPU)
Writes $OUT/fused_mlp.json (or ./fused_mlp.json).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import triton_gemm as mk  # noqa: E402
from profiling import sustained, sustained_text, timed  # noqa: E402
from parcae.model import mlp_kernels  # noqa: E402
from parcae.model.layers import relu2  # noqa: E402

SHAPES = {"parcae_small": (32768, 768, 3072), "parcae_medium": (32768, 1024, 4096),
          # attention's GEMMs at parcae-small (op gemm): q/k/v side by side, the output projection
          "small_qkv": (32768, 768, 2304), "small_o": (32768, 768, 768),
          # parcae-small's MLP GEMM with a 2x and 4x longer K loop (same output tiles): time = tiles x (a + b K)
          # separates a tile's fixed cost (epilogue, pipeline refill) from its K loop
          "small_k2x": (32768, 1536, 3072), "small_k4x": (32768, 3072, 3072)}
SWEEP = [mk.Tiles(128, 128, 64, 4, 3), mk.Tiles(128, 128, 64, 8, 3), mk.Tiles(128, 128, 64, 4, 4),
         mk.Tiles(128, 256, 64, 8, 3), mk.Tiles(128, 256, 64, 8, 4), mk.Tiles(256, 128, 64, 8, 3),
         mk.Tiles(64, 256, 64, 4, 4), mk.Tiles(128, 256, 32, 8, 4)]


XLA = {"gemm": jax.jit(lambda x, w: jnp.dot(x, w)),
       "fwd": jax.jit(lambda x, w: relu2(jnp.dot(x, w))),
       "bwd": jax.jit(lambda g, w2, h: jnp.dot(g, w2.T) * jnp.maximum(h, 0)),
       "gemmT": jax.jit(lambda g, w2: jnp.dot(g, w2.T)),
       "pair": jax.jit(lambda x, w: (lambda h: (h, relu2(h)))(jnp.dot(x, w)))}


def operands(m, d, f):
  """The MLP's operands at [M tokens, width D, hidden F] (bf16): x, w [D, F], g, w2 [F, D] and h = x @ w."""
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (m, d), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (d, f), jnp.float32) / np.sqrt(d)).astype(jnp.bfloat16)
  g = jax.random.normal(ks[2], (m, d), jnp.bfloat16)
  w2 = (jax.random.normal(ks[3], (f, d), jnp.float32) / np.sqrt(f)).astype(jnp.bfloat16)
  return x, w, g, w2, XLA["gemm"](x, w)


def reference(op, args, rows):
  f = lambda a: np.asarray(a[rows], np.float64)  # the checked rows of x, g, h
  if op == "gemm":
    return f(args[0]) @ np.asarray(args[1], np.float64)
  if op == "gemmT":
    return f(args[0]) @ np.asarray(args[1], np.float64).T
  if op == "pair":  # h and relu2(h) side by side
    return np.concatenate([reference("gemm", args, rows), reference("fwd", args, rows)], axis=1)
  if op == "fwd":
    h = np.asarray((f(args[0]) @ np.asarray(args[1], np.float64)).astype(np.float32).astype(jnp.bfloat16),
                   np.float64)
    return 0.5 * np.maximum(h, 0) ** 2
  g, w2, h = args
  da = np.asarray((f(g) @ np.asarray(w2, np.float64).T).astype(np.float32).astype(jnp.bfloat16), np.float64)
  return da * np.maximum(np.asarray(h[rows], np.float64), 0)




def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="parcae_small,parcae_medium")
  p.add_argument("--iters", type=int, default=100)
  p.add_argument("--ops", default="gemm,fwd,bwd,pair,gemmT")
  p.add_argument("--clusters", default="1,2,4", help="Mosaic GPU cluster sizes to time")
  p.add_argument("--knobs", default="", help="Mosaic GPU launch variants to time, ';'-separated, each "
                 "comma-separated mlp_kernels settings, e.g. 'STEPS_NO_H=4,PIECE_NO_H=64;H_FETCH_STEP=3' "
                 "(default: the library's)")
  p.add_argument("--sustain", type=float, default=0.0,
                 help="also time each kernel over this many seconds of back-to-back calls, with the GPU's clock and "
                 "power (at the power limit a step pays in energy: millijoules per call decide, not the burst)")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--impls", default="xla,pallas,mgpu", help="which of xla, pallas (Triton), mgpu (Mosaic GPU)")
  args = p.parse_args()
  shapes = {"smoke": (512, 128, 256)} if args.smoke else {k: SHAPES[k] for k in args.only.split(",")}
  sweep = [mk.Tiles(128, 128, 64, 4, 3), mk.Tiles(128, 256, 32, 8, 4)] if args.smoke else SWEEP
  iters = 2 if args.smoke else args.iters
  rows_out = []
  print(jax.devices()[0].device_kind, flush=True)
  for name, (m, d, f) in shapes.items():
    x, w, g, w2, h = operands(m, d, f)
    inputs = {"gemm": (x, w), "fwd": (x, w), "bwd": (g, w2, h), "pair": (x, w), "gemmT": (g, w2)}
    flops = 2 * m * d * f
    rows = np.sort(np.random.default_rng(0).choice(m, min(m, 512), replace=False))  # rows checked
    refs = {op: reference(op, a, rows) for op, a in inputs.items()}

    def record(op, impl, tiles, fn):
      if op not in args.ops.split(","):
        return
      try:
        ms, out = timed(fn, inputs[op], iters)
        out = jnp.concatenate(out, axis=1) if isinstance(out, tuple) else out
      except Exception as e:  # a tile shape that does not compile (shared memory) is reported, not fatal
        print(f"{name:14s} {op:4s} {impl:6s} {tiles} FAILED {type(e).__name__}: {str(e)[:300]} ... {str(e)[-600:]}", flush=True)
        return
      ref = refs[op]
      err = float(np.max(np.abs(np.asarray(out[rows], np.float64) - ref)) / np.max(np.abs(ref)))
      row = {"shape": name, "m": m, "d": d, "f": f, "op": op, "impl": impl, "tiles": tiles and list(tiles),
             "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1), "rel_err": err}
      line = f"{name:14s} {op:4s} {impl:6s} {str(tiles):60s} {ms:8.4f} ms {row['tflops']:7.1f} TF/s  err {err:.2e}"
      if args.sustain:
        row.update(sustained(fn, inputs[op], max(1, int(args.sustain * 1e3 / ms))))
        line += sustained_text(row)
      rows_out.append(row)
      print(line, flush=True)

    for op in ("gemm", "fwd", "bwd", "pair", "gemmT"):
      record(op, "xla", None, XLA[op])
    for t in sweep if "pallas" in args.impls else ():
      if not mk.supported(m, d, f, t):
        continue
      record("gemm", "pallas", t, functools.partial(mk.relu2_matmul, tiles=t, act=False))
      record("fwd", "pallas", t, functools.partial(mk.relu2_matmul, tiles=t))
      record("bwd", "pallas", t, functools.partial(mk.relu_grad_matmul, tiles=t))
    if not args.smoke and "mgpu" in args.impls:  # Mosaic GPU kernels (wgmma + TMA): Hopper only
      variants = [dict(kv.split("=") for kv in v.split(",")) if v else {} for v in args.knobs.split(";")]
      names = {"CLUSTER"} | {k for v in variants for k in v}
      default = {k: getattr(mlp_kernels, k) for k in names}
      for cluster, variant in itertools.product(map(int, args.clusters.split(",")), variants):
        # read when a kernel is traced: a fresh jit per launch shape
        for k, v in dict(default, CLUSTER=cluster, **{k: int(v) for k, v in variant.items()}).items():
          setattr(mlp_kernels, k, v)
        kw = tuple((k.lower(), getattr(mlp_kernels, k)) for k in sorted(names))
        record("gemm", "mgpu_ws", kw, jax.jit(lambda x, w: mlp_kernels._ws_gemm(  # pylint: disable=protected-access
            (x, w), x.shape[1], w.shape[1], lambda a, _: (a,), trans_b=False, steps=mlp_kernels.STEPS_NO_H,
            piece=mlp_kernels.PIECE_NO_H)[0]))
        # fresh lambdas: jit's trace cache is keyed on the function, and the knobs are read when tracing
        record("fwd", "mgpu_ws", kw, jax.jit(lambda x, w: mlp_kernels._relu2_matmul_mosaic(x, w)))  # pylint: disable=protected-access
        record("bwd", "mgpu_ws", kw, jax.jit(lambda g, w, h: mlp_kernels._relu_grad_matmul_mosaic(g, w, h)))  # pylint: disable=protected-access
        record("pair", "mgpu_ws", kw, jax.jit(lambda x, w: mlp_kernels._pair_matmul_mosaic(x, w)))  # pylint: disable=protected-access
        record("gemmT", "mgpu_ws", kw, jax.jit(lambda g, w2: mlp_kernels._ws_gemm(  # pylint: disable=protected-access
            (g, w2), g.shape[1], w2.shape[0], lambda a, _: (a,), trans_b=True)[0]))
      for k, v in default.items():
        setattr(mlp_kernels, k, v)
  with open(os.path.join(os.environ.get("OUT", "."), "fused_mlp.json"), "w") as fh:
    json.dump(rows_out, fh, indent=1)
  best = {}
  for r in rows_out:
    key = (r["shape"], r["op"], r["impl"])
    if key not in best or r["ms"] < best[key]["ms"]:
      best[key] = r
  print("\nbest per (shape, op, impl):")
  for (s, op, impl), r in sorted(best.items()):
    print(f"  {s:14s} {op:4s} {impl:6s} {r['ms']:8.4f} ms  {r['tflops']:7.1f} TF/s  tiles {r['tiles']}")


if __name__ == "__main__":
  main()
