"""Simulated MX / NVFP4 quantize-dequantize (fake quant) in jnp, bit-exact with the torchao recipe.

Public entry point: `quantize_dequantize`. The block math lives in `qdq_blocks`, which works on
f32 arrays whose last axis is one scale block; the Pallas kernels call the same function on tiles,
so the two paths agree bit for bit. Division is passed in (`div`) because GPU Triton's default f32
division is approximate; everything else is exact power-of-two scaling and adds/compares.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from parcae.quant import formats as F
from parcae.quant import rng as R

ROUNDINGS = ("nearest", "stochastic")
NV_GLOBAL = 448.0 * 6.0  # E4M3 max * E2M1 max: the tensor amax maps to block scale 448
QUARTET_RMS_MULT = 0.48708  # 2.92247856 / 6: MSE-optimal E2M1 clip for a unit Gaussian


def _mx_exponent(amax, elem: F.Element, mode: str, div):
  """Shared exponent e (int32, scale 2^e) of each block; e == 128 marks a NaN (0xFF) scale."""
  if mode in ("floor", "headroom"):
    e = F.exp_field(amax) - 127 - elem.emax
  elif mode == "ceil":
    e = F.exp_field(amax) - 127 - elem.emax + (F.mant_field(amax) != 0).astype(jnp.int32)
  elif mode == "even":
    bits = F.f32_bits(amax) + (1 << (23 - elem.mbits - 1))
    e = ((bits >> 23) & 0xFF) - 127 - elem.emax
  elif mode == "rceil":
    d = div(amax, jnp.float32(elem.max_val))
    e = F.exp_field(d) - 127 + (F.mant_field(d) != 0).astype(jnp.int32)
    return jnp.clip(e, -127, 127)
  else:
    raise ValueError(f"unknown MX scale_mode {mode!r}")
  return jnp.clip(e, -127, 128)


@functools.lru_cache(maxsize=None)
def _headroom_mul_exact(elem: F.Element) -> bool:
  """Whether f32(q * f32(4/3)) == f32(q / 0.75) for every value q of elem's grid (both IEEE round to
  nearest). Then the per-element division (a long div.rn sequence in the Triton kernels) is a multiply
  with the same bits. Holds for E2M1: q = 2^j gives an exact power-of-two scaling of f32(4/3), and
  q = 1.5 * 2^j lands within half an ulp of the exact 2^(j+1)."""
  g = np.asarray(F.grid_values(elem), np.float32)
  return bool(np.array_equal(g * np.float32(4.0 / 3.0), g / np.float32(0.75)))


def _mx_blocks(xb, elem, mode, u, div, baxis):
  amax = jnp.max(jnp.abs(xb), axis=baxis, keepdims=True)
  if mode == "rms":
    mean = jnp.mean(xb, axis=baxis, keepdims=True)
    var = jnp.maximum(jnp.mean(xb * xb, axis=baxis, keepdims=True) - mean * mean, 0.0)
    e = F.exp_field(QUARTET_RMS_MULT * jnp.sqrt(var) + 1e-8) - 127
    qe, de = e, e
  else:
    e = _mx_exponent(amax, elem, mode, div)
    qe, de = jnp.maximum(e, -126), e
    if mode == "rceil":  # torchao multiplies by 2^(127 - code), with code 0 -> x 1.0
      qe = jnp.where(e == -127, 0, e)
  t = F.mul_pow2(xb, -qe)
  if mode == "headroom":
    t = t * jnp.float32(0.75)
  q = F.round_to_grid(t, elem, u)
  if mode == "headroom":
    q = q * jnp.float32(4.0 / 3.0) if _headroom_mul_exact(elem) else div(q, jnp.float32(0.75))
  deq = F.mul_pow2(q, de)
  bad = (amax != amax) | (e == 128)
  return jnp.where(bad, jnp.float32(jnp.nan), deq), t


def nv_consts(sg):
  """Per-tensor NVFP4 constants: [s_g, RN((1/s_g)/m_j) for mantissas m_j = 1 + j/8] (9 f32s).

  (1/s_g)/q_s with q_s = m_j * 2^E equals RN((1/s_g)/m_j) * 2^-E exactly, so the kernels never
  divide by the block scale.
  """
  sg = jnp.asarray(sg, jnp.float32)
  inv = 1.0 / sg
  mants = jnp.asarray(1.0 + np.arange(8) / 8.0, jnp.float32)
  return jnp.concatenate([sg[None], inv / mants])


def nv_block_scale(amax, consts, two_level, div):
  """E4M3 block scale q_s (f32, in [2^-6, 448]) from the block amax, torchao order of ops."""
  v = div(amax, jnp.float32(6.0))
  if two_level:
    v = div(v, consts[0])
  v = jnp.clip(v, jnp.float32(F.E4M3_MIN_NORMAL), jnp.float32(448.0))
  return F.round_to_grid(v, F.E4M3)


def nv_apply_scale(xb, q_s, consts, two_level, u):
  """Quantize-dequantize xb with the given E4M3 block scales q_s (broadcast over the last axis)."""
  mant = (F.f32_bits(q_s) >> 20) & 7
  r = consts[1]
  for j in range(1, 8):
    r = jnp.where(mant == j, consts[1 + j], r)
  mult = F.mul_pow2(r, -(F.exp_field(q_s) - 127))
  t = xb * mult
  q = F.round_to_grid(t, F.E2M1, u)
  scale = consts[0] * q_s if two_level else q_s
  return q * scale, t


def qdq_blocks(xb, fmt: F.Format, scale_mode, u=None, consts=None, two_level=True,
               div=jnp.divide, return_scaled=False, baxis=-1):
  """Quantize-dequantize f32 xb; axis `baxis` (an int or a tuple of axes) spans one scale block.

  consts: `nv_consts(s_g)` for nvfp4 (ignored by MX). Returns f32; with return_scaled also the
  scaled pre-rounding values t (for clip masks). Everything but the block reductions is
  elementwise, so the block axes may sit anywhere (2-D NVFP4 tiles are blocked in place).
  """
  xb = xb.astype(jnp.float32)
  if fmt.scale == "e8m0":
    deq, t = _mx_blocks(xb, fmt.elem, scale_mode, u, div, baxis)
  else:
    amax = jnp.max(jnp.abs(xb), axis=baxis, keepdims=True)
    q_s = nv_block_scale(amax, consts, two_level, div)
    deq, t = nv_apply_scale(xb, q_s, consts, two_level, u)
    deq = jnp.where(amax != amax, jnp.float32(jnp.nan), deq)
  return (deq, t) if return_scaled else deq


def activate(x, act, explicit_rounding=True):
  """act(x) (an elementwise function, or None: x) in x's dtype, on the jnp path and inside the kernels.
  XLA may evaluate act at higher precision inside a fusion and skip the rounding to bf16 (seen on the CPU:
  other block scales than act's bf16 output gives), so a bf16 result is rounded explicitly (as
  `hadamard.rotate` does); Triton rounds every bf16 op as written, so the GPU kernels skip it
  (explicit_rounding=False; jnp == kernel on the H200: bench/quant_kernels.py)."""
  if act is None:
    return x
  y = act(x)
  return round_to(y.astype(jnp.float32), y.dtype) if explicit_rounding else y


def round_to(y, dtype):
  """y (float32) rounded to `dtype`, explicitly: XLA may skip a bare f32 -> bf16 conversion inside a fusion
  whose consumer reads f32 (its excess-precision rule), reduce_precision it keeps."""
  if jnp.dtype(dtype) == jnp.float32:
    return y.astype(dtype)
  fi = jnp.finfo(dtype)
  return jax.lax.reduce_precision(y, exponent_bits=fi.nexp, mantissa_bits=fi.nmant).astype(dtype)


def nv_tensor_scale(x):
  """torchao's per-tensor scale amax / (448 * 6); an all-zero tensor gets 1.0 (not 0 -> NaN)."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
  return jnp.where(amax == 0, jnp.float32(1.0), amax / jnp.float32(NV_GLOBAL))


def check_args(x, fmt, axis, scale_mode, rounding, key, block_2d):
  f = F.get_format(fmt)
  modes = F.MX_SCALE_MODES + F.EXTRA_SCALE_MODES if f.scale == "e8m0" else ("floor",)
  if scale_mode not in modes:
    raise ValueError(f"scale_mode {scale_mode!r} is not valid for {fmt}; use one of {modes}"
                     + (" (nvfp4 has one E4M3 rule: pass 'floor', the default)" if f.scale != "e8m0" else ""))
  if scale_mode == "rms" and f.elem is not F.E2M1:
    raise ValueError("scale_mode 'rms' (Quartet) is defined for mxfp4 only; use fmt='mxfp4'")
  if rounding not in ROUNDINGS:
    raise ValueError(f"rounding {rounding!r} is not valid; use one of {ROUNDINGS}")
  if rounding == "stochastic" and key is None:
    raise ValueError("rounding='stochastic' needs an explicit PRNG key: pass key=jax.random.key(...)")
  if x.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"input dtype {x.dtype} is not supported; cast x to float32 or bfloat16")
  if x.ndim == 0:
    raise ValueError("x must have at least one axis to block along")
  ax = axis % x.ndim
  if block_2d:
    if x.ndim != 2 or fmt != "nvfp4":
      raise ValueError("block_2d (16x16 tiles) needs fmt='nvfp4' and a 2-D x; set block_2d=False")
    for d in x.shape:
      if d % 16:
        raise ValueError(f"block_2d needs both dims divisible by 16, got shape {x.shape}; pad x")
  elif x.shape[ax] % f.block:
    raise ValueError(f"axis {axis} has length {x.shape[ax]}, not a multiple of the {fmt} block "
                     f"size {f.block}; pad x or choose another axis")
  return f, ax


def to_blocks(x, ax, block, block_2d):
  """Move the quantization axis last and split it -> (xb [..., nb, block], block axes, inverse).

  block_2d: a 2-D x as [r/16, 16, c/16, 16] with block axes (1, 3), in place. (Blocking 1-D
  blocks in place, reducing over a middle axis, measured no faster on the H200 than the
  transpose: bench/quant_layouts.py.)
  """
  if block_2d:
    r, c = x.shape
    return x.reshape(r // 16, 16, c // 16, 16), (1, 3), lambda y: y.reshape(r, c)
  xm = jnp.moveaxis(x, ax, -1)
  shape = xm.shape
  xb = xm.reshape(shape[:-1] + (shape[-1] // block, block))
  return xb, -1, lambda y: jnp.moveaxis(y.reshape(shape), -1, ax)


def quantize_dequantize(x, fmt, *, axis=-1, scale_mode="floor", rounding="nearest", key=None,
                        tensor_scale=None, two_level=True, block_2d=False, impl="jnp"):
  """Round x to fmt's grid with per-block scales along `axis` and return the decoded values.

  fmt: mxfp4 | mxfp6_e2m3 | mxfp6_e3m2 | mxfp8_e4m3 | mxfp8_e5m2 | mxint8 (32-element blocks,
    E8M0 scales) | nvfp4 (16-element blocks, E4M3 scales; two_level adds the FP32 tensor scale
    `tensor_scale`, by default amax/(448*6) of x; two_level=False is the single-level variant).
  scale_mode (MX): floor (OCP) | rceil | ceil | even; plus recipe rules headroom | rms.
  rounding: nearest (ties to even) | stochastic (needs key; uniforms from a counter hash of each
    element's index in x's moved-axis layout, shape x.shape with `axis` last: `rng.uniform_moved`).
  block_2d: nvfp4 only, 16x16 tiles of a 2-D x (axis is then irrelevant).
  impl: "jnp" or "pallas" (fused kernel, parcae.quant.kernels; bit-identical).
  Output has x's dtype; all arithmetic is f32.
  """
  f, ax = check_args(x, fmt, axis, scale_mode, rounding, key, block_2d)
  if impl == "pallas":
    from parcae.quant.kernels import qdq_pallas  # pylint: disable=g-import-not-at-top
    return qdq_pallas(x, fmt, axis=axis, scale_mode=scale_mode, rounding=rounding, key=key,
                      tensor_scale=tensor_scale, two_level=two_level)
  if impl != "jnp":
    raise ValueError(f"impl {impl!r} is not valid; use 'jnp' or 'pallas'")
  return _qdq_jnp(x, f, ax, scale_mode, rounding, key, tensor_scale, two_level, block_2d)[0]


def _qdq_jnp(x, f, ax, scale_mode, rounding, key, tensor_scale, two_level, block_2d):
  """Returns (dequantized x in x.dtype, scaled pre-rounding values in f32, x's layout)."""
  x32 = x.astype(jnp.float32)
  xb, baxis, back = to_blocks(x32, ax, f.block, block_2d)
  u = None
  if rounding == "stochastic":
    u = to_blocks(R.uniform_moved(R.seed(key), x.shape, x.ndim - 1 if block_2d else ax, f.block),
                  ax, f.block, block_2d)[0]  # the moved layout's index, however x is blocked
  consts = None
  if f.scale == "e4m3":
    sg = (nv_tensor_scale(x32) if tensor_scale is None else tensor_scale) if two_level else 1.0
    consts = nv_consts(sg)
  deq, t = qdq_blocks(xb, f, scale_mode, u, consts, two_level, return_scaled=True, baxis=baxis)
  return back(deq).astype(x.dtype), back(t)
