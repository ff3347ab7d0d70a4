"""The q/k/v GEMM with RoPE + QK-norm in its epilogue (parcae/model/qkv_rope.py) against XLA's GEMM followed by
the RoPE kernel (parcae/model/rope_norm.py), the path it replaces in blocks without value embeddings.

  PYTHONPATH=$PWD python3 bench/qkv_rope.py            # Hopper GPU: parcae-small (full and half batch), -medium
  PYTHONPATH=$PWD python3 bench/qkv_rope.py --smoke    # CPU: the jnp stand-in only, tiny shape

Per shape (tokens M, width D; heads of 128): first a check on inputs whose GEMM is exact (small integers), the
fused kernel's q, k, v and RoPE output against the stand-in (fraction of elements that differ, largest
difference relative to the element), then ms per call of
  fwd     : q, k, v (the no-grad loops, evaluation)
  fwd_res : q, k, v and the RoPE output r the backward reads (the forward under differentiation)
  vjp     : forward and backward, all three cotangents (x's and w's gradients)
for "unfused" (jnp.dot, then rope_norm's kernels) and "fused". Writes $OUT/qkv_rope.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from profiling import timed  # noqa: E402
from parcae.model import layers, qkv_rope, rope_norm  # noqa: E402

SHAPES = {"parcae_small": (16, 2048, 768), "parcae_small_half": (8, 2048, 768), "parcae_medium": (16, 2048, 1024)}
EPS = qkv_rope.EPS


def unfused(x, w, cos, sin, s, residual):
  """XLA's GEMM, then rope_norm's forward kernel (the model's path with rope_impl "pallas")."""
  return rope_norm._forward(jnp.dot(x, w), cos, sin, (), None, s=s, k=128, t=1, eps=EPS, norm=True,
                            cd=jnp.bfloat16, interpret=None, residual=residual)


def project(impl, b, s, d):
  """x [B, S, D], w -> q, k, v [B, S, H, K] through `impl`'s path (for the vjp)."""
  if impl == "fused":
    return lambda x, w, cos, sin: qkv_rope.qkv_rope_qk_norm(x, w, cos, sin, impl="mosaic" if not SMOKE else "jnp")
  def f(x, w, cos, sin):
    y = jnp.dot(x, w).reshape(b, s, 1, 3, d)
    return rope_norm.rope_qk_norm(y, cos, sin, n_heads=d // 128, norm=True)
  return f


def check(b, s, d, impl):
  """Differences of the fused kernel from the stand-in on exact-GEMM inputs, per output (q, k, v, r)."""
  ks = jax.random.split(jax.random.key(0), 2)
  x = jax.random.randint(ks[0], (b * s, d), -2, 3).astype(jnp.bfloat16)
  w = jax.random.randint(ks[1], (d, 3 * d), -1, 2).astype(jnp.bfloat16)
  cos, sin = layers.rope_tables(s, 128, 50000.0)
  got = jax.jit(lambda *a: qkv_rope.KERNELS[impl](*a, s, True))(x, w, cos, sin)
  want = jax.jit(lambda *a: qkv_rope._jnp(*a, s, True))(x, w, cos, sin)
  out = {}
  for name, a, ref in zip("qkvr", got, want):
    a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
    rel = np.abs(a - ref) / np.maximum(np.abs(ref), 1e-30)
    out[name] = {"differ": float((a != ref).mean()), "max_rel": float(rel[a != ref].max()) if (a != ref).any() else 0.0}
  return out


def bench(name, b, s, d, iters):
  m = b * s
  ks = jax.random.split(jax.random.key(1), 5)
  x = jax.random.normal(ks[0], (b, s, d), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (d, 3 * d)) * d ** -0.5).astype(jnp.bfloat16)
  cos, sin = layers.rope_tables(s, 128, 50000.0)
  cts = tuple(jax.random.normal(kk, (b, s, d // 128, 128), jnp.bfloat16) for kk in ks[2:])
  row = {"shape": [m, d], "check": check(b, s, d, "jnp" if SMOKE else "mosaic")}
  print(name, "check", row["check"], flush=True)
  x2 = x.reshape(m, d)
  for impl in ("unfused", "fused"):
    kern = (lambda *a, r: qkv_rope.KERNELS["jnp" if SMOKE else "mosaic"](*a, s, r)) if impl == "fused" else \
           (lambda *a, r: unfused(*a, s, r))
    f = project(impl, b, s, d)
    fns = {"fwd": jax.jit(lambda *a: kern(*a, r=False)), "fwd_res": jax.jit(lambda *a: kern(*a, r=True)),
           "vjp": jax.jit(lambda x, w, cos, sin: jax.vjp(lambda x, w: f(x, w, cos, sin), x, w)[1](cts))}
    for op, fn in fns.items():
      args = (x, w, cos, sin) if op == "vjp" else (x2, w, cos, sin)
      ms, _ = timed(fn, args, iters)
      row[f"{impl}_{op}_ms"] = ms
      print(f"{name:18s} {impl:8s} {op:8s} {ms * 1e3:8.1f} us", flush=True)
  for op in ("fwd", "fwd_res", "vjp"):
    row[f"{op}_gain"] = 1 - row[f"fused_{op}_ms"] / row[f"unfused_{op}_ms"]
    print(f"{name:18s} {op:8s} fused / unfused - 1 = {-row[f'{op}_gain']:+.1%}", flush=True)
  return row


VARIANTS = {  # the fused kernel's launch knobs: qkv_rope.PREFETCH / TABLES, mlp_kernels.STEPS_NO_H
    "gmem": {"TABLES": "gmem"}, "gmem_prefetch": {"TABLES": "gmem", "PREFETCH": True},
    "gmem_steps3": {"TABLES": "gmem", "STEPS_NO_H": 3}, "smem": {"TABLES": "smem"},
    "smem_stages2_rows128": {"TABLES": "smem", "SMEM_STAGES": 2, "SMEM_OUT_ROWS": 128}}


def variants(b, s, d, iters, names):
  """The fused kernel's fwd / fwd_res per launch variant of VARIANTS, each checked as in `check`."""
  from parcae.model import mlp_kernels
  x = jax.random.normal(jax.random.key(1), (b * s, d), jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(2), (d, 3 * d)) * d ** -0.5).astype(jnp.bfloat16)
  cos, sin = layers.rope_tables(s, 128, 50000.0)
  out = {}
  for name in names:
    knobs = VARIANTS[name]
    saved = {k: getattr(qkv_rope if hasattr(qkv_rope, k) else mlp_kernels, k) for k in knobs}
    try:
      for k, v in knobs.items():
        setattr(qkv_rope if hasattr(qkv_rope, k) else mlp_kernels, k, v)
      row = {"check": check(b, s, d, "mosaic")}
      for op, r in (("fwd", False), ("fwd_res", True)):
        row[f"{op}_ms"], _ = timed(jax.jit(lambda *a, r=r: qkv_rope._kernel(*a, s, r)), (x, w, cos, sin), iters)
    finally:
      for k, v in saved.items():
        setattr(qkv_rope if hasattr(qkv_rope, k) else mlp_kernels, k, v)
    out[name] = row
    print(f"variant {name}: fwd {row['fwd_ms'] * 1e3:.1f} us, fwd_res {row['fwd_res_ms'] * 1e3:.1f} us, "
          f"differ {max(v['differ'] for v in row['check'].values()):.2e}", flush=True)
  return out


SMOKE = False


def main(argv=None):
  global SMOKE
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--smoke", action="store_true", help="CPU: the jnp stand-in at a tiny shape")
  p.add_argument("--only", default=",".join(SHAPES), help="shapes to run")
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--variants", default="", help="GPU: also the fused kernel's launch variants at parcae-small "
                 f"(`variants`), some of {','.join(VARIANTS)}")
  args = p.parse_args(argv)
  SMOKE = args.smoke
  shapes = {"tiny": (2, 128, 256)} if SMOKE else {n: SHAPES[n] for n in args.only.split(",")}
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  out = {n: bench(n, *shape, iters=2 if SMOKE else args.iters) for n, shape in shapes.items()}
  if args.variants:
    out["variants"] = variants(*SHAPES["parcae_small"], args.iters, args.variants.split(","))
  path = os.path.join(os.environ.get("OUT", "."), "qkv_rope.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
