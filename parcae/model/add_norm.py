"""A block's residual add + RMSNorm + cast as one Pallas kernel each way (`model.norm_impl`).

A branch's output y (compute dtype: attention's before norm2, the previous block's MLP's before norm1) joins
the float32 residual stream x and the sum is normalized for the next GEMM: s = x + f32(y), n = cd((s *
rsqrt(mean(s^2) + eps)) * scale), the formula of `layers.Block` with `layers.rms_norm`. XLA runs the forward as two passes over [tokens, D] (the add
with the row's sum of squares, then the normalized output) and the backward as a row reduction plus a pass
that also adds the residual path's cotangent and sums the scale's gradient (bench/RESULTS.md, session 22).
Here each program reads and writes its [ROWS, D] block once each way:
  forward : (x, y, scale) -> (s, n, r = rsqrt(mean(s^2) + eps))
  backward: (s, r, scale, ds, dn) -> dx = ds + r * (g - xhat * mean(g * xhat)), dy = dx in y's dtype, and
            per-program partial sums of the scale's gradient dn * xhat (summed over programs in jnp),
            with xhat = s * r, g = f32(dn) * scale; dx is the cotangent of x and of f32(y) alike.
Same arithmetic as autodiff of the formula up to the order of the float32 row sums. A row is processed in
power-of-two column chunks (Triton arrays must have power-of-two sizes): D = 768 is three chunks of 256.
Under the trainer's mesh the kernels run per device over the batch axes (shard_map); under a "tensor" axis
the XLA formula is used.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from parcae.model.rope_norm import kernel_axes, kernel_batch_axes, kernel_batch_shards

# GPU launch shape: token rows per program, Triton warps. bench/add_norm.py on an H100 (session 23): 4 rows x
# 8 warps fastest of {4, 8, 16, 32} x {4, 8} over D = 768 and 1024 (forward + backward 0.291 ms against XLA's
# 0.346 at 32768 x 768); 32 rows spill (up to 7x slower).
ROWS, WARPS = 4, 8


def chunk(d: int) -> int:
  """Widest power-of-two column chunk <= 512 dividing d (the kernels need >= 64)."""
  w = 1
  while d % (2 * w) == 0 and 2 * w <= 512:
    w *= 2
  return w


def supported(tokens: int, d: int) -> bool:
  return chunk(d) >= 64 and tokens % ROWS == 0


def _fwd_kernel(x_ref, y_ref, sc_ref, s_ref, n_ref, r_ref, *, eps, w):
  d = x_ref.shape[1]
  parts, ss = [], 0.0
  for j in range(d // w):
    sl = pl.ds(j * w, w)
    s = x_ref[:, sl] + y_ref[:, sl].astype(jnp.float32)
    s_ref[:, sl] = s
    parts.append(s)
    ss = ss + jnp.sum(s * s, axis=1)
  r = jax.lax.rsqrt(ss / d + eps)
  for j, s in enumerate(parts):
    sl = pl.ds(j * w, w)
    n_ref[:, sl] = ((s * r[:, None]) * sc_ref[sl][None, :]).astype(n_ref.dtype)
  r_ref[...] = r


def norm_grads(s_ref, r, sc_ref, dn_ref, ds_ref, w):
  """(column slice, xhat, ds + r * (g - xhat * mean(g * xhat))) for each w-wide column chunk of a row block:
  RMSNorm's backward (xhat = s * r, g = f32(dn) * scale) plus the residual path's cotangent ds, the row mean
  taken over all chunks first (this module's and `loop_boundary`'s backward kernels)."""
  d = s_ref.shape[1]
  xs, gs, dot = [], [], 0.0
  for j in range(d // w):
    sl = pl.ds(j * w, w)
    xhat = s_ref[:, sl] * r[:, None]
    g = dn_ref[:, sl].astype(jnp.float32) * sc_ref[sl][None, :]
    xs.append(xhat)
    gs.append(g)
    dot = dot + jnp.sum(g * xhat, axis=1)
  mean = dot / d
  for j, (xhat, g) in enumerate(zip(xs, gs)):  # a generator: the caller's stores follow each chunk's gradient
    sl = pl.ds(j * w, w)
    dx = r[:, None] * (g - xhat * mean[:, None])
    yield sl, xhat, dx if ds_ref is None else ds_ref[:, sl] + dx


def _bwd_kernel(*refs, w, has_ds):
  (s_ref, r_ref, sc_ref), ds_ref = refs[:3], refs[3] if has_ds else None
  dn_ref, dx_ref, dy_ref, dsc_ref = refs[3 + has_ds:]
  for sl, xhat, dx in norm_grads(s_ref, r_ref[...], sc_ref, dn_ref, ds_ref, w):
    dx_ref[:, sl] = dx
    dy_ref[:, sl] = dx.astype(dy_ref.dtype)
    dsc_ref[:, sl] = jnp.sum(dn_ref[:, sl].astype(jnp.float32) * xhat, axis=0)[None, :]


def _backend(interpret):
  from parcae.quant.kernels import qdq  # the kernels' shared backend choice (interpret on a CPU)
  interpret, _, params = qdq.backend(interpret, WARPS)
  return interpret, params


def forward(x_NxD, y_NxD, scale_D, eps, cd, interpret=None):
  """(s, n, r): the sum (float32), its normalized compute-dtype output, each row's rsqrt."""
  n, d = x_NxD.shape
  interpret, params = _backend(interpret)
  blk = pl.BlockSpec((ROWS, d), lambda i: (i, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, eps=eps, w=chunk(d)), grid=(n // ROWS,),
      out_shape=(jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n, d), cd),
                 jax.ShapeDtypeStruct((n,), jnp.float32)),
      in_specs=[blk, blk, pl.BlockSpec((d,), lambda i: (0,))],
      out_specs=(blk, blk, pl.BlockSpec((ROWS,), lambda i: (i,))),
      interpret=interpret, **params)(x_NxD, y_NxD, scale_D)


def backward(s_NxD, r_N, scale_D, ds_NxD, dn_NxD, y_dtype, interpret=None):
  """(dx, dy, dscale): the cotangents of x, y and scale. ds None: the sum s has no other use (no residual path:
  `rms_norm_of_sum`), so no zeros are read in its place."""
  n, d = s_NxD.shape
  interpret, params = _backend(interpret)
  blk = pl.BlockSpec((ROWS, d), lambda i: (i, 0))
  has_ds = ds_NxD is not None
  dx, dy, part = pl.pallas_call(
      functools.partial(_bwd_kernel, w=chunk(d), has_ds=has_ds), grid=(n // ROWS,),
      out_shape=(jax.ShapeDtypeStruct((n, d), jnp.float32), jax.ShapeDtypeStruct((n, d), y_dtype),
                 jax.ShapeDtypeStruct((n // ROWS, d), jnp.float32)),
      in_specs=[blk, pl.BlockSpec((ROWS,), lambda i: (i,)), pl.BlockSpec((d,), lambda i: (0,))]
      + [blk] * (1 + has_ds),
      out_specs=(blk, blk, pl.BlockSpec((1, d), lambda i: (i, 0))),
      interpret=interpret, **params)(s_NxD, r_N, scale_D, *((ds_NxD,) if has_ds else ()), dn_NxD)
  return dx, dy, jnp.sum(part, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _local(x, y, scale, eps, cd, y_dtype, interpret):
  return forward(x, y, scale, eps, cd, interpret)[:2]


def _local_fwd(x, y, scale, eps, cd, y_dtype, interpret):
  s, n, r = forward(x, y, scale, eps, cd, interpret)
  return (s, n), (s, r, scale)


def _local_bwd(eps, cd, y_dtype, interpret, res, ct):
  s, r, scale = res
  ds, dn = ct
  return backward(s, r, scale, ds, dn.astype(cd), y_dtype, interpret)


_local.defvjp(_local_fwd, _local_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _local_norm(x, y, scale, eps, cd, y_dtype, interpret):
  return forward(x, y, scale, eps, cd, interpret)[1]


def _local_norm_fwd(x, y, scale, eps, cd, y_dtype, interpret):
  s, n, r = forward(x, y, scale, eps, cd, interpret)
  return n, (s, r, scale)


def _local_norm_bwd(eps, cd, y_dtype, interpret, res, dn):
  s, r, scale = res
  return backward(s, r, scale, None, dn.astype(cd), y_dtype, interpret)


_local_norm.defvjp(_local_norm_fwd, _local_norm_bwd)


def usable(x_shape) -> bool:
  """Whether the kernels take an [B, S, D] residual under the current mesh: whole row blocks per device (the
  batch split over the batch axes), a column chunk of >= 64, and no "tensor" axis."""
  b, s, d = x_shape
  mesh = jax.sharding.get_abstract_mesh()
  n = kernel_batch_shards(mesh)
  return "tensor" not in kernel_axes(mesh) and b % n == 0 and supported(b // n * s, d)


def add_rms_norm(x_BxSxD, y_BxSxD, scale_D, eps: float, cd, interpret=None):
  """(x + f32(y), cd(rms_norm(x + f32(y)) * scale)) for the float32 residual x and a branch output y
  (shapes `usable`)."""
  return _per_device(_local, 2, x_BxSxD, y_BxSxD, scale_D, eps, cd, interpret)


def rms_norm_of_sum(x_BxSxD, y_BxSxD, scale_D, eps: float, dtype, interpret=None):
  """dtype(rms_norm(x + f32(y)) * scale) alone: a stage's closing norm (`layers.run_stage(norm=...)`), whose sum
  has no other reader, so the backward kernel reads no residual cotangent (the kernels of `add_rms_norm`)."""
  return _per_device(_local_norm, 1, x_BxSxD, y_BxSxD, scale_D, eps, dtype, interpret)[0]


def _per_device(local, n_out, x_BxSxD, y_BxSxD, scale_D, eps, cd, interpret):
  """local's outputs ([B, S, D] each) over row-flattened inputs, per device over the mesh's batch axes."""
  b, s, d = x_BxSxD.shape

  def per_device(x, y, scale):
    bl = x.shape[0]
    out = local(x.reshape(bl * s, d), y.reshape(bl * s, d), scale, eps, jnp.dtype(cd), jnp.dtype(y.dtype),
                interpret)
    return tuple(o.reshape(bl, s, d) for o in (out if n_out > 1 else (out,)))

  batch = kernel_batch_axes(jax.sharding.get_abstract_mesh())
  if not batch:
    return per_device(x_BxSxD, y_BxSxD, scale_D)
  spec = P(batch, None, None)
  return jax.shard_map(per_device, in_specs=(spec, spec, P()), out_specs=(spec,) * n_out, axis_names=set(batch),
                       check_vma=False)(x_BxSxD, y_BxSxD, scale_D)
