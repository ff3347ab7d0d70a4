"""Parcae: prelude -> loop over one shared core (state h, injection of e) -> C -> coda -> tied head.

The loop of `hidden`:
  phase 1: n no-grad iterations, a `while_loop` whose count max(n_B) is traced (one compilation for any n);
           the core's parameters and every loop input pass through stop_gradient, so nothing flows back.
           `model.no_grad_split=2`: the loop runs the whole batch only to the deepest n of the shallower half
           of each batch shard's sequences, then that shard's deeper half alone to max(n_B) (half the batch:
           the same per-sequence iterations for less work when the sequences are grouped by depth; an NVFP4
           recipe's tensor scale then spans the half batch in the second loop); `=4` splits the deeper half
           again (a third loop on a quarter of the batch).
  phase 2: `grad_depth` iterations (static) with gradient, a `scan` of a rematerialized step
           (`jax.checkpoint` per iteration); `model.grad_unroll` unrolls it into straight-line code, so the
           residuals the backward pass keeps are not stacked into [grad_depth, ...] loop buffers.
Per-sequence depths mask the update: sequence b changes only while i < n_b (phase 1) and i < k_b (phase 2),
as the reference does. A test-time forward at T loops is phase 1 with n_b = T and no phase 2.
With the add + norm kernels and the diagonal injection, an iteration leaves its masked update pending in the
loop carry; the next iteration's boundary kernel (model/loop_boundary.py) applies it together with the
injection and its first norm1, and `_settle` applies the one a loop ends with.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from parcae.model import init, layers, loop_boundary, sampler
from parcae.model.config import grad_depth, ve_layout
from parcae.model.injection import make_injection

def _norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def _keyed(quant_key, phase, i):
  """The stochastic-rounding key of loop iteration i of a phase (None without a quant key)."""
  return None if quant_key is None else jax.random.fold_in(jax.random.fold_in(quant_key, phase), i)


def _update(live_B, new, h, d_BxS):
  """The masked loop update and the per-token norm of the live sequences' change (telemetry)."""
  sg = jax.lax.stop_gradient
  return jnp.where(live_B[:, None, None], new, h), jnp.where(live_B[:, None], _norm(sg(new) - sg(h)), d_BxS)


class Parcae(nnx.Module):
  def __init__(self, cfg, key, quant: str = "bf16"):
    cd = jnp.dtype(cfg.compute_dtype)
    ks = jax.random.split(key, 6)
    ve = ve_layout(cfg)
    self.cfg = cfg
    self.cd = cd
    self.embed = layers.Embed(init.embedding(ks[0], cfg.vocab_size, cfg.d_model))
    self.prelude = layers.make_stage(cfg, ks[1], ve["prelude"], cd, quant)
    self.prelude_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.prelude_norm else None
    self.injection = make_injection(cfg, ks[2], cd)
    self.core = layers.make_stage(cfg, ks[3], ve["core"], cd, quant)
    self.C = layers.Linear(init.kernel(ks[4], cfg.d_model, cfg.d_model, init.std_for(cfg.d_model)), cd)
    self.coda = layers.make_stage(cfg, ks[5], ve["coda"], cd, quant)
    self.final_norm = layers.RMSNorm(cfg.d_model, cfg.norm_eps)
    self.quant = quant

  def __call__(self, input_ids, loops=None, key=None):
    """Float32 logits [B, S, V] after `loops` iterations (default: mean_recurrence); never samples depths."""
    b = input_ids.shape[0]
    t = self.cfg.mean_recurrence if loops is None else loops
    n_B = jnp.full((b,), t, jnp.int32)
    y, _ = self.hidden(input_ids, n_B, jnp.zeros((b,), jnp.int32), key=key, grad_steps=0)
    return self.logits(y)

  def loop_state(self, input_ids, loops=None, key=None):
    """(e, h_T): the injected prelude output and the loop state after `loops` iterations (for analysis)."""
    cfg, b = self.cfg, input_ids.shape[0]
    t = cfg.mean_recurrence if loops is None else loops
    rope = layers.rope_tables(input_ids.shape[1], cfg.d_model // cfg.n_heads, cfg.rope_base)
    e = self._prelude(input_ids, rope, None)
    h0 = sampler.init_state(jax.random.key(0) if key is None else key, e.shape, cfg.state_init, cfg.d_model)
    ves = [blk.attn.lookup_ve(input_ids) for blk in self.core]
    n_B, k_B = jnp.full((b,), t, jnp.int32), jnp.zeros((b,), jnp.int32)
    return e, self._loop(h0, self.injection.prepare(e), ves, rope, n_B, k_B, 0, None)[0]

  def _prelude(self, ids_BxS, rope, quant_key):
    x = self.embed(ids_BxS)
    return layers.run_stage(self.prelude, x, rope, [b.attn.lookup_ve(ids_BxS) for b in self.prelude], quant_key,
                            self.cfg.block_remat, self.cfg.block_remat_first, norm=self.prelude_norm,
                            norm_dtype=self.cd if self.injection.reads_e_in_cd else jnp.float32)

  def logits(self, y_BxSxD):
    return layers.head_logits(y_BxSxD, self.embed.embedding[...], self.cd)

  def sample_depths(self, key, batch: int):
    return sampler.sample_depths(key, batch, self.cfg)

  def hidden(self, ids_BxS, n_B, k_B, *, key=None, grad_steps=None, quant_key=None):
    """Final-normed hidden states [B, S, D] in the compute dtype (the head GEMM's operand) and loop telemetry.

    n_B, k_B: no-grad and grad iterations per sequence; grad_steps: static length of the grad phase
    (default: the config's grad depth; 0 for inference). key: PRNG key of the loop-state init
    (None = a fixed key, so inference is deterministic). quant_key: key for stochastic-rounding recipes.
    """
    grad_steps = grad_depth(self.cfg) if grad_steps is None else grad_steps
    qk = (lambda i: None) if quant_key is None else (lambda i: jax.random.fold_in(quant_key, i))
    rope, h0, ctx, ves = self._encode(ids_BxS, key, qk(0))
    h, step_BxS = self._loop(h0, ctx, ves, rope, n_B, k_B, grad_steps, qk(1))
    return self._decode(h, ids_BxS, rope, qk(2)), self._telemetry(h, step_BxS, n_B, k_B)

  def hidden_at(self, ids_BxS, loops_K, readout, *, key=None):
    """readout(y, aux) at each loop count of the ascending int32 loops_K [K] (values traced, K static) in one
    pass: the loop runs once to loops_K[-1], and C -> coda -> final norm -> readout at each requested count,
    so T = 1..16 costs 16 core iterations instead of 136. y and aux are hidden()'s at that count
    (inference: n_B = T, no grad phase). Returns readout's outputs stacked on a leading K axis."""
    rope, h0, ctx, ves = self._encode(ids_BxS, key, None)
    sg = jax.lax.stop_gradient
    no_grad, ctx, ves = self._no_grad_fn(rope, None), sg(ctx), sg(ves)
    b = ids_BxS.shape[0]
    zeros_B = jnp.zeros((b,), jnp.int32)

    def advance(carry, t):
      done, c = carry
      n_B = jnp.full((b,), t, jnp.int32)
      c = no_grad(c, ctx, ves, n_B, done, t)
      h, d_BxS = self._settle(c)
      return (t, c), readout(self._decode(h, ids_BxS, rope, None), self._telemetry(h, d_BxS, n_B, zeros_B))

    return jax.lax.scan(advance, (jnp.int32(0), self._carry(sg(h0))), loops_K)[1]

  def _encode(self, ids_BxS, key, quant_key):
    """(rope tables, initial loop state h0, the injection's context of the prelude output, core VE lookups)."""
    cfg = self.cfg
    rope = layers.rope_tables(ids_BxS.shape[1], cfg.d_model // cfg.n_heads, cfg.rope_base)
    e = self._prelude(ids_BxS, rope, quant_key)
    h0 = sampler.init_state(jax.random.key(0) if key is None else key, e.shape, cfg.state_init, cfg.d_model)
    return rope, h0, self.injection.prepare(e), [b.attn.lookup_ve(ids_BxS) for b in self.core]

  def _decode(self, h, ids_BxS, rope, quant_key):
    """C -> coda -> final norm of a loop state: the hidden states the head reads."""
    y = self.C(h).astype(jnp.float32)
    return layers.run_stage(self.coda, y, rope, [b.attn.lookup_ve(ids_BxS) for b in self.coda], quant_key,
                            self.cfg.block_remat, self.cfg.block_remat_first, norm=self.final_norm, norm_dtype=self.cd)

  def _fused_boundary(self, shape) -> bool:
    """Whether the loop's boundary (update, injection, norm1) is one kernel each way: `loop_boundary`."""
    return self.cfg.injection == "diagonal" and self.core[-1].add_norm_kernels(shape)

  def _carry(self, h):
    """The loop carry at state h: (h, |h - h_prev| per token (zeros), pending). pending = None, or with the fused
    boundary the last pass's output not yet added to h (x, its MLP output p, live_B), which the next pass's
    boundary kernel applies: here none (no row live; zeros, not h, so the loop's buffers stay distinct)."""
    b, s, _ = h.shape
    pending = None
    if self._fused_boundary(h.shape):
      pending = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(h.shape, self.cd), jnp.zeros((b,), bool))
    return h, jnp.zeros((b, s), jnp.float32), pending

  @staticmethod
  def _settle(carry):
    """(h, d_BxS) of a carry: its pending update applied (`_update`)."""
    h, d_BxS, pending = carry
    if pending is None:
      return h, d_BxS
    x, p, live_B = pending
    return _update(live_B, x + p.astype(jnp.float32), h, d_BxS)

  def _core_fn(self):
    """A pure step (core_state, carry, ctx, ves, rope, key, live_B) -> carry (`_carry`): one pass through the
    core and the masked update, so the same code serves frozen and live weights. With the fused boundary the
    pass starts with the kernel (last pass's update, injection, first norm1) and leaves its own update pending."""
    graphdef, _ = nnx.split(self.core)
    inject, cd = self.injection.step, self.cd

    def step(core_state, carry, ctx, ves, rope, key, live_B):
      core = nnx.merge(graphdef, core_state)
      h, d_BxS, pending = carry
      if pending is None:
        return _update(live_B, layers.run_stage(core, inject(h, ctx), rope, ves, key), h, d_BxS) + (None,)
      x, p, was_live = pending
      norm1 = core[0].norm1
      h, dist, u, n = loop_boundary.boundary(x, p, h, ctx, was_live, norm1.scale[...], norm1.eps, cd)
      x, p = layers.run_stage(core, u, rope, ves, key, normed=n, defer=True)
      return h, jnp.where(was_live[:, None], dist, d_BxS), (x, p, live_B)
    return step

  def _no_grad_fn(self, rope, quant_key):
    """no_grad(carry, ctx, ves, n_B, start, stop) -> carry (`_carry`): phase-1 iterations start..stop-1 with the
    core's parameters frozen; sequence b changes only while i < n_b (see `_loop`)."""
    step = self._core_fn()
    frozen = layers.kernels_in(jax.lax.stop_gradient(nnx.state(self.core)), self.cd, self.quant)

    def no_grad(carry, ctx, ves, n_B, start, stop):
      def body(ic):
        i, c = ic
        return i + 1, step(frozen, c, ctx, ves, rope, _keyed(quant_key, 0, i), i < n_B)
      return jax.lax.while_loop(lambda ic: ic[0] < stop, body, (start, carry))[1]
    return no_grad

  def _loop(self, h0, ctx, ves, rope, n_B, k_B, grad_steps, quant_key):
    """(h, |h - h_prev| per token): the final state and the norm of each sequence's last live update
    (telemetry; a [B, S] carry instead of the whole previous state, so no iteration writes one)."""
    step = self._core_fn()
    state = nnx.state(self.core)
    sg = jax.lax.stop_gradient
    frozen = (sg(ctx), sg(ves))
    no_grad = self._no_grad_fn(rope, quant_key)

    carry = _split_no_grad(no_grad, self._carry(sg(h0)), frozen[0], frozen[1], n_B, self.cfg.no_grad_split)
    if grad_steps == 0:
      return self._settle(carry)
    unroll = self.cfg.grad_unroll
    live_step = layers.remat(step, self.cfg.remat, in_scan=not unroll)

    def grad_body(carry, i):
      return live_step(state, carry, ctx, ves, rope, _keyed(quant_key, 1, i), i < k_B), None

    if not unroll:
      return self._settle(jax.lax.scan(grad_body, carry, jnp.arange(grad_steps))[0])
    for i in range(grad_steps):  # a Python loop: jax's unrolled scan would still stack the residuals
      carry, _ = grad_body(carry, jnp.int32(i))
    return self._settle(carry)

  def _telemetry(self, h, step_BxS, n_B, k_B):
    """Loop statistics the reference never logs (all float32 scalars, cheap)."""
    sg = jax.lax.stop_gradient
    h = sg(h)
    h_norm = _norm(h)
    out = {
        "state_norm": jnp.mean(h_norm),
        "rel_residual": jnp.mean(sg(step_BxS) / (h_norm + 1e-12)),
        "n_mean": jnp.mean(n_B.astype(jnp.float32)),
        "k_mean": jnp.mean(k_B.astype(jnp.float32)),
        "n_max": jnp.max(n_B).astype(jnp.float32),
        "n_exec": executed_no_grad_iters(n_B, self.cfg.no_grad_split),
    }
    if self.cfg.injection == "diagonal":
      delta, decay = self.injection.delta_decay()
      out.update(decay_min=decay.min(), decay_mean=decay.mean(), decay_max=decay.max(),
                 delta_min=delta.min(), delta_mean=delta.mean(), delta_max=delta.max(),
                 B_norm=_spectral_norm(self.injection.B.kernel[...]))
    out["C_norm"] = _spectral_norm(self.C.kernel[...])
    return {k: sg(v) for k, v in out.items()}


def _batch_shards(b: int) -> int:
  """How many shards the trainer's batch axes (data, fsdp) of the current mesh cut a batch of b into."""
  mesh = jax.sharding.get_abstract_mesh()
  n = 1
  for a in ("data", "fsdp"):
    if not mesh.empty and a in mesh.axis_names and a not in mesh.manual_axes:
      n *= mesh.shape[a]
  return n if b % n == 0 else 1


def _halves(b: int, split: int):
  """(lower, upper, merge) for each batch shard's shallower / deeper half, or None when there is no split;
  merge(full, hi) puts hi in place of full's deeper halves.
  Shards hold contiguous runs of the batch, so [B] -> [shards, B / shards] keeps each shard's rows local."""
  shards = _batch_shards(b)
  per = b // shards
  if split == 1 or per < 2 or per % 2:
    return None
  cut = lambda a, sl: a.reshape((shards, per) + a.shape[1:])[:, sl].reshape((b // 2,) + a.shape[1:])
  lower, upper = (lambda a: cut(a, slice(None, per // 2))), (lambda a: cut(a, slice(per // 2, None)))

  def merge(full, hi):  # full with its deeper halves replaced by hi: an in-place update of those rows
    view = full.reshape((shards, per) + full.shape[1:])
    return view.at[:, per // 2:].set(hi.reshape((shards, per // 2) + hi.shape[1:])).reshape(full.shape)
  return lower, upper, merge


def _split_no_grad(no_grad, carry, ctx, ves, n_B, split: int, start=0):
  """Phase 1 (module doc): one while loop from `start` to max(n_B), or with split > 1 the whole batch to the
  shallower halves' deepest n and then the deeper halves alone, split again with split / 2 (the same
  iterations for every sequence). carry: `Parcae._carry`, every array with the batch first."""
  b = n_B.shape[0]
  halves = _halves(b, split) if b else None
  if halves is None:
    return no_grad(carry, ctx, ves, n_B, jnp.int32(start), jnp.max(n_B) if b else 0)
  lower, upper, merge = halves
  n_lo = jnp.maximum(jnp.max(lower(n_B)), start)  # under a mesh a shard's deeper half may be shallower
  carry = no_grad(carry, ctx, ves, n_B, jnp.int32(start), n_lo)
  per_seq = lambda a: upper(a) if a.ndim >= 2 and a.shape[0] == b else a  # [B, S, D] inputs, [B, S] ids
  hi = _split_no_grad(no_grad, jax.tree.map(upper, carry), jax.tree.map(per_seq, ctx),
                      jax.tree.map(per_seq, ves), upper(n_B), split // 2, n_lo)
  return jax.tree.map(merge, carry, hi)


def executed_no_grad_iters(n_B, split: int, start=0):
  """No-grad loop iterations the batch executes, in whole-batch units (honest MFU): max(n_B), or with the
  split the shallower halves' deepest n plus half of what the deeper halves execute from there."""
  b = n_B.shape[0]
  halves = _halves(b, split) if b else None
  n_max = jnp.max(n_B).astype(jnp.float32) if b else jnp.float32(0)
  if halves is None:
    return jnp.maximum(n_max - start, 0.0)
  n_lo = jnp.maximum(jnp.max(halves[0](n_B)).astype(jnp.float32), start)
  return n_lo - start + 0.5 * executed_no_grad_iters(halves[1](n_B), split // 2, n_lo)


def _spectral_norm(w, iters: int = 8):
  """Largest singular value by a few power iterations (cheap, for telemetry only)."""
  v = jnp.ones((w.shape[1],), jnp.float32) / jnp.sqrt(float(w.shape[1]))
  for _ in range(iters):
    u = w @ v
    u = u / (jnp.linalg.norm(u) + 1e-12)
    v = w.T @ u
    v = v / (jnp.linalg.norm(v) + 1e-12)
  return jnp.linalg.norm(w @ v)
