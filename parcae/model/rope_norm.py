"""RoPE and QK-norm of the fused q/k/v GEMM's output, and the value embeddings' mix into v: one Pallas kernel
forward, one backward.

XLA runs this step as 4-6 memory passes per attention call (the norm's reduction, the rotation, casts, a copy
of v) and writes the backward's q / k / v gradient in one fusion that evaluates the rotation and the norm's
transpose at both halves of every pair (bench/RESULTS.md, "2026-12-01, session 6"). Here the forward reads the
GEMM output once and writes q, k, v once (under autodiff also q's and k's RoPE output); the backward reads that
and the three cotangents once and writes the gradient once.

  y [B, S, T, 3, G]: the GEMM output (T "tensor" shards, G = D / T = heads per shard x K; q and k columns in
  the split-halves order of layers.split_pairs); cos, sin [S, K/2]  ->  q, k, v [B, S, H, K].
Math: layers.apply_rope, its result rounded to the compute dtype, then layers.qk_norm (float32) -- in
interpret mode equal to that jnp path up to the norm's summation order. Backward: the closed forms
d_r = inv * (d_n - n * mean(d_n * n)) and the rotation's transpose, with the cotangent rounded to the compute
dtype where autodiff of the jnp path rounds it. The forward also writes the rounded RoPE output of q and k, the
backward's residual (what autodiff of the jnp path keeps; keeping y instead would hold v's columns twice).
Programs: (row block, head, q | k | v), each reading and writing one [rows, K] block; the backward writes the
whole [tokens, T x 3 x G] gradient in place. Under the trainer's mesh it runs per device (shard_map): XLA cannot
partition a kernel call.
Value embeddings (layers.Attention.project): v's programs form cd(v + gate * ve) and, backward, the gate's
gradient sum_K dv * ve, reading ve's rows from the table at the token ids (`rope_qk_norm`'s ve_table_ids), so
the looked-up [tokens, D] float32 array is neither written nor read: one pass each way less per call
(bench/RESULTS.md, session 25).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

# GPU launch shape: token rows per program, Triton warps. Swept on the H200 (bench/RESULTS.md, session 7;
#   python3 bench/rope_norm.py --rows 32,64,128 --warps 2,4,8): 32 x 8 fastest forward and backward.
ROWS, WARPS = 32, 8
BATCH_AXES = ("data", "fsdp")  # the trainer's mesh axes that split the batch (parcae.train.mesh)


def kernel_axes(mesh):
  """The trainer's axes (batch axes, then "tensor") of size > 1 that a kernel call must run per device under
  (none already manual in a caller's shard_map); () without a mesh."""
  return () if mesh.empty else tuple(
      a for a in BATCH_AXES + ("tensor",) if a in mesh.axis_names and mesh.shape[a] > 1 and a not in mesh.manual_axes)


def kernel_batch_axes(mesh):
  """The batch axes among `kernel_axes`: a per-device call's rows are split over these."""
  return tuple(a for a in kernel_axes(mesh) if a != "tensor")


def kernel_batch_shards(mesh) -> int:
  """How many shards `kernel_batch_axes` cut a batch into (1 without any)."""
  return math.prod(mesh.shape[a] for a in kernel_batch_axes(mesh))


def supported(y_shape, k: int) -> bool:
  """The kernels need a power-of-two head_dim >= 32 and sequences that are whole row blocks."""
  return k >= 32 and k & (k - 1) == 0 and y_shape[1] % ROWS == 0


def _col(t, hpt, role, h):
  """Column block (units of K) of head h's q (role 0), k (1) or v (2) in the [tokens, T x 3 x G] view."""
  return (h // hpt) * 3 * hpt + role * hpt + h % hpt


def _rotate(x_ref, c, s, cd):
  """RoPE of one [rows, K] block (split halves), rounded to the compute dtype, in float32."""
  half = c.shape[1]
  x0 = x_ref[:, :half].astype(jnp.float32)
  x1 = x_ref[:, half:].astype(jnp.float32)
  r0 = (x0 * c - x1 * s).astype(cd).astype(jnp.float32)
  r1 = (x0 * s + x1 * c).astype(cd).astype(jnp.float32)
  return r0, r1


def _inv_rms(r0, r1, eps):
  k = 2 * r0.shape[1]
  ms = (jnp.sum(r0 * r0, axis=1, keepdims=True) + jnp.sum(r1 * r1, axis=1, keepdims=True)) / k
  return jax.lax.rsqrt(ms + eps)


def _store(o_ref, a0, a1):
  half = a0.shape[1]
  o_ref[:, :half] = a0.astype(o_ref.dtype)
  o_ref[:, half:] = a1.astype(o_ref.dtype)


def _by_role(q, k, v):
  """Run the program's part: q, k or v by the grid's last index."""
  role = pl.program_id(2)
  for r, fn in enumerate((q, k, v)):
    pl.when(role == r)(fn)


_VE_INPUTS = {None: 0, "rows": 1, "gather": 2}  # value-embedding inputs of the kernels by mode (+ the gate)


def _ve_block(ve_refs, ve, col):
  """The program's [rows, K] block of value embeddings (float32): its block of the looked-up array ("rows"),
  or its rows of the table at the block's token ids ("gather": no looked-up array is ever written); col: the
  head's first column (`_head_cols`)."""
  if ve == "gather":
    ids_ref, tab_ref = ve_refs
    return tab_ref[ids_ref[...], col]
  return ve_refs[0][...]


def _head_cols(k):
  """The program's head's K columns of a [*, H x K] array (read outside `_by_role`'s branches)."""
  return pl.ds(pl.multiple_of(pl.program_id(1) * k, k), k)


def _fwd_kernel(cos_ref, sin_ref, x_ref, *refs, eps, norm, cd, ve):
  n_ve = _VE_INPUTS[ve]
  ve_refs, g_ref = refs[:n_ve], refs[n_ve] if ve else None
  qo_ref, ko_ref, vo_ref, *r_ref = refs[n_ve + 1:] if ve else refs
  cols = _head_cols(x_ref.shape[1])

  def qk(o_ref):  # the tables are read here, not by v's programs
    r0, r1 = _rotate(x_ref, cos_ref[...], sin_ref[...], cd)
    if r_ref:  # the backward's residual (what autodiff of the jnp path keeps); none without autodiff
      _store(r_ref[0], r0, r1)
    if norm:
      inv = _inv_rms(r0, r1, eps)
      r0, r1 = r0 * inv, r1 * inv
    _store(o_ref, r0, r1)

  def v():  # with value embeddings: v + gate * ve in float32 (layers.Attention.project's formula), rounded once
    if ve:
      e = _ve_block(ve_refs, ve, cols)
      vo_ref[...] = (x_ref[...].astype(jnp.float32) + g_ref[...][:, None] * e).astype(vo_ref.dtype)
    else:
      vo_ref[...] = x_ref[...]
  _by_role(lambda: qk(qo_ref), lambda: qk(ko_ref), v)


def _bwd_kernel(cos_ref, sin_ref, r_ref, dq_ref, dk_ref, dv_ref, *refs, eps, norm, cd, ve):
  n_ve = _VE_INPUTS[ve]
  ve_refs, (g_ref, *dg_ref) = refs[:n_ve], refs[n_ve:]
  half = cos_ref.shape[1]
  cols = _head_cols(2 * half)

  def qk(d_ref):
    c, s = cos_ref[...], sin_ref[...]
    d0 = d_ref[:, :half].astype(jnp.float32)
    d1 = d_ref[:, half:].astype(jnp.float32)
    if norm:
      r0, r1 = r_ref[:, :half].astype(jnp.float32), r_ref[:, half:].astype(jnp.float32)
      inv = _inv_rms(r0, r1, eps)
      n0, n1 = r0 * inv, r1 * inv
      m = (jnp.sum(d0 * n0, axis=1, keepdims=True) + jnp.sum(d1 * n1, axis=1, keepdims=True)) / (2 * half)
      d0 = (inv * (d0 - n0 * m)).astype(cd).astype(jnp.float32)
      d1 = (inv * (d1 - n1 * m)).astype(cd).astype(jnp.float32)
    _store(g_ref, d0 * c + d1 * s, d1 * c - d0 * s)

  def v():  # v's cotangent passes through the rounding unchanged; the gate's is sum_K dv * ve
    dv = dv_ref[...]
    g_ref[...] = dv
    if ve:
      dg_ref[0][...] = jnp.sum(dv.astype(jnp.float32) * _ve_block(ve_refs, ve, cols), axis=1)
  _by_role(lambda: qk(dq_ref), lambda: qk(dk_ref), v)


def _backend(interpret):
  from parcae.quant.kernels import qdq  # the kernels' shared backend choice (interpret on CPU)
  interpret, _, params = qdq.backend(interpret, WARPS)
  return interpret, params


def _specs(s, k, h, t, rows):
  """BlockSpecs on the (row block, head, role) grid: cos / sin rows, a [tokens, H x K] output's head block,
  the head's own q / k / v block of the [tokens, T x 3 x G] view, its q / k block of the [tokens, 2 x H x K]
  RoPE output (role 2, v, points at k's and writes none), and the head's row block of a [H, tokens] array
  (the value-embedding gate)."""
  hpt = h // t
  tables = pl.BlockSpec((rows, k // 2), lambda i, j, r: (i % (s // rows), 0))
  head = pl.BlockSpec((rows, k), lambda i, j, r: (i, j))
  own = pl.BlockSpec((rows, k), lambda i, j, r: (i, _col(t, hpt, r, j)))
  rope = pl.BlockSpec((rows, k), lambda i, j, r: (i, jnp.minimum(r, 1) * h + j))
  gate = pl.BlockSpec((None, rows), lambda i, j, r: (j, i))
  return tables, head, own, rope, gate


def _ve_mode(ve_in):
  """ve_in: () without value embeddings, (ve2,) the looked-up [tokens, H x K] array, or (ve2, ids [tokens],
  table [V, H x K]) for the kernels to gather from (ve2 then only carries the cotangent)."""
  return (None, "rows", None, "gather")[len(ve_in)]


def _ve_operands(ve_in, head, rows):
  """The kernels' value-embedding operands and their BlockSpecs by mode (`_ve_mode`)."""
  if not ve_in:
    return (), []
  if len(ve_in) == 1:
    return ve_in, [head]
  _, ids, table = ve_in
  return (ids, table), [pl.BlockSpec((rows,), lambda i, j, r: (i,)), pl.BlockSpec(table.shape, lambda i, j, r: (0, 0))]


def _forward(y2, cos, sin, ve_in, g_HxN, *, s, k, t, eps, norm, cd, interpret, residual):
  """q, k, v [tokens, H x K], and with `residual` the rounded RoPE output of q and k [tokens, 2 x H x K].
  With value embeddings (`_ve_mode`) and their gate g_HxN (float32), v gets the gated embeddings."""
  n, h = y2.shape[0], y2.shape[1] // (3 * k)
  interpret, params = _backend(interpret)
  tables, head, own, rope, gate = _specs(s, k, h, t, ROWS)
  ve_ops, ve_specs = _ve_operands(ve_in, head, ROWS)
  gates = (g_HxN,) if ve_in else ()
  out = jax.ShapeDtypeStruct((n, h * k), y2.dtype)
  extra = [jax.ShapeDtypeStruct((n, 2 * h * k), y2.dtype)] if residual else []
  return pl.pallas_call(
      functools.partial(_fwd_kernel, eps=eps, norm=norm, cd=cd, ve=_ve_mode(ve_in)),
      out_shape=(out, out, out, *extra), grid=(n // ROWS, h, 3),
      in_specs=[tables, tables, own, *ve_specs, *[gate] * len(gates)],
      out_specs=(head, head, head, *[rope] * len(extra)),
      interpret=interpret, **params)(cos, sin, y2, *ve_ops, *gates)


def _backward(r2, cos, sin, dq, dk, dv, ve_in, *, s, k, t, eps, norm, cd, interpret):
  """The gradient of y [tokens, T x 3 x G], and with value embeddings the gate's [H, tokens] (float32)."""
  n, h = r2.shape[0], r2.shape[1] // (2 * k)
  interpret, params = _backend(interpret)
  tables, head, own, rope, gate = _specs(s, k, h, t, ROWS)
  ve_ops, ve_specs = _ve_operands(ve_in, head, ROWS)
  dy = jax.ShapeDtypeStruct((n, 3 * h * k), r2.dtype)
  out = pl.pallas_call(
      functools.partial(_bwd_kernel, eps=eps, norm=norm, cd=cd, ve=_ve_mode(ve_in)),
      out_shape=(dy, jax.ShapeDtypeStruct((h, n), jnp.float32)) if ve_in else dy, grid=(n // ROWS, h, 3),
      in_specs=[tables, tables, rope, head, head, head, *ve_specs],
      out_specs=(own, gate) if ve_in else own,
      interpret=interpret, **params)(cos, sin, r2, dq, dk, dv, *ve_ops)
  return out if ve_in else (out, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _local(y2, cos, sin, ve_in, g_HxN, s, k, t, norm, cd, interpret):
  eps = float(jnp.finfo(cd).eps)
  return _forward(y2, cos, sin, ve_in, g_HxN, s=s, k=k, t=t, eps=eps, norm=norm, cd=cd, interpret=interpret,
                  residual=False)


def _local_fwd(y2, cos, sin, ve_in, g_HxN, s, k, t, norm, cd, interpret):
  eps = float(jnp.finfo(cd).eps)
  q, k_, v, r2 = _forward(y2, cos, sin, ve_in, g_HxN, s=s, k=k, t=t, eps=eps, norm=norm, cd=cd,
                          interpret=interpret, residual=True)
  kept = ve_in[:1] if len(ve_in) == 1 else ve_in[1:]  # in "gather" mode ve2 is not kept (nor ever formed)
  return (q, k_, v), (r2, cos, sin, kept, g_HxN)


def _local_bwd(s, k, t, norm, cd, interpret, res, g):
  r2, cos, sin, kept, g_HxN = res
  eps = float(jnp.finfo(cd).eps)
  ve_in = kept if len(kept) < 2 else (None,) + kept
  dy, dg_HxN = _backward(r2, cos, sin, *g, ve_in, s=s, k=k, t=t, eps=eps, norm=norm, cd=cd, interpret=interpret)
  d_ve = ()
  if kept:  # ve2's cotangent gate * dv: left to XLA, which fuses it into the sum over the table's uses
    n, hk = g[2].shape
    dv = g[2].astype(jnp.float32).reshape(n, hk // k, k)
    d_ve = ((dv * g_HxN.T[:, :, None]).reshape(n, hk),)
    if len(kept) == 2:  # the ids and the (stopped) table take no cotangent
      d_ve += (None, jnp.zeros_like(kept[1]))
  return dy, jnp.zeros_like(cos), jnp.zeros_like(sin), d_ve, dg_HxN


_local.defvjp(_local_fwd, _local_bwd)


def rope_qk_norm(y_BxSxTx3xG, cos_SxK2, sin_SxK2, *, n_heads: int, norm: bool, ve_BxSxD=None, gate_BxSxH=None,
                 ve_table_ids=None, interpret=None):
  """q, k, v [B, S, H, K] (see the module docstring); the kernels' compute dtype is y's. With value embeddings
  ve [B, S, H x K] and their gate [B, S, H] (both float32, as layers.Attention.project forms them), v is
  cd(v + gate * ve), formed in the v programs instead of a pass of its own. With ve_table_ids = (table [V, H x K],
  ids [B, S]), ve = table[ids], the programs read the table's rows themselves: ve is never written, only its
  cotangent is (gate * dv, for the lookup's own transpose). Not under an "fsdp" axis, which shards the table."""
  b, s, t, _, g = y_BxSxTx3xG.shape
  k = y_BxSxTx3xG.shape[2] * g // n_heads
  cos, sin = cos_SxK2[:s], sin_SxK2[:s]
  mesh = jax.sharding.get_abstract_mesh()
  axes = kernel_axes(mesh)
  ve = () if ve_BxSxD is None else (ve_BxSxD.astype(jnp.float32), gate_BxSxH.astype(jnp.float32))
  if ve and ve_table_ids is not None and "fsdp" not in axes:
    table, ids = ve_table_ids
    ve += (ids.astype(jnp.int32), jax.lax.stop_gradient(table).astype(jnp.float32))

  def per_device(y, cos, sin, *ve):
    bl, _, tl = y.shape[:3]
    ve_in, g_HxN = (), None
    if ve:
      ve_in, g_HxN = (ve[0].reshape(bl * s, -1),), ve[1].reshape(bl * s, -1).T
      ve_in += () if len(ve) == 2 else (ve[2].reshape(bl * s), ve[3])
    outs = _local(y.reshape(bl * s, -1), cos, sin, ve_in, g_HxN, s, k, tl, norm, y.dtype, interpret)
    return tuple(o.reshape(bl, s, -1, k) for o in outs)

  if not axes:
    return per_device(y_BxSxTx3xG, cos, sin, *ve)
  batch = kernel_batch_axes(mesh) or None
  if batch and b % kernel_batch_shards(mesh):
    batch = None  # a batch the data-parallel axes do not split: whole on every device
  # The tensor axis splits the T shards of y (Attention orders them per device); with T = 1 (heads that do not
  # divide the axis) y is whole on every device and so is the result.
  tensor = "tensor" if "tensor" in axes and t % mesh.shape["tensor"] == 0 else None
  out = P(batch, None, tensor, None)
  heads = P(batch, None, tensor)  # ve's columns and the gate's heads: a device's own heads (consecutive)
  ve_specs = (heads, heads, P(batch, None), P(None, tensor))[:len(ve)]
  return jax.shard_map(per_device, in_specs=(P(batch, None, tensor, None, None), P(), P()) + ve_specs,
                       out_specs=(out, out, out), axis_names=set(axes), check_vma=False)(y_BxSxTx3xG, cos, sin, *ve)
