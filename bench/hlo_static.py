"""A static profile of an optimized XLA GPU program (HLO text): what its kernels compute and move, per step.

Every kernel launch of the program (fusions, library calls, collectives at the top level of the entry
computation and of the loops it runs) with its bytes (operands read + results written, as declared) and, for
cuBLAS GEMMs, its FLOPs; a loop body's kernels count as often as XLA's known trip count says (a loop whose
count depends on data counts once and is reported). No GPU needed: with `parcae info --target` / bench/aot_gpu.py
the program comes from a compile-only H100, so variants can be compared before device time is spent.
Bytes are an upper bound of the DRAM traffic: each operand counts whole, except one a fusion only reads through
dynamic slices (the slices count) or updates in place (the update counts); use differences between variants,
not absolute times. `sites` groups the bytes by the
model source line that made each kernel:

  python bench/aot_gpu.py --only parcae_small --target h100 --hlo   # writes parcae_small.hlo.txt.gz
  python bench/hlo_static.py parcae_small.hlo.txt.gz --sites        # XLA's fusions by source line, largest first
  python bench/hlo_static.py hlo_V.txt.gz --timed prof_V.json 2      # a profile's measured time by source line
(the last from `bench/train_throughput.py --only V_cmdbuf_off --profile`, which writes both files to $OUT).
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict

BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
         "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1}
_ARRAY = re.compile(r"\b([a-z0-9]+)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(.*)$")
_COMP = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")
KERNEL_OPS = {"fusion", "custom-call", "all-reduce", "all-gather", "reduce-scatter", "all-to-all",
              "collective-permute", "copy", "all-reduce-start", "all-gather-start", "collective-permute-start",
              "reduce-scatter-start"}


def shape_bytes(shape: str) -> int:
  return sum(BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
             for t, dims in _ARRAY.findall(shape))


def parse(hlo: str):
  """{computation: [(name, shape, op, operand names, attributes)]} (a parameter's operand: its index), the
  entry computation's name and {computation: its ROOT instruction's name}."""
  comps, entry, roots, cur = {}, None, {}, None
  for line in hlo.splitlines():
    m = _COMP.match(line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      entry = cur if m.group(1) else entry
      continue
    if cur is None or line.strip() == "}":
      continue
    m = _INSTR.match(line)
    if m:
      name, shape, op, args, attrs = m.groups()
      comps[cur].append((name, shape, op, [args] if op == "parameter" else re.findall(r"%([\w.\-]+)", args), attrs))
      if line.lstrip().startswith("ROOT "):
        roots[cur] = name
  return comps, entry, roots


def _fusion_bytes(body, root, operand_shapes, shape):
  """Bytes a fusion moves: its result written and each operand read, except an operand only dynamically
  sliced (the slices' bytes) or updated in place by the root dynamic-update-slice, directly or through
  bitcasts (the update's bytes, read nowhere else and written once)."""
  shapes = {n: s for n, s, *_ in body}
  params = {n: int(a[0]) for n, _, op, a, _ in body if op == "parameter"}
  users = defaultdict(list)
  for _, s, op, args, _ in body:
    for i, a in enumerate(args):
      users[a].append((op, i, s))
  read = [shape_bytes(s) for s in operand_shapes]
  for p, i in params.items():
    if i < len(read) and users[p] and all(op == "dynamic-slice" and j == 0 for op, j, _ in users[p]):
      read[i] = sum(shape_bytes(s) for *_, s in users[p])
  written = shape_bytes(shape)
  op_args = {n: (op, a) for n, _, op, a, _ in body}
  op, args = op_args.get(root, ("", []))
  base = args[0] if op == "dynamic-update-slice" else None
  while base in op_args and op_args[base][0] == "bitcast" and len(users[base]) == 1:  # a view of the buffer
    base = op_args[base][1][0]
  if base in params and params[base] < len(read) and len(users[base]) == 1:
    read[params[base]] = 0
    written = shape_bytes(shapes[args[1]])
  return written + sum(read)


def _gemm_flops(shape, operand_shapes, attrs):
  dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
  arrays = _ARRAY.findall(shape)
  if not dims or not arrays or not operand_shapes:
    return 0
  lhs = [int(d) for d in _ARRAY.findall(operand_shapes[0])[0][1].split(",") if d]
  k = math.prod(lhs[int(i.strip('"'))] for i in dims.group(1).split(",") if i)
  return 2 * k * math.prod(int(d) for d in arrays[0][1].split(",") if d)


def kernels(hlo: str):
  """[(kind, computation, name, count, bytes, flops)] of every kernel, counts multiplied by trip counts;
  and the loops whose trip count is unknown."""
  comps, entry, roots = parse(hlo)
  out, unknown = [], []

  def walk(comp, mult):
    shapes = {n: s for n, s, *_ in comps.get(comp, [])}
    for name, shape, op, args, attrs in comps.get(comp, []):
      if op == "while":
        body = re.search(r"body=%([\w.\-]+)", attrs).group(1)
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
        if not trip:
          unknown.append(f"{comp}/{name}")
        walk(body, mult * (int(trip.group(1)) if trip else 1))
      elif op in ("call", "conditional", "async-start"):
        for callee in re.findall(r"(?:to_apply|calls|branch_computations=\{[^}]*)=?%([\w.\-]+)", attrs):
          walk(callee, mult)
      elif op in KERNEL_OPS:
        operand_shapes = [shapes.get(a, "") for a in args]
        target = re.search(r'custom_call_target="([^"]+)"', attrs)
        kind = target.group(1) if target else op
        written = shape
        if "matmul" in kind or "gemm" in kind:  # a cuBLAS call's result is (product, workspace): count the product
          written = "%s[%s]" % _ARRAY.findall(shape)[0]
        nbytes = shape_bytes(written) + sum(shape_bytes(s) for s in operand_shapes)
        callee = re.search(r"calls=%([\w.\-]+)", attrs)
        if op == "fusion" and callee and callee.group(1) in comps:
          nbytes = _fusion_bytes(comps[callee.group(1)], roots.get(callee.group(1)), operand_shapes, shape)
        if op == "fusion":
          kind = "triton-gemm" if "__triton_gemm" in attrs or "nested_gemm" in attrs else \
              "fusion:" + re.search(r"kind=(\w+)", attrs).group(1)
        flops = _gemm_flops(shape, operand_shapes, attrs) if "matmul" in kind or "gemm" in kind else 0
        out.append((kind, comp, name, mult, nbytes, flops))

  walk(entry, 1)
  return out, unknown


def summary(hlo: str) -> dict:
  """Per kind of kernel: launches, GB moved and GEMM TFLOP per step (trip counts applied)."""
  ks, unknown = kernels(hlo)
  by = defaultdict(lambda: [0, 0.0, 0.0])
  for kind, _, _, n, b, f in ks:
    key = "cudnn-attention" if "cudnn" in kind else "triton-kernel" if "triton" in kind and "gemm" not in kind \
        else "gemm" if "matmul" in kind or "gemm" in kind else kind
    by[key][0] += n
    by[key][1] += n * b / 1e9
    by[key][2] += n * f / 1e12
  return {"kinds": {k: {"launches": v[0], "GB": round(v[1], 3), "TFLOP": round(v[2], 4)} for k, v in by.items()},
          "total_GB": round(sum(v[1] for v in by.values()), 3),
          "gemm_TFLOP": round(sum(v[2] for v in by.values()), 4), "loops_with_unknown_trip_count": unknown}


def stack_frames(hlo: str) -> dict:
  """{stack_frame_id: ["file.py:line function", ...] innermost first} from the program's source tables
  (FileNames, FunctionNames, FileLocations, StackFrames; as XLA prints them, a frame's parent_frame_id is its
  parent's id + 1, so 1 = none)."""
  first = re.search(r"^(?:%|ENTRY )", hlo, re.M)  # the tables sit between the module line and the first computation
  head = hlo[:first.start()] if first else hlo

  def table(name):
    if name + "\n" not in head:
      return []
    return re.findall(r"^(\d+) (.*)$", head.split(name + "\n", 1)[1].split("\n\n", 1)[0], re.M)

  files = {i: v.strip('"').rsplit("/", 1)[-1] for i, v in table("FileNames")}
  funcs = {i: v.strip('"') for i, v in table("FunctionNames")}
  locs = {i: re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v).groups()
          for i, v in table("FileLocations")}
  parents = {}
  for i, v in table("StackFrames"):
    parent = re.search(r"parent_frame_id=(\d+)", v)
    parents[i] = (re.search(r"file_location_id=(\d+)", v).group(1), int(parent.group(1)) if parent else 0)
  out = {}
  for frame in parents:
    chain, f = [], frame
    while f in parents and len(chain) < 64:
      loc, parent = parents[f]
      fi, fu, line = locs[loc]
      chain.append(f"{files[fi]}:{line} {funcs[fu].rsplit('.', 1)[-1]}")
      f = str(parent - 1) if parent > 1 else None
    out[frame] = chain
  return out


def sites(hlo: str, depth: int = 3, kinds: str = "fusion") -> list:
  """[(site, launches, bytes)] per step of the kernels whose kind starts with `kinds` (default: XLA's own
  fusions), grouped by the innermost `depth` frames of the source line that made them, largest first: which
  model code the memory-bound passes come from. Loops of unknown trip count count once (as in `kernels`)."""
  frames = stack_frames(hlo)
  comps = parse(hlo)[0]
  attrs = {(c, n): a for c, ins in comps.items() for n, _, _, _, a in ins}
  by = defaultdict(lambda: [0, 0.0])
  for kind, comp, name, n, b, _ in kernels(hlo)[0]:
    if kind.startswith(kinds):
      frame = re.search(r"stack_frame_id=(\d+)", attrs[(comp, name)])
      site = " < ".join(frames.get(frame.group(1), [])[:depth]) if frame else ""
      by[site or "?"][0] += n
      by[site or "?"][1] += n * b
  return sorted(((k, v[0], v[1]) for k, v in by.items()), key=lambda r: -r[2])


def timed_sites(hlo: str, hlo_ops: dict, depth: int = 3, steps: int = 1) -> list:
  """[(site, launches, ms)] per step of a profile's measured device time grouped like `sites`: hlo_ops maps an
  instruction name of this program to (microseconds, calls, ...) over `steps` steps (the "hlo_ops" table that
  bench/profiling.py writes; profile a variant with command buffers off so each kernel names its own
  instruction). Instructions without a stack frame (or not in the program) group under "?"."""
  frames = stack_frames(hlo)
  attrs = {n: a for ins in parse(hlo)[0].values() for n, _, _, _, a in ins}
  by = defaultdict(lambda: [0, 0.0])
  for op, (us, calls, *_) in hlo_ops.items():
    frame = re.search(r"stack_frame_id=(\d+)", attrs.get(op, ""))
    site = " < ".join(frames.get(frame.group(1), [])[:depth]) if frame else ""
    by[site or "?"][0] += calls / steps
    by[site or "?"][1] += us / 1e3 / steps
  return sorted(((k, v[0], v[1]) for k, v in by.items()), key=lambda r: -r[2])


if __name__ == "__main__":
  import gzip
  import sys
  text = (gzip.open if sys.argv[1].endswith(".gz") else open)(sys.argv[1], "rt").read()
  if "--timed" in sys.argv:  # ... --timed PROFILE.json [STEPS]: a profile's device time by source line
    i = sys.argv.index("--timed")
    steps = int(sys.argv[i + 2]) if len(sys.argv) > i + 2 else 2
    with open(sys.argv[i + 1]) as f:
      rows = timed_sites(text, json.load(f)["hlo_ops"], steps=steps)
    print(f"{sum(r[2] for r in rows):.2f} ms of device time per step")
    for site, n, ms in rows[:40]:
      print(f"{ms:8.2f} ms {n:7.0f} launches  {site}")
  elif "--sites" in sys.argv:  # python bench/hlo_static.py PROGRAM.hlo.txt.gz --sites: XLA fusions by source line
    for site, n, nbytes in sites(text)[:30]:
      print(f"{nbytes / 1e9:8.1f} GB {n:6d} launches  {site}")
  else:
    print(json.dumps(summary(text), indent=1))
