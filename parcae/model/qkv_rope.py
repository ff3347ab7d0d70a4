"""The attention's q/k/v GEMM with RoPE and QK-norm in its epilogue (Mosaic GPU, `model.qkv_impl`).

With the RoPE kernels (model/rope_norm.py) a block without value embeddings writes the q/k/v GEMM's output
y [tokens, 3D] and reads it back once: 300 MB of parcae-small's 32,768-token micro-batch per call, the RoPE
forward's 24.5 ms per step (bench/RESULTS.md, session 36). Here the GEMM (`mlp_kernels._ws_gemm`, one head per
compute warpgroup: BN = head_dim = 128) rotates and normalizes its own accumulator tile before the only write:

  q, k, v = qkv_rope_qk_norm(x [M, D], w [D, 3D], cos, sin)   (w: [q | k | v], q and k in split halves)
  a = bf16(x @ w)  -- the GEMM's output, rounded as XLA's GEMM rounds it
  q / k tiles: r = bf16(RoPE(a)) in float32 (layers.apply_rope), out = bf16(r * rsqrt(mean(r^2) + eps))
  v tiles: a as it is

the math of rope_norm's forward kernel (and of the jnp path) per element; the norm's sum runs in another order.
Under differentiation the forward also writes r (q's heads, then k's: rope_norm's residual r2), and the backward
is rope_norm's backward kernel (the gradient of y) and the two GEMMs of y = x @ w's transpose.

A compute warpgroup's tile is [128 tokens, 128 columns]: one head of q, k or v (role = column block // heads).
Its cos / sin rows (float32, 64 frequencies) are read 64 rows at a time into the accumulator's register layout
(a half's tables take 64 of a thread's registers): with TABLES "gmem" straight from global memory (L2; the
pipeline's 4 stages and the [128, 64] output buffers leave no shared memory for them), with "smem" from a
shared copy that one TMA per tile fetches during the K loop (3 stages, [64, 64] output buffers). Each [64, 64]
result goes out through the warpgroup's shared-memory buffer with TMA.
Blocks with value embeddings keep the GEMM + rope_norm path (their v needs a gather of the table's rows).
On a CPU, impl="jnp" runs the same custom VJP with a jnp stand-in for the kernel (tests).
Measured on H100s (bench/RESULTS.md, sessions 37-38: `bench/qkv_rope.py`): parcae-small's projection forward
(q, k, v / + r under differentiation) with the tables in shared memory 216.9 / 244.2 us against the GEMM +
rope_norm kernel's 264.2 / 306.0 (-18% / -20%); from global memory 247.9 / 290.2 (its L2 loads of the tables
sit in the epilogue's critical path). In training (session 39, two A/B pairs): +1.0% / +1.1%, so
`model.qkv_impl` defaults to "auto" (this kernel where it can run).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from parcae.model import mlp_kernels as mk
from parcae.model import rope_norm

HALF = 64  # rows per register pass and columns per stored piece (half a head)
EPS = float(jnp.finfo(jnp.bfloat16).eps)  # QK-norm's eps: the compute dtype's machine epsilon (as F.rms_norm)
# Load the second 64 rows' cos / sin before the first rows' math and stores (their latency hidden behind those;
# 64 more registers live) instead of after.
PREFETCH = False
# Where the epilogue reads cos / sin: "gmem" (from L2, into registers, per 64 rows), "smem" (one TMA fetch of the
# tile's 128 rows per CTA at K step SMEM_STAGES, into shared memory both warpgroups read; SMEM_STAGES pipeline
# stages and [64, 64] output buffers make room), or "auto": "smem" where the K loop has more than SMEM_STAGES
# steps (every width over 192), else "gmem". On an H100 "smem" ran parcae-small's projection forward in 216.9 us
# against "gmem"'s 247.9 (bench/RESULTS.md, session 38).
TABLES = "auto"
SMEM_STAGES = 3
# "smem"'s output buffer rows per warpgroup: HALF (one [64, 64] piece: each store waits for the last one's read)
# or 2 x HALF (two pieces per wait; 16 KB more per CTA: fits at SMEM_STAGES 2 only).
SMEM_OUT_ROWS = HALF


def placement(d: int) -> str:
  """The table placement TABLES gives a model width d: "gmem" or "smem" ("smem" fetches at K step SMEM_STAGES,
  so it needs more K steps than that)."""
  fits = d // mk.TK > SMEM_STAGES
  if TABLES == "auto":
    return "smem" if fits else "gmem"
  if TABLES not in ("gmem", "smem"):
    raise ValueError(f"qkv_rope.TABLES={TABLES!r}: choose 'auto', 'gmem' or 'smem'")
  if TABLES == "smem" and not fits:
    raise ValueError(f"qkv_rope.TABLES='smem' fetches the tables at K step {SMEM_STAGES}: needs width > "
                     f"{SMEM_STAGES * mk.TK}, got {d}; use TABLES='gmem' or 'auto'")
  return TABLES


def supported(m: int, d: int, n_heads: int, seq: int) -> bool:
  """Whole tiles (mlp_kernels.supported for [m, d] @ [d, 3d]), head_dim = the tile width (128), whole row tiles
  per sequence."""
  return d // n_heads == mk.BN and d % n_heads == 0 and seq % mk.BM == 0 and mk.supported(m, d, 3 * d)


def _math(a_bf16, c, s, eps):
  """RoPE of a [rows, 2 x HALF] bf16 tile (split halves) with its float32 cos / sin [rows, HALF], rounded to
  bf16, and its RMS-normalized copy: (r0, r1, n0, n1), bf16 halves. As rope_norm's `_rotate` / `_inv_rms`."""
  x0 = a_bf16[:, :HALF].astype(jnp.float32)
  x1 = a_bf16[:, HALF:].astype(jnp.float32)
  r0 = (x0 * c - x1 * s).astype(jnp.bfloat16)
  r1 = (x0 * s + x1 * c).astype(jnp.bfloat16)
  f0, f1 = r0.astype(jnp.float32), r1.astype(jnp.float32)
  ms = (jnp.sum(f0 * f0, axis=1) + jnp.sum(f1 * f1, axis=1)) / (2 * HALF)
  inv = lax.broadcast_in_dim(lax.rsqrt(ms + eps), f0.shape, (0,))
  return r0, r1, (f0 * inv).astype(jnp.bfloat16), (f1 * inv).astype(jnp.bfloat16)


def _fetch_tables(in_gmem, extra, rows, wg, *, seq):
  """TABLES "smem": at K step SMEM_STAGES, warpgroup 0 fetches the tile's cos / sin rows ([2, BM, HALF] float32)
  into the shared table. By then the other warpgroup has consumed this tile's stage 0 (both consume every stage,
  and the stage ring holds SMEM_STAGES), so it has left the previous tile's epilogue and its table reads."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  tab, bar = extra

  def before_step(step):
    @pl.when((step == SMEM_STAGES) & (wg == 0))
    def _():
      plgpu.copy_gmem_to_smem(in_gmem[2].at[:, pl.ds(lax.rem(rows.start, seq), mk.BM), :], tab, bar.at[0])
  return before_step


def _rope_tile(run, *, epilogue, in_gmem, o_gmem, o_smem, barrier, wg, rows, cols, piece, nbuf, heads, seq, eps,
               extra=()):
  """A compute warpgroup's tile (mlp_kernels._ws_gemm's tile_fn): the K loop, then q / k's RoPE + norm or v
  as it is, out through its one buffer ([BM or HALF, HALF]). o_gmem: q, k, v [M, D] (+ r2 [M, 2D] under
  autodiff); extra: TABLES "smem"'s shared table and its barrier."""
  del epilogue, barrier, piece, nbuf
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  buf = o_smem.at[wg, 0]
  acc = run(plgpu.layout_cast(jnp.zeros((mk.BM, mk.BN), jnp.float32), plgpu.Layout.WGMMA))
  a = acc.astype(jnp.bfloat16)
  cb = lax.div(cols.start, mk.BN)             # column block of y: role x heads + head
  role, head = lax.div(cb, heads), lax.rem(cb, heads)
  if extra:  # TABLES "smem": every warpgroup waits for its tile's fetch (v's too: the barrier's phase)
    plgpu.barrier_wait(extra[1].at[0])
  tables = extra[0] if extra else in_gmem[2].at[:, pl.ds(lax.rem(rows.start, seq), mk.BM), :]

  def put(pieces):
    """Fill the buffer (after its last store has read it) with `pieces`, (array, dst, dst_rows, dst_cols)
    stacked by row, then store each to dst[dst_rows, dst_cols : + HALF]."""
    at = buf.shape[0]
    for p, dst, dst_rows, dst_cols in pieces:
      if at + p.shape[0] > buf.shape[0]:  # a full buffer: wait until its last store has read it
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        at = 0
      buf[pl.ds(at, p.shape[0]), :] = p
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(buf.at[pl.ds(at, p.shape[0]), :], dst.at[dst_rows, pl.ds(dst_cols, HALF)])
      at += p.shape[0]

  @pl.when(role == 2)
  def _v():
    for j in range(2):
      put([(a[h * HALF:(h + 1) * HALF, j * HALF:(j + 1) * HALF], o_gmem[2], pl.ds(rows.start + h * HALF, HALF),
            head * mk.BN + j * HALF) for h in range(2)])

  def qk(dst):
    table = lambda i, h: plgpu.load(tables.at[i, pl.ds(h * HALF, HALF), :], (), layout=plgpu.Layout.WGMMA,
                                    optimized=False)
    tabs = [(table(0, h), table(1, h)) if PREFETCH or h == 0 else None for h in range(2)]
    for h in range(2):  # 64 rows at a time, each stored before the next is formed (registers)
      c, sn = tabs[h] or (table(0, h), table(1, h))
      r0, r1, n0, n1 = _math(a[h * HALF:(h + 1) * HALF], c, sn, eps)
      sub = pl.ds(rows.start + h * HALF, HALF)
      if len(o_gmem) == 4:  # the backward's residual: the rounded RoPE output, at y's own column (q's, k's)
        put([(r0, o_gmem[3], sub, cols.start), (r1, o_gmem[3], sub, cols.start + HALF)])
      put([(n0, dst, sub, head * mk.BN), (n1, dst, sub, head * mk.BN + HALF)])

  pl.when(role == 0)(lambda: qk(o_gmem[0]))
  pl.when(role == 1)(lambda: qk(o_gmem[1]))


def _kernel(x_MxD, w_Dx3D, cos, sin, seq, residual):
  (m, d), n = x_MxD.shape, w_Dx3D.shape[1]
  heads = d // mk.BN
  if x_MxD.dtype != jnp.bfloat16 or not supported(m, d, heads, seq):
    raise ValueError(f"qkv_rope: the Mosaic GPU kernel needs bf16 operands, head_dim {mk.BN} and whole tiles "
                     f"(tokens per device % {mk.BM * mk.CLUSTER}, sequence % {mk.BM}); got {x_MxD.dtype}, "
                     f"x {x_MxD.shape}, sequence {seq}. Use model.qkv_impl='xla'")
  out = jax.ShapeDtypeStruct((m, d), jnp.bfloat16)
  outs = (out,) * 3 + ((jax.ShapeDtypeStruct((m, 2 * d), jnp.bfloat16),) if residual else ())
  tile = functools.partial(_rope_tile, heads=heads, seq=seq, eps=EPS)
  tables = jnp.stack([cos, sin]).astype(jnp.float32)  # [2, S, K/2]
  kw = dict(steps=mk.STEPS_NO_H)
  if placement(d) == "smem":
    from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
    kw = dict(steps=SMEM_STAGES, out_rows=SMEM_OUT_ROWS, tile_fetch=functools.partial(_fetch_tables, seq=seq),
              tile_scratch=(plgpu.SMEM((2, mk.BM, HALF), jnp.float32), plgpu.Barrier(num_barriers=1)))
  return mk._ws_gemm((x_MxD, w_Dx3D, tables), d, n, None, trans_b=False, piece=HALF, tile_fn=tile, out_types=outs,
                     **kw)


def _jnp(x_MxD, w_Dx3D, cos, sin, seq, residual):
  """The kernel's stand-in: XLA's GEMM, then the epilogue's math on [tokens, 2, heads, K] blocks, the RoPE
  output rounded to bf16 by `lax.reduce_precision` (a cast pair f32 -> bf16 -> f32, as layers.apply_rope +
  qk_norm write it, is one XLA may drop under its default --xla_allow_excess_precision)."""
  (m, d), k = x_MxD.shape, mk.BN
  y = jnp.dot(x_MxD, w_Dx3D).reshape(m, 3, d // k, k)
  c = jnp.tile(cos[:seq], (m // seq, 1))[:, None, None].astype(jnp.float32)
  s = jnp.tile(sin[:seq], (m // seq, 1))[:, None, None].astype(jnp.float32)
  x0, x1 = y[:, :2, :, :HALF].astype(jnp.float32), y[:, :2, :, HALF:].astype(jnp.float32)
  rnd = lambda a: lax.reduce_precision(a, exponent_bits=8, mantissa_bits=7)
  f0, f1 = rnd(x0 * c - x1 * s), rnd(x0 * s + x1 * c)
  inv = lax.rsqrt((jnp.sum(f0 * f0, -1, keepdims=True) + jnp.sum(f1 * f1, -1, keepdims=True)) / k
                  + EPS)
  qk = jnp.concatenate([f0 * inv, f1 * inv], -1).astype(jnp.bfloat16).reshape(m, 2, d)
  outs = (qk[:, 0], qk[:, 1], y[:, 2].reshape(m, d))
  return outs + ((jnp.concatenate([f0, f1], -1).astype(jnp.bfloat16).reshape(m, 2 * d),) if residual else ())


KERNELS = {"mosaic": _kernel, "jnp": _jnp}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _local(x_BxSxD, w_Dx3D, cos, sin, seq, impl):
  return KERNELS[impl](x_BxSxD.reshape(-1, x_BxSxD.shape[-1]), w_Dx3D, cos, sin, seq, residual=False)


def _local_fwd(x_BxSxD, w_Dx3D, cos, sin, seq, impl):
  q, k, v, r2 = KERNELS[impl](x_BxSxD.reshape(-1, x_BxSxD.shape[-1]), w_Dx3D, cos, sin, seq, residual=True)
  return (q, k, v), (x_BxSxD, w_Dx3D, cos, sin, r2)


def _local_bwd(seq, impl, res, g):
  """rope_norm's backward kernel, then y = x @ w's transposes as autodiff of jnp.dot forms them (x [B, S, D]:
  the same program, so XLA rounds dw to bf16 where it does for the unfused path)."""
  x_BxSxD, w_Dx3D, cos, sin, r2 = res
  dy, _ = rope_norm._backward(r2, cos, sin, *g, (), s=seq, k=mk.BN, t=1, eps=EPS, norm=True, cd=jnp.bfloat16,
                              interpret=None)
  _, dot_vjp = jax.vjp(jnp.dot, x_BxSxD, w_Dx3D)
  dx, dw = dot_vjp(dy.reshape(*x_BxSxD.shape[:2], -1))
  return dx, dw, jnp.zeros_like(cos), jnp.zeros_like(sin)


_local.defvjp(_local_fwd, _local_bwd)


def qkv_rope_qk_norm(x_BxSxD, w_Dx3D, cos_SxK2, sin_SxK2, *, impl="mosaic"):
  """q, k, v [B, S, H, K] from x [B, S, D] and the fused q/k/v kernel w [D, 3D] ([q | k | v], q and k in the
  split-halves order of layers.split_pairs), bf16: RoPE and QK-norm on q and k (see the module docstring).
  Per device under the trainer's batch axes (not with a "tensor" axis: Attention's [T, 3, G] column order)."""
  b, s, d = x_BxSxD.shape
  cos, sin = cos_SxK2[:s].astype(jnp.float32), sin_SxK2[:s].astype(jnp.float32)

  def per_device(x, w, cos, sin):
    outs = _local(x, w, cos, sin, s, impl)
    return tuple(o.reshape(x.shape[0], s, d // mk.BN, mk.BN) for o in outs)

  mesh = jax.sharding.get_abstract_mesh()
  axes = rope_norm.kernel_axes(mesh)
  if "tensor" in axes:
    raise ValueError("qkv_rope: not under a 'tensor' mesh axis (the q/k/v columns are per shard); use "
                     "model.qkv_impl='xla'")
  if not axes:
    return per_device(x_BxSxD, w_Dx3D, cos, sin)
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  batch = rope_norm.kernel_batch_axes(mesh)
  out = P(batch, None, None, None)
  return jax.shard_map(per_device, in_specs=(P(batch, None, None), P(), P(), P()), out_specs=(out, out, out),
                       axis_names=set(axes), check_vma=False)(x_BxSxD, w_Dx3D, cos, sin)


def shapes_ok(b: int, s: int, d: int, n_heads: int) -> bool:
  """Whether each device's call is whole tiles under the mesh in force (batch split over the batch axes)."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = rope_norm.kernel_axes(mesh)
  shards = rope_norm.kernel_batch_shards(mesh)
  return "tensor" not in axes and b % shards == 0 and supported(b // shards * s, d, n_heads, s)
