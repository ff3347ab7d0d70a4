"""KV-cached generation for Parcae (looped) and GPT models: static cache, jitted prefill and decode step.

    ids_BxN = generate(model, prompt_BxP, loops=8, max_new_tokens=256)            # greedy, deterministic
    ids_BxN = generate(model, prompt_BxP, max_new_tokens=64, temperature=0.8, top_k=50, key=jax.random.key(1))

Cache: one slot per block application of the unrolled stack (the reference's per-(iteration, core layer)
cache, spec 7.4): prelude i -> slot i; core layer j of iteration r -> P + r*R + j; coda i -> P + T*R + i
(T = loop count, fixed when the cache is made). GPT: block i -> slot i. Each slot holds keys and values after
RoPE and QK-norm in the compute dtype, laid out [B, H, max_len, K] (contiguous per head, so decode attention
reads the cache without a transpose). Slots are separate arrays, so every write is an in-place update of a
donated buffer. Memory: 2 * n_slots * B * max_len * D * bytes(compute dtype).

Loop state: each position p starts from h_0 = init_state(fold_in(state_key, p)) with the model's `state_init`,
so a token's state does not depend on how the sequence is split into prefill and decode steps, and greedy
decoding is deterministic (state_key defaults to the fixed key the model's forward uses). The full forward
`model(ids)` draws h_0 for the whole sequence from one key instead; with state_init="zero" both agree.

Generation runs the prompt through `prefill`, then all decode steps in one jitted `fori_loop` (no host round
trip per token). `decode_step` is the same step, jitted on its own, for callers that drive the loop.
"""
from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from parcae.model import layers, sampler


class KVCache(NamedTuple):
  k: tuple  # per slot: keys [B, H, max_len, K] in the compute dtype, after RoPE and QK-norm
  v: tuple  # per slot: values [B, H, max_len, K]
  pos: jax.Array  # int32 scalar: positions already filled (the next token's position)


# ------------------------------------------------------------------------------------------------ the cache
def _is_parcae(model) -> bool:
  return model.cfg.kind == "parcae"


def _loops(model, loops):
  t = model.cfg.mean_recurrence if loops is None else loops
  if _is_parcae(model) and (not isinstance(t, int) or t < 1):
    raise ValueError(f"loops={t!r} must be a positive int (default: model.mean_recurrence)")
  return t


def num_slots(model, loops=None) -> int:
  """Cache slots: P + T*R + Co for Parcae, n_layers for GPT."""
  if not _is_parcae(model):
    return len(model.blocks)
  return len(model.prelude) + _loops(model, loops) * len(model.core) + len(model.coda)


def _loops_of(model, cache: KVCache) -> int:
  """The loop count T a cache was made for (recovered from its number of slots)."""
  if not _is_parcae(model):
    return 0
  return (len(cache.k) - len(model.prelude) - len(model.coda)) // len(model.core)


def init_cache(model, batch: int, max_len: int, loops=None) -> KVCache:
  """An empty cache for `batch` sequences of up to `max_len` positions at `loops` iterations."""
  cfg = model.cfg
  if batch < 1 or max_len < 1:
    raise ValueError(f"batch={batch} and max_len={max_len} must be >= 1")
  if max_len > cfg.max_seq_len:
    raise ValueError(f"max_len={max_len} (prompt + new tokens) exceeds model.max_seq_len={cfg.max_seq_len}, "
                     "the longest sequence the model is trained for; shorten the prompt or max_new_tokens")
  h, kd = cfg.n_heads, cfg.d_model // cfg.n_heads
  n = num_slots(model, loops)
  zeros = lambda: jnp.zeros((batch, h, max_len, kd), model.cd)
  return KVCache(tuple(zeros() for _ in range(n)), tuple(zeros() for _ in range(n)), jnp.int32(0))


# ------------------------------------------------------------------------------------------------ the model
def _attend(q_BxSxHxK, k_BxHxLxK, v_BxHxLxK, pos):
  """Causal attention of S new queries at positions pos..pos+S-1 over the cache (as the model's XLA path:
  float32 logits and softmax, probabilities cast to the value dtype)."""
  s, l, kd = q_BxSxHxK.shape[1], k_BxHxLxK.shape[2], q_BxSxHxK.shape[3]
  logits = jnp.einsum("bqhk,bhlk->bhql", q_BxSxHxK, k_BxHxLxK, preferred_element_type=jnp.float32)
  logits = logits * jnp.float32(1.0 / math.sqrt(kd))
  visible_SxL = jnp.arange(l)[None, :] <= (pos + jnp.arange(s))[:, None]
  logits = jnp.where(visible_SxL[None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_BxHxLxK.dtype)
  return jnp.einsum("bhql,bhlk->bqhk", probs, v_BxHxLxK)


def _block(blk, x_BxSxD, rope, ve, k_cache, v_cache, pos):
  """One pre-norm block on new positions, reading and extending its cache slot (the model's Block math)."""
  a = blk.attn
  b, s, d = x_BxSxD.shape
  q, k, v = a.project(blk.norm1(x_BxSxD), rope, ve)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, pos, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, pos, 0))
  out = _attend(q, k_cache, v_cache, pos)
  x = x_BxSxD + a.o(out.reshape(b, s, d)).astype(jnp.float32)
  return x + blk.mlp(blk.norm2(x)).astype(jnp.float32), k_cache, v_cache


def _stage(blocks, x, ids, rope, ks, vs, first_slot, pos):
  """Run `blocks` on slots first_slot.. (ks, vs are lists, updated in place)."""
  for i, blk in enumerate(blocks):
    j = first_slot + i
    x, ks[j], vs[j] = _block(blk, x, rope, blk.attn.lookup_ve(ids), ks[j], vs[j], pos)
  return x


def init_states(model, state_key, batch: int, pos, length: int):
  """h_0 [B, S, D] (float32) for positions pos..pos+S-1: position p draws from fold_in(state_key, p)."""
  cfg = model.cfg
  draw = lambda p: sampler.init_state(jax.random.fold_in(state_key, p), (batch, cfg.d_model), cfg.state_init,
                                      cfg.d_model)
  return jnp.swapaxes(jax.vmap(draw)(pos + jnp.arange(length)), 0, 1)


def _forward(model, ids_BxS, cache: KVCache, state_key):
  """Final-normed hidden states [B, S, D] of new tokens at cache.pos.., and the extended cache (all NaN when
  the tokens do not fit in the cache)."""
  cfg = model.cfg
  b, s = ids_BxS.shape
  pos = cache.pos
  cos, sin = layers.rope_tables(cache.k[0].shape[2], cfg.d_model // cfg.n_heads, cfg.rope_base)
  rope = (jax.lax.dynamic_slice_in_dim(cos, pos, s), jax.lax.dynamic_slice_in_dim(sin, pos, s))
  ks, vs = list(cache.k), list(cache.v)
  x = model.embed(ids_BxS)
  if not _is_parcae(model):
    x = _stage(model.blocks, x, ids_BxS, rope, ks, vs, 0, pos)
  else:
    p_, r_, t = len(model.prelude), len(model.core), _loops_of(model, cache)
    x = _stage(model.prelude, x, ids_BxS, rope, ks, vs, 0, pos)
    e = model.prelude_norm(x) if model.prelude_norm is not None else x
    ctx = model.injection.prepare(e)
    h = init_states(model, state_key, b, pos, s)
    for it in range(t):
      h = _stage(model.core, model.injection.step(h, ctx), ids_BxS, rope, ks, vs, p_ + it * r_, pos)
    x = model.C(h).astype(jnp.float32)
    x = _stage(model.coda, x, ids_BxS, rope, ks, vs, p_ + t * r_, pos)
  # writes past the cache end cannot be caught on device without a host sync: make them visible as NaN
  y = jnp.where(pos + s <= cache.k[0].shape[2], model.final_norm(x), jnp.nan)
  return y, KVCache(tuple(ks), tuple(vs), pos + s)


def sample(logits_BxV, key, temperature: float = 0.0, top_k: int = 0):
  """Next tokens [B] int32: argmax if temperature == 0, else softmax(logits / temperature) over the top_k."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  if top_k:
    kth_Bx1 = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_Bx1, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------- jitted entry points
_COMPILED = weakref.WeakKeyDictionary()  # model -> (graphdef, {name+statics: jitted function})


def _compiled(model, name: str, statics: tuple):
  """The jitted pure function `name` for this model's graph and static arguments (compiled once)."""
  if model not in _COMPILED:
    _COMPILED[model] = (nnx.graphdef(model), {})
  graphdef, fns = _COMPILED[model]
  if (name, statics) not in fns:
    fns[(name, statics)] = jax.jit(_FNS[name](graphdef, *statics), donate_argnums=(1,))
  return fns[(name, statics)]


def _prefill_fn(graphdef, all_logits: bool):
  def fn(state, cache, ids_BxS, state_key):
    model = nnx.merge(graphdef, state)
    y_BxSxD, cache = _forward(model, ids_BxS, cache, state_key)
    if all_logits:
      return model.logits(y_BxSxD), cache
    return model.logits(y_BxSxD[:, -1]), cache
  return fn


def _step(model, cache, tok_B, state_key, sample_key, temperature, top_k, head_VxD):
  y, new_cache = _forward(model, tok_B[:, None], cache, state_key)
  logits_BxV = layers.head_logits(y[:, 0], head_VxD, model.cd)
  nxt = sample(logits_BxV, jax.random.fold_in(sample_key, cache.pos), temperature, top_k)
  return nxt, logits_BxV, new_cache


def _decode_step_fn(graphdef, temperature, top_k):
  def fn(state, cache, tok_B, state_key, sample_key):
    model = nnx.merge(graphdef, state)
    head = model.embed.embedding[...]
    return _step(model, cache, tok_B, state_key, sample_key, temperature, top_k, head)
  return fn


def _cast_kernels(graphdef, state):
  """(model, head table) with every Linear kernel and the tied head cast to the compute dtype once, so a decode
  loop reads bf16 weights instead of converting float32 ones at every step (identical math: Linear casts to the
  compute dtype anyway). Simulated low-precision recipes (quant != "bf16") read float32 kernels: unchanged."""
  model = nnx.merge(graphdef, state)
  if model.quant != "bf16":
    return model, model.embed.embedding[...]
  cd = model.cd
  is_kernel = lambda path: any(getattr(k, "key", None) == "kernel" for k in path)
  state = jax.tree_util.tree_map_with_path(lambda p, x: x.astype(cd) if is_kernel(p) else x, state)
  return nnx.merge(graphdef, state), model.embed.embedding[...].astype(cd)


def _decode_loop_fn(graphdef, n_steps, temperature, top_k):
  """n_steps decode steps in one fori_loop: feed tok_B, return the n_steps sampled tokens [B, n_steps]."""
  def fn(state, cache, tok_B, state_key, sample_key):
    model, head = _cast_kernels(graphdef, state)

    def body(i, carry):
      cache, tok, out_BxN = carry
      nxt, _, cache = _step(model, cache, tok, state_key, sample_key, temperature, top_k, head)
      return cache, nxt, out_BxN.at[:, i].set(nxt)
    out = jnp.zeros((tok_B.shape[0], n_steps), jnp.int32)
    cache, _, out = jax.lax.fori_loop(0, n_steps, body, (cache, tok_B, out))
    return out, cache
  return fn


_FNS = {"prefill": _prefill_fn, "decode_step": _decode_step_fn, "decode_loop": _decode_loop_fn}


def _default_key(key):
  return jax.random.key(0) if key is None else key


def prefill(model, cache: KVCache, ids_BxS, *, state_key=None, all_logits: bool = False):
  """Run tokens ids_BxS at positions cache.pos.. (donates `cache`): (float32 logits, cache).

  Logits are [B, V] at the last position, or [B, S, V] with all_logits=True.
  """
  fn = _compiled(model, "prefill", (bool(all_logits),))
  return fn(nnx.state(model), cache, jnp.asarray(ids_BxS, jnp.int32), _default_key(state_key))


def decode_step(model, cache: KVCache, tok_B, *, key=None, state_key=None, temperature: float = 0.0,
                top_k: int = 0):
  """Feed one token per sequence (donates `cache`): (next token [B], float32 logits [B, V], cache).

  The next token is sampled with fold_in(key, position of tok_B); greedy when temperature == 0. A step past the
  cache's max_len returns NaN logits.
  """
  _check_sampling(temperature, top_k, model.cfg.vocab_size)
  fn = _compiled(model, "decode_step", (float(temperature), int(top_k)))
  return fn(nnx.state(model), cache, jnp.asarray(tok_B, jnp.int32), _default_key(state_key), _default_key(key))


def _check_sampling(temperature, top_k, vocab):
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  if not 0 <= top_k <= vocab:
    raise ValueError(f"top_k={top_k} must be in [0, vocab_size={vocab}] (0 = no top-k filter)")


def decode(model, cache: KVCache, tok_B, n_steps: int, *, key=None, state_key=None, temperature: float = 0.0,
           top_k: int = 0):
  """n_steps decode steps in one jitted loop, feeding tok_B first (donates `cache`): (tokens [B, n_steps], cache).

  Same tokens as n_steps calls of decode_step, each feeding the token the previous one sampled.
  """
  if n_steps < 1:
    raise ValueError(f"n_steps={n_steps} must be >= 1")
  _check_sampling(temperature, top_k, model.cfg.vocab_size)
  fn = _compiled(model, "decode_loop", (int(n_steps), float(temperature), int(top_k)))
  return fn(nnx.state(model), cache, jnp.asarray(tok_B, jnp.int32), _default_key(state_key), _default_key(key))


def generate(model, prompt_ids_BxP, *, loops=None, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             key=None, state_key=None):
  """Prompt followed by `max_new_tokens` generated tokens, [B, P + N] int32.

  loops: iterations T (Parcae; default model.mean_recurrence; ignored by GPT). key: sampling key (unused when
  greedy). state_key: key of the per-position loop-state init (default: the model's fixed key).
  """
  prompt = jnp.asarray(prompt_ids_BxP, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt_ids_BxP must be [batch, prompt_len >= 1], got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  _check_sampling(temperature, top_k, model.cfg.vocab_size)
  b, p = prompt.shape
  state_key, key = _default_key(state_key), _default_key(key)
  cache = init_cache(model, b, p + max_new_tokens - 1, _loops(model, loops))
  logits_BxV, cache = prefill(model, cache, prompt, state_key=state_key)
  first = sample(logits_BxV, jax.random.fold_in(key, p - 1), temperature, top_k)
  if max_new_tokens == 1:
    return jnp.concatenate([prompt, first[:, None]], axis=1)
  rest, _ = decode(model, cache, first, max_new_tokens - 1, key=key, state_key=state_key,
                   temperature=temperature, top_k=top_k)
  return jnp.concatenate([prompt, first[:, None], rest], axis=1)
