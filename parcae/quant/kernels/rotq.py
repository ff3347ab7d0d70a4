"""One-pass Pallas kernel for a 2-D GEMM operand: [block Hadamard +] scale + round + dequantize [+ clip mask].

The recipes quantize 2-D operands along either axis: along K (columns, axis 1) for the forward and
dgrad operands and along the tokens (rows, axis 0) for the wgrad operands. The jnp path moves the axis
last (a transpose), rotates with a small matmul (an f32 array written and read) and then quantizes;
this kernel reads x once and writes the result once, with no transpose:

  axis 1: x viewed as [R * C / block, block] (a free reshape: each row of the view is one block, so
          a tile of consecutive view rows is one contiguous stretch of memory); tiles [tile, block]
          on a (R * C / block / tile, 1) grid; rotation = tile @ M
  axis 0: tiles [block, cols] on a (R / block, C / cols) grid; rotation = M^T @ tile
  With stochastic rounding a tile spans two blocks along the quantization axis (the view's rows are
  [2 * block] long; axis 0 tiles are [2 * block, cols]): the two blocks of each `rng` pair, so one hash
  gives both their uniforms. Each block is rotated and quantized in turn.

The arithmetic is the jnp path's, step for step (bf16(x) times the +-1 matrix with f32 accumulation,
times 1/sqrt(n), rounded to x's dtype; `quantize.qdq_blocks` with the block axis in place; the
stochastic-rounding uniforms hashed from the moved-layout index), so in interpret mode (CPU) it equals
`hadamard.rotate` + `quantize_dequantize` bit for bit (tests/test_quant_rotq.py), and on the H200 too
(bench/quant_kernels.py: 0 mismatches in every operand row; timings and launch shapes in bench/RESULTS.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from parcae.quant import formats as F
from parcae.quant import hadamard as H
from parcae.quant import quantize as Q
from parcae.quant import rng as R
from parcae.quant.kernels.qdq import N_CONSTS, backend, kernel_inputs

TILE = 256  # elements along the non-block axis per program (the largest tile; `_tile` may pick less)
# GPU launch shape per kernel flavour (axis, rotate, stochastic) -> (tile, num_warps); the values computed
# do not depend on it. Swept on the H200 (16384 x 8192 bf16, bench/RESULTS.md 2026-12-01; the stochastic
# rows again 2026-12-05, session 13, once a tile held both blocks of each SR pair):
#   python3 bench/quant_kernels.py --quick --iters 20 --rounding R --rotq-cases C --rotq-tiles T --rotq-warps 4,8
TUNING = {(1, False, False): (256, 8), (1, True, False): (128, 4), (1, False, True): (128, 4),
          (1, True, True): (128, 4), (0, False, False): (256, 4), (0, True, False): (128, 4),
          (0, False, True): (256, 4), (0, True, True): (128, 4)}


def _tile(d, tile=TILE):
  """Largest power of two <= tile dividing d, or 0 when below 16 (the smallest tensor-core dot)."""
  t = tile
  while t >= 16 and d % t:
    t //= 2
  return t if t >= 16 else 0


def supported(x, fmt, axis, rotation, block_2d=False, search=False, rounding="nearest"):
  """Whether the kernel handles this operand (else the caller uses the jnp path)."""
  f = F.get_format(fmt)
  if x.ndim != 2 or block_2d or search or (rotation is not None and rotation[0] != f.block):
    return False
  ax = axis % 2
  pairs = 2 if rounding == "stochastic" else 1  # a program holds both blocks of each `rng` pair
  if ax == 0:
    return x.shape[0] % (pairs * f.block) == 0 and _tile(x.shape[1]) > 0
  view_rows = x.shape[0] * x.shape[1] // f.block
  return (x.shape[1] % f.block == 0 and _tile(x.shape[0]) > 0 and view_rows % pairs == 0
          and _tile(view_rows // pairs) > 0)


def _kernel(x_ref, m_ref, c_ref, s_ref, o_ref, *mask_ref, fmt, axis, scale_mode, two_level, stochastic,
            rotate, shape, div, act, interpret):
  """A tile of `pairs` blocks along the quantization axis per block position (2 with stochastic
  rounding: the two blocks of each `rng` pair, whose uniforms come from one hash; else 1)."""
  b = fmt.block
  tr, tc = x_ref.shape
  tr, tc = (tr, b) if axis == 1 else (b, tc)  # one block's part of the tile
  i, j = pl.program_id(0), pl.program_id(1)
  us = [None] * (x_ref.shape[axis] // b)
  if stochastic:  # pair index (rng): s_ref[2] = the first pair row of this (row-sharded) x in the whole
    # operand, `shape` the whole operand's shape in pairs: [pair rows, block] (axis 1), [rows / 2, cols] (0)
    r = (i * tr).astype(jnp.uint32) + jax.lax.broadcasted_iota(jnp.int32, (tr, tc), 0).astype(jnp.uint32)
    r = r + s_ref[2]
    c = (j * tc).astype(jnp.uint32) + jax.lax.broadcasted_iota(jnp.int32, (tr, tc), 1).astype(jnp.uint32)
    p = r * jnp.uint32(shape[1]) + c if axis == 1 else c * jnp.uint32(shape[0]) + r
    us = R.uniform_pair(p, s_ref[0], s_ref[1])
  consts = [c_ref[k] for k in range(9)]
  for h, u in enumerate(us):
    part = (slice(None), pl.ds(h * b, b)) if axis == 1 else (pl.ds(h * b, b), slice(None))
    x = Q.activate(x_ref[part], act, interpret)  # the caller's elementwise function (e.g. ReLU^2)
    if rotate:  # exact products (bf16 x +-1), f32 sums; interpret mode multiplies in f32 (the CPU's dot
      # thunk lacks bf16 x bf16 -> f32; the same products and sums)
      xb, m = x.astype(jnp.bfloat16), m_ref[...]
      if interpret:
        xb, m = xb.astype(jnp.float32), m.astype(jnp.float32)
      y = jnp.dot(xb, m, preferred_element_type=jnp.float32) if axis == 1 else \
          jnp.dot(m, xb, preferred_element_type=jnp.float32)
      x = (y * jnp.float32(1.0 / np.sqrt(b))).astype(x.dtype)
    deq, t = Q.qdq_blocks(x.astype(jnp.float32), fmt, scale_mode, u, consts, two_level, div,
                          return_scaled=True, baxis=axis)
    o_ref[part] = deq.astype(o_ref.dtype)
    if mask_ref:
      mask_ref[0][part] = (jnp.abs(t) < fmt.elem.max_val).astype(jnp.int8)


def operand_inputs(x, fmt, rounding, key, rotation=None, two_level=True, axis=-1, act=None):
  """(consts, seed words) the kernel reads for the whole operand x: NVFP4's tensor-scale constants (of
  act(x), rotated, as on the jnp path) and the stochastic-rounding seed. A row-sharded caller computes
  them once on the whole x and hands them to every shard (`rotate_quantize(..., inputs=)`)."""
  f = F.get_format(fmt)
  scaled = x if f.scale != "e4m3" else Q.activate(x, act)
  if rotation is not None and f.scale == "e4m3":
    scaled = H.rotate(scaled, rotation[0], rotation[1], axis)
  return kernel_inputs(scaled, f, rounding, key, two_level)


def rotate_quantize(x, fmt, axis, *, scale_mode="floor", rounding="nearest", key=None, rotation=None,
                    two_level=True, want_mask=False, interpret=None, tile=None, num_warps=None,
                    inputs=None, first_row=0, total_rows=None, act=None):
  """quantize_dequantize(rotate(act(x), *rotation, axis), fmt, axis=axis, ...) for a 2-D x in one pass.

  act: None or an elementwise function, evaluated on each loaded tile (act(x) is never written).
  rotation: None or (n, signs) with n == the format's block size. Returns (y, mask or None); mask is
  int8 [R, C], 1 where the scaled value was inside the element range (not clipped).
  tile, num_warps: the GPU launch shape (default: `TUNING`); they do not change the values. With stochastic
  rounding a tile holds both blocks of each `rng` pair and max(tile // 2, 16) positions along the other axis.
  Row shards (inside shard_map): x holds rows [first_row, first_row + R) of an operand of total_rows
  rows, and inputs = operand_inputs(whole operand); the shard's values then equal those rows of the
  whole operand's result (blocks along axis 0 must not straddle shards: R % block == 0).
  """
  f, ax = Q.check_args(x, fmt, axis, scale_mode, rounding, key, False)
  if not supported(x, fmt, ax, rotation, rounding=rounding):
    raise ValueError(f"rotate_quantize does not handle x {x.shape} along axis {axis} with rotation "
                     f"{rotation and rotation[0]} for {fmt} ({rounding} rounding); use the jnp path")
  if inputs is None:
    inputs = operand_inputs(x, fmt, rounding, key, rotation, two_level, ax, act)
  pairs = 2 if rounding == "stochastic" else 1
  if ax == 0:
    return _launch(x, f, 0, scale_mode, rounding, rotation, two_level, want_mask, interpret, tile,
                   num_warps, inputs, first_row, total_rows or x.shape[0], act)
  per = x.shape[1] // f.block  # the contiguous view (module doc): the same blocks and SR indices; a row of
  # the view holds `pairs` blocks (supported(): every shard's first block has an even index)
  y, mask = _launch(x.reshape(-1, pairs * f.block), f, 1, scale_mode, rounding, rotation, two_level,
                    want_mask, interpret, tile, num_warps, inputs, first_row * per // pairs,
                    (total_rows or x.shape[0]) * per // pairs, act)
  return y.reshape(x.shape), (mask.reshape(x.shape) if want_mask else None)


def _launch(x, f, ax, scale_mode, rounding, rotation, two_level, want_mask, interpret, tile, num_warps,
            inputs, first_row, total_rows, act):
  """x: [rows, cols] along axis 0; along axis 1 the contiguous view [rows, pairs * block]. first_row and
  total_rows: x's first row in the whole operand (row shards) and the operand's rows, in x's terms."""
  stochastic = rounding == "stochastic"
  pairs = 2 if stochastic else 1  # blocks of a tile per position along the quantization axis
  t_def, w_def = TUNING[(ax, rotation is not None, stochastic)]
  interpret, div, params = backend(interpret, num_warps or w_def)
  rows, cols = x.shape
  span = pairs * f.block
  t = _tile(rows if ax == 1 else cols, max((tile or t_def) // pairs, 16))  # bytes per tile kept with pairs
  if ax == 1:
    bshape, grid = (t, span), (rows // t, 1)
  else:
    bshape, grid = (span, t), (rows // span, cols // t)
  m = jnp.zeros((f.block, f.block), jnp.bfloat16)
  if rotation is not None:  # axis 0 applies the +-1 matrix as M^T @ tile
    pm = H.sign_matrix(f.block, rotation[1])
    m = (pm if ax == 1 else pm.T).astype(jnp.bfloat16)
  consts, sd = inputs
  if stochastic:
    R.check_size((total_rows, cols))
  # the pairs' index space (rng.pair_index): [pair rows, block] along axis 1, [rows / 2, cols] along axis 0
  shape = (total_rows, f.block) if ax == 1 else (total_rows // pairs, cols)
  sd = sd.at[2].set(jnp.asarray(first_row, jnp.uint32) // jnp.uint32(1 if ax == 1 else pairs))
  spec = pl.BlockSpec(bshape, lambda i, j: (i, j))
  one = lambda i, j: (0,)
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
  out_specs = [spec]
  if want_mask:
    out_shape.append(jax.ShapeDtypeStruct(x.shape, jnp.int8))
    out_specs.append(spec)
  kernel = functools.partial(
      _kernel, fmt=f, axis=ax, scale_mode=scale_mode, two_level=two_level,
      stochastic=stochastic, rotate=rotation is not None, shape=shape,
      div=div, act=act, interpret=interpret)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid,
      in_specs=[spec, pl.BlockSpec((f.block, f.block), lambda i, j: (0, 0)),
                pl.BlockSpec((N_CONSTS,), one), pl.BlockSpec((N_CONSTS,), one)],
      out_specs=out_specs, interpret=interpret, **params,
  )(x, m, consts, sd)
  return outs[0], (outs[1] if want_mask else None)
