"""Compile bench/train_throughput.py's variants for a GPU this machine lacks; memory and a static profile.

Each variant's train step is compiled for compile-only GPUs (`parcae info --target`, needs jax's CUDA plugin,
not a GPU) at the throughput bench's shape (micro-batch 16 x 2048, accum 8), with the GPU run's kernels.
Reports XLA's peak memory estimate per device (0.1-0.3 GiB under the peak measured on an H100:
bench/RESULTS.md, session 17) and `hlo_static.summary` of the optimized program: kernel launches, bytes
moved, GEMM TFLOP per step. What it cannot tell: time (no autotuning, no device); compare variants by
their differences, then measure the promising ones on the GPU.

  python bench/aot_gpu.py --only gpt_medium,gpt_medium_mlp_act2 --target h100
  python bench/aot_gpu.py --only parcae_small --target h100 --sites 12   # + XLA's fusions by source line
  python bench/aot_gpu.py --only parcae_medium --target h100x8 --set mesh.fsdp=8   # sharded, 8 GPUs
Writes $OUT/aot_gpu.json (or ./aot_gpu.json) and, with --hlo, each program as <variant>.hlo.txt.gz.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", required=True, help="comma-separated variant names of train_throughput.VARIANTS")
  p.add_argument("--target", default="h100")
  p.add_argument("--micro", type=int, default=16)
  p.add_argument("--accum", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE (e.g. mesh.fsdp=8)")
  p.add_argument("--hlo", action="store_true", help="also write each optimized program")
  p.add_argument("--sites", type=int, default=0, help="print the N largest XLA fusion groups by source line")
  args = p.parse_args()
  # Without a device XLA cannot autotune, and its untuned choice puts every GEMM into a Triton fusion with a
  # default tiling; a GPU run's autotuner picks cuBLAS for the plain GEMMs, so compile with cuBLAS GEMMs.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
  import jax
  jax.config.update("jax_platforms", "cpu")
  import hlo_static
  import train_throughput as tt
  from parcae.config import apply_override
  from parcae.train.loop import compile_train_step, memory_row
  out_dir = os.environ.get("OUT", ".")
  os.makedirs(out_dir, exist_ok=True)
  rows = []
  for name in args.only.split(","):
    kind, size, overrides = tt.VARIANTS[name]
    cfg = tt.build_config(kind, size, overrides, argparse.Namespace(micro=args.micro, accum=args.accum,
                                                                    seq=args.seq, smoke=False))
    for kv in args.set:
      apply_override(cfg, kv)
    compiled, mesh, seconds = compile_train_step(cfg, target=args.target)
    hlo = compiled.as_text()
    row = {"variant": name, "target": args.target, "mesh": dict(mesh.shape), "compile_s": round(seconds, 1),
           **{k: round(v, 3) for k, v in memory_row(compiled).items()}, **hlo_static.summary(hlo)}
    rows.append(row)
    if args.hlo:
      with gzip.open(os.path.join(out_dir, f"{name}.hlo.txt.gz"), "wt") as f:
        f.write(hlo)
    kinds = row["kinds"]
    print(f"{name:28s} peak {row['peak_estimate_gib']:7.3f} GiB  temp {row['temp_gib']:7.3f}  "
          f"GEMM {row['gemm_TFLOP']:8.2f} TFLOP  moved {row['total_GB']:9.1f} GB  launches "
          f"{sum(v['launches'] for v in kinds.values()):7d}  (compile {seconds:.0f} s)", flush=True)
    for site, n, nbytes in hlo_static.sites(hlo)[:args.sites]:
      print(f"  {nbytes / 1e9:8.1f} GB {n:6d} launches  {site}", flush=True)
  with open(os.path.join(out_dir, "aot_gpu.json"), "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
