"""The ReLU^2 MLP's elementwise passes fused into its GEMMs: Pallas (Triton) kernels for bench/fused_mlp.py.

XLA runs the MLP's first GEMM and ReLU^2 as two kernels (the square reads the GEMM's [tokens, F] output back
and writes another), and in the backward pass the product with the ReLU mask as a third after the GEMM that
forms the activation gradient (bench/RESULTS.md, session 19: 22.4 + 18.9 ms of parcae-small's 644 ms step on
an H100, both at bandwidth). Here each GEMM program applies that elementwise step to its float32 accumulator
tile before the one write:

  relu2_matmul(x_MxK, w_KxN)         = relu2(bf16(x @ w))              (forward: h never written)
  relu_grad_matmul(g_MxK, w_NxK, h)  = bf16(g @ w^T) * max(h, 0)       (backward: dA never written)

Rounding as the unfused bf16 program: the accumulator is rounded to the compute dtype first, then the
elementwise step runs in float32 and is rounded once. A program covers a [BM, BN] output tile and loops over K
in BK steps (Triton pipelines the loads over `STAGES` buffers). On a CPU the kernels run in Pallas' interpret
mode (tests/test_bench_fused_mlp.py).

Measured on an H100 (bench/RESULTS.md, session 20): the best tile shape reaches 488-535 TF/s against cuBLAS's
775-793 TF/s, so the fused kernels are only 0-5% faster than cuBLAS plus XLA's elementwise pass. The model
uses Mosaic GPU kernels with the same epilogues instead (parcae/model/mlp_kernels.py: 16-19% faster).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class Tiles(NamedTuple):
  bm: int = 128      # output rows per program
  bn: int = 128      # output columns per program
  bk: int = 64       # contraction step
  warps: int = 8     # Triton warps per program
  stages: int = 3    # Triton software-pipeline stages of the K loop


TILES = Tiles()


def supported(m: int, k: int, n: int, tiles: Tiles = TILES) -> bool:
  """The kernels need whole tiles: m % bm, n % bn and k % bk all zero."""
  return m % tiles.bm == 0 and n % tiles.bn == 0 and k % tiles.bk == 0


def _params(interpret, tiles):
  from parcae import compile_target  # pylint: disable=g-import-not-at-top
  if interpret is None:
    interpret = compile_target.platform() == "cpu"
  if interpret:
    return {"interpret": True}
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return {"compiler_params": pltriton.CompilerParams(num_warps=tiles.warps, num_stages=tiles.stages)}


def _accumulate(a_ref, b_ref, bk, trans_b):
  """float32 [BM, BN] = a_ref[BM, K] @ b_ref ([K, BN], or [BN, K] with trans_b), BK columns at a time."""
  k = a_ref.shape[1]
  cols = lambda i: pl.ds(pl.multiple_of(i * bk, bk), bk)

  def body(i, acc):
    a = a_ref[:, cols(i)]
    b = b_ref[:, cols(i)] if trans_b else b_ref[cols(i), :]
    contract = ((1,), (1,) if trans_b else (0,))
    return acc + jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)

  bn = b_ref.shape[0] if trans_b else b_ref.shape[1]
  return jax.lax.fori_loop(0, k // bk, body, jnp.zeros((a_ref.shape[0], bn), jnp.float32))


def _plain_kernel(x_ref, w_ref, o_ref, *, bk):
  o_ref[...] = _accumulate(x_ref, w_ref, bk, False).astype(o_ref.dtype)


def _relu2_kernel(x_ref, w_ref, o_ref, *, bk):
  h = _accumulate(x_ref, w_ref, bk, False).astype(o_ref.dtype).astype(jnp.float32)
  r = jnp.maximum(h, 0.0)
  o_ref[...] = (0.5 * r * r).astype(o_ref.dtype)


def _relu_grad_kernel(g_ref, w_ref, h_ref, o_ref, *, bk):
  da = _accumulate(g_ref, w_ref, bk, True).astype(o_ref.dtype).astype(jnp.float32)
  o_ref[...] = (da * jnp.maximum(h_ref[...].astype(jnp.float32), 0.0)).astype(o_ref.dtype)


def _check(m, k, n, tiles, what):
  if not supported(m, k, n, tiles):
    raise ValueError(f"{what}: shapes (m={m}, k={k}, n={n}) are not whole tiles of {tiles}; use tiles that "
                     "divide them")


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "act"))
def relu2_matmul(x_MxK, w_KxN, tiles: Tiles = TILES, interpret=None, act=True):
  """0.5 * max(x @ w, 0)^2 in x's dtype, without writing x @ w (act=False: x @ w, the same kernel's GEMM)."""
  (m, k), n = x_MxK.shape, w_KxN.shape[1]
  _check(m, k, n, tiles, "relu2_matmul")
  return pl.pallas_call(
      functools.partial(_relu2_kernel if act else _plain_kernel, bk=tiles.bk), grid=(m // tiles.bm, n // tiles.bn),
      in_specs=[pl.BlockSpec((tiles.bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k, tiles.bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((tiles.bm, tiles.bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), x_MxK.dtype), **_params(interpret, tiles))(x_MxK, w_KxN)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def relu_grad_matmul(g_MxK, w_NxK, h_MxN, tiles: Tiles = TILES, interpret=None):
  """(g @ w^T) * max(h, 0) in g's dtype, without writing g @ w^T (the gradient of h given ReLU^2's output's)."""
  (m, k), n = g_MxK.shape, w_NxK.shape[0]
  _check(m, k, n, tiles, "relu_grad_matmul")
  return pl.pallas_call(
      functools.partial(_relu_grad_kernel, bk=tiles.bk), grid=(m // tiles.bm, n // tiles.bn),
      in_specs=[pl.BlockSpec((tiles.bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((tiles.bn, k), lambda i, j: (j, 0)),
                pl.BlockSpec((tiles.bm, tiles.bn), lambda i, j: (i, j))],
      out_specs=pl.BlockSpec((tiles.bm, tiles.bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((m, n), g_MxK.dtype), **_params(interpret, tiles))(g_MxK, w_NxK, h_MxN)
