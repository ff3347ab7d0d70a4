"""Causal attention at the micro-batch's shapes: cuDNN (the model's) against jax's Mosaic GPU flash attention.

jax ships a warp-specialized Hopper attention written in Pallas Mosaic GPU
(`jax.experimental.pallas.ops.gpu.attention_mgpu`: forward with causal masking; its backward has no causal
mask). This times, for q, k, v [B, S, H, K] bf16 (B x S = 16 x 2048):
  cudnn fwd        : jax.nn.dot_product_attention(..., implementation="cudnn")
  cudnn fwd+bwd    : its value and the three input gradients (the training step's cost)
  mgpu fwd         : attention_mgpu.attention, causal, over a sweep of (block_q, block_kv, steps)
and checks each forward against float64 on the first sequence (max |err| / max |ref|).

  python bench/attention.py                      # parcae-small and parcae-medium shapes
  python bench/attention.py --dtype float16      # the Mosaic kernel runs only float16 on jax 0.11.2
Writes $OUT/attention.json (or ./attention.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from profiling import sustained, sustained_text, timed  # noqa: E402

SHAPES = {"parcae_small": (16, 2048, 6, 128), "parcae_medium": (16, 2048, 8, 128)}
SWEEP = [(64, 128, 2), (64, 64, 2), (128, 128, 2), (64, 128, 3), (128, 64, 2), (64, 256, 2)]




def reference(q, k, v, scale):
  """Causal softmax attention of the first sequence in float64, scores q.k * scale: [S, H, K]."""
  q, k, v = (np.asarray(t[0], np.float64) for t in (q, k, v))
  s = np.einsum("qhd,khd->hqk", q, k) * scale
  s = np.where(np.tril(np.ones(s.shape[1:], bool)), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="parcae_small,parcae_medium")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--dtype", default="bfloat16", help="bfloat16 (the model's) or float16 (what the Mosaic kernel "
                 "runs on jax 0.11.2: its speed, not a drop-in)")
  p.add_argument("--sustain", type=float, default=0.0, help="also time each over this many seconds of back-to-back "
                 "calls, with the GPU's clock, power and energy per call (bench/profiling.sustained)")
  args = p.parse_args()
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  rows = []
  print(jax.devices()[0].device_kind, flush=True)
  for name in args.only.split(","):
    b, s, h, kd = SHAPES[name]
    ks = jax.random.split(jax.random.key(0), 4)
    dt = jnp.dtype(args.dtype)
    q, k, v, do = (jax.random.normal(kk, (b, s, h, kd), dt) for kk in ks)
    qs = (q * kd ** -0.5).astype(dt)  # the Mosaic kernel does not scale the scores
    refs = {"cudnn": reference(q, k, v, kd ** -0.5), "mgpu": reference(qs, k, v, 1.0)}
    flops = 4 * b * h * s * s * kd / 2  # causal: half the score matrix

    def record(what, fn, inputs, mult=1.0, check=True):
      try:
        ms, out = timed(fn, inputs, args.iters)
      except Exception as e:  # a block shape that does not fit shared memory is reported, not fatal
        print(f"{name:14s} {what:40s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        return
      err = None
      if check:
        o = np.asarray((out[0] if isinstance(out, tuple) else out)[0], np.float64)
        ref = refs[what.split()[0]]
        err = float(np.max(np.abs(o - ref)) / np.max(np.abs(ref)))
      tf = mult * flops / ms / 1e9
      row = {"shape": name, "dtype": args.dtype, "what": what, "ms": round(ms, 4), "tflops": round(tf, 1), "rel_err": err}
      line = f"{name:14s} {what:40s} {ms:8.4f} ms {tf:7.1f} TF/s  err {err}"
      if args.sustain:
        row.update(sustained(fn, inputs, max(1, int(args.sustain * 1e3 / ms))))
        line += sustained_text(row)
      rows.append(row)
      print(line, flush=True)

    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    record("cudnn fwd", jax.jit(cudnn), (q, k, v))

    def fwd_bwd(q, k, v, do):
      out, vjp = jax.vjp(cudnn, q, k, v)
      return (out,) + vjp(do)
    record("cudnn fwd+bwd", jax.jit(fwd_bwd), (q, k, v, do), mult=3.5)  # bwd ~ 2.5x fwd flops
    for bq, bkv, steps in SWEEP:
      cfg = am.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=steps, causal=True)
      record(f"mgpu fwd bq={bq} bkv={bkv} steps={steps}", jax.jit(lambda q, k, v, c=cfg: am.attention(q, k, v, c)),
             (qs, k, v))
  with open(os.path.join(os.environ.get("OUT", "."), "attention.json"), "w") as fh:
    json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main()
