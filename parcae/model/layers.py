"""Transformer building blocks: RMSNorm, RoPE, attention with value embeddings, ReLU^2 MLP, pre-norm block.

Precision (spec 1.8): parameters float32; matmuls in `cd` (the compute dtype, bf16 by default); RMSNorm and
RoPE in float32; the residual stream stays float32 (branch outputs are added in float32).
Shape letters: B batch, S sequence, D width, H heads, K head_dim, F MLP width, V vocabulary.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from parcae import compile_target
from parcae.model import add_norm, init, mlp_kernels, qkv_rope, rope_norm
from parcae.model.mlp_kernels import relu2  # the MLP activation, defined beside its fused kernels

VE_GATE_WIDTH = 32  # gate reads the first 32 channels of the normed block input
# Named recompute policies (model.remat for each grad loop iteration, model.block_remat for each block of
# the non-looped stages): what the backward pass keeps from the forward; the rest is recomputed.
REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def remat(fn, policy: str, in_scan: bool = False):
  """fn under jax.checkpoint with the named policy ("none": fn itself). Outside a scan the recomputation
  must be shielded from common-subexpression elimination (else XLA merges it with the forward and keeps
  the activations after all); inside one the loop already separates them and the shield only costs."""
  return fn if policy == "none" else jax.checkpoint(fn, policy=REMAT[policy], prevent_cse=not in_scan)


def rms_norm(x, eps):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.eps) * self.scale[...]


class Linear(nnx.Module):
  """y = x @ kernel, kernel [in, out], no bias; optionally through a simulated low-precision GEMM."""

  def __init__(self, kernel_init, cd, quant: str = "bf16"):
    self.kernel = nnx.Param(kernel_init)
    self.cd, self.quant = cd, quant

  def __call__(self, x, key=None, act=None):
    return self.matmul(x, self.kernel[...], key, act)

  def matmul(self, x, kernel, key=None, act=None):
    """act(x) @ kernel with this layer's compute dtype and recipe (also for a kernel made of several layers').
    act: None or an elementwise function; a quantized recipe evaluates it inside x's quantize kernel."""
    # The operand in the compute dtype, as a low-precision GEMM's quantize kernel would read it (the kernels
    # read half the bytes of a float32 norm output, and autodiff keeps the bf16 copy).
    x = x.astype(self.cd)
    if self.quant == "bf16":
      return jnp.dot(x if act is None else act(x), kernel.astype(self.cd))
    from parcae.quant import qdot  # quant/ is optional at import time and usable on its own
    return qdot(x, kernel, self.quant, key=key, compute_dtype=self.cd, act=act)


def kernels_in(state, cd, quant: str):
  """`state` (an nnx.State) with every Linear kernel cast to the compute dtype cd: for frozen weights that a
  loop reuses, one cast per loop instead of one per use and iteration (`Linear.matmul`'s cast is then a no-op:
  the same values). Kept as they are for float32 compute and quantized recipes (their quantizers read the
  float32 kernel)."""
  if quant != "bf16" or jnp.dtype(cd) == jnp.float32:
    return state
  is_kernel = lambda path: any(getattr(k, "key", None) == "kernel" for k in path)
  return jax.tree_util.tree_map_with_path(lambda path, a: a.astype(cd) if is_kernel(path) else a, state)


class Embed(nnx.Module):
  def __init__(self, table):
    self.embedding = nnx.Param(table)

  def __call__(self, ids):
    return jnp.take(self.embedding[...], ids, axis=0)


def rope_tables(seq_len: int, head_dim: int, base: float):
  """cos, sin [S, K/2] for RoPE pair i; inv_freq_i = base^(-2i/K), angles in float32."""
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def split_pairs(kernel_DxD, n_heads: int):
  """Reorder a q or k kernel's columns within each head from adjacent RoPE pairs (2i, 2i+1) -- the reference
  layout, kept in the parameters -- to split halves (i, i + K/2). A score q . k is a sum over the head's
  channels, so the same permutation of q and k leaves attention unchanged, and RoPE then rotates two
  contiguous halves instead of interleaved pairs: halves the RoPE kernels (rope_norm) can load as blocks, where
  XLA wrote the interleave as a strided shuffle at about a third of the bandwidth."""
  d = kernel_DxD.shape[0]
  return kernel_DxD.reshape(d, n_heads, -1, 2).swapaxes(-1, -2).reshape(d, -1)


def apply_rope(x_BxSxHxK, cos_SxK2, sin_SxK2):
  """Rotate channel pairs (i, i + K/2) -- the split-halves layout of `split_pairs` -- in float32; result in
  x's dtype. Each pair gets the same products as the reference's adjacent pair (2i, 2i+1), bit for bit."""
  s, k2 = x_BxSxHxK.shape[1], x_BxSxHxK.shape[-1] // 2
  x = x_BxSxHxK.astype(jnp.float32)
  x0, x1 = x[..., :k2], x[..., k2:]
  c, sn = cos_SxK2[None, :s, None, :], sin_SxK2[None, :s, None, :]
  return jnp.concatenate([x0 * c - x1 * sn, x0 * sn + x1 * c], axis=-1).astype(x_BxSxHxK.dtype)


def qk_norm(x):
  """Parameter-free RMS norm over head_dim with eps = machine epsilon of x's dtype (as F.rms_norm)."""
  return rms_norm(x, float(jnp.finfo(x.dtype).eps))


class Attention(nnx.Module):
  def __init__(self, cfg, key, *, with_ve: bool, cd, quant):
    d, h = cfg.d_model, cfg.n_heads
    ks = jax.random.split(key, 6)
    std = init.std_for(d)
    self.q = Linear(init.kernel(ks[0], d, d, std), cd, quant)
    self.k = Linear(init.kernel(ks[1], d, d, std), cd, quant)
    self.v = Linear(init.kernel(ks[2], d, d, std), cd, quant)
    self.o = Linear(init.zeros(d, d), cd, quant)
    self.n_heads, self.cd, self.impl, self.rope_impl = h, cd, cfg.attention_impl, cfg.rope_impl
    self.qkv_impl = cfg.get("qkv_impl", "auto")
    self.use_qk_norm = cfg.qk_norm
    if with_ve:
      self.ve_gate = Linear(init.ve_gate(ks[3], h, VE_GATE_WIDTH), cd)
      self.ve_table = Embed(init.value_embedding(ks[4], cfg.vocab_size, d))
    else:
      self.ve_gate = self.ve_table = None

  def lookup_ve(self, ids_BxS):
    """(value embeddings of the token ids (float32), the ids), or None for blocks without them. With the RoPE
    kernels the embeddings are read from the table by the kernels at the ids; the lookup is then never
    formed (XLA drops it) and serves autodiff only: its transpose adds the kernels' cotangent into the table."""
    return None if self.ve_table is None else (self.ve_table(ids_BxS), ids_BxS)

  def _qkv_gemm(self, x_BxSxD, key=None):
    """y [B, S, T, 3, G]: q, k, v from one GEMM of the three kernels side by side: one read of x and, for a
    low-precision recipe, one quantization of it (as a fused-QKV kernel runs them; NVFP4's tensor scale then
    spans the three weights). The parameters stay three matrices (Muon, checkpoints, the reference's names).
    Columns are ordered [q | k | v] per "tensor" shard (T shards of G = D / T columns), so each device's
    columns are its own heads' and a tensor-parallel GEMM needs no collective (plain [Wq | Wk | Wv] makes
    XLA gather; tests/test_train_mesh.py); q and k in the split-halves order of `split_pairs`."""
    b, s, d = x_BxSxD.shape
    tp = tensor_shards(self.n_heads)
    return self.q.matmul(x_BxSxD, self._qkv_kernel(tp), key).reshape(b, s, tp, 3, d // tp)

  def _qkv_kernel(self, tp: int):
    """The three kernels side by side, [D, T x 3 x G] (`_qkv_gemm`'s column order)."""
    d = self.q.kernel.shape[0]
    wq, wk = (split_pairs(lin.kernel[...], self.n_heads) for lin in (self.q, self.k))
    return jnp.stack([w.reshape(d, tp, d // tp) for w in (wq, wk, self.v.kernel[...])], axis=2).reshape(d, 3 * d)

  def qkv(self, x_BxSxD, key=None):
    """q, k, v [B, S, H, K] straight from the GEMM (no RoPE, no norm)."""
    b, s, d = x_BxSxD.shape
    y = self._qkv_gemm(x_BxSxD, key)
    return tuple(y[:, :, :, i].reshape(b, s, self.n_heads, d // self.n_heads) for i in range(3))

  def project(self, x_BxSxD, rope, ve=None, key=None):
    """q, k, v [B, S, H, K] as attention reads them: RoPE and QK-norm on q and k, value embeddings (`lookup_ve`)
    added to v. RoPE + QK-norm and the value embeddings' mix run as one Pallas kernel each way
    (parcae.model.rope_norm) where rope_impl picks it."""
    b, s, d = x_BxSxD.shape
    h = self.n_heads
    cos, sin = rope
    impl = self._fused_qkv(x_BxSxD.shape, cos.shape[0] >= s) if ve is None else None
    if impl:  # the GEMM with RoPE + QK-norm in its epilogue (model.qkv_impl)
      w = self._qkv_kernel(1).astype(self.cd)
      return qkv_rope.qkv_rope_qk_norm(x_BxSxD.astype(self.cd), w, cos, sin, impl=impl)
    y = self._qkv_gemm(x_BxSxD, key)
    ve_BxSxD, ids_BxS = (None, None) if ve is None else ve
    gate_BxSxH = None
    if ve is not None:
      gate_BxSxH = 2.0 * jax.nn.sigmoid(self.ve_gate(x_BxSxD[..., :VE_GATE_WIDTH]).astype(jnp.float32))
    if self._fused_rope(y.shape, cos.shape[0] >= s):
      table_ids = None if ve is None else (self.ve_table.embedding[...], ids_BxS)
      return rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=self.use_qk_norm, ve_BxSxD=ve_BxSxD,
                                    gate_BxSxH=gate_BxSxH, ve_table_ids=table_ids)
    q, k, v = (y[:, :, :, i].reshape(b, s, h, d // h) for i in range(3))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if self.use_qk_norm:
      q, k = qk_norm(q), qk_norm(k)
    if ve_BxSxD is not None:
      v = (v.astype(jnp.float32) + gate_BxSxH[..., None] * ve_BxSxD.reshape(b, s, h, d // h)).astype(self.cd)
    return q, k, v

  def _fused_qkv(self, x_shape, tables_cover):
    """The qkv_rope implementation a block without value embeddings takes (`model.qkv_impl`), or None."""
    if self.qkv_impl == "xla" or self.q.quant != "bf16" or not self.use_qk_norm or not tables_cover:
      return None
    b, s, d = x_shape
    ok = self.cd == jnp.bfloat16 and qkv_rope.shapes_ok(b, s, d, self.n_heads)
    if self.qkv_impl == "auto":
      ok = ok and self.rope_impl != "xla" and compile_target.platform() == "gpu" and mlp_kernels.hopper()
      return "mosaic" if ok else None
    if not ok or (self.qkv_impl == "mosaic" and compile_target.platform() != "gpu"):
      raise ValueError(f"model.qkv_impl={self.qkv_impl!r} needs bf16 compute, head_dim {mlp_kernels.BN}, tokens "
                       f"per device % {mlp_kernels.BM * mlp_kernels.CLUSTER}, sequence % {mlp_kernels.BM}, no "
                       f"'tensor' mesh axis (and for 'mosaic' a Hopper GPU); got x {x_shape}, {self.n_heads} "
                       f"heads, traced for {compile_target.platform()}. Use qkv_impl='auto' or 'xla'")
    return self.qkv_impl

  def _fused_rope(self, y_shape, tables_cover):
    if self.rope_impl == "xla" or not tables_cover:
      return False
    ok = rope_norm.supported(y_shape, y_shape[2] * y_shape[4] // self.n_heads)
    if self.rope_impl == "pallas":
      if not ok:
        raise ValueError(f"model.rope_impl='pallas' needs a power-of-two head_dim >= 32 and a sequence length "
                         f"divisible by {rope_norm.ROWS} (q/k/v {y_shape}); use rope_impl='auto' or 'xla'")
      return True
    return ok and compile_target.platform() == "gpu"

  def __call__(self, x_BxSxD, rope, ve=None, key=None):
    b, s, d = x_BxSxD.shape
    keys = [None] * 4 if key is None else list(jax.random.split(key, 4))
    q, k, v = (shard_heads(t) for t in self.project(x_BxSxD, rope, ve, keys[0]))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self._impl())
    return self.o(out.reshape(b, s, d), keys[3])

  def _impl(self):
    if self.impl == "auto":
      use_cudnn = compile_target.platform() == "gpu" and self.cd in (jnp.bfloat16, jnp.float16)
      return "cudnn" if use_cudnn else None
    return None if self.impl == "xla" else self.impl


# [B, S, H, hd] activations: batch over the data-parallel axes, heads over "tensor" (the axes of
# parcae.train.mesh). cuDNN attention's partitioner needs q, k and v sharded alike; without this,
# FSDP-sharded q/k/v kernels let propagation give them different shardings (seen on 2 H200s).
HEADS_SPEC = P(("data", "fsdp"), None, "tensor", None)


def tensor_shards(n_heads: int) -> int:
  """Size of the trainer's "tensor" axis when traced under its mesh and it divides the heads, else 1."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "tensor" not in mesh.axis_names or n_heads % mesh.shape["tensor"]:
    return 1
  return mesh.shape["tensor"]


def shard_heads(x_BxSxHxK):
  """Constrain to HEADS_SPEC when traced under jax.set_mesh with the trainer's axes; else as is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not {"data", "fsdp", "tensor"} <= set(mesh.axis_names):
    return x_BxSxHxK
  return jax.lax.with_sharding_constraint(x_BxSxHxK, HEADS_SPEC)


class MLP(nnx.Module):
  def __init__(self, cfg, key, *, cd, quant):
    d, f = cfg.d_model, cfg.ffn_mult * cfg.d_model
    self.fc = Linear(init.kernel(key, d, f, init.std_for(d)), cd, quant)
    self.proj = Linear(init.zeros(f, d), cd, quant)
    self.impl = cfg.get("mlp_impl", "auto")

  def _fused_impl(self, x_BxSxD, recompute_act):
    """The mlp_kernels implementation this call takes, or None for the XLA path."""
    if self.impl == "xla" or self.fc.quant != "bf16" or recompute_act:
      return None
    n, (d, f) = math.prod(x_BxSxD.shape[:-1]), self.fc.kernel.shape
    if self.impl == "auto":
      ok = (self.fc.cd == jnp.bfloat16 and compile_target.platform() == "gpu" and mlp_kernels.hopper()
            and mlp_kernels.shapes_ok(n, d, f))
      return "mosaic" if ok else None
    if self.impl == "mosaic" and compile_target.platform() != "gpu":
      raise ValueError("model.mlp_impl='mosaic' runs Mosaic GPU kernels, which need a Hopper GPU (this run is "
                       f"traced for {compile_target.platform()}); use mlp_impl='auto' or 'xla'")
    return self.impl

  def __call__(self, x_BxSxD, key=None, recompute_act=False):
    """recompute_act: the backward pass recomputes ReLU^2(h) from the kept h instead of keeping it (one
    MLP-sized array less per block for an elementwise pass; block_remat "mlp_act")."""
    impl = self._fused_impl(x_BxSxD, recompute_act)
    if impl:
      cast = lambda a: a.astype(self.fc.cd)
      return mlp_kernels.relu2_mlp(cast(x_BxSxD), cast(self.fc.kernel[...]), cast(self.proj.kernel[...]), impl)
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    h_BxSxF = self.fc(x_BxSxD, k1)
    if not recompute_act:
      return self.proj(h_BxSxF, k2, act=relu2)  # quantized: ReLU^2 inside proj's quantizer
    proj = jax.checkpoint(lambda h, w: self.proj.matmul(h, w, k2, relu2), policy=REMAT["full"])
    return proj(h_BxSxF, self.proj.kernel[...])


class Block(nnx.Module):
  """Pre-norm block: x + Attn(norm1(x)), then + MLP(norm2(x)); residual in float32."""

  def __init__(self, cfg, key, *, with_ve: bool, cd, quant="bf16"):
    k1, k2 = jax.random.split(key)
    self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.attn = Attention(cfg, k1, with_ve=with_ve, cd=cd, quant=quant)
    self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
    self.mlp = MLP(cfg, k2, cd=cd, quant=quant)
    self.cd, self.norm_impl = cd, cfg.get("norm_impl", "auto")

  def __call__(self, x_BxSxD, rope, ve=None, key=None, recompute_act=False, normed=None):
    x, m = self.branches(x_BxSxD, None, rope, ve, key, recompute_act, normed)
    return x + m.astype(jnp.float32)

  def branches(self, x_BxSxD, pending, rope, ve=None, key=None, recompute_act=False, normed=None):
    """(x + f32(pending) + f32(attention branch), MLP branch output): the block without its last residual add,
    so that the next block can fuse it with its norm1 (`run_stage`). With the add + norm kernels
    (`model.norm_impl`) each add that a norm reads is one kernel each way; pending needs them. normed: norm1(x)
    already computed (the loop boundary's kernel, `loop_boundary`)."""
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    kernels = self.add_norm_kernels(x_BxSxD.shape)
    if pending is not None:  # the previous block's MLP output joins the residual inside norm1's kernel
      x, h = add_norm.add_rms_norm(x_BxSxD, pending, self.norm1.scale[...], self.norm1.eps, self.cd)
    else:
      x, h = x_BxSxD, self.norm1(x_BxSxD) if normed is None else normed
    a = self.attn(h, rope, ve, k1)
    if kernels:  # the add and norm2 as one kernel each way (the MLP reads the compute dtype)
      x, n = add_norm.add_rms_norm(x, a, self.norm2.scale[...], self.norm2.eps, self.cd)
    else:
      x = x + a.astype(jnp.float32)
      n = self.norm2(x)
    return x, self.mlp(n, k2, recompute_act)

  def add_norm_kernels(self, x_shape) -> bool:
    """Whether this block's norms take the add + norm kernels for a residual of x_shape (`model.norm_impl`)."""
    if self.norm_impl == "xla":
      return False
    ok = add_norm.usable(x_shape)
    if self.norm_impl == "pallas":
      if not ok:
        raise ValueError(f"model.norm_impl='pallas' needs tokens per device divisible by {add_norm.ROWS}, a "
                         f"width with a power-of-two column chunk >= 64 and no 'tensor' mesh axis (residual "
                         f"{x_shape}); use norm_impl='auto' or 'xla'")
      return True
    return ok and compile_target.platform() == "gpu"


def make_stage(cfg, key, ve_flags, cd, quant):
  keys = jax.random.split(key, max(1, len(ve_flags)))
  return nnx.List([Block(cfg, keys[i], with_ve=f, cd=cd, quant=quant) for i, f in enumerate(ve_flags)])


def run_stage(blocks, x, rope, ves, key=None, policy: str = "none", first: int = 0, normed=None, defer=False,
              norm=None, norm_dtype=jnp.float32):
  """The blocks in order; each rematerialized with the named policy (`REMAT`) unless "none" (or, for
  "mlp_act", recomputing only its MLP's activation); with first > 0 only the first `first` blocks are (a
  memory / speed trade finer than all or nothing). With the add + norm kernels (`model.norm_impl`) a block's
  last residual add is left to the next block's norm1 kernel (`Block.branches`) and done here after the last,
  or with defer=True left to the caller: (x, pending MLP output). normed: the first block's norm1(x), given.
  norm: an RMSNorm closing the stage, whose output (in norm_dtype: the compute dtype where every reader casts
  to it) is returned instead; with the kernels the last add and the norm are one kernel each way."""
  pending = None
  for i, blk in enumerate(blocks):
    k = None if key is None else jax.random.fold_in(key, i)
    fuse = blk.add_norm_kernels(x.shape)
    if not fuse and pending is not None:
      x, pending = x + pending.astype(jnp.float32), None
    nrm = normed if i == 0 else None
    if policy in ("none", "mlp_act") or 0 < first <= i:
      act = policy == "mlp_act" and not 0 < first <= i
      out = blk.branches(x, pending, rope, ves[i], k, act, nrm) if fuse else blk(x, rope, ves[i], k, act, nrm)
    else:
      graphdef, state = nnx.split(blk)
      if fuse:
        f = lambda st, x, p, n, rope, ve, k: nnx.merge(graphdef, st).branches(x, p, rope, ve, k, normed=n)
      else:
        f = lambda st, x, p, n, rope, ve, k: nnx.merge(graphdef, st)(x, rope, ve, k, normed=n)
      out = remat(f, policy)(state, x, pending, nrm, rope, ves[i], k)
    x, pending = out if fuse else (out, None)
  if defer:
    if pending is None:
      raise ValueError("run_stage(defer=True) needs the add + norm kernels (model.norm_impl) on its last block")
    return x, pending
  if norm is not None and pending is not None:
    return add_norm.rms_norm_of_sum(x, pending, norm.scale[...], norm.eps, norm_dtype)
  x = x if pending is None else x + pending.astype(jnp.float32)
  return x if norm is None else norm(x).astype(norm_dtype)


def head_logits(y_BxSxD, table_VxD, cd):
  """Tied head: logits = y @ embed^T in the compute dtype, returned as float32."""
  return jnp.dot(y_BxSxD.astype(cd), table_VxD.astype(cd).T).astype(jnp.float32)
