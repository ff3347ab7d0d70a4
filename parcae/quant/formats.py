"""Element grids, block formats and exact power-of-two / grid-rounding helpers.

Everything here is arithmetic on f32 bit fields (no jnp.log2 / jnp.exp2, which are inexact on
XLA:CPU, and no astype to fp4/fp6, which fails in XLA or inside Pallas GPU kernels), so the same
functions serve the jnp path and the Pallas kernels bit-identically.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class Element:
  """A sign-magnitude element grid: values m * 2^(e - mbits) with e >= emin, |v| <= max_val."""
  name: str
  mbits: int  # explicit mantissa bits (int8: 6 -> step 2^-6 in [1, 2))
  emin: int  # exponent of the smallest normal (the subnormal step is 2^(emin - mbits))
  emax: int  # exponent of the largest normal (OCP emax_elem, used by the MX scale rules)
  max_val: float  # largest finite magnitude; inputs are clipped to it before rounding


E2M1 = Element("e2m1", 1, 0, 2, 6.0)
E2M3 = Element("e2m3", 3, 0, 2, 7.5)
E3M2 = Element("e3m2", 2, -2, 4, 28.0)
E4M3 = Element("e4m3", 3, -6, 8, 448.0)
E5M2 = Element("e5m2", 2, -14, 15, 57344.0)
# MXINT8: k/64 with k in [-127, 127]; as a grid that is a fixed step 2^-6 (emin = emax = 0).
INT8 = Element("int8", 6, 0, 0, 127.0 / 64.0)


@dataclasses.dataclass(frozen=True)
class Format:
  name: str
  elem: Element
  block: int  # elements per scale along the quantization axis
  scale: str  # "e8m0" (MX power of two) or "e4m3" (NVFP4 block scale)


FORMATS = {
    "mxfp4": Format("mxfp4", E2M1, 32, "e8m0"),
    "mxfp6_e2m3": Format("mxfp6_e2m3", E2M3, 32, "e8m0"),
    "mxfp6_e3m2": Format("mxfp6_e3m2", E3M2, 32, "e8m0"),
    "mxfp8_e4m3": Format("mxfp8_e4m3", E4M3, 32, "e8m0"),
    "mxfp8_e5m2": Format("mxfp8_e5m2", E5M2, 32, "e8m0"),
    "mxint8": Format("mxint8", INT8, 32, "e8m0"),
    "nvfp4": Format("nvfp4", E2M1, 16, "e4m3"),
}
MX_SCALE_MODES = ("floor", "rceil", "ceil", "even")
# Recipe-internal MX rules: "headroom" = floor scale x 4/3 (amax/scale in [3, 6) for FP4, nothing
# clips, so stochastic rounding stays unbiased); "rms" = Quartet's 2^floor(log2(0.48708 * std)).
EXTRA_SCALE_MODES = ("headroom", "rms")


def get_format(name: str) -> Format:
  if name not in FORMATS:
    raise ValueError(f"unknown quantization format {name!r}; fmt must be one of {sorted(FORMATS)}")
  return FORMATS[name]


# ---------------------------------------------------------------------------------------------
# Exact bit-level helpers (f32 only).

def f32_bits(x):
  return lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)


def exp_field(x):
  """Biased f32 exponent field (0..255) of x."""
  return (f32_bits(x) >> 23) & 0xFF


def mant_field(x):
  return f32_bits(x) & 0x7FFFFF


def pow2(k):
  """Exact 2^k as f32 for integer k in [-126, 127] (bit construction, never exp2)."""
  k = jnp.asarray(k, jnp.int32)
  return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def mul_pow2(x, k):
  """x * 2^k exactly (up to final rounding) for integer k in [-252, 254], split in two factors."""
  k = jnp.asarray(k, jnp.int32)
  k1 = jnp.clip(k, -126, 127)
  return (x * pow2(k1)) * pow2(k - k1)


def floor_int(t):
  return jnp.floor(t)


def rne_int(s):
  """Round half to even to an integer, for 0 <= s < 2^23 (NaN maps to garbage): f32 addition of 2^23
  rounds s to an integer as IEEE does (ties to even), and the integer is read back from the sum's bits
  (a float subtraction of 2^23 would be folded away by XLA's simplifier; lax.round has no Pallas Triton
  lowering). Three operations instead of a floor, compares and selects."""
  return (f32_bits(s + jnp.float32(2.0**23)) - 0x4B000000).astype(jnp.float32)  # the bits of 2^23


def round_to_grid(t, elem: Element, u=None):
  """Round f32 t onto elem's grid: clip to +-max_val, then RNE (u is None) or stochastic rounding.

  Stochastic: with f = the fraction of the way from the grid point below |t| to the one above,
  round up iff u < f (u ~ U[0, 1)), so E[result] = clip(t). NaN stays NaN.
  """
  t = t.astype(jnp.float32)
  a = jnp.minimum(jnp.abs(t), jnp.float32(elem.max_val))
  # The grid step at a is ulp = 2^(max(e_a, emin) - mbits); a / ulp < 2^(mbits + 1) is exact in f32. Both
  # ulp and 1 / ulp are built from a's exponent field in place (a >= 0 has no sign bit): the step's
  # exponent lies in [emin - mbits, log2(max_val) - mbits], within [-16, 13] for every grid, so both are
  # normal powers of two (a NaN t gives 1 / ulp = 0 or a subnormal; its result is replaced below).
  e_bits = jnp.maximum(f32_bits(a) & 0x7F800000, (127 + elem.emin) << 23)
  ulp_bits = e_bits - (elem.mbits << 23)
  s = a * lax.bitcast_convert_type((254 << 23) - ulp_bits, jnp.float32)
  if u is None:
    n = rne_int(s)
  else:
    lo = floor_int(s)
    n = jnp.where(u.astype(jnp.float32) < s - lo, lo + 1.0, lo)
  q = n * lax.bitcast_convert_type(ulp_bits, jnp.float32)
  q = jnp.where(t < 0, -q, q)
  return jnp.where(t != t, t, q)


def grid_values(elem: Element):
  """All non-negative representable magnitudes of elem (float list, ascending); for oracles/tests."""
  vals = set()
  for e in range(elem.emin, elem.emax + 1):
    step = 2.0 ** (e - elem.mbits)
    lo = 0 if e == elem.emin else 2.0**e
    k = 0
    while True:
      v = lo + k * step
      if v > elem.max_val or v >= 2.0 ** (e + 1):
        break
      vals.add(v)
      k += 1
  vals.add(0.0)
  return sorted(vals)


# ---------------------------------------------------------------------------------------------
# E4M3 scale codes (NVFP4 block scales and ScaleSearch candidates), normal range only.

E4M3_MIN_NORMAL = 2.0**-6


def e4m3_code(v):
  """Code 0..126 of a non-negative E4M3 value (as f32); assumes v is normal (>= 2^-6)."""
  return (exp_field(v) - 127 + 7) * 8 + ((f32_bits(v) >> 20) & 7)


def e4m3_value(code):
  """f32 value of a normal E4M3 code (8..126)."""
  code = jnp.asarray(code, jnp.int32)
  bits = (((code >> 3) - 7 + 127) << 23) | ((code & 7) << 20)
  return lax.bitcast_convert_type(bits, jnp.float32)
