"""Set mlp_kernels' launch constants in this tree to the fastest variant of a bench/fused_mlp.py --knobs sweep.

  python3 bench/pick_mlp_launch.py $OUT/fused_mlp.json [SHAPE]

The forward kernels (relu2, pair: STEPS_NO_H, PIECE_NO_H) by the sum of their two times, the backward's
H_FETCH_STEP by its own; prints the choice and rewrites the constants' line in parcae/model/mlp_kernels.py
(for an A/B run of the training step in the same GPU call)."""
import json
import os
import re
import sys

rows = [r for r in json.load(open(sys.argv[1])) if r["impl"] == "mgpu_ws"
        and r["shape"] == (sys.argv[2] if len(sys.argv) > 2 else "parcae_small")]
knobs = lambda r: dict(r["tiles"])
by = {}
for r in rows:
  by.setdefault(tuple(sorted(knobs(r).items())), {})[r["op"]] = r["ms"]
fwd = min((v["fwd"] + v["pair"], k) for k, v in by.items() if "fwd" in v and "pair" in v)
bwd = min((v["bwd"], k) for k, v in by.items() if "bwd" in v)
steps, piece, fetch = dict(fwd[1])["steps_no_h"], dict(fwd[1])["piece_no_h"], dict(bwd[1])["h_fetch_step"]
print(f"forward kernels: STEPS_NO_H={steps} PIECE_NO_H={piece} ({fwd[0]:.4f} ms); backward: H_FETCH_STEP={fetch} "
      f"({bwd[0]:.4f} ms)")
path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parcae/model/mlp_kernels.py")
src = open(path).read()
for pattern, line in ((r"^STEPS_NO_H, PIECE_NO_H = .*$", f"STEPS_NO_H, PIECE_NO_H = {steps}, {piece}"),
                      (r"^H_FETCH_STEP = \d+", f"H_FETCH_STEP = {fetch}")):
  src, n = re.subn(pattern, line, src, flags=re.M)
  if n != 1:  # the A/B run that follows would time the unchanged tree
    sys.exit(f"pick_mlp_launch: {n} lines of {path} match {pattern!r} (expected 1); update this script's patterns")
open(path, "w").write(src)
