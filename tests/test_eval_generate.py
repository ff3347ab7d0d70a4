"""KV-cached generation: every cached step against the full (uncached) forward, greedy generation against argmax
of the full forward, per-position loop-state init, sampling statistics, input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcae import model as M
from parcae.eval import generate as G
from parcae.model import layers

V, D, H = 64, 64, 2
T = 2  # test-time loops, deliberately != mean_recurrence (3)
TOL = 1e-5


def tiny_cfg(**kw):
  c = M.default_model_config()
  c.vocab_size, c.d_model, c.n_heads, c.max_seq_len, c.compute_dtype = V, D, H, 32, "float32"
  c.prelude_layers, c.core_layers, c.coda_layers, c.n_layers = 1, 2, 1, 3
  c.mean_recurrence, c.mean_backprop_depth = 3, 2
  for k, v in kw.items():
    c[k] = v
  return c


def perturbed_model(cfg, seed=0):
  """Zero-initialized projections made non-zero so attention, MLP and VE paths all matter."""
  graphdef, state = nnx.split(M.build(cfg, jax.random.key(seed)))

  @jax.jit
  def perturb(state):
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)
  return nnx.merge(graphdef, perturb(state))


_FULL = {}


def full_logits(model, ids_BxS, loops):
  """model(ids, loops=loops), the uncached forward, jitted (one compilation per model, loops and shape)."""
  if (id(model), loops) not in _FULL:
    graphdef = nnx.graphdef(model)
    _FULL[(id(model), loops)] = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, loops=loops))
  return _FULL[(id(model), loops)](nnx.state(model), ids_BxS)


@pytest.fixture(scope="module")
def parcae_zero():
  return perturbed_model(tiny_cfg(state_init="zero"))


@pytest.fixture(scope="module")
def parcae_like():
  return perturbed_model(tiny_cfg(state_init="like-init"), seed=2)


@pytest.fixture(scope="module")
def gpt():
  return perturbed_model(tiny_cfg(kind="gpt"), seed=1)


# Shared shapes, so that compiled prefill/decode functions are reused across tests.
B, P, N = 2, 4, 6  # batch, prompt, new tokens


def ids(b, s, seed=3):
  return jax.random.randint(jax.random.key(seed), (b, s), 0, V)


def cached_logits(model, ids_BxS, split, loops, state_key=None):
  """Logits [B, S, V]: prefill of ids[:, :split], then one decode step per remaining token."""
  b, s = ids_BxS.shape
  cache = G.init_cache(model, b, s, loops)
  first, cache = G.prefill(model, cache, ids_BxS[:, :split], state_key=state_key, all_logits=True)
  steps = []
  for p in range(split, s):
    _, lg, cache = G.decode_step(model, cache, ids_BxS[:, p], state_key=state_key)
    steps.append(lg)
  assert int(cache.pos) == s
  return jnp.concatenate([first] + [x[:, None] for x in steps], axis=1), cache


def assert_greedy_matches_full(model, out_BxS, p, loops):
  """Each generated token is the argmax of the full forward over everything before it. One forward over the
  final sequence gives every step's logits: the forward is causal, and with state_init="zero" (or no loop)
  a position's logits do not depend on the sequence length."""
  full = np.asarray(full_logits(model, out_BxS, loops))
  pred = full[:, p - 1:-1].argmax(-1)
  np.testing.assert_array_equal(np.asarray(out_BxS[:, p:]), pred)
  top2 = np.sort(full[:, p - 1:-1], -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 10 * TOL, "argmax near a tie: pick another seed"


def test_parcae_cached_steps_equal_full_forward(parcae_zero):
  x = ids(B, P + N)
  full = full_logits(parcae_zero, x, T)
  got, cache = cached_logits(parcae_zero, x, P, T)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=TOL, rtol=0)
  assert np.isnan(np.asarray(G.decode_step(parcae_zero, cache, x[:, -1])[1])).all()  # past the cache end
  assert float(jnp.std(full)) > 0.1  # the comparison is not between near-constant logits
  # the loop count matters, so the match above shows that the cache path runs exactly T iterations
  assert float(jnp.abs(full_logits(parcae_zero, x, T + 1) - full).max()) > 100 * TOL


def test_gpt_cached_steps_equal_full_forward(gpt):
  x = ids(B, P + N, seed=4)
  np.testing.assert_allclose(np.asarray(cached_logits(gpt, x, P, None)[0]), np.asarray(full_logits(gpt, x, None)),
                             atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["parcae", "gpt"])
def test_greedy_generation_is_argmax_of_full_forward(name, parcae_zero, gpt):
  model = parcae_zero if name == "parcae" else gpt
  prompt = ids(B, P, seed=5)
  out = G.generate(model, prompt, loops=T, max_new_tokens=N)
  assert out.shape == (B, P + N) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out[:, :P]), np.asarray(prompt))
  assert_greedy_matches_full(model, out, P, T if name == "parcae" else None)


def test_top1_sampling_is_greedy_and_rows_are_independent(parcae_zero):
  prompts = ids(B, P, seed=6)
  greedy = G.generate(parcae_zero, prompts, loops=T, max_new_tokens=N)
  # top-k 1 leaves one candidate, so sampling at any temperature is greedy
  hot = G.generate(parcae_zero, prompts, loops=T, max_new_tokens=N, temperature=0.7, top_k=1,
                   key=jax.random.key(9))
  np.testing.assert_array_equal(np.asarray(hot), np.asarray(greedy))
  # changing row 1's prompt leaves row 0's continuation unchanged
  other = G.generate(parcae_zero, prompts.at[1].set(ids(1, P, seed=8)[0]), loops=T, max_new_tokens=N)
  np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(greedy[0]))
  assert not np.array_equal(np.asarray(other[1]), np.asarray(greedy[1]))


def test_sampled_generation_equals_decode_step_loop(parcae_zero):
  """generate (prefill + fused loop) samples position p's successor with fold_in(key, p), like decode_step."""
  prompts, key = ids(B, P, seed=10), jax.random.key(21)
  out = G.generate(parcae_zero, prompts, loops=T, max_new_tokens=N, temperature=1.0, key=key)
  logits, cache = G.prefill(parcae_zero, G.init_cache(parcae_zero, B, P + N, T), prompts)
  tok = G.sample(logits, jax.random.fold_in(key, P - 1), 1.0)
  toks = [tok]
  for _ in range(N - 1):
    tok, _, cache = G.decode_step(parcae_zero, cache, tok, key=key, temperature=1.0)
    toks.append(tok)
  np.testing.assert_array_equal(np.asarray(out[:, P:]), np.stack([np.asarray(t) for t in toks], 1))
  other = G.generate(parcae_zero, prompts, loops=T, max_new_tokens=N, temperature=1.0, key=jax.random.key(22))
  assert not np.array_equal(np.asarray(other), np.asarray(out))


def test_like_init_is_deterministic_and_split_invariant(parcae_like):
  x = ids(B, P + N, seed=7)
  one_pass = cached_logits(parcae_like, x, P + N, T)[0]  # prefill of the whole sequence
  stepwise = cached_logits(parcae_like, x, P, T)[0]  # prefill P tokens, then one decode step per token
  np.testing.assert_allclose(np.asarray(stepwise), np.asarray(one_pass), atol=TOL, rtol=0)
  # the state init is random but keyed: the default key reproduces, another key changes the logits
  np.testing.assert_array_equal(np.asarray(cached_logits(parcae_like, x, P, T)[0]), np.asarray(stepwise))
  other = cached_logits(parcae_like, x, P + N, T, state_key=jax.random.key(5))[0]
  assert float(jnp.abs(other - one_pass).max()) > 100 * TOL


def test_init_states_per_position(parcae_like):
  model = parcae_like
  key = jax.random.key(11)
  whole = G.init_states(model, key, 2, 0, 6)
  np.testing.assert_array_equal(np.asarray(G.init_states(model, key, 2, 4, 2)), np.asarray(whole[:, 4:]))
  sigma = np.sqrt(2 / (5 * D))  # like-init: N(0, sigma) truncated at 3 sigma
  big = np.asarray(G.init_states(model, key, 64, 0, 16))
  assert np.abs(big).max() <= 3 * sigma + 1e-7
  assert abs(big.std() / sigma - 0.9866) < 0.02  # std of a +-3 sigma truncated normal = 0.9866 sigma


def test_cache_layout(parcae_zero, gpt):
  c = G.init_cache(parcae_zero, 2, 10, loops=5)
  assert len(c.k) == len(c.v) == 1 + 5 * 2 + 1  # P + T*R + Co
  assert c.k[0].shape == (2, H, 10, D // H) and c.k[0].dtype == jnp.float32
  assert len(G.init_cache(gpt, 2, 10).k) == 3
  bf16 = M.build(tiny_cfg(compute_dtype="bfloat16"))
  assert G.init_cache(bf16, 1, 4, 2).v[0].dtype == jnp.bfloat16
  # the decode loop reads bf16 copies of every matmul kernel and of the head; norms and embeddings stay float32
  cast, head = G._cast_kernels(*nnx.split(bf16))
  n_linear = sum(isinstance(m, layers.Linear) for _, m in nnx.iter_graph(cast))
  kernels = [x for x in jax.tree.leaves(nnx.state(cast, nnx.Param)) if x.dtype == jnp.bfloat16]
  assert head.dtype == jnp.bfloat16 and len(kernels) == n_linear > 10
  assert cast.embed.embedding[...].dtype == cast.final_norm.scale[...].dtype == jnp.float32


def test_sample_distribution():
  logits = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
  n, temp, k = 40000, 0.8, 3
  draws = G.sample(jnp.broadcast_to(logits, (n, 6)), jax.random.key(0), temp, k)
  freq = np.bincount(np.asarray(draws), minlength=6) / n
  z = np.asarray(logits[0], np.float64) / temp
  keep = np.argsort(z)[-k:]
  want = np.zeros(6)
  want[keep] = np.exp(z[keep]) / np.exp(z[keep]).sum()
  np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / n))  # 4 sigma of a binomial frequency
  assert (freq[want == 0] == 0).all()
  np.testing.assert_array_equal(np.asarray(G.sample(logits, None)), [5])


def test_bad_input_errors(parcae_zero):
  with pytest.raises(ValueError, match="max_seq_len"):
    G.generate(parcae_zero, ids(1, 30), max_new_tokens=8)
  with pytest.raises(ValueError, match="temperature"):
    G.generate(parcae_zero, ids(1, 3), max_new_tokens=2, temperature=-1.0)
  with pytest.raises(ValueError, match="top_k"):
    G.generate(parcae_zero, ids(1, 3), max_new_tokens=2, temperature=1.0, top_k=V + 1)
  with pytest.raises(ValueError, match="prompt_ids_BxP"):
    G.generate(parcae_zero, jnp.zeros((3,), jnp.int32), max_new_tokens=2)
  with pytest.raises(ValueError, match="loops"):
    G.init_cache(parcae_zero, 1, 4, loops=0)
