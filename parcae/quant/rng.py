"""Counter-based uniforms for stochastic rounding: u = hash(element index, seed), no stored array.

A quantizer's uniforms are a pure function of (seed, index), so XLA fuses them into the quantize
fusion and the Pallas kernel computes them from its tile position: no separate pass writes and
reads a [.., K] float32 array of randoms. The index is the element's row-major position in the
"moved" layout (quantization axis last), so every path (jnp, whatever its blocking; the Pallas
kernels, whatever their tiling) draws the same number for the same element, bit for bit.

Hash: an affine map of the index by the two seed words, idx * (s1 | 1) + s0 (a bijection of uint32:
one multiply-add), then Wellons' `triple32` (a full-avalanche bijection, three multiplies); the top 24
bits give u on the grid k / 2^24 in [0, 1), so P(u < f) = f to within 2^-24 for every f32 fraction f.
The odd multiplier scatters each tensor's index window over the whole uint32 range differently per
key, so two keys' streams are not shifts of each other (an added seed alone would make them so). One
`triple32` round instead of two halves the integer work (plain MXFP4 SR kernel 0.37 -> 0.28 ms per
128 M elements on the H200, bench/RESULTS.md 2026-12-01).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_ELEMENTS = 1 << 32  # the index is uint32


def seed(key) -> jax.Array:
  """Two uint32 seed words from a PRNG key (typed or raw)."""
  return jax.random.bits(key, (2,), jnp.uint32)


def _triple32(x):
  x = x ^ (x >> 17)
  x = x * jnp.uint32(0xED5AD4BB)
  x = x ^ (x >> 11)
  x = x * jnp.uint32(0xAC4C1B51)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x31848BAB)
  return x ^ (x >> 14)


def uniform_from_index(idx, s0, s1):
  """f32 uniforms in [0, 1) from uint32 indices and two uint32 seed words."""
  h = _triple32(idx * (s1 | jnp.uint32(1)) + s0)
  return (h >> 8).astype(jnp.int32).astype(jnp.float32) * jnp.float32(2.0**-24)


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


def uniform_moved(sd, shape, ax):
  """Uniforms of `shape` drawn as if the array had axis `ax` last (see module doc)."""
  return uniform_from_index(moved_index(shape, ax), sd[0], sd[1])
