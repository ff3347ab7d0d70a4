"""Weight-gradient GEMMs dW = x^T @ dy (tokens contracted) at the models' shapes, by formulation and XLA flags.

Written to test session 35's reading that the attention projections' weight gradients ran at ~356 TF/s (XLA
splits their K, 32,768 tokens, into a batch of 2 or 4: bf16[2, 16384, 768] x [2, 16384, 2304] -> f32[2, 768,
2304], then a reduce); it found them at 700+ TF/s alone and the reading wrong (bench/RESULTS.md, session 36).
Each flag set runs in its own process (XLA reads its flags once); each times every formulation of every shape:
  model   : the model's autodiff: the vjp of bf16(x) @ bf16(w) with respect to the float32 w (bf16 product)
  f32out  : dot_general contracting the tokens with a float32 result (no bf16 rounding of the product)
  chunksN : the tokens cut into N chunks by hand, a batched product in float32, summed, rounded to bf16
  kmajor  : x^T and dy^T given (tokens minor in both operands), the product of the two (layout only: the
            transposes are not timed)
  concat4 : four uses of one weight (a loop's four gradient iterations) as one product over 4 x the tokens;
            its time is reported per use
and checks each against a float32 product on the GPU (max |err| / max |ref| under 2^-7: bf16's rounding of the
output plus the float32 sums' order).

  python bench/wgrad.py                          # the default flag sets
  python bench/wgrad.py --flags "default;--xla_gpu_enable_cublaslt=false" --profile   # + each row's kernels
  python bench/wgrad.py --smoke                  # tiny shapes on the CPU
Writes $OUT/wgrad.json (or ./wgrad.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (tokens, in width, out width): parcae-small's q/k/v side by side, output projection, MLP up and down;
# parcae-medium's q/k/v and output projection
SHAPES = {"small_qkv": (32768, 768, 2304), "small_o": (32768, 768, 768), "small_fc": (32768, 768, 3072),
          "small_proj": (32768, 3072, 768), "medium_qkv": (32768, 1024, 3072), "medium_o": (32768, 1024, 1024)}
# (--xla_gpu_experimental_enable_split_k_rewrite=false, which would keep K whole, is unknown to jax 0.11.2: fatal)
FLAGS = ["default", "--xla_gpu_enable_cublaslt=false",
         "--xla_gpu_enable_triton_gemm=true --xla_gpu_triton_gemm_any=true"]
FORMS = ["model", "f32out", "chunks2", "chunks4", "kmajor", "concat4"]


def formulations(jax, jnp):
  """name -> (jitted fn, operand builder (x, dy) -> args, uses per call)."""
  lax = jax.lax
  bf, f32 = jnp.bfloat16, jnp.float32
  tok = (((0,), (0,)), ((), ()))

  def model(x, dy):
    w = jnp.zeros((x.shape[1], dy.shape[1]), f32)
    return jax.vjp(lambda w: jnp.dot(x, w.astype(bf)), w)[1](dy)[0]

  def chunks(n):
    def f(x, dy):
      xs, ds = x.reshape(n, -1, x.shape[1]), dy.reshape(n, -1, dy.shape[1])
      p = lax.dot_general(xs, ds, (((1,), (1,)), ((0,), (0,))), preferred_element_type=f32)
      return p.sum(0).astype(bf).astype(f32)
    return f

  same = lambda x, dy: (x, dy)
  return {
      "model": (jax.jit(model), same, 1),
      "f32out": (jax.jit(lambda x, dy: lax.dot_general(x, dy, tok, preferred_element_type=f32)), same, 1),
      "chunks2": (jax.jit(chunks(2)), same, 1),
      "chunks4": (jax.jit(chunks(4)), same, 1),
      "kmajor": (jax.jit(lambda xt, dyt: jnp.dot(xt, dyt.T).astype(f32)),
                 lambda x, dy: (jnp.asarray(x.T), jnp.asarray(dy.T)), 1),
      "concat4": (jax.jit(model), lambda x, dy: (jnp.concatenate([x] * 4), jnp.concatenate([dy] * 4)), 4),
  }


def kernels_of(fn, args, tag: str) -> dict:
  """{GPU kernel name: microseconds per call} of fn(*args), from a profiler trace of 5 calls."""
  from profiling import top_device_ops
  us = top_device_ops(lambda: [fn(*args) for _ in range(5)], f"wgrad_{tag}", n=6)
  return {k[:60]: round(v / 5, 1) for k, v in sorted(us.items(), key=lambda kv: -kv[1])[:4]}


def child(flags: str, shapes: dict, forms: list, iters: int, profile: bool):
  """Runs in a process whose XLA_FLAGS are `flags`: one row per (shape, formulation)."""
  import jax
  import jax.numpy as jnp
  from profiling import timed
  rows = []
  fns = formulations(jax, jnp)
  for name, (m, k, n) in shapes.items():
    kx, kd = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    dy = jax.random.normal(kd, (m, n), jnp.float32).astype(jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32).T, dy.astype(jnp.float32), precision="highest")
    scale = float(jnp.max(jnp.abs(ref)))
    for form in forms:
      fn, build, uses = fns[form]
      args = build(x, dy)
      try:
        ms, out = timed(fn, args, iters)
      except Exception as e:  # a flag set or formulation XLA rejects: reported, the others still run
        rows.append({"shape": name, "form": form, "flags": flags, "error": str(e)[:300]})
        continue
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - uses * ref))) / (uses * scale)
      hlo = fn.lower(*args).compile().as_text()
      gemms = sorted({l.split("custom_call_target=")[1].split(",")[0] for l in hlo.splitlines()
                      if "custom_call_target=" in l} | {"triton" for l in hlo.splitlines() if "__triton" in l})
      tf = 2 * m * k * n / (ms / uses) / 1e9
      rows.append({"shape": name, "form": form, "flags": flags, "ms": round(ms / uses, 4), "tflops": round(tf, 1),
                   "rel_err": err, "ok": err < 2 ** -7, "kernels": gemms,
                   "dots": [l.split("=")[1].split("custom-call")[0].strip()[:80] for l in hlo.splitlines()
                            if "__cublas" in l and "custom-call(" in l][:4]})
      if profile:  # a small GEMM's wall time is the host's dispatch: its kernels' own time and rate too
        us = rows[-1]["gpu_kernels_us"] = kernels_of(fn, args, f"{name}_{form}")
        if us:  # (none on a CPU)
          rows[-1]["kernel_tflops"] = round(2 * m * k * n * uses / (sum(us.values()) * 1e-6) / 1e12, 1)
      print(json.dumps(rows[-1]), flush=True)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--flags", default=";".join(FLAGS), help="';'-separated XLA flag sets ('default': none)")
  p.add_argument("--only", default=",".join(SHAPES))
  p.add_argument("--forms", default=",".join(FORMS))
  p.add_argument("--iters", type=int, default=50)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--profile", action="store_true", help="also each row's GPU kernels (a profiler trace)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  shapes = {s: SHAPES[s] for s in args.only.split(",")}
  if args.smoke:
    shapes = {s: (256, k // 64, n // 64) for s, (m, k, n) in shapes.items()}
    args.iters = 2
  forms = args.forms.split(",")
  if args.child is not None:
    print("ROWS " + json.dumps(child(args.child, shapes, forms, args.iters, args.profile)), flush=True)
    return
  rows = []
  for flags in args.flags.split(";"):
    env = dict(os.environ)
    if flags != "default":
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    cmd = [sys.executable, __file__, f"--child={flags}", "--only", ",".join(shapes), "--forms", ",".join(forms),
           "--iters", str(args.iters)] + ["--smoke"] * args.smoke + ["--profile"] * args.profile
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    got = [l for l in proc.stdout.splitlines() if l.startswith("ROWS ")]
    if proc.returncode or not got:
      print(f"flags {flags!r}: FAILED\n{proc.stderr[-1500:]}", flush=True)
      rows.append({"flags": flags, "error": proc.stderr[-1500:]})
      continue
    rows += json.loads(got[0][5:])
  with open(os.path.join(os.environ.get("OUT", "."), "wgrad.json"), "w") as f:
    json.dump(rows, f, indent=1)
  print(f"\n{'shape':11s} {'form':8s} {'ms/use':>8s} {'TF/s':>6s} {'rel err':>8s}  flags / kernels")
  for r in rows:
    if "ms" in r:
      print(f"{r['shape']:11s} {r['form']:8s} {r['ms']:8.4f} {r['tflops']:6.1f} {r['rel_err']:8.1e}  "
            f"{'' if r['ok'] else 'WRONG '}{r['flags']} {r['kernels']} {r['dots'][:2]}")
      if r.get("gpu_kernels_us"):
        print(f"      kernels {r['kernel_tflops']} TF/s: " +
              "; ".join(f"{k} {v} us" for k, v in r["gpu_kernels_us"].items()))
    else:
      print(f"{r.get('shape', '-'):11s} {r.get('form', '-'):8s} FAILED {r['flags']}: {r['error'][:120]}")


if __name__ == "__main__":
  main()
