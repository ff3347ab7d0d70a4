"""The ReLU^2 MLP with its elementwise passes inside Hopper GEMM kernels (Mosaic GPU: wgmma + TMA).

XLA runs the MLP's first GEMM and ReLU^2 as two kernels, and in the backward pass the product with the ReLU
mask after the GEMM that forms the activation gradient: each elementwise pass re-reads and re-writes a
[tokens, F] array (bench/RESULTS.md, session 19: 22.4 + 18.9 ms of parcae-small's 644 ms step on an H100).
Here one warp-specialized GEMM applies it to its float32 accumulator before the single write:

  relu2_matmul(x_MxK, w_KxN)        = relu2(bf16(x @ w))          no-grad forward: x @ w never written
  relu_grad_matmul(g_MxK, w_NxK, h) = bf16(g @ w^T) * max(h, 0)   backward: g @ w^T never written
  pair_matmul(x_MxK, w_KxN)         = (h, relu2(h)), h = bf16(x @ w)   forward under differentiation: h never
                                                                   read back

`relu2_mlp(x, w1, w2)` = relu2(x @ w1) @ w2 with a custom VJP: its primal (the no-grad loops, evaluation) runs
relu2_matmul; under differentiation the forward runs pair_matmul (`FWD_PAIR`) and keeps h = x @ w1 and
a = relu2(h) (the two arrays autodiff keeps), and the backward forms dh with relu_grad_matmul. Rounding as the
XLA program: the accumulator is rounded to bf16 first, the elementwise step runs in float32 and is rounded
once; all matmul outputs bf16.

One program per SM (persistent) loops over [BM, 2 x BN] output tiles: one memory warpgroup issues the TMA loads
of the K loop (3 or 4 buffers deep, running ahead into the next tile), two compute warpgroups each accumulate
one [BM, BN] half with wgmma and store it with their own TMA; two SMs (a cluster) share each weight tile.
A TMA store's read of shared memory is slow enough to show (every SM stores at about the same time): nothing
waits for it before the next tile's K loop has run (or, in the backward, half of it).
On a CPU (tests), `impl="jnp"` runs the same custom VJP with jnp stand-ins for the three kernels.
Under the trainer's mesh the kernels run per device (shard_map): rows over the batch axes, F over "tensor".
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from parcae.model.rope_norm import kernel_axes, kernel_batch_axes, kernel_batch_shards

BM, BN, STEPS, WGS = 128, 128, 3, 2   # launch shape (bench/fused_mlp.py measured STEPS 2 and 3)
# The kernels without an h operand (forward, pair): pipeline buffers and the epilogue's column piece per store
# (a [BM, 64] output buffer leaves shared memory for a fourth buffer). bench/RESULTS.md, session 26: (4, 64)
# against (3, BN): plain GEMM -4.3%, pair -3.9%, relu2 -0.3% at parcae-small's shape.
STEPS_NO_H, PIECE_NO_H = 4, 64
# The K step at which the backward fetches its h tile into the output buffer, once the previous tile's store
# has read that buffer (session 26: step 6 of 12 against 0, -7.6%); see `fetch_step`.
H_FETCH_STEP = 6
CLUSTER = 2                           # CTAs per cluster (row tiles 2i, 2i + 1) sharing each weight tile
# 1: the epilogue's output buffers tiled and swizzled as the operands' buffers. Unswizzled, every epilogue
# store (and the backward's h load) is an 8-way shared-memory bank conflict (session 32, from the PTX); on the
# H100 the swizzled kernels are correct (the GPU test) but no faster (session 33: every kernel within 0.7%,
# training +0.05%), so the conflicts are hidden and 0 stays the default.
OUT_SWIZZLE = 0
TK = 64                               # K step: one 128-byte swizzled row of bf16
# Mosaic GPU's in-kernel profiler (bench/mlp_profile.py). A directory turns it on:
# each kernel call then writes a Chrome trace into it (jax's CompilerParams.profile_dir) with one begin/end
# clock stamp (the SM's %clock, taken by thread 0 of each warpgroup) per region named with `_region` below.
# PROFILE_DETAIL 1: per tile the compute warpgroups' kloop and epilogue, and the final drain; 2: also the whole
# tile on every warpgroup (the memory warpgroup's too) and the epilogue's steps (h_wait, math, store_wait,
# smem_store, commit, tma_issue; the backward's h_fetch); 3: also each K step's wgmma (mma). The trace is kept
# in shared memory (16 bytes per region and warpgroup, 3 warpgroups, `profile_space` regions): at parcae-small's
# shape relu2 / pair at STEPS_NO_H = 4 (~3 KB of shared memory left) lower with detail 1 only, the backward
# with detail 2 (detail 3 at half the rows); more fails to lower. Off (""), no region exists: the kernels'
# jaxprs and PTX are unchanged.
PROFILE_DIR = ""
PROFILE_DETAIL = 2
# The epilogues' elementwise math in bf16 (packed bf16x2 max / mul on the GPU) instead of float32 with
# conversions each way: the same bits (0.5 * r is exact; each product of two bf16 values is rounded once
# either way), but the float32 epilogue's conversions made its math ~11-12% of the relu2 / pair / backward
# kernels' time (bench/mlp_profile.py, bench/RESULTS.md session 34).
EPILOGUE_BF16 = True
# One memory pipeline across a program's tiles (jax's pipeline_state START / STEADY / STOP) instead of one per
# tile, which lets the memory warpgroup load the next tile's first stages during this tile's epilogue instead
# of after its last stage is consumed (the refill the bf16 epilogue exposed: 12% of the backward's span,
# bench/RESULTS.md session 34: the same bits on the H100; relu2 -4.9%, backward -4.4%, pair -6.0%; training
# +0.7% in one A/B pair). Needs the K steps to divide by the stages (else per tile, as with 0).
CROSS_TILE = 1
# Output buffers per compute warpgroup for the kernels without an h operand (relu2, pair): with 2, a piece is
# written into one buffer while the previous piece's TMA store still reads the other (the wait before each write
# lets one store stay in flight), instead of waiting for every store to finish reading (the pair kernel's store
# waits: 17% of its span, bench/RESULTS.md session 34). Each tile's pieces (outputs x BN / piece) must divide
# by it. Two [BM, 32] buffers take the shared memory of one [BM, 64] (PIECE_NO_H = 32 at STEPS_NO_H = 4).
# Measured on the H100 (bench/RESULTS.md session 35): the same bits, no gain (relu2 +1.7% / pair 0% with two
# [BM, 32]; -0.2% / +3.5% with two [BM, 64] at 3 stages; training +0.1%): the stores' bandwidth sets the pace.
OUT_BUFFERS = 1


def _target_gpu():
  """The mesh in force's device (platform, kind, SM count) when it is not this machine's: the GPUs of a
  compile-only target (`parcae info --compile --target h100`); else None."""
  mesh = jax.sharding.get_abstract_mesh()
  dev = None if mesh.empty else getattr(mesh, "abstract_device", None)
  if dev is None or dev.device_kind == jax.devices()[0].device_kind:
    return None
  return dev.platform, dev.device_kind, dev.num_cores


def hopper() -> bool:
  """True when the program is traced for a Hopper GPU (H100 / H200): jax's default device of compute
  capability 9.x, or a compile-only target's H100s / H200s."""
  target = _target_gpu()
  if target is not None:
    return target[0] == "gpu" and any(f"H{n}" in target[1].split() for n in ("100", "200", "800"))
  dev = jax.devices()[0]
  return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def supported(m: int, k: int, n: int) -> bool:
  """Whole tiles: tokens % (128 x CLUSTER), K (model width) % 64 and F % 256 all zero."""
  return m % (BM * CLUSTER) == 0 and k % TK == 0 and n % (WGS * BN) == 0


# The elementwise steps in the operands' dtype, as the XLA path writes them (each product of two bf16 values is
# exact in float32 and rounded once, so the kernels' epilogues below, in float32 or in bf16, give the same bits).
@jax.custom_jvp
def relu2(x):
  """ReLU^2 with the reference's 0.5 factor: 0.5 * max(x, 0)^2. Its derivative is max(x, 0) itself, so the
  backward pass keeps that one array (autodiff of the formula keeps four of this size: the ReLU output, its
  tie mask and two products)."""
  r = jnp.maximum(x, 0)
  return 0.5 * r * r


@relu2.defjvp
def _relu2_jvp(primals, tangents):
  r = jnp.maximum(primals[0], 0)
  return 0.5 * r * r, r * tangents[0]


def _mask_product(da, h):
  return da * jnp.maximum(h, 0)


def _relu2_epilogue(a_bf16, _):
  if EPILOGUE_BF16:  # 0.5 * r exact in bf16, then one rounding of 0.5 * r * r: the float32 formula's bits
    r = jnp.maximum(a_bf16, jnp.bfloat16(0))
    return ((jnp.bfloat16(0.5) * r) * r,)
  r = jnp.maximum(a_bf16.astype(jnp.float32), 0.0)
  return ((0.5 * r * r).astype(jnp.bfloat16),)


def _pair_epilogue(a_bf16, _):
  return (a_bf16,) + _relu2_epilogue(a_bf16, _)


def _mask_product_epilogue(da_bf16, h_bf16):
  if EPILOGUE_BF16:  # one rounding of da * max(h, 0), as the float32 product's
    return (da_bf16 * jnp.maximum(h_bf16, jnp.bfloat16(0)),)
  return ((da_bf16.astype(jnp.float32) * jnp.maximum(h_bf16.astype(jnp.float32), 0.0)).astype(jnp.bfloat16),)


# ------------------------------------------------------------------------------------- Mosaic GPU kernels

def _region(name: str, level: int = 2):
  """A profiled region (jax.named_scope) when PROFILE_DIR is set and `level` <= PROFILE_DETAIL; else nothing."""
  return jax.named_scope(name) if PROFILE_DIR and level <= PROFILE_DETAIL else contextlib.nullcontext()


def profile_space(m: int, k: int, n: int, n_out: int, piece: int, fetch: bool, num_sms: int | None = None) -> int:
  """Regions per warpgroup that one call of a kernel records at PROFILE_DETAIL (an upper bound, + 2 for the
  trace's header): tiles per CTA x regions per tile (the compute warpgroups record the most) + the drain."""
  tiles = math.ceil(m // (BM * CLUSTER) * (n // (WGS * BN)) / ((num_sms or _num_sms()) // CLUSTER))
  per_tile = 2                                             # kloop, epilogue
  if PROFILE_DETAIL >= 2:
    per_tile += 2 + 2 * fetch + 4 * n_out * (BN // piece)  # tile, math, h_fetch + h_wait, 4 per stored piece
  if PROFILE_DETAIL >= 3:
    per_tile += k // TK                                    # one per K step
  return tiles * per_tile + 1 + 2


def _ws_gemm(operands, k, n, epilogue, trans_b, n_out=1, steps=None, piece=BN, tile_fn=None, out_types=None,
             tile_scratch=(), tile_fetch=None, out_rows=BM):
  """Warp-specialized [M, n] = operands[0] @ operands[1] (or its transpose, [n, k]); `epilogue` maps the bf16
  accumulator tile (and the backward's h tile) to the n_out output tiles, stored one after another.
  tile_fn (default `_tile_epilogue`, same keywords) runs a compute warpgroup's tile instead: its own epilogue and
  stores into the outputs out_types (default n_out bf16 [M, n]); operands past the third are its own (GMEM refs).
  With it: tile_scratch, more scratch (its refs reach tile_fn as `extra`); tile_fetch(in_gmem, extra, rows, wg),
  a K-step hook (as the backward's h fetch); out_rows, the rows of each output buffer (default BM).

  One program per SM, looping over the [BM, 2 x BN] output tiles (n fastest: consecutive tiles share the
  x rows): with CROSS_TILE the memory warpgroup issues the next tile's first loads while the compute
  warpgroups run this tile's epilogue (without, it waits for the last stage's release first), and each tile's
  store completes during the next tile's K loop. A cluster of CLUSTER = c CTAs (c SMs) takes row tiles
  ci .. ci + c - 1 of the same columns: each loads 1/c of the shared weight tile and multicasts it to all
  (TMA); c = 2 reads a third less from L2 per tile than c = 1."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  m, wide, steps = operands[0].shape[0], WGS * BN, steps or STEPS
  has_h = len(operands) == 3 and tile_fn is None  # the backward's h operand (fetched into the output buffer)
  if BN % piece or (has_h and piece != BN):
    raise ValueError(f"epilogue piece {piece} must divide {BN} (and be {BN} with an h operand, which fills the "
                     "whole buffer)")
  nbuf = 1 if has_h or tile_fn else OUT_BUFFERS  # the backward fetches h into its one buffer
  if (n_out * BN // piece) % nbuf:
    raise ValueError(f"OUT_BUFFERS {nbuf}: each tile's {n_out * BN // piece} stored pieces (outputs x {BN} / piece "
                     f"{piece}) must divide by the buffers; use 1 or 2 buffers with an even count of pieces")
  if OUT_SWIZZLE and piece % TK:
    raise ValueError(f"epilogue piece {piece}: swizzled output buffers (OUT_SWIZZLE) take whole {TK}-column "
                     f"swizzle tiles; use a piece of {TK} or {BN}, or OUT_SWIZZLE = 0")
  n_tiles = n // wide
  tf = (plgpu.TilingTransform((8, TK)), plgpu.SwizzleTransform(2 * TK))
  shared = ("cluster",) if CLUSTER > 1 else ()
  specs = [plgpu.BlockSpec((BM, TK), lambda s: (0, s), transforms=tf),
           plgpu.BlockSpec((wide, TK), lambda s: (0, s), transforms=tf, collective_axes=shared) if trans_b else
           plgpu.BlockSpec((TK, wide), lambda s: (s, 0), transforms=tf, collective_axes=shared)]

  def pipeline(compute, wg, before_step=None, state=None):
    return plgpu.emit_pipeline_warp_specialized(
        _mma_body(pl.ds(wg * BN, BN), trans_b, before_step), grid=(k // TK,), in_specs=specs,
        compute_context=compute, max_concurrent_steps=steps, num_compute_wgs=WGS, memory_registers=40,
        memory_thread_idx=WGS, wg_axis="wg", **({} if state is None else dict(pipeline_state=state)))

  out_types = out_types or (jax.ShapeDtypeStruct((m, n), jnp.bfloat16),) * n_out
  n_out = len(out_types)

  def kernel(*refs):
    n_in = len(operands)
    in_gmem, o_gmem = refs[:n_in], refs[n_in:n_in + n_out]
    o_smem, barrier = refs[n_in + n_out], refs[n_in + n_out + 1]
    extra = refs[n_in + n_out + 2:]
    wg = lax.axis_index("wg")
    cta = lax.axis_index("cluster") if CLUSTER > 1 else 0

    def tiles(allocs):
      @plgpu.nd_loop((m // (BM * CLUSTER) * n_tiles,), collective_axes="sm")
      def _tile(info):
        (t,) = info.index
        mi, ni = lax.div(t, n_tiles) * CLUSTER + cta, lax.rem(t, n_tiles)
        rows, out_cols = pl.ds(mi * BM, BM), pl.ds(ni * wide + wg * BN, BN)

        compute = functools.partial(tile_fn or _tile_epilogue, epilogue=epilogue, in_gmem=in_gmem, o_gmem=o_gmem,
                                    o_smem=o_smem, barrier=barrier, wg=wg, rows=rows, cols=out_cols, piece=piece,
                                    nbuf=nbuf)
        x_rows = in_gmem[0].at[pl.ds(mi * BM, BM), :]
        w_cols = in_gmem[1].at[pl.ds(ni * wide, wide), :] if trans_b else in_gmem[1].at[:, pl.ds(ni * wide, wide)]
        fetch = tile_fetch(in_gmem, extra, rows, wg) if tile_fetch else None
        if tile_fn:
          compute = functools.partial(compute, extra=extra)
        if has_h:  # the backward's h tile into the output buffer once the last store has read it
          fetch = functools.partial(_fetch_h, in_gmem[2].at[rows, out_cols], o_smem.at[wg, 0], barrier.at[wg],
                                    fetch_step(k // TK))
        run = lambda state=None: pipeline(compute, wg, fetch, state)(x_rows, w_cols, allocations=allocs)
        with _region("tile"):
          if not CROSS_TILE or (k // TK) % steps:
            run()
          else:  # one pipeline across the program's tiles: START, STEADY..., STOP (a lone tile: a whole one)
            first, last = info.local_index == 0, info.local_index == info.num_local_steps - 1
            pl.when(first & last)(run)
            pl.when(first & ~last)(lambda: run(plgpu.PipelinePipeline.START))
            pl.when(~first & ~last)(lambda: run(plgpu.PipelinePipeline.STEADY))
            pl.when(~first & last)(lambda: run(plgpu.PipelinePipeline.STOP))

    ignore = lambda *_, **__: None
    pl.run_scoped(tiles, pipeline(ignore, wg).get_allocations(*in_gmem[:2]), collective_axes="wg")
    with _region("drain", 1):
      plgpu.wait_smem_to_gmem(0)

  profile = {}
  if PROFILE_DIR:
    space = profile_space(m, k, n, n_out, piece, has_h)
    profile = dict(compiler_params=plgpu.CompilerParams(profile_space=space, profile_dir=PROFILE_DIR))

  return plgpu.kernel(
      kernel, out_type=tuple(out_types),
      scratch_types=[plgpu.SMEM((WGS, nbuf, out_rows, piece), jnp.bfloat16,
                                **(dict(transforms=tf) if OUT_SWIZZLE else {})),
                     plgpu.Barrier(num_barriers=WGS), *tile_scratch],
      grid=(_num_sms() // CLUSTER,), grid_names=("sm",), num_threads=WGS + 1, thread_name="wg",
      **(dict(cluster=(CLUSTER,), cluster_names=("cluster",)) if CLUSTER > 1 else {}), **profile)(*operands)


def fetch_step(k_steps: int) -> int:
  """The K step at which the backward fetches h: H_FETCH_STEP, but at most half-way through a shorter K loop
  (a step past the loop's end would leave the epilogue waiting for an h that never comes)."""
  return min(H_FETCH_STEP, k_steps // 2)


def _fetch_h(h_gmem, h_smem, barrier, at, step):
  """At K step `at`: wait until the previous tile's store has read the buffer, then fetch h into it."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  @pl.when(step == at)
  def _():
    with _region("h_fetch"):
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.copy_gmem_to_smem(h_gmem, h_smem, barrier)


def _tile_epilogue(run, *, epilogue, in_gmem, o_gmem, o_smem, barrier, wg, rows, cols, piece, nbuf):
  """Compute warpgroup wg's part of one tile: `run` (the K loop) into its [BM, BN] accumulator, then the
  epilogue's output tiles, `piece` columns at a time, through its nbuf shared-memory buffers o_smem[wg] in
  turn to GMEM[rows, cols] (the backward's h tile is fetched into its one buffer during the K loop:
  `_fetch_h`). A buffer's previous store must have read it before it is written again: stores complete in
  issue order, so at most nbuf - 1 may still be reading (a tile's pieces divide by nbuf: the first piece
  takes buffer 0, whose store is the oldest). Waiting for the previous tile's stores at the tile's start
  instead of before the first write cost the forward kernels 1-3% (bench/RESULTS.md, session 26)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  fetch = len(in_gmem) == 3
  with _region("kloop", 1):
    acc = run(plgpu.layout_cast(jnp.zeros((BM, BN), jnp.float32), plgpu.Layout.WGMMA))
  with _region("epilogue", 1):
    h = None
    if fetch:
      with _region("h_wait"):
        plgpu.barrier_wait(barrier.at[wg])
        h = plgpu.load(o_smem.at[wg, 0], (), layout=plgpu.Layout.WGMMA, optimized=False)
    with _region("math"):
      tiles = epilogue(acc.astype(jnp.bfloat16), h)
    for i, tile in enumerate(tiles):
      for j in range(BN // piece):
        buf = o_smem.at[wg, (i * (BN // piece) + j) % nbuf]
        if i or j or not fetch:
          with _region("store_wait"):
            plgpu.wait_smem_to_gmem(nbuf - 1, wait_read_only=True)  # this buffer's last store has read it
        with _region("smem_store"):
          buf[...] = tile if piece == BN else tile[:, j * piece:(j + 1) * piece]
        with _region("commit"):
          plgpu.commit_smem()
        with _region("tma_issue"):
          plgpu.copy_smem_to_gmem(buf, o_gmem[i].at[rows, pl.ds(cols.start + j * piece, piece)])


def _mma_body(cols, trans_b, before_step=None):
  """One K step of a compute warpgroup: its BN columns of the weight tile into the accumulator (after
  `before_step(step)`, if given)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top

  def body(idx, x_smem, w_smem, acc):
    if before_step is not None:
      before_step(idx[0])
    b = plgpu.transpose_ref(w_smem.at[cols, :], (1, 0)) if trans_b else w_smem.at[:, cols]

    def mma(acc_ref):
      plgpu.wgmma(acc_ref, x_smem, b)
    with _region("mma", 3):
      return pl.run_state(mma)(plgpu.ACC.init(acc))
  return body


def _num_sms() -> int:
  """SMs of the GPU the kernel is traced for (132 when lowering on a CPU without a target: an H100's)."""
  target, dev = _target_gpu(), jax.devices()[0]
  if target is not None and target[2]:
    return target[2]
  return dev.core_count if dev.platform == "gpu" else 132


def _check(m, k, n, x, what):
  if x.dtype != jnp.bfloat16 or not supported(m, k, n):
    raise ValueError(f"{what}: the Mosaic GPU kernel needs bf16 operands and whole tiles (tokens per device % "
                     f"{BM * CLUSTER}, width % {TK}, F % {WGS * BN}); got {x.dtype} (m={m}, k={k}, n={n}). Use "
                     "model.mlp_impl='xla'")


def _relu2_matmul_mosaic(x_MxK, w_KxN):
  (m, k), n = x_MxK.shape, w_KxN.shape[1]
  _check(m, k, n, x_MxK, "relu2_matmul")
  return _ws_gemm((x_MxK, w_KxN), k, n, _relu2_epilogue, trans_b=False, steps=STEPS_NO_H, piece=PIECE_NO_H)[0]


def _pair_matmul_mosaic(x_MxK, w_KxN):
  (m, k), n = x_MxK.shape, w_KxN.shape[1]
  _check(m, k, n, x_MxK, "pair_matmul")
  return _ws_gemm((x_MxK, w_KxN), k, n, _pair_epilogue, trans_b=False, n_out=2, steps=STEPS_NO_H, piece=PIECE_NO_H)


def _relu_grad_matmul_mosaic(g_MxK, w_NxK, h_MxN):
  (m, k), n = g_MxK.shape, w_NxK.shape[0]
  _check(m, k, n, g_MxK, "relu_grad_matmul")
  return _ws_gemm((g_MxK, w_NxK, h_MxN), k, n, _mask_product_epilogue, trans_b=True)[0]


def _pair_jnp(x, w):
  h = jnp.dot(x, w)
  return h, relu2(h)


# (relu2_matmul, relu_grad_matmul, pair_matmul) per implementation
KERNELS = {
    "mosaic": (_relu2_matmul_mosaic, _relu_grad_matmul_mosaic, _pair_matmul_mosaic),
    "jnp": (lambda x, w: relu2(jnp.dot(x, w)), lambda g, w, h: _mask_product(jnp.dot(g, w.T), h), _pair_jnp),
}
# The forward under differentiation through pair_matmul (h and relu2(h) from one accumulator) instead of XLA's
# GEMM and separate ReLU^2 (bench/fused_mlp.py, op "pair": 0.309 against 0.338 ms at parcae-small's shapes).
FWD_PAIR = True


def _per_device(fn, args, specs, out_spec):
  """fn per device under the trainer's mesh (rows over the batch axes, F over "tensor"); else fn itself."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = kernel_axes(mesh)
  if not axes:
    return fn(*args)
  batch = kernel_batch_axes(mesh) or None
  tensor = "tensor" if "tensor" in axes else None
  fill = lambda spec: P(*[batch if s == "B" else tensor if s == "T" else None for s in spec])
  outs = tuple(fill(s) for s in out_spec) if isinstance(out_spec, tuple) else fill(out_spec)
  return jax.shard_map(fn, in_specs=tuple(fill(s) for s in specs), out_specs=outs,
                       axis_names=set(axes), check_vma=False)(*args)


def _call(which, impl, args, specs, out_specs):
  """KERNELS[impl][which] per device. specs / out_specs: one per array, "R." or "RT" for token rows [..., X]
  (X replicated or over "tensor"), else a weight's 2-letter spec. The Mosaic kernels take 2-D rows (leading
  axes flattened); the "jnp" stand-ins run on the arrays' own shapes (the dots the XLA path writes)."""
  lead = next(x.shape[:-1] for x, spec in zip(args, specs) if spec[0] == "R")
  flat = impl != "jnp"
  if flat:
    args = [x.reshape(-1, x.shape[-1]) if spec[0] == "R" else x for x, spec in zip(args, specs)]
  rows = lambda spec: ("B" + "." * (0 if flat else len(lead) - 1) + spec[1]) if spec[0] == "R" else spec
  outs = _per_device(KERNELS[impl][which], args, tuple(map(rows, specs)),
                     tuple(map(rows, out_specs)) if len(out_specs) > 1 else rows(out_specs[0]))
  outs = outs if len(out_specs) > 1 else (outs,)
  outs = tuple(o.reshape(*lead, -1) for o in outs) if flat else outs
  return outs if len(out_specs) > 1 else outs[0]


def relu2_matmul(x_NxK, w_KxF, impl="mosaic"):
  """relu2(x @ w) in bf16 for x [..., K], per device."""
  return _call(0, impl, (x_NxK, w_KxF), ("R.", ".T"), ("RT",))


def relu_grad_matmul(g_NxK, w_FxK, h_NxF, impl="mosaic"):
  """bf16(g @ w^T) * max(h, 0) in bf16 for g [..., K], h [..., F], per device."""
  return _call(1, impl, (g_NxK, w_FxK, h_NxF), ("R.", "T.", "RT"), ("RT",))


def pair_matmul(x_NxK, w_KxF, impl="mosaic"):
  """(x @ w, relu2(x @ w)) in bf16 for x [..., K], per device."""
  return _call(2, impl, (x_NxK, w_KxF), ("R.", ".T"), ("RT", "RT"))


# ---------------------------------------------------------------------------------------- the MLP

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def relu2_mlp(x_NxD, w1_DxF, w2_FxD, impl="mosaic"):
  """relu2(x @ w1) @ w2 for bf16 x [..., D], w1 [D, F], w2 [F, D]; the ReLU^2 inside the first GEMM."""
  return jnp.dot(relu2_matmul(x_NxD, w1_DxF, impl), w2_FxD)


def _relu2_mlp_fwd(x_NxD, w1_DxF, w2_FxD, impl):
  if FWD_PAIR:
    h_NxF, a_NxF = pair_matmul(x_NxD, w1_DxF, impl)
  else:
    h_NxF = jnp.dot(x_NxD, w1_DxF)
    a_NxF = relu2(h_NxF)
  return jnp.dot(a_NxF, w2_FxD), (x_NxD, w1_DxF, w2_FxD, h_NxF, a_NxF)


def _relu2_mlp_bwd(impl, res, dy_NxD):
  x_NxD, w1_DxF, w2_FxD, h_NxF, a_NxF = res
  dy_NxD = dy_NxD.astype(x_NxD.dtype)
  dh_NxF = relu_grad_matmul(dy_NxD, w2_FxD, h_NxF, impl)
  lead = list(range(x_NxD.ndim - 1))
  weight_grad = lambda a, b: jnp.tensordot(a, b, axes=(lead, lead))  # as autodiff of jnp.dot transposes
  return jnp.dot(dh_NxF, w1_DxF.T), weight_grad(x_NxD, dh_NxF), weight_grad(a_NxF, dy_NxD)


relu2_mlp.defvjp(_relu2_mlp_fwd, _relu2_mlp_bwd)


def shapes_ok(n_rows: int, d: int, f: int) -> bool:
  """Whether each device's kernel calls are whole tiles under the mesh in force: its share of the n_rows tokens
  (split over the batch axes) and of F (split over "tensor")."""
  mesh = jax.sharding.get_abstract_mesh()
  axes = kernel_axes(mesh)
  shards = kernel_batch_shards(mesh)
  tensor = mesh.shape["tensor"] if "tensor" in axes else 1
  return n_rows % shards == 0 and f % tensor == 0 and supported(n_rows // shards, d, f // tensor)
