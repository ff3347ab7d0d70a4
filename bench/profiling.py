"""Top device ops of a traced callable, from the profiler's perfetto trace (used by the benches' --profile),
and the benches' wall-clock timer of a jitted call."""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
import shutil
import time

import jax


def timed(fn, args, iters):
  """(milliseconds per call of fn(*args) over `iters` calls after one warm-up call, the last output)."""
  out = jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters * 1e3, out


def describe_fusions(hlo_text: str) -> dict:
  """{fusion name: "output shape  fwd | bwd  last jax op"} from an optimized HLO module's text: what a profiled
  kernel computes, and whether autodiff's backward pass made it (a transpose in its op_name). The profiler names a fusion `loop_add_fusion_62` where the HLO has
  `loop_add_fusion.62`; both spellings are keys."""
  out = {}
  for m in re.finditer(r'^\s*%(\S+) = (.*?) fusion\(.*?kind=\w+, calls=%\S+, metadata=\{op_name="([^"]*)"',
                       hlo_text, re.M):
    shape = re.sub(r"\{[\d,]*\}", "", m.group(2))[:60]
    desc = f"{shape}  {'bwd' if 'transpose(' in m.group(3) else 'fwd'} {m.group(3).split('/')[-1]}"
    out[m.group(1)] = out[m.group(1).replace(".", "_")] = desc
  shapes = dict(re.findall(r"^\s*%(\S+) = (\S+)", hlo_text, re.M))
  for m in re.finditer(r'^\s*%(\S+) = \(?(\w+\[[\d,]*\])[^=]*? custom-call\(([^)]*)\), custom_call_target="__cublas'
                       r'[^"]*".*?"lhs_contracting_dimensions":\["(\d)"\].*?"rhs_contracting_dimensions":\["(\d)"\]',
                       hlo_text, re.M):
    args = [re.sub(r"\{[\d,]*\}", "", shapes.get(a.strip().lstrip("%"), "?")) for a in m.group(3).split(",")]
    result = re.sub(r"\{[\d,]*\}", "", m.group(2))
    out[m.group(1)] = f"{result} = {' x '.join(args[:2])} (contracting {m.group(4)}, {m.group(5)})"
  return out


def top_device_ops(run, name, n=25, what="the traced calls", hlo_text=None):
  """Trace run() (which returns arrays to wait for), print the n ops with the most summed device time.

  The trace goes to /tmp/<name>; the per-op totals (microseconds, calls, and with `hlo_text`, the optimized
  program, what each fusion computes: `describe_fusions`) and a summary by kind of kernel to
  $OUT/<name>.json (or /tmp). Returns {op name: microseconds}.
  """
  logdir = os.path.join("/tmp", name)
  shutil.rmtree(logdir, ignore_errors=True)  # an earlier run's trace there would be read instead of this one's
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    jax.block_until_ready(run())
  files = glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    print("no perfetto trace written", flush=True)
    return {}
  with gzip.open(files[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  totals, calls, by_op, streams, total = {}, {}, {}, {}, 0.0
  for e in events:
    proc = pids.get(e.get("pid"), "")
    if e.get("ph") != "X" or "dur" not in e or ("GPU" not in proc and "/device" not in proc):
      continue
    key = e["name"][:90]
    totals[key] = totals.get(key, 0.0) + e["dur"]
    calls[key] = calls.get(key, 0) + 1
    total += e["dur"]
    streams.setdefault((e["pid"], e.get("tid")), []).append((e["ts"], e["dur"], key))
    op = (e.get("args") or {}).get("hlo_op")
    if op:  # the program's instruction that launched the kernel: a cuBLAS call's shapes (`describe_fusions`)
      by_op[op] = [by_op.get(op, [0.0, 0])[0] + e["dur"], by_op.get(op, [0.0, 0])[1] + 1, key]
  print(f"device time in {what}: {total / 1e3:.2f} ms", flush=True)
  if not total:
    print("process names in the trace:", sorted(set(pids.values()))[:20], flush=True)
  desc = describe_fusions(hlo_text) if hlo_text else {}
  for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:n]:
    print(f"  {v / 1e3:9.3f} ms {100 * v / total:5.1f}% {calls[k]:5d}x  {k[:48]:48s} {desc.get(k, '')}", flush=True)
  if by_op:
    print("by instruction (cuBLAS calls with their shapes; a kernel inside an XLA command buffer is named by the "
          "buffer: profile a `_cmdbuf_off` variant to see each GEMM's shapes):", flush=True)
    for op, (us, n, kernel) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:n]:
      print(f"  {us / 1e3:9.3f} ms {n:5d}x {us / n:8.1f} us  {op[:24]:24s} {desc.get(op, kernel[:48])}", flush=True)
  memsets = memsets_by_next_kernel(streams, events)
  if memsets["count"]:
    print(f"memsets: {memsets['count']} calls, {memsets['ms']:.2f} ms (args of one: {memsets['args']}); by the "
          f"kernel after each (ms, count):", flush=True)
    for after, (ms, count) in memsets["by_next"][:12]:
      print(f"  {ms:8.3f} {count:5d}  -> {after[:70]}", flush=True)
  gaps = idle_gaps(max(streams.values(), key=lambda ev: sum(d for _, d, _ in ev))) if streams else {}
  if gaps:
    print(f"busiest stream: {gaps['busy_ms']:.2f} ms busy in a {gaps['span_ms']:.2f} ms span, idle "
          f"{gaps['idle_ms']:.2f} ms; largest idle time by the kernels around it (ms, count, before -> after):",
          flush=True)
    for (before, after), (ms, count) in gaps["by_pair"][:12]:
      print(f"  {ms:8.3f} {count:5d}  {before[:40]:40s} -> {after[:40]}", flush=True)
  kinds = {}
  for k, v in totals.items():
    kinds[op_kind(k)] = kinds.get(op_kind(k), 0.0) + v
  print("by kind: " + ", ".join(f"{k} {100 * v / max(total, 1e-9):.1f}%" for k, v in
                                sorted(kinds.items(), key=lambda kv: -kv[1])), flush=True)
  with open(os.path.join(os.environ.get("OUT", "/tmp"), name + ".json"), "w") as f:
    json.dump({"total_us": total, "by_kind_us": kinds,
               "ops": {k: [totals[k], calls[k]] + ([desc[k]] if k in desc else [])
                       for k in sorted(totals, key=lambda k: -totals[k])},
               "idle": gaps and {**gaps, "by_pair": [[list(k), v] for k, v in gaps["by_pair"][:50]]},
               "hlo_ops": {k: v + ([desc[k]] if k in desc else [])
                           for k, v in sorted(by_op.items(), key=lambda kv: -kv[1][0])}}, f, indent=0)
  return totals


def memsets_by_next_kernel(streams, events) -> dict:
  """Device memsets (XLA zeroing a buffer before a kernel that accumulates into it, or a library's workspace)
  summed by the first non-memset op after each on its stream: which calls the memsets serve."""
  by_next, count, total = {}, 0, 0.0
  for ev in streams.values():
    ev = sorted(ev)
    for i, (_, dur, name) in enumerate(ev):
      if not name.lower().startswith("memset"):
        continue
      after = next((n for _, _, n in ev[i + 1:] if not n.lower().startswith("memset")), "(end)")
      ms, c = by_next.get(after, (0.0, 0))
      by_next[after] = (ms + dur / 1e3, c + 1)
      count, total = count + 1, total + dur / 1e3
  example = next((e.get("args") for e in events if e.get("ph") == "X" and str(e.get("name", "")).lower()
                  .startswith("memset")), None)
  return {"count": count, "ms": total, "args": example,
          "by_next": sorted(by_next.items(), key=lambda kv: -kv[1][0])}


def idle_gaps(events) -> dict:
  """Where one GPU stream waits: events [(start us, duration us, name)] -> busy, span and idle time (ms), and
  the idle time summed by the (kernel before, kernel after) pair around each gap, largest first. Idle time in
  a step is the host falling behind: a loop whose trip count the host must read back, or kernels too short
  for their launches."""
  ev = sorted(events)
  by_pair, idle = {}, 0.0
  for (t0, d0, n0), (t1, _, n1) in zip(ev, ev[1:]):
    gap = t1 - (t0 + d0)
    if gap > 0:
      idle += gap
      ms, count = by_pair.get((n0, n1), (0.0, 0))
      by_pair[(n0, n1)] = (ms + gap / 1e3, count + 1)
  span = ev[-1][0] + ev[-1][1] - ev[0][0] if ev else 0.0
  return {"busy_ms": sum(d for _, d, _ in ev) / 1e3, "span_ms": span / 1e3, "idle_ms": idle / 1e3,
          "by_pair": sorted(by_pair.items(), key=lambda kv: -kv[1][0])}


def op_kind(name: str) -> str:
  """Coarse class of a device op by its kernel name: GEMM, attention, reduction fusion, elementwise, other."""
  n = name.lower()
  if any(t in n for t in ("nvjet", "gemm", "cutlass", "sm90_xmma", "cublas", "dot")):
    return "gemm"
  if any(t in n for t in ("cudnn", "flash", "fmha", "sdpa")):
    return "attention"
  if "reduce" in n:
    return "reduction fusion"
  if "fusion" in n or "loop_" in n:
    return "elementwise fusion"
  if any(t in n for t in ("copy", "memcpy", "memset", "transpose")):
    return "copy / transpose"
  if any(t in n for t in ("triton", "pallas", "kernel")):  # Pallas kernels carry their function's name
    return "custom kernel"
  return "other"


SMI_QUERY = "clocks.sm,power.draw,clocks_throttle_reasons.sw_power_cap,clocks_throttle_reasons.hw_slowdown"


class GpuClocks:
  """The GPU's SM clock and power while a block runs, from `nvidia-smi` every `period_ms` (a context manager;
  `.summary()` after it). An H100 held at its power limit lowers its clock: a step that draws more power runs
  at a lower clock than the kernels timed alone (bench/RESULTS.md, session 27), so throughput rows carry the
  clock they ran at. Without nvidia-smi (a CPU machine) the summary is empty."""

  def __init__(self, period_ms: int = 100, gpu: int = 0):
    self.period_ms, self.gpu = period_ms, gpu
    self.proc, self.text = None, ""

  def _query(self) -> str:
    """SMI_QUERY, or the clock and power alone where this driver knows no throttle-reason fields."""
    import subprocess
    try:
      ok = subprocess.run(["nvidia-smi", f"--query-gpu={SMI_QUERY}", "--format=csv,noheader", f"-i={self.gpu}"],
                          capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
      return ""
    return SMI_QUERY if ok else "clocks.sm,power.draw"

  def __enter__(self):
    import subprocess
    import tempfile
    self.out = tempfile.TemporaryFile(mode="w+")
    query = self._query()
    if query:
      cmd = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", f"-lms={self.period_ms}",
             f"-i={self.gpu}"]
      self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.DEVNULL, text=True)
    return self

  def __exit__(self, *exc):
    if self.proc is not None:
      self.proc.terminate()
      self.proc.wait()
      self.out.seek(0)
      self.text = self.out.read()
    self.out.close()
    return False

  def summary(self) -> dict:
    return parse_clock_samples(self.text)


def parse_clock_samples(text: str) -> dict:
  """nvidia-smi lines "MHz, W, power cap, hw slowdown" (the last two "Active" / "Not Active") -> mean and min
  SM clock, mean and max power, and the share of samples throttled by the power cap; {} without samples."""
  rows = []
  for line in text.splitlines():
    f = [s.strip() for s in line.split(",")]
    try:
      rows.append((float(f[0]), float(f[1]), len(f) > 2 and f[2] == "Active", len(f) > 3 and f[3] == "Active"))
    except (ValueError, IndexError):
      continue  # a header, an "[N/A]" or a line cut off by the stop
  if not rows:
    return {}
  mhz, watts = [r[0] for r in rows], [r[1] for r in rows]
  return {"clock_mhz_mean": sum(mhz) / len(mhz), "clock_mhz_min": min(mhz), "power_w_mean": sum(watts) / len(watts),
          "power_w_max": max(watts), "power_capped": sum(r[2] for r in rows) / len(rows),
          "hw_slowdown": sum(r[3] for r in rows) / len(rows), "samples": len(rows)}


def sustained(fn, args, iters) -> dict:
  """Time `iters` back-to-back calls while sampling the GPU's clock and power: ms per call, the clock and
  power (profiling.GpuClocks) and the energy per call (mean power x time; the figure that sets a step's time
  when the board runs at its power limit)."""
  with GpuClocks() as clocks:
    ms, _ = timed(fn, args, iters)
  c = clocks.summary()
  return {"ms_sustained": round(ms, 4), **c, **({"mj_per_call": c["power_w_mean"] * ms} if c else {})}


def sustained_text(row: dict) -> str:
  """A bench line's suffix for `sustained`'s figures."""
  return (f"  sustained {row['ms_sustained']:8.4f} ms at {row.get('clock_mhz_mean', 0):4.0f} MHz, "
          f"{row.get('power_w_mean', 0):3.0f} W: {row.get('mj_per_call', 0):6.1f} mJ/call")


def _unnumbered(name: str) -> str:
  """A kernel or instruction name without XLA's numbering (`loop_add_fusion_62` -> `loop_add_fusion`)."""
  return re.sub(r"([._]\d+)+$", "", name)


def _work_key(name: str, entry: list) -> str:
  """What an op of a `top_device_ops` file computes, comparable across two programs: its description where the
  file has one (shape, pass, jax op), else its kernel name without XLA's numbering (`loop_add_fusion_62`)."""
  return entry[2] if len(entry) > 2 else _unnumbered(name)


def _op_work_key(op: str, entry: list) -> str:
  """`_work_key` for an instruction of a file's "hlo_ops" table ([us, calls, kernel, description?]): a GEMM by
  its shapes, whichever cuBLAS kernel the autotuner picked in that program (two compiles of one GEMM often pick
  different ones); else the instruction and its kernel without XLA's numbering ("pallas_call: _grad_kernel")."""
  if len(entry) > 3:
    return entry[3]
  op, kernel = _unnumbered(op), _unnumbered(entry[2])
  return op if op == kernel else f"{op}: {kernel}"


def compare_profiles(old: dict, new: dict, steps: int = 2, n: int = 20) -> dict:
  """Two `top_device_ops` files (old, new) side by side, in ms per step (each traced `steps` steps): the total,
  each kernel kind, and the n kinds of work whose time moved most, largest change first: per instruction
  (`_op_work_key`) where both files have the "hlo_ops" table, else per kernel (`_work_key`)."""
  per = lambda us: us / 1e3 / steps
  by_op = bool(old.get("hlo_ops")) and bool(new.get("hlo_ops"))

  def work(p):
    out = {}
    for name, entry in (p["hlo_ops"] if by_op else p["ops"]).items():
      k = _op_work_key(name, entry) if by_op else _work_key(name, entry)
      out[k] = out.get(k, 0.0) + per(entry[0])
    return out
  wo, wn = work(old), work(new)
  moved = sorted(((k, wo.get(k, 0.0), wn.get(k, 0.0)) for k in set(wo) | set(wn)), key=lambda r: -abs(r[2] - r[1]))
  kinds = sorted(set(old["by_kind_us"]) | set(new["by_kind_us"]))
  return {"total_ms": (per(old["total_us"]), per(new["total_us"])),
          "by_kind_ms": {k: (per(old["by_kind_us"].get(k, 0.0)), per(new["by_kind_us"].get(k, 0.0))) for k in kinds},
          "moved_ms": moved[:n]}


def _diff_main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description="compare two `--profile` files (bench/profiling.top_device_ops): "
                              "python3 bench/profiling.py OLD.json NEW.json")
  p.add_argument("old")
  p.add_argument("new")
  p.add_argument("--steps", type=int, default=2, help="steps each file traced (train_throughput --profile: 2)")
  p.add_argument("--top", type=int, default=20)
  args = p.parse_args(argv)
  with open(args.old) as f_old, open(args.new) as f_new:
    c = compare_profiles(json.load(f_old), json.load(f_new), args.steps, args.top)
  o, w = c["total_ms"]
  print(f"device time per step: old {o:.2f} ms, new {w:.2f} ms ({w - o:+.2f})")
  for k, (o, w) in sorted(c["by_kind_ms"].items(), key=lambda kv: -kv[1][1]):
    print(f"  {k:20s} {o:9.2f} {w:9.2f} {w - o:+8.2f}")
  print("moved most (ms per step, old -> new):")
  for k, o, w in c["moved_ms"]:
    print(f"  {o:9.3f} -> {w:9.3f} {w - o:+8.3f}  {k[:100]}")


if __name__ == "__main__":
  _diff_main()
