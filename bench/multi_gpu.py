"""Multi-GPU scaling of training throughput, and checkpoint portability across device layouts.

N = all visible devices. Variants, each in its own process (clean peak-memory counters):
  parcae_{medium,large}_1gpu     1 device: the baseline of the scaling efficiency
  parcae_{medium,large}_dp<N>    N devices, pure data parallelism (mesh data=N, fsdp=1): parameters replicated
  parcae_{medium,large}_fsdp<N>  N devices, FSDP (data=1, fsdp=N): parameters and optimizer state split over
                                 the devices, all-gathered where used
  ckpt_portability               parcae-small trained 3 steps on N devices with FSDP, saved with
                                 parcae.train.checkpoint, restored onto 1 device and onto N devices with data
                                 parallelism; the loss of one fixed batch on every layout must agree (< 1e-5
                                 relative). float32 compute at "highest" matmul precision, so that only the
                                 checkpoint, not bf16 rounding in a different GEMM tiling, could make it differ.

Training is bench/train_throughput.py's measurement (its train_and_time and DEFAULTS: cuDNN attention, the recipe's loss
chunk (2048), depth grouping; random tokens; warm-up steps, then timed steps; loss finite and falling) with a
per-device micro-batch of 16 x 2048 tokens, so the global batch grows with N (weak scaling), and grad
accumulation 4. Efficiency = tok/s on N / (N x tok/s on 1), same model and per-device batch. The N-device
step groups N times more sequences by sampled depth and each micro-batch loops to the deepest of its 16 N
sequences, so its executed loop iterations ("iters") differ from the 1-device run: read efficiency with them.
The 1-device baselines of the two models run at the same time, each on its own GPU (CUDA_VISIBLE_DEVICES),
unless --serial; everything else runs alone. NCCL_NVLS_ENABLE=0 (NVLink multicast off) in every process.

  python bench/multi_gpu.py                       # everything: ~13 min on 2 H200, so two calls of < 10 min:
  python bench/multi_gpu.py --only parcae_medium_1gpu,parcae_large_1gpu,ckpt
  python bench/multi_gpu.py --only parcae_medium_dp,parcae_medium_fsdp,parcae_large_dp,parcae_large_fsdp
  python bench/multi_gpu.py --smoke               # tiny model on 2 fake CPU devices (~1.5 min on 2 CPU cores)
  python bench/multi_gpu.py --only parcae_medium_1gpu,parcae_medium_dp --quant quartet   # quantized scaling
  python bench/multi_gpu.py --only parcae_small_1gpu,parcae_small_dp --quant quartet     # the same, quicker
Order: the two 1-device baselines side by side, ckpt_portability, then the N-device variants of medium and of
large. Measured wall time per variant on 2 H200 (2026-11-29, bench/RESULTS.md): parcae-medium 1 GPU 91 s, dp2
94 s, fsdp2 121 s; parcae-large 1 GPU 201 s (next to medium); ckpt_portability 172 s (float32, mostly compile).
A variant that would end after --budget seconds (default 420; judged by the previous variant of the same model)
is skipped and one still running 45 s after it is killed, so the whole run stays under 8 min (partial results
are kept). Writes $OUT/multi_gpu.json (or ./multi_gpu.json), rewritten after every variant, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

T_START = time.time()  # a variant's wall_s counts from here (its own process)
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off; passed on to every subprocess
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402  (build_config, train_and_time, random_batch, DEFAULTS)

SIZES = ("medium", "large")
EXTRA_SIZES = ("small",)  # run only when --only names them (a quick check, e.g. of a quant recipe's scaling)
LAYOUTS = ("1gpu", "dp", "fsdp")
SMOKE_MODEL = {"model.prelude_layers": 1, "model.core_layers": 1, "model.coda_layers": 1,
               "model.mean_recurrence": 2, "model.mean_backprop_depth": 1}
# The portability check: exact arithmetic, a short sequence, 3 steps (well under a minute on a GPU).
PORTABLE = {"model.compute_dtype": "float32", "model.attention_impl": "xla", "train.loss_chunk": 0, "_accum": 1}
PORTABLE_SHAPE = {"micro": 4, "seq": 512, "warmup": 1, "steps": 2}  # micro per device
CKPT = "ckpt_portability"
KILL_AFTER = 45  # seconds past --budget at which a still running variant is killed


def variant_names(n, sizes=SIZES):
  return [f"parcae_{s}_{l if l == '1gpu' else l + str(n)}" for s in sizes for l in LAYOUTS] + [CKPT]


def parse_variant(name):
  """'parcae_large_fsdp2' -> ('large', 'fsdp')."""
  _, size, layout = name.split("_")
  return size, re.sub(r"\d+$", "", layout)


def model_config(size, args, overrides=None):
  """tt.build_config (DEFAULTS, args.micro/accum/seq, its smoke shrink) plus ours for --smoke."""
  from parcae.config import apply_override
  cfg = tt.build_config("parcae", size, overrides or {}, args)
  if args.smoke:
    for k, v in SMOKE_MODEL.items():
      apply_override(cfg, f"{k}={v}")
  return cfg


def place(cfg, layout, n, micro_per_device):
  """Sets the mesh for `layout` over n devices and the global micro-batch (micro_per_device on each)."""
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (n, 1, 1) if layout == "dp" else (1, n, 1)
  cfg.train.micro_batch_size = micro_per_device * n  # batch dim split over data*fsdp = n devices
  return cfg


# ---------------------------------------------------------------- child processes

def run_scaling(name, args):
  import jax
  import numpy as np
  from parcae.model.config import grad_depth
  size, layout = parse_variant(name)
  n = 1 if layout == "1gpu" else jax.device_count()
  devices = jax.devices()[:n]
  cfg = place(model_config(size, args, {"quant.recipe": args.quant}), layout, n, args.micro)
  run = tt.train_and_time(cfg, args, devices, name)
  tc, ms = cfg.train, run["metrics"]
  tokens_per_step = tc.grad_accum * tc.micro_batch_size * tc.seq_len
  tps = tokens_per_step * args.steps / run["seconds"]
  n_exec = float(np.mean([m["n_exec_mean"] for m in ms]))
  return {"variant": name, "model": f"parcae_{size}", "layout": layout, "quant": args.quant, "n_devices": n,
          "mesh": cfg.mesh.to_dict(), "device": devices[0].device_kind, "micro_per_device": args.micro,
          "accum": tc.grad_accum, "seq": tc.seq_len, "tokens_per_step": tokens_per_step,
          "compile_s": run["compile_s"], "tokens_per_s": tps, "tokens_per_s_per_device": tps / n,
          "peak_gib_max_device": run["peak_gib"], "n_exec_mean": n_exec,
          "executed_iters": n_exec + grad_depth(cfg.model), "losses": run["losses"]}


def layout_loss(cfg, layout, n, ck, graphdef, devices):
  """Restores the latest checkpoint onto `layout` over n devices; (loss on the fixed batch, restored state)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from parcae.train import checkpoint as ckpt
  from parcae.train import mesh as pmesh
  from parcae.train.loop import init_state
  from parcae.train.step import make_eval_step
  cfg = cfg.copy_and_resolve_references()
  place(cfg, layout, n, cfg.train.micro_batch_size // n)  # the same global batch on every layout
  mesh = pmesh.make_mesh(cfg.mesh, devices[:n])
  _, _, _, abstract, shardings = init_state(cfg, mesh)
  state, _, _ = ck.restore(None, ckpt.abstract_like(abstract, shardings))
  # [1, micro, seq] with micro split over the n devices; [0] -> [micro, seq], the same tokens on every layout
  batch = tt.random_batch(cfg, NamedSharding(mesh, P(None, pmesh.BATCH_AXES, None)), seed=1)
  batch = {k: v[0] for k, v in batch.items()}
  total, count, _ = jax.jit(make_eval_step(graphdef, cfg.train.loss_chunk))(
      state["params"], batch, jnp.asarray([cfg.model.mean_recurrence], jnp.int32))
  return float(total[0]) / float(count), state


def max_abs_diff(a, b):
  import jax
  import numpy as np
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0))
             for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))))


def run_portability(name, args):
  import jax
  from parcae.train import checkpoint as ckpt
  jax.config.update("jax_default_matmul_precision", "highest")
  n = jax.device_count()
  pargs = argparse.Namespace(**{**vars(args), **({} if args.smoke else PORTABLE_SHAPE)})
  cfg = place(model_config("small", pargs, PORTABLE), "fsdp", n, pargs.micro)
  run = tt.train_and_time(cfg, pargs, jax.devices(), name)  # trains warmup + steps on N devices, FSDP
  rows = []
  with tempfile.TemporaryDirectory() as d:
    ck = ckpt.Checkpointer(d, every_steps=1)
    ck.save(int(run["state"]["step"]), run["state"], {"bench": "multi_gpu"}, {"config": cfg.to_dict()}, force=True)
    ck.wait()
    for layout, k in (("fsdp", n), ("1gpu", 1), ("dp", n)):
      loss, state = layout_loss(cfg, layout, k, ck, run["graphdef"], jax.devices())
      rows.append({"layout": layout if layout == "1gpu" else layout + str(k), "loss": loss,
                   "param_max_abs_diff": max_abs_diff(state["params"], run["state"]["params"]),
                   "step": int(state["step"])})
    ck.close()
  ref = rows[0]["loss"]  # the layout it was trained and saved on
  diff = max(abs(r["loss"] - ref) for r in rows)
  assert diff <= 1e-5 * abs(ref), f"loss differs across layouts by {diff:.3g}: {rows}"
  return {"variant": name, "model": "parcae_small", "n_devices": n, "device": jax.devices()[0].device_kind,
          "steps_trained": len(run["losses"]), "layouts": rows, "max_abs_loss_diff": diff,
          "max_rel_loss_diff": diff / abs(ref), "losses": run["losses"]}


# ---------------------------------------------------------------- parent

def child_env(args, gpu=None):
  env = dict(os.environ)  # carries NCCL_NVLS_ENABLE=0
  if args.smoke:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=2").strip()
    env["JAX_PLATFORMS"] = "cpu"
  if gpu is not None:
    env["CUDA_VISIBLE_DEVICES"] = gpu
  return env


PROBE = ("import jax, json; d = jax.devices(); print(json.dumps({'n_devices': len(d), 'backend': "
         "jax.default_backend(), 'device': d[0].device_kind, 'jax': jax.__version__}))")


def probe(args):
  """{n_devices, backend, device, jax} from a short process (the parent itself never touches the
  accelerators, so every variant has them to itself) plus the GPU ids for CUDA_VISIBLE_DEVICES."""
  env = {**child_env(args), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
  info = json.loads(out.stdout.strip().splitlines()[-1])
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  ids = visible.split(",") if visible else [str(i) for i in range(info["n_devices"])]
  return {**info, "gpu_ids": ids if info["backend"] == "gpu" else []}


def launch(name, args, gpu=None):
  """Starts `--one name` with its output in temporary files (no pipe can fill while others run)."""
  cmd = [sys.executable, os.path.abspath(__file__), "--one", name] + [
      f"--{k}={getattr(args, k)}" for k in ("micro", "accum", "seq", "warmup", "steps", "quant")] + ["--smoke"] * args.smoke
  out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
  proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=child_env(args, gpu))
  return {"name": name, "proc": proc, "out": out, "err": err, "t0": time.time(), "gpu": gpu}


def collect(job, timeout):
  """Waits for a launched variant; its result dict, or {"variant", "error"}."""
  try:
    rc = job["proc"].wait(timeout=max(timeout, 1))
  except subprocess.TimeoutExpired:
    job["proc"].kill()
    job["proc"].wait()
    rc = f"killed after {timeout:.0f} s (--budget)"
  job["out"].seek(0), job["err"].seek(0)
  stdout, stderr = job["out"].read(), job["err"].read()
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
  if rc or not line:
    print(f"{job['name']}: FAILED ({rc})\n{stderr[-3000:]}", flush=True)
    return {"variant": job["name"], "error": f"rc={rc}: {stderr[-3000:]}"}
  r = {**json.loads(line[0][7:]), "cuda_visible_devices": job["gpu"]}
  print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "layouts")}), flush=True)
  return r


def add_efficiency(results):
  """efficiency = tok/s on N / (N x tok/s of the same model's 1-device run)."""
  base = {r["model"]: r["tokens_per_s"] for r in results if r.get("layout") == "1gpu"}
  for r in results:
    if "tokens_per_s" in r:
      b = base.get(r["model"])
      r["efficiency"] = r["tokens_per_s"] / (r["n_devices"] * b) if b else None
  return results


def write(results, meta, path):
  with open(path, "w") as f:
    json.dump({"meta": meta, "results": add_efficiency(results)}, f, indent=1)


def schedule(names, args, gpu_ids):
  """Batches of (variant, CUDA_VISIBLE_DEVICES) run at the same time: the 1-device runs together, one GPU
  each, when there are enough GPUs (on CPU: always) and not --serial, else one by one on the first GPU;
  everything else alone on all devices, the short portability check first (a --budget skip hits the last)."""
  singles = [n for n in names if n.endswith("_1gpu")]
  pins = gpu_ids or [None] * len(singles)  # no GPUs (CPU smoke): nothing to pin
  together = not args.serial and 1 < len(singles) <= len(pins)
  batches = [list(zip(singles, pins))] if together else [[(n, pins[0])] for n in singles]
  rest = sorted((n for n in names if n not in singles), key=lambda n: n != CKPT)  # stable: CKPT first
  return batches + [[(n, None)] for n in rest]


def run_all(names, args, meta, out_path):
  results, t_start, last = [], time.time(), {}  # last: model -> wall seconds of its latest variant
  for batch in schedule(names, args, meta["gpu_ids"]):
    elapsed = time.time() - t_start
    expect = max(last.get(n.rsplit("_", 1)[0], 0.0) for n, _ in batch)
    if elapsed + expect > args.budget:
      why = f"skipped: {elapsed:.0f} s + ~{expect:.0f} s > --budget"
      results += [{"variant": n, "error": why} for n, _ in batch]
      print(f"skipped {[n for n, _ in batch]} (time budget)", flush=True)
      continue
    jobs = [launch(n, args, gpu) for n, gpu in batch]
    for job in jobs:
      r = collect(job, args.budget + KILL_AFTER - (time.time() - t_start))
      last[job["name"].rsplit("_", 1)[0]] = r.get("wall_s", time.time() - job["t0"])
      results.append(r)
    write(results, meta, out_path)
  return results


def print_table(results, meta):
  shape = next((f"micro-batch {r['micro_per_device']} per device x accum {r['accum']} x seq {r['seq']}"
                for r in results if "accum" in r), "")
  print(f"\n{meta['n_devices']} x {meta['device']} ({meta['backend']}, jax {meta['jax']}); {shape}")
  print(f"{'variant':22s} {'N':>2s} {'tok/s':>11s} {'tok/s/dev':>10s} {'eff':>6s} {'peak GiB':>8s} "
        f"{'compile s':>9s} {'iters':>6s} {'wall s':>6s}")
  for r in results:
    if "error" in r:
      print(f"{r['variant']:22s} {(r['error'].strip().splitlines() or ['FAILED'])[-1][:100]}")
    elif r["variant"] == CKPT:
      cells = ", ".join(f"{x['layout']} {x['loss']:.6f} (params {x['param_max_abs_diff']:.1g})"
                        for x in r["layouts"])
      print(f"{CKPT:22s} {r['n_devices']:2d} loss per layout: {cells}; max |diff| {r['max_abs_loss_diff']:.2e} "
            f"(rel {r['max_rel_loss_diff']:.1e}) wall {r['wall_s']:.0f} s")
    else:
      eff = f"{r['efficiency']:6.3f}" if r.get("efficiency") is not None else "     -"
      print(f"{r['variant']:22s} {r['n_devices']:2d} {r['tokens_per_s']:11,.0f} "
            f"{r['tokens_per_s_per_device']:10,.0f} {eff} {r['peak_gib_max_device']:8.1f} {r['compile_s']:9.1f} "
            f"{r['executed_iters']:6.2f} {r['wall_s']:6.0f}")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="", help="comma-separated variant name prefixes (e.g. parcae_medium,ckpt)")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one variant in this process
  p.add_argument("--micro", type=int, default=16, help="sequences per device per micro-batch")
  p.add_argument("--accum", type=int, default=4)
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--budget", type=float, default=420.0,
                 help=f"no variant starts that would end after this many seconds; one still running "
                      f"{KILL_AFTER} s later is killed")
  p.add_argument("--serial", action="store_true", help="run the 1-device baselines one after the other")
  p.add_argument("--quant", default="bf16", help="quant.recipe of the scaling variants (e.g. quartet; impl auto)")
  p.add_argument("--smoke", action="store_true", help="tiny model and shapes on 2 fake CPU devices")
  args = p.parse_args()
  if args.smoke:
    args.micro, args.accum, args.seq, args.warmup, args.steps = 2, 2, 32, 1, 2
  if args.one:
    r = run_portability(args.one, args) if args.one == CKPT else run_scaling(args.one, args)
    r["wall_s"] = time.time() - T_START
    print("RESULT " + json.dumps(r), flush=True)
    return
  meta = {**probe(args), "args": vars(args)}
  n = meta["n_devices"]
  only = [o for o in args.only.split(",") if o]
  names = [v for v in variant_names(n, SIZES + EXTRA_SIZES if only else SIZES)
           if not only or any(v.startswith(o) for o in only)]
  if n == 1:  # nothing to scale to: the N-device variants would repeat the baseline
    names = [v for v in names if v.endswith("_1gpu") or v == CKPT]
  out_path = os.path.join(os.environ.get("OUT", "."), "multi_gpu.json")
  results = run_all(names, args, meta, out_path)
  write(results, meta, out_path)
  print_table(results, meta)
  print(f"\nwrote {out_path}")


if __name__ == "__main__":
  main()
