"""Where the Mosaic GPU MLP kernels' time per output tile goes: Mosaic GPU's in-kernel profiler on one call.

parcae/model/mlp_kernels.py's kernels, with `mlp_kernels.PROFILE_DIR` set, record per warpgroup (thread 0's
SM %clock) a begin and an end stamp of each named region: per tile the compute warpgroups' `kloop` (the
pipeline's K loop: its first stage's wait, each step's barrier wait, wgmma and wait, consumed-barrier arrive) and
`epilogue`; with PROFILE_DETAIL 2 also `tile` (every warpgroup, the memory warpgroup's issue loop and its
quiesce included) and the epilogue's steps (`h_wait`, `math`, `store_wait`, `smem_store`, `commit`,
`tma_issue`, the backward's `h_fetch`); with 3 each K step's `mma` (wgmma issue to its wait). The trace sits in
shared memory, which the library's relu2 / pair kernels (4 pipeline stages) nearly fill: they are profiled at
detail 1 as they are, and at detail 3 with 3 stages (STEPS_NO_H = 3, the variant timed beside them); the
backward (3 stages) at detail 2, and at detail 3 on half the rows.

Notes on jax's profiler (0.10-0.11): the trace's dump is a host callback, so the script adds "cpu" to
JAX_PLATFORMS=cuda; the trace's file name is fixed when the kernel is lowered, so one executable dumps once per
file: the cold (compiling) call's trace is set aside and the warm call's kept. The stamps are volatile inline
asm: ptxas may still move pure register arithmetic across them, so the split between an epilogue's `math`,
`smem_store` and the rest is approximate, where the K loop / epilogue totals are not. bench/RESULTS.md has the
H100 figures (the K loop runs at ~90-95% of the tensor cores' peak; the fixed time per tile is the epilogue).

For each configuration, at parcae-small's MLP shape (M = 32768, K = 768, N = 3072; the backward's operands
[M, K] @ [N, K]^T and h [M, N]): the unprofiled kernel timed (a burst, with the SM clock sampled), then one
profiled call after a warm-up burst; its trace (jax writes one Chrome-trace JSON per call into PROFILE_DIR) is
parsed into per-warpgroup regions and printed as
  * per region: count per tile and warpgroup, mean duration (cycles and ns at the burst's clock), its share of
    the warpgroup's span (first stamp to last);
  * the compute warpgroups' per-tile timeline, as shares of the span: before the first tile, the K loop
    (split at detail 3 into the first stage's wait = refill, the wgmmas and the time between steps), the
    epilogue (and its steps), the gap from the epilogue's end to the next tile's K loop, the final drain.
Times inside a trace are SM cycles (%clock; the dump subtracts its estimate of the stamps' own cost); the
traces of different SMs are aligned only by their start's globaltimer (ns), so nothing here compares them.
Writes $OUT/mlp_profile.json (summary), $OUT/mlp_profile.txt (the tables) and $OUT/mlp_profile_regions.npz
(every region of every configuration: trace id, name id, begin, end cycles), or under ./ where OUT is unset.

  JAX_PLATFORMS=cuda XLA_FLAGS= python3 bench/mlp_profile.py [--only relu2,bwd_d2] [--budget-s 200]
  python3 bench/mlp_profile.py --smoke    # CPU: the trace parser on a synthetic trace and, with jax's CUDA
                                          # plugin importable, every configuration lowered for an H100
  python3 bench/mlp_profile.py --smem-probe   # CPU + CUDA plugin: the GEMM's room for an extra scratch buffer
The profiler cannot run on a CPU: Pallas's GPU interpreter does not lower through Mosaic GPU, where the
profiler lives, so the smoke checks what it can (the regions' shared memory fits; the parser) and says so.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import glob
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

# The trace's dump is a host callback (jax.debug.callback), which needs jax's CPU client beside the GPU's.
if os.environ.get("JAX_PLATFORMS", "") in ("cuda", "gpu"):
  os.environ["JAX_PLATFORMS"] += ",cpu"

M, K, N = 32768, 768, 3072     # parcae-small's MLP (bench/fused_mlp.py SHAPES["parcae_small"])
# name: (op, rows, STEPS_NO_H (None: the library's), PROFILE_DETAIL), in the order they run (the budget cuts
# the tail)
CONFIGS = {
    "relu2": ("fwd", M, None, 1),
    "pair": ("pair", M, None, 1),
    "bwd": ("bwd", M, None, 1),
    "bwd_d2": ("bwd", M, None, 2),
    "pair_s3_d3": ("pair", M, 3, 3),
    "relu2_s3_d3": ("fwd", M, 3, 3),
    "bwd_half_d3": ("bwd", M // 2, None, 3),
    "gemm": ("gemm", M, None, 1),
    "gemm_s3_d3": ("gemm", M, 3, 3),
}
COMPUTE_WGS = 2                 # mlp_kernels.WGS; warpgroup 2 of each CTA is the memory warpgroup
EPILOGUE_STEPS = ("h_wait", "math", "store_wait", "smem_store", "commit", "tma_issue")


# ------------------------------------------------------------------------------------------- the trace

def regions_of(trace: dict) -> dict:
  """{tid: [(name, begin, end, depth)]} from a Mosaic GPU profiler trace (Chrome JSON, B/E events per tid in
  order), times in cycles from the trace's first stamp."""
  per_tid = collections.defaultdict(list)
  for ev in trace["traceEvents"]:
    per_tid[ev["tid"]].append(ev)
  out = {}
  for tid, evs in per_tid.items():
    t0 = evs[0]["ts"]
    stack, regs = [], []
    for ev in evs:
      t = round((ev["ts"] - t0) * 1e3)   # the dump writes (start ns + cycles) / 1e3
      if ev["ph"] == "B":
        stack.append((ev["name"], t))
      else:
        name, b = stack.pop()
        if name != ev["name"]:
          raise ValueError(f"tid {tid}: region {ev['name']} ends inside {name}")
        regs.append((name, b, t, len(stack)))
    out[tid] = sorted(regs, key=lambda r: (r[1], r[3]))
  return out


def tile_timeline(regs: list) -> dict:
  """One compute warpgroup's regions -> cycles per timeline part (summed over its tiles), its tile count and
  span. Parts: start (before the first K loop), kloop (the whole K loop) and at detail 3 its refill (K loop
  start to the first wgmma), wgmma and between_steps (the rest); epilogue and at detail 2 its steps (epi_<step>;
  epi_other: the epilogue outside named steps); gap (epilogue end to the next K loop); end (after the last
  epilogue: the drain)."""
  kloops = [r for r in regs if r[0] == "kloop"]
  epis = [r for r in regs if r[0] == "epilogue"]
  first, last = min(r[1] for r in regs), max(r[2] for r in regs)
  parts = collections.Counter()
  if not kloops:
    return {"parts": {}, "tiles": 0, "span": last - first}
  parts["start"] = kloops[0][1] - first
  kbegins = [r[1] for r in kloops]
  ebegins = [r[1] for r in epis]
  steps = collections.defaultdict(list)      # kloop index -> its mma regions
  inner = collections.defaultdict(list)      # epilogue index -> its step regions
  for r in regs:
    if r[0] == "mma":
      steps[bisect.bisect_right(kbegins, r[1]) - 1].append(r)
    elif r[0] in EPILOGUE_STEPS:
      inner[bisect.bisect_right(ebegins, r[1]) - 1].append(r)
  for i, (_, kb, ke, _) in enumerate(kloops):
    parts["kloop"] += ke - kb
    if steps[i]:
      wg = sum(r[2] - r[1] for r in steps[i])
      parts["refill"] += steps[i][0][1] - kb
      parts["wgmma"] += wg
      parts["between_steps"] += (ke - kb) - (steps[i][0][1] - kb) - wg
      parts["steps"] += len(steps[i])
    j = bisect.bisect_left(ebegins, ke)
    if j == len(epis):
      continue
    eb, ee = epis[j][1], epis[j][2]
    parts["epilogue"] += ee - eb
    for r in inner[j]:
      parts["epi_" + r[0]] += r[2] - r[1]
    if inner[j]:
      parts["epi_other"] += (ee - eb) - sum(r[2] - r[1] for r in inner[j])
    if i + 1 < len(kloops):
      parts["gap"] += kloops[i + 1][1] - ee
    else:
      parts["end"] += last - ee
  return {"parts": dict(parts), "tiles": len(kloops), "span": last - first}


def summarize(regions: dict, traces_per_block: int = COMPUTE_WGS + 1) -> dict:
  """Per region and warpgroup kind (compute / memory): regions per tile and warpgroup, mean cycles, share of
  the warpgroups' span; and the compute warpgroups' timeline (tile_timeline) summed over them."""
  stats = collections.defaultdict(lambda: {"n": 0, "cycles": 0, "wgs": set()})
  spans = {"compute": 0, "memory": 0}
  timeline, t_span, t_tiles, n_compute = collections.Counter(), 0, 0, 0
  for tid, regs in regions.items():
    if not regs:
      continue
    kind = "compute" if (tid - 1) % traces_per_block < COMPUTE_WGS else "memory"
    spans[kind] += max(r[2] for r in regs) - min(r[1] for r in regs)
    for name, b, e, _ in regs:
      st = stats[(kind, name)]
      st["n"] += 1
      st["cycles"] += e - b
      st["wgs"].add(tid)
    if kind == "compute":
      tl = tile_timeline(regs)
      timeline.update(tl["parts"])
      t_span += tl["span"]
      t_tiles += tl["tiles"]
      n_compute += 1
  tiles_per_wg = t_tiles / max(n_compute, 1)
  rows = []
  for (kind, name), st in sorted(stats.items()):
    rows.append({"wg": kind, "region": name, "per_tile": st["n"] / max(len(st["wgs"]) * tiles_per_wg, 1),
                 "mean_cycles": st["cycles"] / st["n"], "share": st["cycles"] / max(spans[kind], 1),
                 "wgs": len(st["wgs"])})
  per_tile = {k: v / max(t_tiles, 1) for k, v in timeline.items()}
  share = {k: v / max(t_span, 1) for k, v in timeline.items() if k != "steps"}
  return {"regions": rows, "timeline_share": share, "timeline_cycles_per_tile": per_tile,
          "tiles_per_compute_wg": tiles_per_wg, "compute_span_cycles": t_span / max(n_compute, 1),
          "compute_wgs": n_compute}


def table(name: str, summ: dict, mhz: float | None) -> str:
  """The printed tables of one configuration."""
  ns = (lambda c: f"{c / mhz * 1e3:8.1f}") if mhz else (lambda c: "       -")
  lines = [f"\n== {name}: {summ['compute_wgs']} compute warpgroups, {summ['tiles_per_compute_wg']:.1f} tiles "
           f"each, span {summ['compute_span_cycles']:.0f} cycles" +
           (f" = {summ['compute_span_cycles'] / mhz:.1f} us at {mhz:.0f} MHz" if mhz else ""),
           f"{'wg':8s} {'region':12s} {'per tile':>8s} {'mean cyc':>9s} {'mean ns':>8s} {'share':>7s}"]
  for r in summ["regions"]:
    lines.append(f"{r['wg']:8s} {r['region']:12s} {r['per_tile']:8.2f} {r['mean_cycles']:9.0f} "
                 f"{ns(r['mean_cycles'])} {100 * r['share']:6.1f}%")
  lines.append("compute warpgroup timeline (per tile, share of the span):")
  order = ["start", "kloop", "refill", "wgmma", "between_steps", "epilogue"] + \
          ["epi_" + s for s in EPILOGUE_STEPS] + ["epi_other", "gap", "end"]
  for k in order:
    if k in summ["timeline_share"]:
      c = summ["timeline_cycles_per_tile"][k]
      lines.append(f"  {k:16s} {c:9.0f} cyc {ns(c)} ns  {100 * summ['timeline_share'][k]:6.1f}%")
  return "\n".join(lines)


def synthetic_trace() -> dict:
  """A two-tile trace of one CTA (compute warpgroups tid 1, 2; memory 3) in the dump's format, for the smoke:
  per tile 1000 cycles: K loop 10-700 (wgmmas 100-300, 350-650), epilogue 700-990 (smem_store 700-800,
  store_wait 800-900), the next tile's K loop 20 cycles after the epilogue."""
  regs = {3: [("tile", 0, 900), ("tile", 950, 1900)]}
  for tid in (1, 2):
    regs[tid] = [(n, t + b, t + e) for t in (0, 1000) for n, b, e in
                 [("tile", 0, 1000), ("kloop", 10, 700), ("mma", 100, 300), ("mma", 350, 650),
                  ("epilogue", 700, 990), ("smem_store", 700, 800), ("store_wait", 800, 900)]]
  evs = []
  for tid, rs in regs.items():
    es = [((b, 1, -e), {"name": n, "ph": "B", "ts": (1000 + b) / 1e3, "pid": 1, "tid": tid}) for n, b, e in rs]
    es += [((e, 0, -b), {"name": n, "ph": "E", "ts": (1000 + e) / 1e3, "pid": 1, "tid": tid}) for n, b, e in rs]
    evs += [ev for _, ev in sorted(es, key=lambda x: x[0])]
  return {"displayTimeUnit": "ns", "traceEvents": evs}


def check_parser():
  summ = summarize(regions_of(synthetic_trace()))
  cyc = summ["timeline_cycles_per_tile"]
  assert summ["tiles_per_compute_wg"] == 2, summ
  assert abs(cyc["kloop"] - 690) < 1e-6 and abs(cyc["refill"] - 90) < 1e-6, cyc
  assert abs(cyc["wgmma"] - 500) < 1e-6 and abs(cyc["between_steps"] - 100) < 1e-6, cyc
  assert abs(cyc["epilogue"] - 290) < 1e-6 and abs(cyc["epi_other"] - 90) < 1e-6, cyc
  assert abs(cyc["gap"] - 20 / 2) < 1e-6, cyc   # one gap of 20 cycles over two tiles
  print(table("synthetic", summ, 1000.0))


# ------------------------------------------------------------------------------------------- the kernels

def kernel_fn(op: str):
  import jax
  from parcae.model import mlp_kernels as mk
  if op == "gemm":
    return jax.jit(lambda x, w: mk._ws_gemm((x, w), x.shape[1], w.shape[1], lambda a, _: (a,), trans_b=False,  # pylint: disable=protected-access
                                            steps=mk.STEPS_NO_H, piece=mk.PIECE_NO_H)[0])
  return jax.jit({"fwd": lambda x, w: mk._relu2_matmul_mosaic(x, w),  # pylint: disable=protected-access
                  "pair": lambda x, w: mk._pair_matmul_mosaic(x, w),  # pylint: disable=protected-access
                  "bwd": lambda g, w, h: mk._relu_grad_matmul_mosaic(g, w, h)}[op])  # pylint: disable=protected-access


def operands(op: str, m: int, like=None):
  import jax
  import jax.numpy as jnp
  ks = jax.random.split(jax.random.key(0), 3)
  mk_arr = (lambda key, shape, scale: (jax.random.normal(key, shape, jnp.float32) * scale).astype(jnp.bfloat16))
  if like is not None:   # compile-only: abstract operands on the target device
    return [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=like) for s in
            ([(m, K), (N, K), (m, N)] if op == "bwd" else [(m, K), (K, N)])]
  if op == "bwd":
    return [mk_arr(ks[0], (m, K), 1.0), mk_arr(ks[1], (N, K), K ** -0.5), mk_arr(ks[2], (m, N), 1.0)]
  return [mk_arr(ks[0], (m, K), 1.0), mk_arr(ks[1], (K, N), K ** -0.5)]


class Knobs:
  """mlp_kernels' module knobs set for one configuration, restored after."""

  def __init__(self, **kw):
    from parcae.model import mlp_kernels as mk
    self.mk, self.kw, self.old = mk, kw, {}

  def __enter__(self):
    for k, v in self.kw.items():
      self.old[k] = getattr(self.mk, k)
      setattr(self.mk, k, v)

  def __exit__(self, *exc):
    for k, v in self.old.items():
      setattr(self.mk, k, v)


def run_config(name, cfg, work_dir, iters, row):
  """Unprofiled burst (ms, clock) into `row`, then the profiled call after a warm-up burst (its outputs
  compared with the unprofiled call's): the profiled call's regions."""
  import jax
  from profiling import sustained
  from parcae.model import mlp_kernels as mk
  op, m, steps, detail = cfg
  knobs = {} if steps is None else {"STEPS_NO_H": steps}
  args = operands(op, m)
  stages = mk.STEPS if op == "bwd" else (steps or mk.STEPS_NO_H)   # the backward runs STEPS stages
  row.update({"op": op, "m": m, "k": K, "n": N, "stages": stages, "detail": detail})
  with Knobs(**knobs):
    plain = kernel_fn(op)
    want = jax.block_until_ready(plain(*args))
    row.update(sustained(plain, args, iters))
    pdir = os.path.join(work_dir, name)
    os.makedirs(pdir, exist_ok=True)
    with Knobs(PROFILE_DIR=pdir, PROFILE_DETAIL=detail):
      prof = kernel_fn(op)
      jax.block_until_ready(prof(*args))            # compiles and runs cold; its trace is the first file
      jax.effects_barrier()
      # jax names the trace file when it lowers the kernel, so each call of one executable dumps to the same
      # path and a second dump is refused while the file exists: the cold call's trace is set aside
      first = sorted(glob.glob(os.path.join(pdir, "*.json")))
      for f in first:
        os.rename(f, f[:-len(".json")] + ".cold")
      before = set()
      out = None
      for _ in range(iters // 4):                    # warm-up at the kernel's clock
        out = plain(*args)
      jax.block_until_ready(out)
      out = prof(*args)
      jax.block_until_ready(out)
      jax.effects_barrier()                           # the trace's dump is a host callback
  row["profiled_equals_plain"] = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))
  new = sorted(set(glob.glob(os.path.join(pdir, "*.json"))) - before)
  row["trace_call"] = "warm"
  if not new and len(first) == 1:    # the warm call's dump refused: fall back on the cold call's trace
    new, row["trace_call"] = [first[0][:-len(".json")] + ".cold"], "cold (the warm call's dump failed)"
  if len(new) != 1:
    raise RuntimeError(f"{name}: expected one new trace in {pdir}, found {new} (first call: {first})")
  with open(new[0]) as f:
    trace = json.load(f)
  row["trace_bytes"] = os.path.getsize(new[0])
  return regions_of(trace)


def lower_all(names):
  """CPU smoke: each configuration's profiled kernel lowered and compiled for a compile-only H100 (needs jax's
  CUDA plugin importable; the profile dump's host callback is stubbed out, as no GPU client exists)."""
  import jax
  try:
    from parcae.train.targets import target_devices
    dev = target_devices("h100")[0]
  except Exception as e:  # pylint: disable=broad-except
    print(f"compile-only H100 target unavailable ({type(e).__name__}: {str(e)[:120]}): lowering skipped")
    return
  from parcae.model import mlp_kernels as mk
  jax.debug.callback = lambda *a, **k: None
  sh = jax.sharding.SingleDeviceSharding(dev)
  for name in names:
    op, m, steps, detail = CONFIGS[name]
    knobs = dict(PROFILE_DIR=tempfile.gettempdir(), PROFILE_DETAIL=detail, _num_sms=lambda: 132)
    if steps is not None:
      knobs["STEPS_NO_H"] = steps
    try:
      with Knobs(**knobs):
        kernel_fn(op).lower(*operands(op, m, like=sh)).compile()
      print(f"{name}: lowers and compiles for an H100 with the profiler (detail {detail})")
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name}: FAILED {type(e).__name__}: {str(e).splitlines()[-1][:200]}")


def smem_probe(extra_kbs=(0, 32, 64), shapes=((2, 128), (3, 64), (3, 128), (4, 64))):
  """CPU: whether the library's plain GEMM (parcae-small's MLP shape) still fits an H100's shared memory with
  an extra float32 scratch buffer of each size (KB), per (pipeline stages, output piece): the room an epilogue
  with its own tables (say RoPE's cos / sin) would have. Compiles for a compile-only H100; returns
  {(kb, stages, piece): None if it fits, else the compiler's complaint}."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas import mosaic_gpu as plgpu
  from parcae.train.targets import target_devices
  sh = jax.sharding.SingleDeviceSharding(target_devices("h100")[0])
  real, out = plgpu.kernel, {}
  try:
    for kb in extra_kbs:
      def with_scratch(*a, scratch_types=(), kb=kb, **k):
        extra = [plgpu.SMEM((128, kb * 1024 // (128 * 4)), jnp.float32)] if kb else []
        return real(*a, scratch_types=list(scratch_types) + extra, **k)
      plgpu.kernel = with_scratch
      for steps, piece in shapes:
        try:
          with Knobs(STEPS_NO_H=steps, PIECE_NO_H=piece, _num_sms=lambda: 132):
            kernel_fn("gemm").lower(*operands("gemm", M, like=sh)).compile()
          out[(kb, steps, piece)] = None
        except Exception as e:  # pylint: disable=broad-except
          out[(kb, steps, piece)] = str(e).strip().splitlines()[-1][:200]
        print(f"extra {kb} KB, {steps} stages, piece {piece}: {out[(kb, steps, piece)] or 'fits'}", flush=True)
  finally:
    plgpu.kernel = real
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default=",".join(CONFIGS), help="configurations, ','-separated: " + ", ".join(CONFIGS))
  p.add_argument("--iters", type=int, default=2000, help="calls per unprofiled burst")
  p.add_argument("--budget-s", type=float, default=1e9, help="start no configuration after this many seconds")
  p.add_argument("--smoke", action="store_true", help="CPU: parser self-test and compile-only lowering")
  p.add_argument("--smem-probe", action="store_true", help="CPU: the GEMM's shared-memory room (`smem_probe`)")
  args = p.parse_args(argv)
  if args.smem_probe:
    smem_probe()
    return
  names = [n for n in args.only.split(",") if n]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    p.error(f"unknown configurations {unknown}; valid: {', '.join(CONFIGS)}")
  out_dir = os.environ.get("OUT", ".")
  if args.smoke:
    check_parser()
    lower_all(names)
    return
  import jax
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  t0 = time.time()
  results, texts, arrays = {}, [], {}
  with tempfile.TemporaryDirectory() as work:
    for name in names:
      if time.time() - t0 > args.budget_s:
        print(f"{name}: skipped (budget {args.budget_s:.0f} s spent)", flush=True)
        continue
      row = {}
      try:
        regions = run_config(name, CONFIGS[name], work, args.iters, row)
      except Exception as e:  # pylint: disable=broad-except
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
        print(f"{name}: FAILED {msg} (unprofiled: {row.get('ms_sustained')} ms)", flush=True)
        results[name] = {**row, "error": msg}
        continue
      summ = summarize(regions)
      mhz = row.get("clock_mhz_mean")
      row.update(summ)
      if mhz:
        row["compute_span_us"] = summ["compute_span_cycles"] / mhz
      results[name] = row
      text = table(name, summ, mhz)
      head = (f"{name}: op {row['op']}, M {row['m']}, {row['stages']} stages, detail {row['detail']}: "
              f"unprofiled {row['ms_sustained']:.4f} ms at {mhz or 0:.0f} MHz; profiled outputs equal the "
              f"unprofiled: {row['profiled_equals_plain']}; trace of the {row['trace_call']} call")
      print(head + text, flush=True)
      texts.append(head + text)
      ids = {n: i for i, n in enumerate(sorted({r[0] for regs in regions.values() for r in regs}))}
      arrays[name] = np.array([(tid, ids[r[0]], r[1], r[2]) for tid, regs in regions.items() for r in regs],
                              np.int64)
      arrays[name + "__names"] = np.array(sorted(ids, key=ids.get))
      print(f"  ({time.time() - t0:.0f} s)", flush=True)
  with open(os.path.join(out_dir, "mlp_profile.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  with open(os.path.join(out_dir, "mlp_profile.txt"), "w") as f:
    f.write("\n\n".join(texts) + "\n")
  np.savez_compressed(os.path.join(out_dir, "mlp_profile_regions.npz"), **arrays)
  # the short table last: the timeline shares of every configuration
  keys = ["kloop", "refill", "wgmma", "between_steps", "epilogue", "epi_store_wait", "epi_smem_store",
          "epi_commit", "epi_tma_issue", "epi_math", "epi_h_wait", "gap", "start", "end"]
  print("\nunprofiled ms at MHz, a compute warpgroup's profiled span (us at that clock), and the share of that "
        "span, %:\n" + " | ".join(keys))
  for name, row in results.items():
    if "timeline_share" in row:
      sh = row["timeline_share"]
      print(f"{name:12s} {row['ms_sustained']:.4f} ms {row.get('clock_mhz_mean', 0):4.0f} MHz "
            f"{row.get('compute_span_us', 0):6.1f} us: " +
            " ".join(f"{100 * sh[k]:5.1f}" if k in sh else "    -" for k in keys))
    else:
      print(f"{name:12s} {row.get('ms_sustained', 0):.4f} ms, profile failed: {row.get('error', '')[:150]}")


if __name__ == "__main__":
  main()
