"""The MLP kernels' shared-memory accesses in their PTX, compiled for an H100 on a machine without one.

Compiles the library's Mosaic GPU kernels (parcae/model/mlp_kernels.py) and the ping-pong GEMM
(bench/pingpong_mlp.py) at parcae-small's shape for a compile-only H100 (jax's CUDA plugin, no GPU), with
Mosaic GPU's PTX dump on, unswizzled and swizzled output buffers (OUT_SWIZZLE / out_swizzle), and prints per
kernel its shared-memory loads and stores by instruction and how many address registers they use. Then the
bank conflicts those stores would have, from the accumulator's WGMMA register layout (lane l of a warp holds
row l // 4 and columns 2 (l % 4), +1, of each 8-row x 8-column block) and the buffer's layout: rows of `pitch`
bytes, or (8, 64) tiles with the 128-byte swizzle (16-byte chunk c of row r stored at chunk c ^ (r % 8)).
bench/RESULTS.md, session 32.

  PYTHONPATH=$PLUGIN_DIR JAX_PLATFORMS=cpu python bench/kernel_ptx.py   # PLUGIN_DIR: jax's CUDA plugin (RESULTS, session 17)
"""
from __future__ import annotations

import collections
import glob
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = {  # name: (call, operand shapes) at parcae-small's MLP (32768 x 768 -> 3072)
    "library_pair": ("mk._pair_matmul_mosaic(a, b)", "(m, k), (k, n)"),
    "library_bwd": ("mk._relu_grad_matmul_mosaic(a, b, c)", "(m, k), (n, k), (m, n)"),
    "pingpong_gemm": ("pingpong_mlp.pingpong(a, b, 'gemm', 3, 64, num_sms=132, out_swizzle=bool(z))", "(m, k), (k, n)"),
}
CHILD = """
import sys, jax, jax.numpy as jnp
sys.path[:0] = [{here!r}, {root!r}]
from parcae.train.targets import target_devices
from parcae.model import mlp_kernels as mk
import pingpong_mlp
z = {z}
mk._num_sms, mk.OUT_SWIZZLE = (lambda: 132), z
sh = jax.sharding.SingleDeviceSharding(target_devices("h100")[0])
m, k, n = 32768, 768, 3072
args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh) for s in ({shapes},)]
jax.jit(lambda *x: (lambda a, b, c=None: {call})(*x)).lower(*args).compile()
"""


def smem_accesses(ptx: str) -> dict:
  """{instruction: (count, distinct address registers)} of the shared-memory loads and stores."""
  regs = collections.defaultdict(set)
  counts = collections.Counter()
  for op, reg in re.findall(r"^\s*((?:st|ld)\.shared[.\w]*)\s+[^\[]*\[(%\w+)", ptx, re.M):
    counts[op] += 1
    regs[op].add(reg)
  return {op: (counts[op], len(regs[op])) for op in counts}


def conflict_ways(pitch: int, swizzled: bool) -> int:
  """Most lanes of one 4-byte-per-lane warp access (8 rows x 4 words of the WGMMA layout) on one bank."""
  banks = collections.Counter()
  for lane in range(32):
    row, word = lane // 4, lane % 4        # word: the lane's 4 bytes within the row's first 16-byte chunk
    chunk = row % 8 if swizzled else 0     # chunk 0 of row r lands at chunk 0 ^ r
    addr = (row * 128 + chunk * 16 if swizzled else row * pitch) + 4 * word
    banks[addr // 4 % 32] += 1
  return max(banks.values())


def main():
  root = os.path.dirname(HERE)
  for name, (call, shapes) in KERNELS.items():
    for z in (0, 1):
      with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=dump)
        code = CHILD.format(here=HERE, root=root, z=z, call=call, shapes=shapes)
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode:
          print(f"{name} swizzle {z}: FAILED {done.stderr.strip().splitlines()[-1][:300]}")
          continue
        ptx = "".join(open(f).read() for f in sorted(glob.glob(os.path.join(dump, "*.ptx"))))
        print(f"{name:14s} swizzle {z}: " + ", ".join(
            f"{op} x{n} ({r} address registers)" for op, (n, r) in sorted(smem_accesses(ptx).items())))
  for pitch in (128, 256):
    print(f"bank conflicts of one warp's store: rows of {pitch} bytes {conflict_ways(pitch, False)}-way, "
          f"(8, 64) tiles swizzled {conflict_ways(pitch, True)}-way")


if __name__ == "__main__":
  main()
