"""Which jnp formulation of blocking and rotation lets XLA fuse the quantized layer best on the GPU?

  PYTHONPATH=$PWD python bench/quant_layouts.py [--smoke]

An exploration bench: it swaps, by patching module attributes, four choices inside the library's
quantizer and times bench/quant_gemm.py's layer (fwd + bwd) for each named variant (VARIANTS):
  blocks   moved:   move the axis last first (transposes), reduce over the last axis (library)
           inplace: split the quantization axis in place (reductions over a middle axis)
  barrier  materialize the block reductions (optimization_barrier) so XLA cannot fuse a reduction
           into every element of its consumer
  rot      dotbf16: bf16(x) times the +-1 matrix on the tensor cores (exact products, f32
                    accumulation), scaled by 1/sqrt(n) after, no transpose of x (library)
           dot32:   axis moved last, f32 matmul with the orthonormal matrix at HIGHEST precision
           fwht:    butterflies (slices + concatenates) in place
  operand barrier: materialize each quantized GEMM operand (optimization_barrier before the dot), in
           case XLA folds the quantizer into a GEMM's operand loads and recomputes it per output tile
  hash     1: the library's stochastic-rounding hash (rng._hash): one lowbias32 round of
              pair index * (s1 | 1) + s0, one hash per two elements
           2: the 2026-11-30 mixer, triple32(triple32(pair index + s0) ^ s1): about three times
              the integer work per hash (kept to measure what the cheaper hashes saved: the SR
              kernels are bound by it)
  --impl auto runs the layer through the Triton kernels on a GPU (they read the patched hash too).
The library keeps the winner; this script records why (bench/RESULTS.md). Writes
$OUT/quant_layouts.json. XLA's own GEMM fusion can be switched off around it for comparison:
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python bench/quant_layouts.py --variants library
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant_gemm  # noqa: E402  pylint: disable=wrong-import-position
from parcae.quant import hadamard as H  # noqa: E402
from parcae.quant import quantize as Q  # noqa: E402
from parcae.quant import dense as D  # noqa: E402
from parcae.quant import rng as R  # noqa: E402

ORIG = {"to_blocks": Q.to_blocks, "rotate": H.rotate, "hash": R._hash}  # pylint: disable=protected-access


def _triple32(x):
  x = x ^ (x >> 17)
  x = x * jnp.uint32(0xED5AD4BB)
  x = x ^ (x >> 11)
  x = x * jnp.uint32(0xAC4C1B51)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x31848BAB)
  return x ^ (x >> 14)


def hash_two_rounds(p, s0, s1):
  return _triple32(_triple32(p + s0) ^ s1)


def inplace_blocks(x, ax, block, block_2d):
  if block_2d:
    return ORIG["to_blocks"](x, ax, block, block_2d)
  shape = x.shape
  xb = x.reshape(shape[:ax] + (shape[ax] // block, block) + shape[ax + 1:])
  return xb, ax + 1, lambda y: y.reshape(shape)


class BarrierJnp:
  """jnp with max / mean results put behind an optimization barrier."""

  def __getattr__(self, name):
    return getattr(jnp, name)

  @staticmethod
  def max(*a, **k):
    return jax.lax.optimization_barrier(jnp.max(*a, **k))

  @staticmethod
  def mean(*a, **k):
    return jax.lax.optimization_barrier(jnp.mean(*a, **k))


def _pm(n, signs, inverse):
  m = H.sign_matrix(n, signs)
  return m.T if inverse else m


def rotate_dot32(x, n, signs=None, axis=-1, inverse=False):
  ax = axis % x.ndim
  xm = jnp.moveaxis(x.astype(jnp.float32), ax, -1)
  xb = xm.reshape(xm.shape[:-1] + (xm.shape[-1] // n, n))
  m = _pm(n, signs, inverse) / np.sqrt(n)
  yb = jnp.einsum("...i,ij->...j", xb, m, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(yb.reshape(xm.shape), -1, ax).astype(x.dtype)


def rotate_fwht(x, n, signs=None, axis=-1, inverse=False):
  ax = axis % x.ndim
  shape = x.shape
  pre, post, nb = shape[:ax], shape[ax + 1:], shape[ax] // n
  v = x.astype(jnp.float32).reshape(pre + (nb, n) + post)
  s = None if signs is None else jnp.asarray(signs, jnp.float32).reshape((1,) * len(pre) + (1, n) + (1,) * len(post))
  v = v * s if s is not None and not inverse else v
  h = n // 2
  while h >= 1:  # (a, b) -> (a + b, a - b) on halves of every 2h-block
    w = v.reshape(pre + (nb, n // (2 * h), 2, h) + post)
    a, b = (jax.lax.index_in_dim(w, i, ax + 2, keepdims=True) for i in (0, 1))
    v = jnp.concatenate([a + b, a - b], axis=ax + 2).reshape(pre + (nb, n) + post)
    h //= 2
  v = v * jnp.float32(1 / np.sqrt(n))
  v = v * s if s is not None and inverse else v
  return v.reshape(shape).astype(x.dtype)


ROT = {"dotbf16": ORIG["rotate"], "dot32": rotate_dot32, "fwht": rotate_fwht}


class _Proxy:
  """A module stand-in: attributes from `base`, except those given."""

  def __init__(self, base, **over):
    self._base, self._over = base, over

  def __getattr__(self, name):
    return self._over[name] if name in self._over else getattr(self._base, name)


def _barrier_args(f):
  return lambda a, b, *rest, **kw: f(*jax.lax.optimization_barrier((a, b)), *rest, **kw)


# dense.py's GEMMs read their operands through these (jnp.dot forward, lax.dot_general backward)
DENSE_BARRIER = {"jnp": _Proxy(jnp, dot=_barrier_args(jnp.dot)),
                 "jax": _Proxy(jax, lax=_Proxy(jax.lax, dot_general=_barrier_args(jax.lax.dot_general)))}

# name: (blocking, reduction barrier, rotation, operand barrier: materialize the quantized operands so
# XLA cannot fold the quantizer into a GEMM's operand loads, SR hash rounds)
VARIANTS = {
    "library": ("moved", False, "dotbf16", False, 1),
    "operand_barrier": ("moved", False, "dotbf16", True, 1),
    "reduction_barrier": ("moved", True, "dotbf16", False, 1),
    "inplace": ("inplace", False, "dotbf16", False, 1),
    "inplace_reduction_barrier": ("inplace", True, "dotbf16", False, 1),
    "rot_dot32": ("moved", False, "dot32", False, 1),
    "rot_fwht": ("moved", False, "fwht", False, 1),
    "hash2": ("moved", False, "dotbf16", False, 2),
}


def apply(blocks, barrier, rot, operand_barrier, hash_rounds):
  Q.to_blocks = ORIG["to_blocks"] if blocks == "moved" else inplace_blocks
  Q.jnp = BarrierJnp() if barrier else jnp
  H.rotate = ROT[rot]
  D.jnp = DENSE_BARRIER["jnp"] if operand_barrier else jnp
  D.jax = DENSE_BARRIER["jax"] if operand_barrier else jax
  R._hash = ORIG["hash"] if hash_rounds == 1 else hash_two_rounds  # pylint: disable=protected-access


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--recipes", default="bf16,quartet,mxfp8,mxfp4")
  p.add_argument("--impl", default="jnp", help="jnp | pallas | auto: the quantizers the layer runs")
  args = p.parse_args(argv)
  rows = []
  for label in args.variants.split(","):
    apply(*VARIANTS[label])
    argv_ = ["--recipes", args.recipes, "--label", label, "--iters", str(args.iters), "--no-count",
             "--impl", args.impl] + \
        (["--smoke"] if args.smoke else ["--shapes", "3072x768,768x3072"])
    quant_gemm.main(argv_)
    with open(os.path.join(os.environ.get("OUT", "."), f"quant_gemm_{label}.json")) as fh:
      rows += [dict(r, variant=label) for r in json.load(fh)["rows"]]
  apply(*VARIANTS["library"])
  print(f"\n{'variant':26s} {'recipe':>8s} {'ms (sum of shapes)':>18s} {'x bf16':>7s}")
  table = {}
  for r in rows:
    table.setdefault((r["variant"], r["recipe"]), []).append(r["ms"])
  for (v, rec), ms in table.items():
    base = sum(table[(v, "bf16")])
    print(f"{v:26s} {rec:>8s} {sum(ms):18.3f} {sum(ms) / base:7.2f}")
  with open(os.path.join(os.environ.get("OUT", "."), "quant_layouts.json"), "w") as fh:
    json.dump({"device": str(jax.devices()[0]), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
