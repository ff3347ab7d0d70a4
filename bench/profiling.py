"""Top device ops of a traced callable, from the profiler's perfetto trace (used by the benches' --profile)."""
from __future__ import annotations

import glob
import gzip
import json
import os

import jax


def top_device_ops(run, name, n=25, what="the traced calls"):
  """Trace run() (which returns arrays to wait for), print the n ops with the most summed device time.

  The trace goes to $OUT/<name> (or /tmp/<name>). Returns {op name: microseconds}.
  """
  logdir = os.path.join(os.environ.get("OUT", "/tmp"), name)
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
  totals, total = {}, 0.0
  for e in events:
    proc = pids.get(e.get("pid"), "")
    if e.get("ph") != "X" or "dur" not in e or ("GPU" not in proc and "/device" not in proc):
      continue
    key = e["name"][:90]
    totals[key] = totals.get(key, 0.0) + e["dur"]
    total += e["dur"]
  print(f"device time in {what}: {total / 1e3:.2f} ms", flush=True)
  if not total:
    print("process names in the trace:", sorted(set(pids.values()))[:20], flush=True)
  for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:n]:
    print(f"  {v / 1e3:9.3f} ms {100 * v / total:5.1f}%  {k}", flush=True)
  return totals
