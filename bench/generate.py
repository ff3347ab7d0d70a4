"""Benchmark KV-cached generation (run on the H100): prefill time and decode tokens/s.

  PYTHONPATH=$PWD python bench/generate.py              # GPU: parcae-small-140m, bf16, T=8, prompt 128, 256 new
  PYTHONPATH=$PWD python bench/generate.py --kind gpt   # the GPT baseline of the same size
  PYTHONPATH=$PWD python bench/generate.py --smoke      # CPU: tiny model, tiny sizes

Random weights (the reference init plus small noise on every parameter, so no branch is exactly zero).
Per batch size: prefill of the prompt (jitted, fresh cache each run); decode of --new tokens in one jitted
loop (`generate.decode`, the path `generate` uses); and a Python loop of `decode_step` calls (per-step dispatch
cost). Each time is the median of --runs runs after a warm-up run, with block_until_ready. Self-check: the
cached path is split-invariant (prefill of the whole prompt vs prefill of a part plus decode steps: within 1e-4
of the logits' std in float32, and within the bf16-vs-float32 rounding difference in bf16; `split_check`) and
the fused loop emits the same greedy tokens as the Python decode_step loop.
Writes $OUT/generate.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parcae import model as M
from parcae.eval import generate as G

CHECK_TOKENS = 8  # decode steps compared between the fused loop and decode_step calls
SPLIT_F32_TOL = 1e-4  # float32 split check: max |diff| / std (measured 8e-6 on the CPU, parcae-small T = 8)


def build(kind, size, smoke):
  if smoke:
    cfg = M.default_model_config()
    cfg.kind, cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.max_seq_len = kind, 256, 64, 2, 64
    cfg.prelude_layers, cfg.core_layers, cfg.coda_layers, cfg.n_layers = 1, 2, 1, 4
  else:
    cfg = M.size_config(kind, size)
  graphdef, state = nnx.split(M.build(cfg, jax.random.key(0)))

  @jax.jit
  def perturb(state):
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])
  return nnx.merge(graphdef, perturb(state))


def ready(tree):
  return jax.block_until_ready(tree)


def median_time(fn, runs):
  """fn() -> (seconds of the timed part, result); one warm-up call (which compiles), then the median."""
  t_first, _ = fn()
  ts = [fn()[0] for _ in range(runs)]
  return statistics.median(ts), t_first, ts


def bench_batch(model, b, loops, prompt_len, new, runs, stepwise):
  prompt = jax.random.randint(jax.random.key(b), (b, prompt_len), 0, model.cfg.vocab_size)
  max_len = prompt_len + new

  def run_prefill():
    cache = ready(G.init_cache(model, b, max_len, loops))
    t0 = time.perf_counter()
    out = ready(G.prefill(model, cache, prompt))
    return time.perf_counter() - t0, out

  def prefilled():
    logits, cache = ready(G.prefill(model, G.init_cache(model, b, max_len, loops), prompt))
    return jnp.argmax(logits, -1).astype(jnp.int32), cache

  def run_decode():
    first, cache = prefilled()
    t0 = time.perf_counter()
    out = ready(G.decode(model, cache, first, new))
    return time.perf_counter() - t0, out

  def run_steps():
    tok, cache = prefilled()
    t0 = time.perf_counter()
    toks = []
    for _ in range(stepwise):
      tok, _, cache = G.decode_step(model, cache, tok)
      toks.append(tok)
    ready(cache)
    return time.perf_counter() - t0, jnp.stack(toks, 1)

  log = lambda what: print(f"  batch {b}: {what} ({time.perf_counter() - t_start:.1f} s)", flush=True)
  t_start = time.perf_counter()
  pre, pre_first, pre_all = median_time(run_prefill, runs)
  log(f"prefill timed: {pre * 1e3:.2f} ms")
  dec, dec_first, dec_all = median_time(run_decode, runs)
  log(f"decode loop timed: {b * new / dec:,.1f} tok/s")
  step, _, _ = median_time(run_steps, max(1, runs // 2))
  log("decode_step calls timed")
  n_check = min(CHECK_TOKENS, stepwise, new)
  fused_tokens = run_decode()[1][0][:, :n_check]
  step_tokens = run_steps()[1][:, :n_check]
  split = split_check(model, prompt, loops)
  log("split check done")
  slot_bytes = 2 * b * max_len * model.cfg.d_model * jnp.dtype(model.cd).itemsize
  return {
      "batch": b, "loops": loops, "prompt": prompt_len, "new_tokens": new,
      "prefill_ms": pre * 1e3, "prefill_first_call_s": pre_first, "prefill_runs_ms": [t * 1e3 for t in pre_all],
      "decode_s": dec, "decode_first_call_s": dec_first, "decode_runs_s": dec_all,
      "decode_tok_per_s": b * new / dec, "decode_ms_per_step": dec / new * 1e3,
      "stepwise_ms_per_step": step / stepwise * 1e3,
      "cache_mb": G.num_slots(model, loops) * slot_bytes / 2**20,
      "fused_equals_stepwise": bool(np.array_equal(np.asarray(fused_tokens), np.asarray(step_tokens))),
      **split,
  }


def float32_copy(model):
  """The same weights with compute_dtype float32: the reference the bf16 paths are measured against (the
  float32 module's structure comes from an abstract build, so nothing is initialised twice)."""
  cfg = model.cfg.copy_and_resolve_references()
  cfg.compute_dtype = "float32"
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: M.build(cfg, jax.random.key(0))))
  return nnx.merge(graphdef, nnx.state(model))


def split_paths(model, prompt, loops, k):
  """Logits of the last k positions: prefill of the whole prompt, and prefill of the first part + k decode steps."""
  b, p = prompt.shape
  whole, _ = G.prefill(model, G.init_cache(model, b, p, loops), prompt, all_logits=True)
  _, cache = G.prefill(model, G.init_cache(model, b, p, loops), prompt[:, :p - k])
  steps = []
  for i in range(p - k, p):
    _, lg, cache = G.decode_step(model, cache, prompt[:, i])
    steps.append(lg)
  as64 = lambda a: np.asarray(a, np.float64)
  return as64(whole[:, p - k:]), as64(jnp.stack(steps, 1))


def split_check(model, prompt, loops):
  """Is the cached path split-invariant? Two checks, max |difference| over the logits / std of the logits:

  - float32 (the same weights, matmuls at full float32 precision): prefill of the whole prompt against prefill
    of a part plus decode steps within SPLIT_F32_TOL. A cached-path bug (a wrong position, slot or mask) gives
    differences of the order of the std itself.
  - the model's own dtype: the two paths differ by no more than the whole-prompt path differs from float32,
    i.e. by rounding noise. (A fixed bound is not a rounding bound: through T loop iterations bf16 logits
    drift 5-9% of their std from float32 on random weights, measured on the CPU for parcae-small at T = 8.)
  """
  k = min(CHECK_TOKENS, prompt.shape[1] - 1)
  whole, split = split_paths(model, prompt, loops, k)
  with jax.default_matmul_precision("highest"):
    whole32, split32 = split_paths(float32_copy(model), prompt, loops, k)
  std = float(whole32.std())
  rel = lambda a, b: float(np.abs(a - b).max()) / std
  split_rel, noise_rel, f32_rel = rel(whole, split), rel(whole, whole32), rel(whole32, split32)
  finite = all(np.isfinite(x).all() for x in (whole, split, whole32, split32))
  return {"split_rel_diff": split_rel, "rounding_rel_diff": noise_rel, "split_rel_diff_f32": f32_rel,
          "split_ok": bool(finite and f32_rel <= SPLIT_F32_TOL and split_rel <= noise_rel)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--kind", default="parcae", choices=["parcae", "gpt"])
  ap.add_argument("--size", default="small", choices=sorted(M.config.SIZES))
  ap.add_argument("--loops", type=int, default=8)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--stepwise", type=int, default=32, help="decode_step calls timed in the Python loop")
  ap.add_argument("--smoke", action="store_true", help="tiny model and sizes (CPU)")
  args = ap.parse_args(argv)
  if args.smoke:
    args.loops, args.prompt, args.new, args.batch, args.runs, args.stepwise = 3, 8, 8, "1,4", 2, 4
  model = build(args.kind, args.size, args.smoke)
  loops = args.loops if args.kind == "parcae" else None
  name = "smoke" if args.smoke else f"{args.kind}-{args.size}"
  print(f"{name} ({model.cfg.compute_dtype}, T={loops}, prompt {args.prompt}, new {args.new}) "
        f"on {jax.devices()[0].device_kind}")
  rows = []
  for b in args.batch.split(","):  # each batch's row printed and written as soon as it is done (a kill keeps it)
    rows.append(bench_batch(model, int(b), loops, args.prompt, args.new, args.runs, args.stepwise))
    print(f"{'B':>4} {'prefill ms':>11} {'decode tok/s':>13} {'ms/step':>8} {'py ms/step':>11} {'cache MB':>9} "
          f"{'compile s':>10} {'split':>6} {'rounding':>8} {'split f32':>9} {'check':>6}")
    r = rows[-1]
    ok = r["split_ok"] and r["fused_equals_stepwise"]
    print(f"{r['batch']:>4} {r['prefill_ms']:>11.2f} {r['decode_tok_per_s']:>13.1f} {r['decode_ms_per_step']:>8.3f} "
          f"{r['stepwise_ms_per_step']:>11.3f} {r['cache_mb']:>9.1f} {r['decode_first_call_s']:>10.1f} "
          f"{r['split_rel_diff']:>6.4f} {r['rounding_rel_diff']:>8.4f} {r['split_rel_diff_f32']:>9.1e} "
          f"{'ok' if ok else 'FAIL':>6}", flush=True)
    result = {"model": name, "device": jax.devices()[0].device_kind, "compute_dtype": model.cfg.compute_dtype,
              "jax": jax.__version__, "rows": rows}
    if os.environ.get("OUT"):
      path = os.path.join(os.environ["OUT"], "generate.json")
      with open(path, "w") as f:
        json.dump(result, f, indent=1)
      print(f"wrote {path}")
  return 0 if all(r["split_ok"] and r["fused_equals_stepwise"] for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
