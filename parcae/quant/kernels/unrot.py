"""One-pass Pallas kernel for the backward of a rotated GEMM's token operand: clip mask + inverse block
Hadamard [+ the derivative of an elementwise act], in the jnp path's arithmetic.

The forward quantized rot(act(x)) along K (Quartet: a 32-point Hadamard, QuEST's clip mask); its dgrad
GEMM returns the gradient in the rotated space, dr [M, K] (bf16). The jnp path then runs

  d  = where(mask, dr, 0)                                 (bf16)
  dx = bf16(f32(d) @ M^T * 1/sqrt(n))                      (rotation: +-1 matrix on the tensor cores)
  dx = vjp(act, x)(dx)                                     (ReLU^2: max(x, 0) * dx, in bf16)

as three XLA kernels with two intermediate arrays written and read (on the H200: a select fusion at
bandwidth, a Triton GEMM fusion at bandwidth and the act's product). This kernel reads dr, the mask and x
once and writes dx once. Layout as `rotq` along axis 1: the [M, K] arrays viewed as [M * K / n, n] (each
view row one block; a tile of view rows is contiguous memory), programs of `tile` view rows.
In interpret mode (CPU) it equals the jnp path bit for bit (tests/test_quant_unrot.py); on the GPU the
in-tile dot may sum the 32 exact products in another order than XLA's GEMM (bench/quant_kernels.py counts).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from parcae.quant import hadamard as H
from parcae.quant import quantize as Q
from parcae.quant.kernels.qdq import backend
from parcae.quant.kernels.rotq import _tile

TILE, WARPS = 128, 4  # GPU launch shape: view rows (blocks) per program, Triton warps


def supported(dr, n: int) -> bool:
  return dr.ndim == 2 and dr.shape[1] % n == 0 and _tile(dr.shape[0] * dr.shape[1] // n, TILE) > 0


def reference(dr, mask, x, rotation=None, act=None):
  """The jnp path (`dense._backward`'s where the kernel does not apply; rotation (n, signs) or None)."""
  d = dr if mask is None else jnp.where(mask != 0, dr, jnp.zeros((), dr.dtype))
  d = d.astype(jnp.float32)
  dx = Q.round_to(d if rotation is None else H.rotate(d, *rotation, 1, inverse=True), x.dtype)
  return dx if act is None else jax.vjp(act, x)[1](dx)[0]


def _kernel(d_ref, m_ref, *refs, n, act, has_mask, interpret):
  mask_ref, x_ref, o_ref = refs[0] if has_mask else None, refs[-2] if act else None, refs[-1]
  d = d_ref[...]
  if has_mask:
    d = jnp.where(mask_ref[...] != 0, d, jnp.zeros((), d.dtype))
  y = jnp.dot(d.astype(jnp.bfloat16), m_ref[...], preferred_element_type=jnp.float32)
  dx = y * jnp.float32(1.0 / np.sqrt(n))
  dx = Q.round_to(dx, o_ref.dtype) if interpret else dx.astype(o_ref.dtype)  # Triton rounds as written
  if act is not None:
    dx = jax.vjp(act, x_ref[...])[1](dx)[0]
  o_ref[...] = dx.astype(o_ref.dtype)


def unrotate(dr, mask, x, rotation, act=None, *, interpret=None, tile=None, num_warps=None):
  """reference(dr, mask, x, rotation, act) in one pass. dr [M, K] (the gradient in the rotated space), mask
  [M, K] bool / int8 or None, x: act's input [M, K], or (act None) any array of the result's dtype;
  rotation: the forward's (n, signs)."""
  n, signs = rotation
  if not supported(dr, n):
    raise ValueError(f"unrotate does not handle {dr.shape} with a {n}-point rotation; use the jnp path")
  interpret, _, params = backend(interpret, num_warps or WARPS)
  rows = dr.shape[0] * dr.shape[1] // n
  t = _tile(rows, tile or TILE)
  view = lambda a: a.reshape(rows, n)
  spec = pl.BlockSpec((t, n), lambda i: (i, 0))
  ins = [view(dr), H.sign_matrix(n, signs).T.astype(jnp.bfloat16)]
  specs = [spec, pl.BlockSpec((n, n), lambda i: (0, 0))]
  if mask is not None:
    ins.append(view(mask.astype(jnp.int8)))
    specs.append(spec)
  if act is not None:
    ins.append(view(x))
    specs.append(spec)
  kernel = functools.partial(_kernel, n=n, act=act, has_mask=mask is not None, interpret=interpret)
  out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype), grid=(rows // t,),
                       in_specs=specs, out_specs=spec, interpret=interpret, **params)(*ins)
  return out.reshape(dr.shape)
