"""Counter-based uniforms for stochastic rounding: u = hash(element index, seed), no stored array.

A quantizer's uniforms are a pure function of (seed, index), so XLA fuses them into the quantize
fusion and the Pallas kernel computes them from its tile position: no separate pass writes and
reads a [.., K] float32 array of randoms. The index is the element's row-major position in the
"moved" layout (quantization axis last), so every path (jnp, whatever its blocking; the Pallas
kernels, whatever their tiling) draws the same number for the same element, bit for bit.

Pairs: one hash serves two elements. Elements are paired block by block (`unit` = the quantization block
size): block 2m with block 2m + 1 of the moved layout, element j of one with element j of the other. The
pair's index p = m * unit + j is hashed once; the first block's element takes the hash's high 16 bits, the
second's the low 16 bits. A kernel that holds both blocks of a pair hashes half as many indices: the
stochastic-rounding kernels are bound by this integer work (bench/RESULTS.md, 2026-12-01, session 8).

Hash: an affine map of the pair index by the two seed words, p * (s1 | 1) + s0 (a bijection of uint32: one
multiply-add), then Wellons' `lowbias32` (a full-avalanche bijection, two multiplies and three
xor-shifts). u is built from 16 of its bits as a float in [1, 2) (an OR into the bits of 1.0) minus 1: on
the grid k / 2^16 in [0, 1), so P(u < f) = f to within 2^-16 for every fraction f: stochastic rounding's
bias is at most 2^-16 of a grid step (the hardware's `cvt.rs` conversions to FP4 / FP8 take one 32-bit
random word for four values). No int-to-float conversion (a quarter-rate instruction on the GPU). The
odd multiplier scatters each tensor's index window over the whole uint32 range differently per key, so
two keys' streams are not shifts of each other (an added seed alone would make them so).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_ELEMENTS = 1 << 32  # the index is uint32


def seed(key) -> jax.Array:
  """Two uint32 seed words from a PRNG key (typed or raw)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _lowbias32(x):
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _u16(bits):
  """f32 in [0, 1) on the grid 2^-16 from uint32 values below 2^16."""
  one_to_two = jax.lax.bitcast_convert_type((bits << 7) | jnp.uint32(0x3F800000), jnp.float32)
  return one_to_two - jnp.float32(1.0)


def _hash(p, s0, s1):
  return _lowbias32(p * (s1 | jnp.uint32(1)) + s0)


def uniform_pair(p, s0, s1):
  """(first block's u, second block's u) for uint32 pair indices p: one hash each (module doc)."""
  h = _hash(p, s0, s1)
  return _u16(h >> 16), _u16(h & jnp.uint32(0xFFFF))


def pair_index(idx, unit: int):
  """(pair index, 1 where idx is in the pair's second block) of uint32 element indices; unit: a power of 2."""
  lg = unit.bit_length() - 1
  if unit != 1 << lg:
    raise ValueError(f"the pairing unit {unit} must be a power of two (a quantization block size)")
  return ((idx >> (lg + 1)) << lg) | (idx & jnp.uint32(unit - 1)), (idx >> lg) & jnp.uint32(1)


def uniform_from_index(idx, s0, s1, unit: int):
  """f32 uniforms in [0, 1) (grid 2^-16) from uint32 element indices, blocks of `unit` paired."""
  p, second = pair_index(idx, unit)
  h = _hash(p, s0, s1)
  return _u16(jnp.where(second == 1, h & jnp.uint32(0xFFFF), h >> 16))


def check_size(shape):
  size = 1
  for d in shape:
    size *= d
  if size > MAX_ELEMENTS:
    raise ValueError(f"stochastic rounding indexes elements with uint32; {size} elements is too many: "
                     "quantize the tensor in chunks")


def moved_index(shape, ax):
  """uint32 array of `shape`: each element's row-major index once axis `ax` is moved last."""
  check_size(shape)
  if len(shape) == 0:
    return jnp.zeros((), jnp.uint32)
  order = [d for d in range(len(shape)) if d != ax] + [ax]  # moved layout
  weights, w = {}, 1
  for d in reversed(order):
    weights[d] = w
    w *= shape[d]
  idx = jnp.zeros(shape, jnp.uint32)
  for d in range(len(shape)):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(weights[d])
  return idx


def uniform_moved(sd, shape, ax, unit: int):
  """Uniforms of `shape` drawn as if the array had axis `ax` last, blocks of `unit` paired (module doc)."""
  return uniform_from_index(moved_index(shape, ax), sd[0], sd[1], unit)
