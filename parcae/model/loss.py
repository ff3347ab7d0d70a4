"""Cross-entropy of the tied head, `chunk` tokens at a time, with a hand-written backward pass.

The logits are the compute-dtype GEMM's output (bf16, as the reference's autocast head) read as float32. The
forward pass keeps only each token's log-sum-exp; the backward pass recomputes a chunk's logits and turns them
into the compute-dtype logit gradient in one elementwise pass, (softmax - onehot) * g, the operand of the two
backward GEMMs. So no [tokens, V] float32 array is ever written, in either pass (autodiff of the same formula
writes the float32 gradient, subtracts the one-hot in a scatter and casts it in two more passes).
The input gradient leaves its GEMM in y's dtype (the compute dtype: the model hands the head its final norm's
output in it, and the reference's autocast head rounds this gradient to bf16 too); the table gradient leaves
its GEMM in float32 and is summed over chunks in float32. `chunk` <= 0 means one chunk of all tokens. The
forward's log-sum-exp is one Pallas pass over the compute-dtype logits where `lse_impl` picks it
(parcae.model.lse), else the two-pass formula (max, then the sum of exponentials).

Two entry points: `token_nll` (per-token NLL: evaluation, and any loss that weighs tokens) keeps the
log-sum-exps and recomputes each chunk's logits in its backward pass; `mean_token_nll` (the training loss, a
scalar) forms the same gradients in its forward pass while each chunk's logits exist, so its backward pass
only scales them: one logits GEMM per chunk instead of two.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from parcae import compile_target
from parcae.model import lse
from parcae.model.rope_norm import kernel_axes, kernel_batch_axes, kernel_batch_shards


def token_nll(y_BxSxD, table_VxD, targets_BxS, cd, chunk: int = 0, lse_impl: str = "auto"):
  """Negative log-likelihood per token [B, S] (float32); lse_impl as model.lse_impl."""
  b, s, _ = y_BxSxD.shape
  layout = _layout(b, s, chunk, rows_first=not kernel_batch_axes(jax.sharding.get_abstract_mesh()))
  return _from_chunks(_chunked_nll(*_chunks(y_BxSxD, table_VxD, targets_BxS, layout), jnp.dtype(cd),
                                   _use_kernel(lse_impl, _chunk(b * s, chunk), table_VxD.shape[0])), layout)


def mean_token_nll(y_BxSxD, table_VxD, targets_BxS, cd, chunk: int = 0, lse_impl: str = "auto",
                   scale: float = 1.0):
  """scale * the mean token NLL (float32 scalar): the training loss, with its gradients computed in the
  forward pass. A scalar loss's cotangent is one number, so each chunk's logit gradient (softmax - onehot) *
  scale / tokens, the input gradient and the table gradient are formed while the chunk's logits exist, and
  the backward pass only multiplies them by the cotangent: one logits GEMM per chunk instead of two (the
  per-token `token_nll` must recompute them, its cotangent being unknown until then). Same arithmetic as
  differentiating token_nll(...).mean() * scale.

  Under a mesh whose batch axes ("data", "fsdp") split the batch, each device runs the chunk loop over its
  rows (shard_map): its share of every chunk (`_layout`), its partial table gradient summed in the loop, and
  one sum over the devices per call (shard_map's transpose of the replicated table). Left to GSPMD, the loop's
  carried table gradient is sharded like the table under FSDP and was reduce-scattered after every chunk."""
  b, s, _ = y_BxSxD.shape
  n = _chunk(b * s, chunk)
  mesh = jax.sharding.get_abstract_mesh()
  batch = kernel_batch_axes(mesh)
  shards = kernel_batch_shards(mesh)
  if not batch or b % shards or n % shards:  # one device, or GSPMD's: chunks split like the batch (`_layout`)
    return _mean_nll(y_BxSxD, table_VxD, targets_BxS, cd, n, lse_impl, scale, rows_first=not batch)

  def per_device(y, table, t):  # this device's mean times 1 / shards: the psum is the global mean
    return jax.lax.psum(_mean_nll(y, table, t, cd, n // shards, lse_impl, scale / shards, rows_first=True), batch)
  return jax.shard_map(per_device, in_specs=(P(batch), P(), P(batch)), out_specs=P(), axis_names=set(batch),
                       check_vma=False)(y_BxSxD, table_VxD, targets_BxS)


def _mean_nll(y_BxSxD, table_VxD, targets_BxS, cd, chunk, lse_impl, scale, rows_first):
  b, s, _ = y_BxSxD.shape
  kernel = _use_kernel(lse_impl, _chunk(b * s, chunk), table_VxD.shape[0])
  layout = _layout(b, s, chunk, rows_first)
  return _fused_mean_nll(*_chunks(y_BxSxD, table_VxD, targets_BxS, layout), jnp.dtype(cd), kernel,
                         float(scale), layout)


def _chunk(n, chunk):
  chunk = n if chunk <= 0 or chunk >= n else chunk
  if n % chunk:
    raise ValueError(f"train.loss_chunk={chunk} must divide the tokens per micro-batch ({n}); pick a divisor")
  return chunk


def _layout(b, s, chunk, rows_first=False):
  """(B, S, C1, C2): C = B * S / N chunks of N tokens, C1 = gcd(C, S) slices of the sequence axis times C2 =
  C / C1 (which divides B) groups of rows. Each chunk takes S / C1 positions of B / C2 rows, so with the batch
  split over devices every device holds its share of every chunk (chunks of whole sequences would each live
  on one device, and the chunk loop would move them between devices). rows_first (the rows are all on this
  device): C2 = gcd(C, B) groups of whole rows first, so that the chunks are slices of the batch as it lies
  in memory and no transposed copy of y (or of its gradient) is made."""
  c = b * s // _chunk(b * s, chunk)
  c2 = math.gcd(c, b) if rows_first else c // math.gcd(c, s)
  return b, s, c // c2, c2


def _to_chunks(x_BxSx_, layout):
  b, s, c1, c2 = layout
  rest = x_BxSx_.shape[2:]
  x = x_BxSx_.reshape(c2, b // c2, c1, s // c1, *rest)
  return jnp.swapaxes(x, 1, 2).reshape(c1 * c2, b * s // (c1 * c2), *rest)


def _from_chunks(x_CxNx_, layout):
  b, s, c1, c2 = layout
  rest = x_CxNx_.shape[2:]
  x = x_CxNx_.reshape(c2, c1, b // c2, s // c1, *rest)
  return jnp.swapaxes(x, 1, 2).reshape(b, s, *rest)


def _chunks(y_BxSxD, table_VxD, targets_BxS, layout):
  """(y [C, N, D], table, targets [C, N]): the tokens in C chunks of N (`_layout`)."""
  return _to_chunks(y_BxSxD, layout), table_VxD, _to_chunks(targets_BxS, layout)


def _use_kernel(impl, n, v):
  if impl == "pallas" and not lse.supported(n, v):
    raise ValueError(f"model.lse_impl='pallas' needs loss chunks of a multiple of {lse.ROWS} tokens and a "
                     f"vocabulary divisible by 64 (chunk {n}, vocabulary {v}); use lse_impl='auto' or 'xla'")
  return impl == "pallas" or (impl == "auto" and compile_target.platform() == "gpu" and lse.supported(n, v, 256))


def _logits(y_NxD, table_cd_VxD, cd):
  """The GEMM's compute-dtype logits. The barrier keeps XLA from folding a consumer's float32 cast into the
  GEMM, which would skip the rounding (it did inside this scan on the CPU) and write the logits in float32,
  twice the bytes (measured: eval 4.5% slower on the H200)."""
  return jax.lax.optimization_barrier(jnp.dot(y_NxD.astype(cd), table_cd_VxD.T))


def _row_lse(logits_NxV):
  """The two-pass log-sum-exp (float32)."""
  m_N = jnp.max(logits_NxV, axis=-1)
  return m_N + jnp.log(jnp.sum(jnp.exp(logits_NxV - m_N[:, None]), axis=-1))


def _chunk_forward(y_NxD, t_N, table, cd, kernel):
  """One chunk's compute-dtype logits, log-sum-exp and NLL (float32)."""
  logits = _logits(y_NxD, table, cd)
  lse_N = lse.row_lse(logits) if kernel else _row_lse(logits.astype(jnp.float32))
  target_N = jnp.take_along_axis(logits, t_N[:, None], axis=-1)[:, 0].astype(jnp.float32)
  return logits, lse_N, lse_N - target_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_nll(y_CxNxD, table_VxD, t_CxN, cd, kernel):
  return _nll_fwd(y_CxNxD, table_VxD, t_CxN, cd, kernel)[0]


def _nll_fwd(y_CxNxD, table_VxD, t_CxN, cd, kernel):
  table = table_VxD.astype(cd)

  def one(_, xs):
    _, lse_N, nll_N = _chunk_forward(*xs, table, cd, kernel)
    return None, (nll_N, lse_N)

  _, (nll, lse_CxN) = jax.lax.scan(one, None, (y_CxNxD, t_CxN))
  return nll, (y_CxNxD, table_VxD, t_CxN, lse_CxN)


def _chunk_grads(dtable, y_NxD, table, t_N, lse_N, g_N, logits, cd):
  """One chunk's backward from its logits: dtable + the table gradient, and the input gradient (y's dtype)."""
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) == t_N[:, None]
  dlogits = ((jnp.exp(logits.astype(jnp.float32) - lse_N[:, None]) - onehot) * g_N[:, None]).astype(cd)
  return _grads_from(dtable, y_NxD, table, dlogits)


def _grads_from(dtable, y_NxD, table, dlogits):
  """The two backward GEMMs of a chunk's compute-dtype logit gradient: dtable + table gradient, input gradient
  (in y's dtype straight from the GEMM's float32 accumulator: the rounding a cast after it would do, without
  the float32 array and the pass)."""
  dy_NxD = jnp.dot(dlogits, table, preferred_element_type=y_NxD.dtype)
  return dtable + jnp.dot(dlogits.T, y_NxD.astype(dlogits.dtype), preferred_element_type=jnp.float32), dy_NxD


def _nll_bwd(cd, kernel, res, g_CxN):
  y_CxNxD, table_VxD, t_CxN, lse_CxN = res
  table = table_VxD.astype(cd)

  def one(dtable, xs):
    y_NxD, t_N, lse_N, g_N = xs
    return _chunk_grads(dtable, y_NxD, table, t_N, lse_N, g_N, _logits(y_NxD, table, cd), cd)

  dtable, dy = jax.lax.scan(one, jnp.zeros(table_VxD.shape, jnp.float32), (y_CxNxD, t_CxN, lse_CxN, g_CxN))
  return dy.astype(y_CxNxD.dtype), dtable.astype(table_VxD.dtype), None


_chunked_nll.defvjp(_nll_fwd, _nll_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused_mean_nll(y_CxNxD, table_VxD, t_CxN, cd, kernel, scale, layout):
  return jnp.mean(_from_chunks(_nll_fwd(y_CxNxD, table_VxD, t_CxN, cd, kernel)[0], layout)) * scale


def _fused_fwd(y_CxNxD, table_VxD, t_CxN, cd, kernel, scale, layout):
  table = table_VxD.astype(cd)
  g = _g(scale, t_CxN.size)

  fused = kernel and lse.grad_supported(y_CxNxD.shape[1], table_VxD.shape[0]) and not kernel_axes(
      jax.sharding.get_abstract_mesh())

  def one(dtable, xs):
    y_NxD, t_N = xs
    if fused:  # log-sum-exp, target logit and logit gradient from one read of the logits (parcae.model.lse)
      lse_N, target_N, dlogits = lse.row_lse_grad(_logits(y_NxD, table, cd), t_N, g, cd)
      dtable, dy_NxD = _grads_from(dtable, y_NxD, table, dlogits)
      return dtable, (lse_N - target_N, dy_NxD)
    logits, lse_N, nll_N = _chunk_forward(y_NxD, t_N, table, cd, kernel)
    dtable, dy_NxD = _chunk_grads(dtable, y_NxD, table, t_N, lse_N, jnp.broadcast_to(g, t_N.shape), logits, cd)
    return dtable, (nll_N, dy_NxD)

  dtable, (nll, dy) = jax.lax.scan(one, jnp.zeros(table_VxD.shape, jnp.float32), (y_CxNxD, t_CxN))
  loss = jnp.mean(_from_chunks(nll, layout)) * scale
  return loss, (dy.astype(y_CxNxD.dtype), dtable.astype(table_VxD.dtype))


def _g(scale, count):
  """Each token's cotangent as autodiff of mean(nll) * scale forms it: scale, then divided by the count."""
  return np.float32(scale) / np.float32(count)


def _fused_bwd(cd, kernel, scale, layout, res, g):
  dy, dtable = res
  return dy * g.astype(dy.dtype), dtable * g.astype(dtable.dtype), None


_fused_mean_nll.defvjp(_fused_fwd, _fused_bwd)
