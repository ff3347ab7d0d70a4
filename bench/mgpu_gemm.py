"""Mosaic GPU (wgmma + TMA) GEMMs with the ReLU^2 epilogue, for bench/fused_mlp.py."""
import functools
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

SWIZZLE = 128  # bytes: 64 bf16 per swizzled row; also the K step


def _epilogue(acc_f32, act):
  if act is None:
    return acc_f32.astype(jnp.bfloat16)
  h = acc_f32.astype(jnp.bfloat16).astype(jnp.float32)
  r = jnp.maximum(h, 0.0)
  return (0.5 * r * r).astype(jnp.bfloat16)


def _transforms():
  elems = SWIZZLE // 2
  return (plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(SWIZZLE))


@functools.partial(jax.jit, static_argnames=("act", "tile_m", "tile_n", "steps"))
def mgpu_basic(x, w, act=None, tile_m=128, tile_n=128, steps=4):
  """One warpgroup per [tile_m, tile_n] output tile; K loads pipelined `steps` deep, each wgmma awaited."""
  (m, k), n = x.shape, w.shape[1]
  tk = SWIZZLE // 2

  def kernel(x_gmem, w_gmem, o_gmem, o_smem, acc):
    i, j = pl.program_id(0), pl.program_id(1)

    def step(_, x_smem, w_smem):
      plgpu.wgmma(acc, x_smem, w_smem)
      plgpu.wgmma_wait(0)  # the next copy may overwrite this step's buffers

    plgpu.emit_pipeline(
        step, grid=(k // tk,),
        in_specs=[plgpu.BlockSpec((tile_m, tk), lambda s: (i, s), transforms=_transforms()),
                  plgpu.BlockSpec((tk, tile_n), lambda s: (s, j), transforms=_transforms())],
        max_concurrent_steps=steps)(x_gmem, w_gmem)
    o_smem[...] = _epilogue(acc[...], act)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * tile_m, tile_m), pl.ds(j * tile_n, tile_n)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
      scratch_shapes=dict(o_smem=plgpu.SMEM((tile_m, tile_n), jnp.bfloat16),
                          acc=plgpu.ACC((tile_m, tile_n), jnp.float32)),
      grid=(m // tile_m, n // tile_n), grid_names=("m", "n"))(x, w)


@functools.partial(jax.jit, static_argnames=("act", "tile_m", "tile_n", "steps", "wgs"))
def mgpu_ws(x, w, act=None, tile_m=128, tile_n=128, steps=3, wgs=2):
  """Warp-specialized: one memory warpgroup issues the copies, `wgs` compute warpgroups each own a
  [tile_m, tile_n] slice of a [tile_m, wgs * tile_n] output tile (the x tile shared)."""
  (m, k), n = x.shape, w.shape[1]
  tk = SWIZZLE // 2
  wide = wgs * tile_n

  def kernel(x_gmem, w_gmem, o_gmem, o_smem):
    wg = lax.axis_index("wg")
    cols = pl.ds(wg * tile_n, tile_n)
    i, j = pl.program_id(0), pl.program_id(1)

    def compute(pipeline):
      acc0 = plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32), plgpu.Layout.WGMMA)
      acc = pipeline(acc0)
      o_smem[:, cols] = _epilogue(acc, act)

    def body(_, x_smem, w_smem, acc):
      def mma(acc_ref):
        plgpu.wgmma(acc_ref, x_smem, w_smem.at[:, cols])
      return pl.run_state(mma)(plgpu.ACC.init(acc))

    plgpu.emit_pipeline_warp_specialized(
        body, grid=(k // tk,),
        in_specs=[plgpu.BlockSpec((tile_m, tk), lambda s: (i, s), transforms=_transforms()),
                  plgpu.BlockSpec((tk, wide), lambda s: (s, j), transforms=_transforms())],
        compute_context=compute, max_concurrent_steps=steps, num_compute_wgs=wgs,
        memory_registers=40, memory_thread_idx=wgs, wg_axis="wg")(x_gmem, w_gmem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * tile_m, tile_m), pl.ds(j * wide, wide)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
      scratch_shapes=dict(o_smem=plgpu.SMEM((tile_m, wide), jnp.bfloat16)),
      grid=(m // tile_m, n // wide), grid_names=("m", "n"), num_threads=wgs + 1, thread_name="wg")(x, w)


@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "steps", "wgs"))
def mgpu_ws_relu_grad(g, w2, h, tile_m=128, tile_n=128, steps=2, wgs=2):
  """(g @ w2^T) * max(h, 0), warp-specialized as mgpu_ws: w2 [N, K] tiles are transposed views for wgmma; each
  compute warpgroup fetches its h slice into the output buffer while the K loop runs."""
  (m, k), n = g.shape, w2.shape[0]
  tk = SWIZZLE // 2
  wide = wgs * tile_n

  def kernel(g_gmem, w_gmem, h_gmem, o_gmem, o_smem, h_barrier):
    wg = lax.axis_index("wg")
    cols = pl.ds(wg * tile_n, tile_n)
    i, j = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * tile_m, tile_m)

    def compute(pipeline):
      plgpu.copy_gmem_to_smem(h_gmem.at[rows, pl.ds(j * wide + wg * tile_n, tile_n)], o_smem.at[:, cols],
                              h_barrier.at[wg])
      acc0 = plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32), plgpu.Layout.WGMMA)
      acc = pipeline(acc0)
      plgpu.barrier_wait(h_barrier.at[wg])
      hv = plgpu.load(o_smem.at[:, cols], (), layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)
      da = acc.astype(jnp.bfloat16).astype(jnp.float32)
      o_smem[:, cols] = (da * jnp.maximum(hv, 0.0)).astype(jnp.bfloat16)

    def body(_, g_smem, w_smem, acc):
      def mma(acc_ref):
        plgpu.wgmma(acc_ref, g_smem, plgpu.transpose_ref(w_smem.at[cols, :], (1, 0)))
      return pl.run_state(mma)(plgpu.ACC.init(acc))

    plgpu.emit_pipeline_warp_specialized(
        body, grid=(k // tk,),
        in_specs=[plgpu.BlockSpec((tile_m, tk), lambda s: (i, s), transforms=_transforms()),
                  plgpu.BlockSpec((wide, tk), lambda s: (j, s), transforms=_transforms())],
        compute_context=compute, max_concurrent_steps=steps, num_compute_wgs=wgs,
        memory_registers=40, memory_thread_idx=wgs, wg_axis="wg")(g_gmem, w_gmem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[rows, pl.ds(j * wide, wide)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_shape=jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
      scratch_shapes=dict(o_smem=plgpu.SMEM((tile_m, wide), jnp.bfloat16),
                          h_barrier=plgpu.Barrier(num_barriers=wgs)),
      grid=(m // tile_m, n // wide), grid_names=("m", "n"), num_threads=wgs + 1, thread_name="wg")(g, w2, h)
