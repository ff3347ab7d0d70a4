"""Training and evaluation throughput and peak memory, the reference's batch shape (micro-batch 16 x 2048).

Each variant runs in its own process (clean peak-memory counter), builds the reference size, checks the loss is
finite and falls, then times train steps (depth sampling per sequence, depth grouping across micro-batches)
and an eval forward + loss at T = 8. The recipe of parcae.train.config.reference_config (loss chunk 2048; 8192 for
parcae-small, 4096 for gpt-medium; ...) with cuDNN attention; a variant overrides fields. Random tokens, as the reference's measurement.

  python bench/train_throughput.py                      # all default variants, table at the end
  python bench/train_throughput.py --only parcae_small  # variants whose name starts with this
  python bench/train_throughput.py --smoke              # tiny CPU run of the whole script
Writes $OUT/train_throughput.json (or ./train_throughput.json) with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false "
             "--xla_gpu_enable_command_buffer=")
# name: (kind, size, overrides)
VARIANTS = {
    "parcae_small": ("parcae", "small", {}),
    "parcae_small_xla_attn": ("parcae", "small", {"model.attention_impl": "xla"}),
    "parcae_small_mlp_xla": ("parcae", "small", {"model.mlp_impl": "xla"}),
    "parcae_medium_mlp_xla": ("parcae", "medium", {"model.mlp_impl": "xla"}),
    "gpt_small_mlp_xla": ("gpt", "small", {"model.mlp_impl": "xla"}),
    "parcae_small_full_logits": ("parcae", "small", {"train.loss_chunk": 0}),
    "parcae_small_no_grouping": ("parcae", "small", {"train.depth_grouping": False}),
    "parcae_small_remat_dots": ("parcae", "small", {"model.grad_unroll": False, "model.remat": "dots"}),
    "parcae_small_quartet": ("parcae", "small", {"quant.recipe": "quartet"}),
    "parcae_small_quartet_jnp": ("parcae", "small", {"quant.recipe": "quartet", "quant.impl": "jnp"}),
    "parcae_small_mxfp8": ("parcae", "small", {"quant.recipe": "mxfp8"}),
    "parcae_small_mxfp8_jnp": ("parcae", "small", {"quant.recipe": "mxfp8", "quant.impl": "jnp"}),
    "parcae_small_nvfp4": ("parcae", "small", {"quant.recipe": "nvfp4"}),
    "parcae_small_nvidia_nvfp4": ("parcae", "small", {"quant.recipe": "nvidia_nvfp4"}),
    "parcae_small_remat_none": ("parcae", "small", {"model.grad_unroll": False, "model.remat": "none"}),
    # the recipes' grad phase (straight-line, no remat) against the rematerialized scan and other policies
    "parcae_small_scan_full": ("parcae", "small", {"model.grad_unroll": False, "model.remat": "full"}),
    "parcae_small_unroll_full": ("parcae", "small", {"model.remat": "full"}),
    "parcae_small_unroll_dots": ("parcae", "small", {"model.remat": "dots"}),
    "parcae_small_quartet_scan_full": ("parcae", "small", {"quant.recipe": "quartet", "model.grad_unroll": False,
                                                           "model.remat": "full"}),
    "parcae_medium_scan_full": ("parcae", "medium", {"model.grad_unroll": False, "model.remat": "full"}),
    "parcae_small_accum16": ("parcae", "small", {"_accum": 16}),
    "parcae_small_xlaflags": ("parcae", "small", {"_accum": 16, "_xla_flags": XLA_FLAGS}),
    "parcae_small_accum16_quartet": ("parcae", "small", {"_accum": 16, "quant.recipe": "quartet"}),
    "gpt_small": ("gpt", "small", {}),
    "gpt_small_accum1": ("gpt", "small", {"_accum": 1}),
    "gpt_small_chunk2k": ("gpt", "small", {"train.loss_chunk": 2048}),
    "gpt_medium_chunk2k": ("gpt", "medium", {"train.loss_chunk": 2048}),
    "parcae_small_chunk2k": ("parcae", "small", {"train.loss_chunk": 2048}),
    "gpt_small_chunk1k": ("gpt", "small", {"train.loss_chunk": 1024}),
    # per-block remat of the non-looped blocks (GPT memory over the reference's: 2026-11-24)
    "gpt_small_block_dots": ("gpt", "small", {"train.loss_chunk": 2048, "model.block_remat": "dots"}),
    "gpt_medium_block_dots": ("gpt", "medium", {"train.loss_chunk": 2048, "model.block_remat": "dots"}),
    "gpt_medium_block_full": ("gpt", "medium", {"train.loss_chunk": 2048, "model.block_remat": "full"}),
    "gpt_small_block_dots_first1": ("gpt", "small", {"train.loss_chunk": 2048, "model.block_remat": "dots",
                                                     "model.block_remat_first": 1}),
    "gpt_medium_block_dots_first1": ("gpt", "medium", {"train.loss_chunk": 2048, "model.block_remat": "dots",
                                                       "model.block_remat_first": 1}),
    "gpt_medium_chunk1k": ("gpt", "medium", {"train.loss_chunk": 1024}),
    "parcae_small_chunk8k": ("parcae", "small", {"train.loss_chunk": 8192}),
    "parcae_small_chunk16k": ("parcae", "small", {"train.loss_chunk": 16384}),
    "gpt_small_chunk8k": ("gpt", "small", {"train.loss_chunk": 8192}),
    "gpt_medium_no_block_remat": ("gpt", "medium", {"model.block_remat": "none"}),
    "parcae_small_rope_xla": ("parcae", "small", {"model.rope_impl": "xla"}),
    "parcae_small_triton_gemm_any": ("parcae", "small", {"_xla_flags": "--xla_gpu_triton_gemm_any=true"}),
    "parcae_medium": ("parcae", "medium", {}),
    "parcae_medium_quartet": ("parcae", "medium", {"quant.recipe": "quartet"}),
    # the recipes' no-grad loop splits each shard's deeper half off (model.no_grad_split=2); without:
    "parcae_small_split1": ("parcae", "small", {"model.no_grad_split": 1}),
    "parcae_medium_split1": ("parcae", "medium", {"model.no_grad_split": 1}),
    "parcae_small_quartet_split1": ("parcae", "small", {"quant.recipe": "quartet", "model.no_grad_split": 1}),
    "gpt_medium": ("gpt", "medium", {}),
    "gpt_medium_mlp_xla": ("gpt", "medium", {"model.mlp_impl": "xla"}),
    # twice the tokens per optimizer step: the step's fixed cost (optimizer, clipping) from the difference
    "gpt_medium_accum16": ("gpt", "medium", {"_accum": 16}),
    # larger loss-head chunks than the recipes' 2048 (speed against the float32 logit memory)
    "gpt_medium_chunk4k": ("gpt", "medium", {"train.loss_chunk": 4096}),
    "parcae_small_chunk4k": ("parcae", "small", {"train.loss_chunk": 4096}),
    "parcae_medium_chunk8k": ("parcae", "medium", {"train.loss_chunk": 8192}),
    # the loss head's log-sum-exp as XLA's two passes instead of the one-pass kernel (model.lse_impl)
    "parcae_small_lse_xla": ("parcae", "small", {"model.lse_impl": "xla"}),
    "gpt_medium_lse_xla": ("gpt", "medium", {"model.lse_impl": "xla"}),
    "gpt_small_lse_xla": ("gpt", "small", {"model.lse_impl": "xla"}),
    # memory for gpt-medium: recompute only ReLU^2's output in the first N blocks (the recipe: N = 2 since
    # session 17; before, "dots" on the first block: gpt_medium_dots1)
    "gpt_medium_mlp_act2": ("gpt", "medium", {"model.block_remat": "mlp_act", "model.block_remat_first": 2}),
    "gpt_medium_mlp_act3": ("gpt", "medium", {"model.block_remat": "mlp_act", "model.block_remat_first": 3}),
    "gpt_medium_dots1": ("gpt", "medium", {"model.block_remat": "dots", "model.block_remat_first": 1}),
    # the no-grad loop split in quarters (the recipes: halves)
    "parcae_small_split4": ("parcae", "small", {"model.no_grad_split": 4}),
    "parcae_medium_split4": ("parcae", "medium", {"model.no_grad_split": 4}),
    # the residual adds + norms through XLA's fusions instead of the Pallas kernels (model.norm_impl; default "auto")
    "parcae_small_norm_xla": ("parcae", "small", {"model.norm_impl": "xla"}),
    "gpt_small_norm_xla": ("gpt", "small", {"model.norm_impl": "xla"}),
    "parcae_medium_norm_xla": ("parcae", "medium", {"model.norm_impl": "xla"}),
    "gpt_medium_norm_xla": ("gpt", "medium", {"model.norm_impl": "xla"}),
    "parcae_small_quartet_norm_xla": ("parcae", "small", {"quant.recipe": "quartet", "model.norm_impl": "xla"}),
    # the optimizer the PyTorch reference's figures were measured with (fused AdamW, ../shared/docs/gpu.md), where
    # the recipes use MuonAdamW: the like-for-like comparison of the step. lr 1e-3: at the recipe's 8e-3 for
    # every matrix the loss rose within the timed steps (2026-12-07), which the bench's check rejects
    "parcae_small_adamw": ("parcae", "small", {"optim.name": "adamw", "optim.lr": 1e-3}),
    "parcae_small_accum16_adamw": ("parcae", "small", {"_accum": 16, "optim.name": "adamw", "optim.lr": 1e-3}),
    # CUDA graphs (XLA command buffers): none, and the default set plus device-side while loops and
    # conditionals (the no-grad loop's trip count is data-dependent: the host reads its predicate back)
    "parcae_small_cmdbuf_off": ("parcae", "small", {"_xla_flags": "--xla_gpu_enable_command_buffer="}),
    "parcae_small_cmdbuf_while": ("parcae", "small",
                                  {"_xla_flags": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"}),
    # GEMMs through legacy cuBLAS instead of cuBLASLt (bench/RESULTS.md, session 36: -0.2%, noise). (XLA's
    # --xla_gpu_experimental_enable_split_k_rewrite, which splits the weight gradients' K, is unknown to jax 0.11.2.)
    "parcae_small_cublas": ("parcae", "small", {"_xla_flags": "--xla_gpu_enable_cublaslt=false"}),
    # the q/k/v GEMM with RoPE + QK-norm in its epilogue in blocks without value embeddings (model/qkv_rope.py;
    # "auto", the default since session 39, takes it on a Hopper GPU): forced on, and off for A/B pairs
    "parcae_small_qkv": ("parcae", "small", {"model.qkv_impl": "mosaic"}),
    "parcae_small_no_qkv": ("parcae", "small", {"model.qkv_impl": "xla"}),
    # the loss head's gradient kernel candidates (session 40), paired with parcae_small_no_qkv (faster to compile)
    "parcae_small_no_qkv_lse_hints": ("parcae", "small", {"model.qkv_impl": "xla", "_lse": "evict+reverse"}),
    "parcae_small_no_qkv_lse_smem": ("parcae", "small", {"model.qkv_impl": "xla", "_lse": "smem_alias"}),
    "parcae_small_no_qkv_lse_smem_new": ("parcae", "small", {"model.qkv_impl": "xla", "_lse": "smem"}),
    "parcae_medium_qkv": ("parcae", "medium", {"model.qkv_impl": "mosaic"}),
    "parcae_medium_no_qkv": ("parcae", "medium", {"model.qkv_impl": "xla"}),
    "gpt_small_qkv": ("gpt", "small", {"model.qkv_impl": "mosaic"}),
    "gpt_small_no_qkv": ("gpt", "small", {"model.qkv_impl": "xla"}),
}
DEFAULTS = {"model.attention_impl": "cudnn", "train.depth_grouping": True}  # else the recipe's (loss_chunk 2048)
REFERENCE = {  # the PyTorch reference on the same H100 (torch.compile): train tok/s, eval tok/s, peak GiB
    "parcae_small": (284_635, 544_430, 16.3), "gpt_small": (504_992, 749_423, 8.6),
    "parcae_medium": (84_848, 206_531, 39.1), "gpt_medium": (254_743, 479_737, 21.5),
}


def set_lse_grad(choice: str):
  """The training loss's gradient kernel for this process: "evict", "reverse" or "evict+reverse" (the L2 hints
  lse.GRAD_EVICT / GRAD_REVERSE), or "smem" / "smem_alias" (bench/lse_smem.py's shared-memory kernel in
  lse.row_lse_grad's place for bf16 logits on a GPU; "smem_alias" writes the gradient over the logits)."""
  import jax
  import jax.numpy as jnp
  from parcae.model import lse
  if not choice.startswith("smem"):
    lse.GRAD_EVICT, lse.GRAD_REVERSE = "evict" in choice, "reverse" in choice
    return
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import lse_smem  # bench/lse_smem.py
  lse_smem.ALIAS = choice == "smem_alias"
  triton = lse.row_lse_grad

  def row_lse_grad(x, t, g, dtype, interpret=None):
    if x.dtype == jnp.bfloat16 and jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "gpu":
      return lse_smem.row_lse_grad_smem(x, t, g, dtype)
    return triton(x, t, g, dtype, interpret)

  lse.row_lse_grad = row_lse_grad


def build_config(kind, size, overrides, args):
  from parcae.train.config import reference_config
  from parcae.config import apply_override
  cfg = reference_config(kind, size)
  cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.seq_len = args.micro, args.accum, args.seq
  cfg.mesh.data = 1
  for k, v in {**DEFAULTS, **overrides}.items():
    if k == "_accum":
      cfg.train.grad_accum = v
      continue
    if k == "_xla_flags":
      continue
    if k == "_lse":
      set_lse_grad(v)
      continue
    apply_override(cfg, f"{k}={v}")
  if args.smoke:
    for k, v in {"model.d_model": 64, "model.n_heads": 2, "model.vocab_size": 256, "model.max_seq_len": 64,
                 "model.attention_impl": "xla", "train.loss_chunk": 0}.items():
      apply_override(cfg, f"{k}={v}")
  return cfg


def random_batch(cfg, sharding, seed=0):
  """Random tokens as {"inputs", "targets"} of shape [accum, micro, seq] on `sharding` (micro is global)."""
  import jax
  import numpy as np
  tc = cfg.train
  shape = (tc.grad_accum, tc.micro_batch_size, tc.seq_len + 1)
  toks = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, size=shape, dtype=np.int32)
  return {"inputs": jax.device_put(toks[..., :-1], sharding), "targets": jax.device_put(toks[..., 1:], sharding)}


def peak_gib(devices):
  """Largest peak_bytes_in_use over `devices` in GiB (0 where the backend keeps no statistics, e.g. CPU)."""
  return max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices) / 2**30


def train_and_time(cfg, args, devices, name=""):
  """Builds the train state on cfg.mesh over `devices`, compiles the step, runs args.warmup steps, times
  args.steps steps, checks the loss is finite and falls. Returns a dict of what run_one and others need."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from parcae.train import mesh as pmesh
  from parcae.train.loop import init_state, jit_train_step, run_length_arrays

  tc = cfg.train
  mesh = pmesh.make_mesh(cfg.mesh, devices)
  graphdef, optimizer, create, abstract, shardings = init_state(cfg, mesh)
  state = jax.jit(create, out_shardings=shardings)()
  jitted, batch_sh = jit_train_step(graphdef, optimizer, tc, shardings, mesh)
  run = run_length_arrays(cfg, mesh)
  step = lambda state, batch: jitted(state, batch, run)
  batch = random_batch(cfg, batch_sh)
  t0 = time.time()
  compiled = jitted.lower(state, batch, run).compile()
  compile_s = time.time() - t0
  from parcae.train.loop import memory_row
  mem = memory_row(compiled)  # XLA's ahead-of-time figures, to compare with the measured peak
  losses = []
  for _ in range(args.warmup):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  jax.block_until_ready(state)
  from profiling import GpuClocks
  ms = []
  with GpuClocks() as clocks:  # the clock the steps ran at (an H100 at its power limit clocks down)
    t0 = time.time()
    for _ in range(args.steps):
      state, m = step(state, batch)
      ms.append(m)
    jax.block_until_ready(state)
    dt = time.time() - t0
  ms = jax.device_get(ms)
  if getattr(args, "profile", False):
    import gzip
    hlo = compiled.as_text()  # the optimized program: what each profiled fusion computes
    with gzip.open(os.path.join(os.environ.get("OUT", "/tmp"), f"hlo_{name}.txt.gz"), "wt") as f:
      f.write(hlo)
    state = profile_steps(step, state, batch, name, hlo)
  losses += [float(m["loss"]) for m in ms]
  assert all(np.isfinite(losses)), f"non-finite loss {losses}"
  assert losses[-1] < losses[0], f"loss did not fall: {losses}"
  return {"graphdef": graphdef, "state": state, "batch": batch, "metrics": ms, "losses": losses,
          "seconds": dt, "compile_s": compile_s, "mem": mem, "peak_gib": peak_gib(mesh.devices.flat),
          "clocks": clocks.summary()}


def run_one(name, args):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from parcae.train.loop import peak_flops_per_device
  from parcae.train.step import make_eval_step
  from parcae.scaling.flops import executed_flops_per_token
  from parcae.model.config import grad_depth

  kind, size, overrides = VARIANTS[name]
  cfg = build_config(kind, size, overrides, args)
  tc = cfg.train
  dev = jax.devices()[:1]
  run = train_and_time(cfg, args, dev, name)
  graphdef, state, batch, ms, losses = run["graphdef"], run["state"], run["batch"], run["metrics"], run["losses"]
  compile_s, mem, dt = run["compile_s"], run["mem"], run["seconds"]
  shape = (tc.grad_accum, tc.micro_batch_size, tc.seq_len)
  tokens = np.prod(shape) * args.steps
  train_tps = tokens / dt
  n_exec = float(np.mean([m.get("n_exec_mean", 0.0) for m in ms]))
  n_use = float(np.mean([m.get("n_mean", 0.0) for m in ms]))
  k_use = float(np.mean([m.get("k_mean", 0.0) for m in ms]))
  if kind == "parcae":
    f_exec = executed_flops_per_token(cfg.model, tc.seq_len, n=n_exec, k=grad_depth(cfg.model))
    f_use = executed_flops_per_token(cfg.model, tc.seq_len, n=n_use, k=k_use)
  else:
    f_exec = f_use = executed_flops_per_token(cfg.model, tc.seq_len)
  peak = peak_flops_per_device()
  train_peak = run["peak_gib"]

  eval_step = jax.jit(make_eval_step(graphdef, tc.loss_chunk))
  eb = {k: v[0] for k, v in batch.items()}
  jax.block_until_ready(eval_step(state["params"], eb, jnp.asarray([8], jnp.int32)))
  # at least 10 calls: one call is one micro-batch (33 ms for parcae-small on an H100), and 3 of them read
  # 2% apart between two trees whose compiled evaluation programs were the same (session 19)
  calls = args.steps if args.smoke else max(10, args.steps)
  t0 = time.time()
  for _ in range(calls):
    out = eval_step(state["params"], eb, jnp.asarray([8], jnp.int32))
  jax.block_until_ready(out)
  eval_tps = tc.micro_batch_size * tc.seq_len * calls / (time.time() - t0)
  f_eval = executed_flops_per_token(cfg.model, tc.seq_len, n=8, k=0, train=False) if kind == "parcae" else \
      executed_flops_per_token(cfg.model, tc.seq_len, train=False)
  return {
      "variant": name, "device": dev[0].device_kind, "micro": tc.micro_batch_size, "accum": tc.grad_accum,
      "seq": tc.seq_len, "compile_s": compile_s, "train_tokens_per_s": train_tps, "eval_tokens_per_s": eval_tps,
      "train_peak_gib": train_peak, "temp_gib_aot": mem.get("temp_gib", 0.0),
      "peak_estimate_gib_aot": mem.get("peak_estimate_gib", 0.0),
      "n_exec_mean": n_exec, "n_mean": n_use, "k_mean": k_use, "executed_iters": n_exec + grad_depth(cfg.model)
      if kind == "parcae" else 0, "mfu_executed": train_tps * f_exec / peak if peak else None,
      "mfu_useful": train_tps * f_use / peak if peak else None,
      "eval_mfu": eval_tps * f_eval / peak if peak else None, "losses": losses, **run["clocks"],
  }


def profile_steps(step, state, batch, name, hlo_text=None):
  """Trace two steps and print the 25 most expensive device ops (bench/profiling.py), with what each computes."""
  from profiling import top_device_ops
  box = [state]

  def two_steps():
    for _ in range(2):
      box[0], _ = step(box[0], batch)
    return box[0]
  top_device_ops(two_steps, "prof_" + name, what="2 steps", hlo_text=hlo_text)
  return box[0]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="")
  p.add_argument("--one", default="")
  p.add_argument("--micro", type=int, default=16)
  p.add_argument("--accum", type=int, default=8)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--profile", action="store_true", help="also trace 2 steps and print the top device ops")
  p.add_argument("--exact", action="store_true", help="--only matches the variant name exactly")
  args = p.parse_args()
  if args.smoke:
    args.micro, args.accum, args.seq, args.steps = 4, 2, 32, 2
  if args.one:
    print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
    return
  only = [o for o in args.only.split(",") if o]
  names = [n for n in VARIANTS if not only or any(n == o if args.exact else n.startswith(o) for o in only)]
  results = []
  for name in names:
    cmd = [sys.executable, __file__, "--one", name] + [f"--{k}={v}" for k, v in
                                                         (("micro", args.micro), ("accum", args.accum),
                                                          ("seq", args.seq), ("warmup", args.warmup),
                                                          ("steps", args.steps))]
    cmd += ["--smoke"] * args.smoke + ["--profile"] * args.profile
    env = dict(os.environ)
    if "_xla_flags" in VARIANTS[name][2]:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + VARIANTS[name][2]["_xla_flags"]).strip()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if args.profile:
      print("\n".join(l for l in proc.stdout.splitlines() if not l.startswith("RESULT ")), flush=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not line:
      print(f"{name}: FAILED\n{proc.stderr[-3000:]}", flush=True)
      results.append({"variant": name, "error": proc.stderr[-3000:]})
      continue
    r = json.loads(line[0][7:])
    results.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
  out = os.path.join(os.environ.get("OUT", "."), "train_throughput.json")
  with open(out, "w") as f:
    json.dump(results, f, indent=1)
  print(f"\n{'variant':28s} {'train tok/s':>12s} {'x ref':>6s} {'eval tok/s':>11s} {'x ref':>6s} "
        f"{'peak GiB':>8s} {'AOT GiB':>7s} {'ref GiB':>7s} {'iters':>6s} {'MFU ex':>6s} {'MFU use':>7s} "
        f"{'MHz':>5s} {'W':>4s} {'capped':>6s}")
  for r in results:
    if "error" in r:
      print(f"{r['variant']:28s} FAILED")
      continue
    ref = REFERENCE.get(r["variant"], (None, None, None))
    fx = lambda a, b: f"{a / b:6.2f}" if b else "     -"
    mfu = lambda v: f"{100 * v:5.1f}%" if v else "     -"
    print(f"{r['variant']:28s} {r['train_tokens_per_s']:12,.0f} {fx(r['train_tokens_per_s'], ref[0])} "
          f"{r['eval_tokens_per_s']:11,.0f} {fx(r['eval_tokens_per_s'], ref[1])} {r['train_peak_gib']:8.1f} "
          f"{r['peak_estimate_gib_aot']:7.1f} {ref[2] or 0:7.1f} {r['executed_iters']:6.2f} {mfu(r['mfu_executed'])} {mfu(r['mfu_useful'])} "
          f"{r.get('clock_mhz_mean', 0):5.0f} {r.get('power_w_mean', 0):4.0f} {100 * r.get('power_capped', 0):5.0f}%")


if __name__ == "__main__":
  main()
