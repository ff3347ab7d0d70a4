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


def _ws_gemm(operands, specs, k_steps, epilogue, out_shape, tile_m, tile_n, steps, wgs, trans_b=False,
             extra_scratch=None):
  """Warp-specialized GEMM: one memory warpgroup issues the TMA loads of `specs` over k_steps; `wgs` compute
  warpgroups each accumulate a [tile_m, tile_n] slice of the program's [tile_m, wgs * tile_n] output tile (the
  x tile shared), apply epilogue(acc, wg, gmem refs, scratch) and store their slice with their own TMA."""
  wide = wgs * tile_n
  n_in = len(operands)

  def kernel(*refs):
    in_gmem, o_gmem, o_smem = refs[:n_in], refs[n_in], refs[n_in + 1]
    scratch = refs[n_in + 2:]
    wg = lax.axis_index("wg")
    cols = pl.ds(wg * tile_n, tile_n)
    i, j = pl.program_id(0), pl.program_id(1)
    out_cols = pl.ds(j * wide + wg * tile_n, tile_n)

    def compute(pipeline):
      start = epilogue.start(in_gmem, o_smem.at[wg], scratch, wg, i, out_cols)
      acc = pipeline(plgpu.layout_cast(jnp.zeros((tile_m, tile_n), jnp.float32), plgpu.Layout.WGMMA))
      o_smem[wg] = epilogue(acc, o_smem.at[wg], scratch, wg, start)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[pl.ds(i * tile_m, tile_m), out_cols])
      plgpu.wait_smem_to_gmem(0)

    def body(_, x_smem, w_smem, acc):
      b = plgpu.transpose_ref(w_smem.at[cols, :], (1, 0)) if trans_b else w_smem.at[:, cols]
      def mma(acc_ref):
        plgpu.wgmma(acc_ref, x_smem, b)
      return pl.run_state(mma)(plgpu.ACC.init(acc))

    plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_steps,), in_specs=specs, compute_context=compute, max_concurrent_steps=steps,
        num_compute_wgs=wgs, memory_registers=40, memory_thread_idx=wgs, wg_axis="wg")(*in_gmem[:2])

  scratch = [plgpu.SMEM((wgs, tile_m, tile_n), jnp.bfloat16)] + list(extra_scratch or ())
  grid = (out_shape.shape[0] // tile_m, out_shape.shape[1] // wide)
  return plgpu.kernel(kernel, out_shape=out_shape, scratch_shapes=scratch, grid=grid, grid_names=("m", "n"),
                      num_threads=wgs + 1, thread_name="wg")(*operands)


class _Act:
  """Forward epilogue: bf16 GEMM output, or ReLU^2 of it."""

  def __init__(self, act):
    self.act = act

  def start(self, *unused):
    return None

  def __call__(self, acc, *unused):
    return _epilogue(acc, self.act)


class _ReluGrad:
  """Backward epilogue: bf16(acc) * max(h, 0); the h slice is fetched into the output buffer during the K loop."""

  def start(self, in_gmem, o_slice, scratch, wg, i, out_cols):
    tile_m = o_slice.shape[0]
    plgpu.copy_gmem_to_smem(in_gmem[2].at[pl.ds(i * tile_m, tile_m), out_cols], o_slice, scratch[0].at[wg])

  def __call__(self, acc, o_slice, scratch, wg, unused):
    plgpu.barrier_wait(scratch[0].at[wg])
    h = plgpu.load(o_slice, (), layout=plgpu.Layout.WGMMA, optimized=False).astype(jnp.float32)
    return (acc.astype(jnp.bfloat16).astype(jnp.float32) * jnp.maximum(h, 0.0)).astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnames=("act", "tile_m", "tile_n", "steps", "wgs"))
def mgpu_ws(x, w, act=None, tile_m=128, tile_n=128, steps=3, wgs=2):
  """x @ w (act=None) or relu2 of it, warp-specialized (_ws_gemm)."""
  (m, k), n = x.shape, w.shape[1]
  tk = SWIZZLE // 2
  specs = [plgpu.BlockSpec((tile_m, tk), lambda s: (pl.program_id(0), s), transforms=_transforms()),
           plgpu.BlockSpec((tk, wgs * tile_n), lambda s: (s, pl.program_id(1)), transforms=_transforms())]
  return _ws_gemm((x, w), specs, k // tk, _Act(act), jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
                  tile_m, tile_n, steps, wgs)


@functools.partial(jax.jit, static_argnames=("tile_m", "tile_n", "steps", "wgs"))
def mgpu_ws_relu_grad(g, w2, h, tile_m=128, tile_n=128, steps=2, wgs=2):
  """(g @ w2^T) * max(h, 0): w2 [N, K] tiles are transposed views for wgmma (_ws_gemm)."""
  (m, k), n = g.shape, w2.shape[0]
  tk = SWIZZLE // 2
  specs = [plgpu.BlockSpec((tile_m, tk), lambda s: (pl.program_id(0), s), transforms=_transforms()),
           plgpu.BlockSpec((wgs * tile_n, tk), lambda s: (pl.program_id(1), s), transforms=_transforms())]
  return _ws_gemm((g, w2, h), specs, k // tk, _ReluGrad(), jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
                  tile_m, tile_n, steps, wgs, trans_b=True, extra_scratch=[plgpu.Barrier(num_barriers=wgs)])
