"""A ping-pong Hopper GEMM for the MLP's first layer, to time against the library's cooperative kernels.

bench/RESULTS.md, session 30: the library's Mosaic GPU MLP kernels (parcae/model/mlp_kernels.py) run their K
loop at cuBLAS's pace, but a third of the backward's and 43% of the pair kernel's time at parcae-small's shape
is fixed per output tile: both compute warpgroups work on one tile, so the tensor cores idle while they store it.
Here each compute warpgroup owns whole [128, 128] tiles (warpgroup 0 the even tiles of the program's pairs, 1
the odd ones) and a schedule barrier lets only one run its K loop at a time: one stores its tile while the
other's wgmmas run (the ping-pong schedule of CUTLASS and FlashAttention-3). The memory warpgroup feeds each
compute warpgroup its own ring of S stages, in the order the K loops consume them: the other warpgroup's first
S stages are loaded during this one's K loop, so it starts without waiting.

On the H100 (bench/RESULTS.md, session 31) the fixed part per tile halved but the K loop ran 33-71% slower than
the library's, with one wgmma left in flight per step as without (kept: without): every op lost. Session 32: its
K loops alone (op kloop) run at 745 TF/s, faster than the library's GEMM; what costs it is its stores, whose
unswizzled shared-memory writes are 8-way bank conflicts (the PTX). Session 33: `out_swizzle` removes the
conflicts and changes nothing (GEMM 0.2806 -> 0.2857 ms, backward 0.3862 -> 0.3839), so they are not the cost.

Not in the library: bench-only until it beats the cooperative kernels on the GPU (each Mosaic barrier tracks its
phase per thread, so every barrier here is waited on by exactly one side at each of its completions). Its doubt:
without a cluster and with each warpgroup loading its own x slice it moves twice the library's bytes per FLOP
from L2 (bench/RESULTS.md, session 30, section 6); --cluster 2 shares each weight slice between two SMs (TMA
multicast) as the library does. Ops: gemm, fwd (relu2), pair (h and relu2(h)), bwd ((g @ w2^T) * max(h, 0),
h fetched during the K loop into the warpgroup's output buffer).

  python3 bench/pingpong_mlp.py                    # parcae-small's shape and 2x K: ping-pong, library, XLA
  python3 bench/pingpong_mlp.py --cluster 2 --stages 3 --piece 64 --sustain 2
  python3 bench/pingpong_mlp.py --ops kloop,gemm,bwd --impls library,pingpong,concurrent   # what limits its K loop
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from fused_mlp import SHAPES, XLA, operands, reference  # noqa: E402
from profiling import sustained, sustained_text, timed  # noqa: E402
from parcae.model import mlp_kernels  # noqa: E402

TM, TN, TK = 128, 128, 64   # a compute warpgroup's tile; the K step (one 128-byte swizzled row of bf16)
# pylint: disable=protected-access
EPILOGUES = {"gemm": lambda a, _: (a,), "fwd": mlp_kernels._relu2_epilogue, "pair": mlp_kernels._pair_epilogue,
             "bwd": mlp_kernels._mask_product_epilogue,   # bwd: (g @ w2^T) * max(h, 0), w2 [N, K]
             "kloop": lambda a, _: ()}   # the K loops alone: nothing stored (its output is left unwritten)
SCHEDULES = ("pingpong", "concurrent")
# pylint: enable=protected-access


def pingpong(x_MxK, w, op="fwd", stages=3, piece=64, cluster=1, num_sms=None, interpret=False, h_MxN=None,
             trans_b=None, schedule="pingpong", out_swizzle=False):
  """EPILOGUES[op] of bf16(x @ w): a tuple of [M, N] bf16 arrays, one program per SM (num_sms programs;
  interpret: Pallas' interpreter, on a CPU). op "bwd": w is [N, K] (the product is x @ w^T) and h_MxN the
  forward's h, fetched into the warpgroup's output buffer during its K loop (as the library's backward does);
  trans_b=False takes w as [K, N] instead (the interpreter has no transposed wgmma operand). cluster = c > 1:
  c SMs take the row tiles ci .. ci + c - 1 of the same columns and share each weight slice (each loads 1/c of
  it and multicasts it, as the library's kernels do); a stage is reloaded only when every SM of the cluster has
  consumed it (the interpreter cannot run it). schedule "concurrent": the same tiles, rings and epilogues
  without the schedule barrier, both warpgroups' K loops at once (their stages loaded alternately), to tell one
  warpgroup's stream of wgmmas from the rings as what limits the ping-pong's K loop. out_swizzle: the output
  buffers tiled and swizzled as the operands' (the epilogue's register stores without bank conflicts)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  if op not in EPILOGUES:
    raise ValueError(f"pingpong: unknown op {op!r}; use one of {sorted(EPILOGUES)}")
  if schedule not in SCHEDULES:
    raise ValueError(f"pingpong: unknown schedule {schedule!r}; use one of {SCHEDULES}")
  ping = schedule == "pingpong"
  fetch = op == "bwd"
  trans_b = fetch if trans_b is None else trans_b
  (m, k), n = x_MxK.shape, w.shape[0 if trans_b else 1]
  ks, n_cols, s = k // TK, n // TN, stages
  if m % (TM * cluster) or n % TN or k % TK or ks < s or TN % piece or (fetch and piece != TN):
    raise ValueError(f"pingpong: needs M % {TM * cluster}, N % {TN}, K % {TK}, K / {TK} >= stages and "
                     f"{TN} % piece == 0 (piece {TN} for bwd, whose h fills the output buffer)")
  fetch_at = mlp_kernels.fetch_step(ks)
  n_tiles = m // (TM * cluster) * n_cols   # tiles of [cluster x TM, TN], one [TM, TN] row tile per SM
  n_pairs = -(-n_tiles // 2)
  grid = (num_sms or mlp_kernels._num_sms()) // cluster  # pylint: disable=protected-access
  epilogue = EPILOGUES[op]
  n_out = len(epilogue(jnp.zeros((8, 8), jnp.bfloat16), jnp.zeros((8, 8), jnp.bfloat16)))
  n_alloc = max(n_out, 1)   # "kloop" stores nothing but returns one (unwritten) array
  tf = (plgpu.TilingTransform((8, TK)), plgpu.SwizzleTransform(2 * TK))
  shared = dict(collective_axes="cluster") if cluster > 1 else {}
  consumed_type = (functools.partial(plgpu.ClusterBarrier, collective_axes=("cluster",)) if cluster > 1 else
                   plgpu.Barrier)

  def kernel(x_gmem, w_gmem, *refs):
    h_gmem, refs = (refs[0], refs[1:]) if fetch else (None, refs)
    outs = refs[:n_out]
    x_smem, w_smem, o_smem, full_x, full_w, consumed, sched, full_h = refs[n_alloc:]
    wg, sm = lax.axis_index("wg"), lax.axis_index("sm")
    cta = lax.axis_index("cluster") if cluster > 1 else 0
    n_local = lax.div(n_pairs - sm + grid - 1, grid)   # pairs p = sm, sm + grid, ... of this program

    def tile(w_i, q):  # (row, column) tile of warpgroup w_i in local pair q, and whether it exists
      t = 2 * (sm + q * grid) + w_i
      return lax.div(t, n_cols) * cluster + cta, lax.rem(t, n_cols), t < n_tiles

    def slot(w_i, q, kk):  # warpgroup w_i's ring: its K steps in order, S stages
      return w_i * s + lax.rem(q * ks + kk, s)

    def load(w_i, q, kk):
      mi, ni, _ = tile(w_i, q)
      i = slot(w_i, q, kk)
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(mi * TM, TM), pl.ds(kk * TK, TK)], x_smem.at[i], full_x.at[i])
      w_slice = (w_gmem.at[pl.ds(ni * TN, TN), pl.ds(kk * TK, TK)] if trans_b else
                 w_gmem.at[pl.ds(kk * TK, TK), pl.ds(ni * TN, TN)])
      plgpu.copy_gmem_to_smem(w_slice, w_smem.at[i], full_w.at[i], **shared)

    def reload(w_i, q, kk):  # the stage's previous use (S steps earlier in w_i's order) has been consumed
      plgpu.barrier_wait(consumed.at[slot(w_i, q, kk)])
      load(w_i, q, kk)

    def sync():  # both compute warpgroups pass it together (a two-arrival barrier); none when concurrent
      if ping:
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    def feed_alternately():  # concurrent: both rings' K steps in turn, as the two K loops consume them
      @pl.loop(0, n_local)
      def _pair(q):
        odd_exists = tile(1, q)[2]

        @pl.loop(0, ks)
        def _(kk):
          reused = q * ks + kk >= s   # the stage's previous use must have been consumed
          pl.when(reused)(lambda: plgpu.barrier_wait(consumed.at[slot(0, q, kk)]))
          load(0, q, kk)
          pl.when(jnp.logical_and(reused, odd_exists))(lambda: plgpu.barrier_wait(consumed.at[slot(1, q, kk)]))
          pl.when(odd_exists)(lambda: load(1, q, kk))

    def feed_pingpong():  # each ring's K steps in the order the alternating K loops consume them
      for kk in range(s):
        load(0, 0, kk)

      @pl.loop(0, n_local)
      def _pair(q):
        odd_exists = tile(1, q)[2]

        @pl.when(odd_exists)
        def _():  # the odd tile's first stages, while the even tile's K loop runs
          for kk in range(s):
            @pl.when(q > 0)
            def _():
              plgpu.barrier_wait(consumed.at[slot(1, q, kk)])
            load(1, q, kk)

        pl.loop(s, ks)(lambda kk: reload(0, q, kk))

        @pl.when(q + 1 < n_local)
        def _():  # the next even tile's first stages, while the odd tile's K loop runs
          for kk in range(s):
            reload(0, q + 1, kk)

        @pl.when(odd_exists)
        def _():
          pl.loop(s, ks)(lambda kk: reload(1, q, kk))

    @pl.when(wg == 2)
    def _memory():
      plgpu.set_max_registers(40, action="decrease")

      @pl.when(n_local > 0)
      def _():
        (feed_pingpong if ping else feed_alternately)()

        # the last S stages of each ring: observe their release too (every phase of a barrier is waited on)
        odd_tiles = n_local - jnp.where(tile(1, n_local - 1)[2], 0, 1)
        for w_i, count in ((0, n_local), (1, odd_tiles)):
          @pl.when(count > 0)
          def _():
            for kk in range(s):
              plgpu.barrier_wait(consumed.at[w_i * s + kk])

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      pl.when(wg == 1)(sync)  # the odd warpgroup's K loops start after the even one's

      @pl.loop(0, n_local)
      def _pair(q):
        mi, ni, exists = tile(wg, q)

        @pl.when(exists)
        def _():
          def k_loop(acc_ref):
            @pl.loop(0, ks)
            def _step(kk):
              i = slot(wg, q, kk)
              if fetch:
                @pl.when(kk == fetch_at)
                def _():  # h into this warpgroup's output buffer, once its last store has read it
                  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                  plgpu.copy_gmem_to_smem(h_gmem.at[pl.ds(mi * TM, TM), pl.ds(ni * TN, TN)], o_smem.at[wg],
                                          full_h.at[wg])
              plgpu.barrier_wait(full_x.at[i])
              plgpu.barrier_wait(full_w.at[i])
              b = plgpu.transpose_ref(w_smem.at[i], (1, 0)) if trans_b else w_smem.at[i]
              plgpu.wgmma(acc_ref, x_smem.at[i], b)
              # each wgmma waited for, its stage released at once: one left in flight (the stage released a step
              # later) timed the same with 3-stage rings and 31% slower with the backward's 2 (RESULTS, session 31)
              plgpu.wgmma_wait(0)
              plgpu.barrier_arrive(consumed.at[i])
            return acc_ref[...]
          acc = pl.run_scoped(k_loop, plgpu.ACC((TM, TN), jnp.float32))
          sync()  # the tensor cores are the other warpgroup's while this one stores
          h = None
          if fetch:
            plgpu.barrier_wait(full_h.at[wg])
            # the library's load in the accumulator's layout; Pallas' interpreter has no plgpu.load (a plain read)
            h = (o_smem[wg] if interpret else
                 plgpu.load(o_smem.at[wg], (), layout=plgpu.Layout.WGMMA, optimized=False))
          for o, out in enumerate(epilogue(acc.astype(jnp.bfloat16), h)):
            for j in range(TN // piece):
              plgpu.wait_smem_to_gmem(0, wait_read_only=True)
              o_smem[wg] = out if piece == TN else out[:, j * piece:(j + 1) * piece]
              plgpu.commit_smem()
              plgpu.copy_smem_to_gmem(o_smem.at[wg], outs[o].at[pl.ds(mi * TM, TM), pl.ds(ni * TN + j * piece, piece)])
          sync()

        @pl.when(jnp.logical_not(exists))
        def _():  # the last pair's missing odd tile: keep the barrier's count
          sync()
          sync()

      pl.when(wg == 0)(sync)  # the odd warpgroup's last sync (it passed one more at its start)
      plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      kernel, out_type=(jax.ShapeDtypeStruct((m, n), jnp.bfloat16),) * n_alloc,
      scratch_types=[plgpu.SMEM((2 * s, TM, TK), jnp.bfloat16, transforms=tf),
                     plgpu.SMEM((2 * s, TN, TK) if trans_b else (2 * s, TK, TN), jnp.bfloat16, transforms=tf),
                     plgpu.SMEM((2, TM, piece), jnp.bfloat16, **(dict(transforms=tf) if out_swizzle else {})),
                     plgpu.Barrier(num_barriers=2 * s), plgpu.Barrier(num_barriers=2 * s),
                     consumed_type(num_barriers=2 * s), plgpu.Barrier(num_arrivals=2), plgpu.Barrier(num_barriers=2)],
      grid=(grid,), grid_names=("sm",), num_threads=3, thread_name="wg",
      **(dict(cluster=(cluster,), cluster_names=("cluster",)) if cluster > 1 else {}),
      **(dict(interpret=interpret) if interpret else {}))(x_MxK, w, *(() if h_MxN is None else (h_MxN,)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--only", default="parcae_small,small_k2x")
  p.add_argument("--ops", default="gemm,fwd,pair,bwd")
  p.add_argument("--stages", type=int, default=3)
  p.add_argument("--piece", type=int, default=64)
  p.add_argument("--cluster", type=int, default=1, help="SMs sharing each weight slice (1 or 2)")
  p.add_argument("--impls", default="xla,library,pingpong",
                 help="of xla, library, pingpong, concurrent (the ping-pong's tiles without its schedule)")
  p.add_argument("--out-swizzle", default="0", help="comma-separated 0/1: output buffers swizzled (each timed)")
  p.add_argument("--iters", type=int, default=100)
  p.add_argument("--sustain", type=float, default=0.0)
  args = p.parse_args()
  unknown = set(args.impls.split(",")) - {"xla", "library", *SCHEDULES}
  if unknown:
    p.error(f"unknown --impls {sorted(unknown)}; use xla, library, {', '.join(SCHEDULES)}")
  library = {"gemm": lambda x, w: mlp_kernels._ws_gemm((x, w), x.shape[1], w.shape[1], lambda a, _: (a,), trans_b=False,  # pylint: disable=protected-access
                                                       steps=mlp_kernels.STEPS_NO_H, piece=mlp_kernels.PIECE_NO_H)[0],
             "fwd": mlp_kernels._relu2_matmul_mosaic, "pair": mlp_kernels._pair_matmul_mosaic,  # pylint: disable=protected-access
             "bwd": mlp_kernels._relu_grad_matmul_mosaic}  # pylint: disable=protected-access
  print(jax.devices()[0].device_kind, flush=True)
  for name in args.only.split(","):
    m, d, f = SHAPES[name]
    x, w, g, w2, h = operands(m, d, f)
    rows = np.sort(np.random.default_rng(0).choice(m, 512, replace=False))
    for op in args.ops.split(","):
      inputs = (g, w2, h) if op == "bwd" else (x, w)
      ref = None if op == "kloop" else reference(op, inputs, rows)
      # bwd: h fills a [TM, TN] output buffer per warpgroup, so its rings hold 2 stages (shared memory)
      kw = dict(op=op, stages=2 if op == "bwd" else args.stages, piece=TN if op == "bwd" else args.piece,
                cluster=args.cluster)
      impls = {i + ("_swz" if int(z) else ""):
               jax.jit(lambda a, b, *c, kw=kw, i=i, z=int(z): pingpong(a, b, h_MxN=c[0] if c else None, schedule=i,
                                                                       out_swizzle=bool(z), **kw))
               for i in SCHEDULES for z in args.out_swizzle.split(",")}
      if op != "kloop":  # kloop: the K loops alone, only the ping-pong kernel has it and it writes nothing
        impls.update({"xla": XLA[op], "library": jax.jit(library[op])})
      chosen = args.impls.split(",")
      for impl, fn in ((i, f) for i, f in impls.items() if i.removesuffix("_swz") in chosen):
        try:
          ms, out = timed(fn, inputs, args.iters)
        except Exception as e:  # a launch that does not compile is reported, not fatal
          print(f"{name:14s} {op:5s} {impl:10s} FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
          continue
        out = jnp.concatenate(out, axis=1) if isinstance(out, tuple) else out
        err = (float(np.max(np.abs(np.asarray(out[rows], np.float64) - ref)) / np.max(np.abs(ref)))
               if ref is not None else float("nan"))
        line = f"{name:14s} {op:5s} {impl:10s} {ms:8.4f} ms {2 * m * d * f / ms / 1e9:7.1f} TF/s  err {err:.2e}"
        if args.sustain:
          line += sustained_text(sustained(fn, inputs, max(1, int(args.sustain * 1e3 / ms))))
        print(line, flush=True)


if __name__ == "__main__":
  main()
