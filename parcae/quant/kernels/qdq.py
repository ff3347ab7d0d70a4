"""Fused quantize-dequantize Pallas kernel (MX formats and NVFP4), nearest or stochastic rounding.

The input is viewed as [blocks, block_size] (quantization axis moved last, blocks contiguous), and
each program handles `block_rows` blocks with `quantize.qdq_blocks`, the same function the jnp
path uses, so results are bit-identical. Stochastic rounding computes its uniforms in the kernel
from each element's index and the key's seed words (`parcae.quant.rng`), the same numbers the jnp
path draws: no uniform array is read. With stochastic rounding a kernel row holds the two blocks of
an `rng` pair ([blocks / 2, 2 * block_size], a free reshape), so one hash serves both.

GPU: the Triton backend (H100 / sm_90). Triton's f32 `/` is approximate (div.full.f32), so the
few divisions (block amax / 6, / s_g, amax / max_elem for rceil) use inline PTX div.rn.f32.
Elsewhere (CPU) the kernel runs with interpret=True.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from parcae import compile_target
from parcae.quant import quantize as Q
from parcae.quant import rng as R

N_CONSTS = 16  # nv_consts (9 values) padded to a power of two for Triton
# GPU launch shape (scale type, rounding) -> (blocks per program, warps), measured on the H200 with
# `bench/quant_kernels.py --quick --block-rows 128,256 --warps 2,4,8` (bench/RESULTS.md; stochastic NVFP4
# re-swept 2026-12-05 with the paired SR uniforms).
TUNING = {("e8m0", "nearest"): (256, 8), ("e4m3", "nearest"): (256, 4),
          ("e8m0", "stochastic"): (128, 8), ("e4m3", "stochastic"): (128, 2)}


def _div_rn_ptx(x, y):
  """IEEE round-to-nearest f32 division inside a Triton kernel."""
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(x, jnp.float32)
  y = jnp.broadcast_to(jnp.asarray(y, jnp.float32), x.shape)
  return pltriton.elementwise_inline_asm(
      "div.rn.f32 $0, $1, $2;", args=[x, y], constraints="=f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _kernel(x_ref, c_ref, s_ref, o_ref, *, fmt, scale_mode, two_level, stochastic, div):
  """x_ref: [rows, pairs * block], each row `pairs` consecutive blocks (2 with stochastic rounding: the
  two blocks of an `rng` pair, whose uniforms come from one hash of the pair index; else 1)."""
  rows, width = x_ref.shape
  b = fmt.block
  us = [None] * (width // b)
  if stochastic:  # pair index: the row's index in the [pairs, 2 * block] view times block + column
    first = (pl.program_id(0) * rows).astype(jnp.uint32)
    r = jax.lax.broadcasted_iota(jnp.int32, (rows, b), 0).astype(jnp.uint32)
    c = jax.lax.broadcasted_iota(jnp.int32, (rows, b), 1).astype(jnp.uint32)
    us = R.uniform_pair((first + r) * jnp.uint32(b) + c, s_ref[0], s_ref[1])
  consts = [c_ref[i] for i in range(9)]
  for h, u in enumerate(us):
    part = (slice(None), pl.ds(h * b, b))
    deq = Q.qdq_blocks(x_ref[part].astype(jnp.float32), fmt, scale_mode, u, consts, two_level, div)
    o_ref[part] = deq.astype(o_ref.dtype)


def kernel_inputs(x, f, rounding, key, two_level, tensor_scale=None):
  """(consts f32[16], seed u32[16]) that the kernels read: NVFP4's per-tensor constants (`nv_consts` of
  x's tensor scale; zeros for MX) and the stochastic-rounding seed words (zeros for nearest)."""
  consts = jnp.zeros((9,), jnp.float32)
  if f.scale == "e4m3":
    consts = Q.nv_consts((Q.nv_tensor_scale(x) if tensor_scale is None else tensor_scale) if two_level else 1.0)
  sd = jnp.zeros((N_CONSTS,), jnp.uint32)
  if rounding == "stochastic":
    R.check_size(x.shape)
    sd = sd.at[:2].set(R.seed(key))
  return jnp.pad(consts, (0, N_CONSTS - 9)), sd


def backend(interpret, num_warps=4):
  """(interpret, division, pallas_call keyword arguments): CPU interprets; the GPU compiles with Triton
  with `num_warps` warps per program."""
  if interpret is None:
    interpret = compile_target.platform() == "cpu"
  if interpret:
    return True, jnp.divide, {}
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return False, _div_rn_ptx, {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=2)}


def _pick_rows(nb, block_rows):
  rows = block_rows
  while rows > 1 and rows > nb:
    rows //= 2
  return rows


def qdq_pallas(x, fmt, *, axis=-1, scale_mode="floor", rounding="nearest", key=None,
               tensor_scale=None, two_level=True, interpret=None, block_rows=None, num_warps=None):
  """Pallas version of quantize_dequantize (same arguments; no block_2d / rms / search).

  block_rows: quantization blocks per program; num_warps: Triton warps per program (GPU launch shape,
  the values do not depend on either; default: `TUNING`)."""
  f, ax = Q.check_args(x, fmt, axis, scale_mode, rounding, key, False)
  if scale_mode == "rms":
    raise ValueError("scale_mode 'rms' is jnp-only (its mean/std sums are order dependent); "
                     "use impl='jnp'")
  rows_def, warps_def = TUNING[(f.scale, rounding)]
  interpret, div, params = backend(interpret, num_warps or warps_def)
  xm = jnp.moveaxis(x, ax, -1)
  shape = xm.shape
  pairs = 2 if rounding == "stochastic" else 1  # blocks per kernel row (the `rng` pairs)
  xb = xm.reshape(-1, f.block)
  nb = xb.shape[0]
  rows = max(_pick_rows(nb, block_rows or rows_def) // pairs, 1)  # kernel rows per program
  pad = (-nb) % (rows * pairs)
  if pad:
    xb = jnp.pad(xb, ((0, pad), (0, 0)))
  xb = xb.reshape(-1, pairs * f.block)
  consts, sd = kernel_inputs(x, f, rounding, key, two_level, tensor_scale)
  spec = pl.BlockSpec((rows, pairs * f.block), lambda i: (i, 0))
  kernel = functools.partial(
      _kernel, fmt=f, scale_mode=scale_mode, two_level=two_level,
      stochastic=rounding == "stochastic", div=div)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(xb.shape, x.dtype),
      grid=(xb.shape[0] // rows,),
      in_specs=[spec] + [pl.BlockSpec((N_CONSTS,), lambda i: (0,))] * 2,
      out_specs=spec,
      interpret=interpret,
      **params,
  )(xb, consts, sd)
  out = out.reshape(-1, f.block)
  return jnp.moveaxis(out[:nb].reshape(shape), -1, ax)
