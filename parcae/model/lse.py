"""Row-wise log-sum-exp of the loss head's logits in one read: a Pallas kernel and a tiny combine.

XLA evaluates logsumexp over a [tokens, V] chunk of bf16 logits as two passes that each read every logit (the
row max, then the sum of exponentials; bench/RESULTS.md, session 16: ~1.7% of gpt-medium's step, both at
bandwidth). Here each program reads one [ROWS, cols] tile once and writes the tile's max m and its sum
s = sum exp(x - m); the combine over a row's V / cols tiles is
  lse = M + log(sum_j s_j exp(m_j - M)),   M = max_j m_j
(in jnp: [V / cols, tokens] floats, ~1/500 of the logits' bytes). Same math as the two-pass formula up to the
order of the float32 sums. Under the trainer's mesh it runs per device (shard_map; XLA cannot partition a
kernel call): rows over the batch axes, the vocabulary over "tensor" (vocab-parallel logits), with the
per-device results combined across "tensor" by the same formula.

For the training loss (`row_lse_grad`) a second kernel also forms the logit gradient (softmax - onehot) * g in
the compute dtype and each row's target logit: each program reads its rows' logits once from memory (a pass
for the row's max and sum of exponentials, then a pass over the same tiles, now in L2, for the gradient) and
writes the gradient once, where the log-sum-exp kernel and XLA's gradient fusion read the logits twice. It
takes one device's whole rows and vocabulary (its caller runs it per device).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jax.sharding import PartitionSpec as P

from parcae.model.rope_norm import kernel_axes, kernel_batch_axes, kernel_batch_shards

# GPU launch shape: rows per program, widest column tile, Triton warps (bench/lse.py sweeps them).
ROWS, MAX_COLS, WARPS = 16, 1024, 8
# The gradient kernel's: rows per program (its tiles stay in L2 between the two passes), column tile, warps.
# Swept on the H100 (bench/RESULTS.md, session 22: `python3 bench/lse.py --grad`); whole rows in registers
# (one exponential per logit) spilled and ran 1.5-20x slower.
GRAD_ROWS, GRAD_COLS, GRAD_WARPS = 1, 4096, 8
GRAD_STAGES = 2  # Triton's pipelining depth of the two column-tile loops
# L2 hints for the gradient kernel (candidates, bench/lse.py --grad --hints): the second loop's reads are meant
# to hit L2, where a row's 64 KB wait behind ~1,000 programs' rows and the gradient's own writes. GRAD_EVICT:
# the first loop's reads marked evict_last, the second loop's reads and the gradient's stores evict_first (so
# the writes stream through without pushing the rows still to be re-read out); GRAD_REVERSE: the second loop
# walks the tiles last to first (the most recently read first).
GRAD_EVICT, GRAD_REVERSE = False, False


def _cols(v: int, widest: int = 0) -> int:
  """Widest power-of-two tile width <= widest (default MAX_COLS) dividing v (0: none >= 64)."""
  c = widest or MAX_COLS
  while c >= 64 and v % c:
    c //= 2
  return c if c >= 64 else 0


def supported(n: int, v: int, min_cols: int = 64) -> bool:
  """The kernel needs whole row blocks and a vocabulary that a tile width of 64 (or min_cols) or more divides.
  ("auto" asks for 256: narrower tiles make many tiny programs, not measured against XLA.)"""
  return n % ROWS == 0 and _cols(v) >= min_cols


def _kernel(x_ref, m_ref, s_ref):
  x = x_ref[...].astype(jnp.float32)
  m = jnp.max(x, axis=1)
  m_ref[...] = m
  s_ref[...] = jnp.sum(jnp.exp(x - m[:, None]), axis=1)


def combine(m_JxN, s_JxN, axis=0):
  """lse from per-tile maxima m and sums s = sum exp(x - m) along `axis`."""
  big = jnp.max(m_JxN, axis=axis, keepdims=True)
  return jnp.squeeze(big, axis) + jnp.log(jnp.sum(s_JxN * jnp.exp(m_JxN - big), axis=axis))


def _backend(interpret, warps=None, stages=None):
  from parcae.quant.kernels import qdq  # the kernels' shared backend choice (interpret on a CPU)
  interpret, _, params = qdq.backend(interpret, warps or WARPS)
  if stages and params:  # Triton's software pipelining depth of the kernel's loops
    params["compiler_params"] = dataclasses.replace(params["compiler_params"], num_stages=stages)
  return interpret, params


def _local(x_NxV, interpret):
  """Per-tile (m, s) of one device's logits, [V / cols, N] each."""
  interpret, params = _backend(interpret)
  n, v = x_NxV.shape
  cols = _cols(v)
  part = jax.ShapeDtypeStruct((v // cols, n), jnp.float32)
  out = pl.BlockSpec((None, ROWS), lambda i, j: (j, i))
  return pl.pallas_call(_kernel, out_shape=(part, part), grid=(n // ROWS, v // cols),
                        in_specs=[pl.BlockSpec((ROWS, cols), lambda i, j: (i, j))], out_specs=(out, out),
                        interpret=interpret, **params)(x_NxV)


def row_lse(x_NxV, interpret=None):
  """log(sum(exp(x), axis=1)) in float32 for x [N, V] (any float dtype), N a multiple of ROWS."""
  n, v = x_NxV.shape
  mesh = jax.sharding.get_abstract_mesh()
  axes = kernel_axes(mesh)
  batch = kernel_batch_axes(mesh) or None
  shards = kernel_batch_shards(mesh)
  if batch and (n % shards or (n // shards) % ROWS):
    batch = None  # rows that do not split into whole row blocks per device: all rows on every device
  tensor = "tensor" if "tensor" in axes and _cols(v // mesh.shape["tensor"]) and not v % mesh.shape["tensor"] else None
  if not (batch or tensor):
    return combine(*_local(x_NxV, interpret))

  def per_device(x):
    lse = combine(*_local(x, interpret))
    if tensor:  # each device holds a slice of the vocabulary
      big = jax.lax.pmax(lse, tensor)
      lse = big + jnp.log(jax.lax.psum(jnp.exp(lse - big), tensor))
    return lse

  return jax.shard_map(per_device, in_specs=P(batch, tensor), out_specs=P(batch),
                       axis_names=set(a for a in (*(batch or ()), tensor) if a), check_vma=False)(x_NxV)


def grad_supported(n: int, v: int) -> bool:
  """`row_lse_grad` needs whole row blocks and a vocabulary of whole column tiles."""
  return n % GRAD_ROWS == 0 and _cols(v, GRAD_COLS) > 0


def _grad_kernel(x_ref, t_ref, d_ref, lse_ref, tgt_ref, *, g, cols, evict, reverse):
  rows, v = x_ref.shape
  t_R = t_ref[...]
  at = lambda ref, j: ref.at[:, pl.ds(pl.multiple_of(j * cols, cols), cols)]

  def tile(j, policy=None):  # [rows, cols] float32 logits and the one-hot of the targets
    x = (plt.load(at(x_ref, j), eviction_policy=policy) if evict else at(x_ref, j)[...]).astype(jnp.float32)
    col = j * cols + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    return x, col == t_R[:, None]

  def stats(j, carry):  # running max and sum of exp(x - max), rescaled as the max grows; the target logit
    m, s, tgt = carry
    x, hot = tile(j, "evict_last")
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(x - m_new[:, None]), axis=1)
    return m_new, s, tgt + jnp.sum(jnp.where(hot, x, 0.0), axis=1)

  init = (jnp.full((rows,), -jnp.inf, jnp.float32), jnp.zeros((rows,), jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  m, s, tgt = jax.lax.fori_loop(0, v // cols, stats, init)
  lse_R = m + jnp.log(s)

  def grad(i, _):
    j = v // cols - 1 - i if reverse else i
    x, hot = tile(j, "evict_first")
    d = ((jnp.exp(x - lse_R[:, None]) - hot.astype(jnp.float32)) * g).astype(d_ref.dtype)
    if evict:
      plt.store(at(d_ref, j), d, eviction_policy="evict_first")
    else:
      at(d_ref, j)[...] = d

  jax.lax.fori_loop(0, v // cols, grad, None)
  lse_ref[...] = lse_R
  tgt_ref[...] = tgt


def row_lse_grad(x_NxV, t_N, g: float, dtype, interpret=None):
  """(lse [N], target logit [N], d [N, V]) for logits x [N, V] and targets t [N]: lse as `row_lse`, the
  target's logit x[i, t_i] in float32, and d = (exp(x - lse) - onehot(t)) * g rounded to `dtype` (the training
  loss's logit gradient; g a Python float: the cotangent of each token's NLL). One device's whole rows and
  vocabulary (the caller runs it per device: `mean_token_nll`).
  Where d has the logits' dtype it is written over them (`input_output_aliases`): a program touches only its
  own rows, and reads each tile of them again just before writing it, so no logit is read after its place is
  written; the logits' buffer serves as the gradient's, one [N, V] array less at the loss head's peak (a
  caller that reads x_NxV afterwards makes XLA copy it first)."""
  n, v = x_NxV.shape
  cols = _cols(v, GRAD_COLS)
  interpret, params = _backend(interpret, GRAD_WARPS, GRAD_STAGES)
  rows = pl.BlockSpec((GRAD_ROWS,), lambda i: (i,))
  vec = jax.ShapeDtypeStruct((n,), jnp.float32)
  kernel = functools.partial(_grad_kernel, g=float(np.float32(g)), cols=cols, evict=GRAD_EVICT,
                             reverse=GRAD_REVERSE)
  d, lse, tgt = pl.pallas_call(
      kernel, out_shape=(jax.ShapeDtypeStruct((n, v), dtype), vec, vec), grid=(n // GRAD_ROWS,),
      in_specs=[pl.BlockSpec((GRAD_ROWS, v), lambda i: (i, 0)), rows],
      out_specs=(pl.BlockSpec((GRAD_ROWS, v), lambda i: (i, 0)), rows, rows),
      input_output_aliases={0: 0} if jnp.dtype(dtype) == x_NxV.dtype else {},
      interpret=interpret, **params)(x_NxV, t_N.astype(jnp.int32))
  return lse, tgt, d
