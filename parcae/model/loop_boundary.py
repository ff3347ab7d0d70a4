"""The loop's iteration boundary as one Pallas kernel each way (diagonal injection, with the add + norm kernels).

Between two passes through the core, XLA runs the core's last residual add, the masked state update with its
telemetry norm, the injection and the next pass's first norm1 as separate passes over [tokens, D]
(bench/RESULTS.md, session 23 section 4 and session 24). Here one program reads each [ROWS, D] block once:
  forward : (x, p, h, be, live, decay, scale) -> h' = where(live, x + f32(p), h),
            dist = |x + f32(p) - h| per row (telemetry, no gradient), u = decay * h' + be,
            n = cd(u * r * scale) with r = rsqrt(mean(u^2) + eps), and r
  backward: (h', u, r, live, decay, scale; dh', du, dn) -> g = du + r * (gs - uhat * mean(gs * uhat)) with
            uhat = u * r, gs = f32(dn) * scale; t = dh' + decay * g; dx = where(live, t, 0), dp = dx in p's
            dtype, dh = where(live, 0, t), dbe = g, and per-program partial sums of decay's gradient g * h' and
            of the scale's f32(dn) * uhat (summed over programs in jnp).
x is the core's residual stream before its last block's MLP output p is added (`layers.run_stage(defer=True)`);
u and n are the next pass's input and its first block's norm1 output (`layers.run_stage(normed=n)`). Same
arithmetic as autodiff of `looped._update`, `injection.Diagonal.step` and `layers.RMSNorm` up to the order of
the float32 row sums. Launch shape and column chunks as `add_norm`'s; per device under the trainer's mesh.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from parcae.model import add_norm
from parcae.model.rope_norm import kernel_batch_axes


def _fwd_kernel(x_ref, p_ref, h_ref, be_ref, live_ref, dec_ref, sc_ref, hn_ref, dist_ref, u_ref, n_ref, r_ref, *,
                eps, w):
  d = x_ref.shape[1]
  live = live_ref[...][:, None] > 0
  us, ss, dd = [], 0.0, 0.0
  for j in range(d // w):
    sl = pl.ds(j * w, w)
    h = h_ref[:, sl]
    new = x_ref[:, sl] + p_ref[:, sl].astype(jnp.float32)
    hn = jnp.where(live, new, h)
    hn_ref[:, sl] = hn
    u = dec_ref[sl][None, :] * hn + be_ref[:, sl]
    u_ref[:, sl] = u
    us.append(u)
    ss = ss + jnp.sum(u * u, axis=1)
    dd = dd + jnp.sum((new - h) * (new - h), axis=1)
  r = jax.lax.rsqrt(ss / d + eps)
  for j, u in enumerate(us):
    sl = pl.ds(j * w, w)
    n_ref[:, sl] = ((u * r[:, None]) * sc_ref[sl][None, :]).astype(n_ref.dtype)
  r_ref[...] = r
  dist_ref[...] = jnp.sqrt(dd)


def _bwd_kernel(hn_ref, u_ref, r_ref, live_ref, dec_ref, sc_ref, dhn_ref, du_ref, dn_ref,
                dx_ref, dp_ref, dh_ref, dbe_ref, ddec_ref, dsc_ref, *, w):
  r = r_ref[...]
  live = live_ref[...][:, None] > 0
  for sl, uhat, gu in add_norm.norm_grads(u_ref, r, sc_ref, dn_ref, du_ref, w):
    dbe_ref[:, sl] = gu
    t = dhn_ref[:, sl] + dec_ref[sl][None, :] * gu
    dx = jnp.where(live, t, 0.0)
    dx_ref[:, sl] = dx
    dp_ref[:, sl] = dx.astype(dp_ref.dtype)
    dh_ref[:, sl] = jnp.where(live, 0.0, t)
    ddec_ref[:, sl] = jnp.sum(gu * hn_ref[:, sl], axis=0)[None, :]
    dsc_ref[:, sl] = jnp.sum(dn_ref[:, sl].astype(jnp.float32) * uhat, axis=0)[None, :]


def _specs(d):
  rows = add_norm.ROWS
  return (pl.BlockSpec((rows, d), lambda i: (i, 0)), pl.BlockSpec((rows,), lambda i: (i,)),
          pl.BlockSpec((d,), lambda i: (0,)))


def forward(x_NxD, p_NxD, h_NxD, be_NxD, live_N, decay_D, scale_D, eps, cd, interpret=None, alias=False):
  """(h', dist, u, n, r) for N token rows (live_N: 1.0 where the row's sequence is still looping, else 0.0).
  alias: h' written into h's buffer (a no-grad while loop's carry updated in place; under differentiation h
  is the last iteration's residual, which aliasing would make XLA copy first)."""
  n, d = x_NxD.shape
  interpret, params = add_norm._backend(interpret)
  blk, row, col = _specs(d)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, eps=eps, w=add_norm.chunk(d)), grid=(n // add_norm.ROWS,),
      out_shape=(f32(n, d), f32(n), f32(n, d), jax.ShapeDtypeStruct((n, d), cd), f32(n)),
      in_specs=[blk, blk, blk, blk, row, col, col], out_specs=(blk, row, blk, blk, row),
      input_output_aliases={2: 0} if alias else {},
      interpret=interpret, **params)(x_NxD, p_NxD, h_NxD, be_NxD, live_N, decay_D, scale_D)


def backward(hn_NxD, u_NxD, r_N, live_N, decay_D, scale_D, dhn_NxD, du_NxD, dn_NxD, p_dtype, interpret=None):
  """(dx, dp, dh, dbe, ddecay, dscale): the cotangents of the forward's inputs but live."""
  n, d = u_NxD.shape
  interpret, params = add_norm._backend(interpret)
  blk, row, col = _specs(d)
  part = pl.BlockSpec((1, d), lambda i: (i, 0))
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  nb = n // add_norm.ROWS
  dx, dp, dh, dbe, ddec, dsc = pl.pallas_call(
      functools.partial(_bwd_kernel, w=add_norm.chunk(d)), grid=(nb,),
      out_shape=(f32(n, d), jax.ShapeDtypeStruct((n, d), p_dtype), f32(n, d), f32(n, d), f32(nb, d), f32(nb, d)),
      in_specs=[blk, blk, row, row, col, col, blk, blk, blk], out_specs=(blk, blk, blk, blk, part, part),
      interpret=interpret, **params)(hn_NxD, u_NxD, r_N, live_N, decay_D, scale_D, dhn_NxD, du_NxD, dn_NxD)
  return dx, dp, dh, dbe, jnp.sum(ddec, axis=0), jnp.sum(dsc, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _local(x, p, h, be, live, decay, scale, eps, cd, p_dtype, interpret):
  return forward(x, p, h, be, live, decay, scale, eps, cd, interpret, alias=True)[:4]


def _local_fwd(x, p, h, be, live, decay, scale, eps, cd, p_dtype, interpret):
  hn, dist, u, n, r = forward(x, p, h, be, live, decay, scale, eps, cd, interpret)
  return (hn, dist, u, n), (hn, u, r, live, decay, scale)


def _local_bwd(eps, cd, p_dtype, interpret, res, ct):
  hn, u, r, live, decay, scale = res
  dhn, _, du, dn = ct  # dist is telemetry: callers stop its gradient
  dx, dp, dh, dbe, ddec, dsc = backward(hn, u, r, live, decay, scale, dhn, du, dn.astype(cd), p_dtype, interpret)
  return dx, dp, dh, dbe, jnp.zeros_like(live), ddec, dsc


_local.defvjp(_local_fwd, _local_bwd)


def boundary(x_BxSxD, p_BxSxD, h_BxSxD, ctx, live_B, scale_D, eps: float, cd, interpret=None):
  """(h', dist [B, S], u, n): the masked loop update of state h by the core's output x + f32(p), the telemetry
  norm of the change (stopped gradient), the diagonal injection u = decay * h' + be of ctx = (decay, be), and
  cd(rms_norm(u) * scale) for the next pass's first block (shapes `add_norm.usable`)."""
  b, s, d = x_BxSxD.shape
  decay_D, be_BxSxD = ctx
  live_BxS = jnp.broadcast_to(live_B.astype(jnp.float32)[:, None], (b, s))

  def per_device(x, p, h, be, live, decay, scale):
    bl = x.shape[0]
    rows = lambda a: a.reshape((bl * s,) + a.shape[2:])
    out = _local(rows(x), rows(p), rows(h), rows(be), rows(live), decay, scale, eps, jnp.dtype(cd), jnp.dtype(p.dtype),
                 interpret)
    return tuple(o.reshape((bl, s) + o.shape[1:]) for o in out)

  args = (x_BxSxD, p_BxSxD, h_BxSxD, be_BxSxD, live_BxS, decay_D, scale_D)
  batch = kernel_batch_axes(jax.sharding.get_abstract_mesh())
  if batch:
    big, row = P(batch, None, None), P(batch, None)
    per_device = jax.shard_map(per_device, in_specs=(big, big, big, big, row, P(), P()),
                               out_specs=(big, row, big, big), axis_names=set(batch), check_vma=False)
  hn, dist, u, n = per_device(*args)
  return hn, jax.lax.stop_gradient(dist), u, n
