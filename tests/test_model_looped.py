"""The loop: truncated backprop against a hand-unrolled float64 computation, causality, compile counts."""
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcae import model as M

V, D, H, S = 64, 64, 2, 8


def tiny_cfg(**kw):
  c = M.default_model_config()
  c.vocab_size, c.d_model, c.n_heads, c.max_seq_len, c.compute_dtype = V, D, H, S, "float32"
  c.prelude_layers, c.core_layers, c.coda_layers = 1, 2, 1
  c.mean_recurrence, c.mean_backprop_depth = 3, 2
  for k, v in kw.items():
    c[k] = v
  return c


def perturbed_model(cfg, seed=0):
  """A model whose zero-initialized projections are made non-zero, so every path carries gradient."""
  m = M.build(cfg, jax.random.key(seed))
  graphdef, state = nnx.split(m)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


# ---------------------------------------------------------------- float64 reference, written from the spec
def rms(x, eps):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def rope(x):
  b, s, h, k = x.shape
  inv = 50000.0 ** (-jnp.arange(0, k, 2, dtype=jnp.float64) / k)
  ang = jnp.arange(s, dtype=jnp.float64)[:, None] * inv[None]
  c, sn = jnp.cos(ang)[None, :, None], jnp.sin(ang)[None, :, None]
  x0, x1 = x[..., 0::2], x[..., 1::2]
  return jnp.stack([x0 * c - x1 * sn, x0 * sn + x1 * c], -1).reshape(x.shape)


def ref_block(p, x, ids):
  b, s, d = x.shape
  a = p["attn"]
  xn = rms(x, 1e-5) * p["norm1"]["scale"]
  q = (xn @ a["q"]["kernel"]).reshape(b, s, H, d // H)
  k = (xn @ a["k"]["kernel"]).reshape(b, s, H, d // H)
  v = (xn @ a["v"]["kernel"]).reshape(b, s, H, d // H)
  if "ve_table" in a and a["ve_table"] is not None:
    gate = 2 * jax.nn.sigmoid(xn[..., :32] @ a["ve_gate"]["kernel"])
    v = v + gate[..., None] * a["ve_table"]["embedding"][ids].reshape(b, s, H, d // H)
  eps32 = float(np.finfo(np.float32).eps)  # QK-norm eps = machine epsilon of the compute dtype (float32 here)
  q, k = rms(rope(q), eps32), rms(rope(k), eps32)
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(d // H)
  scores = jnp.where(jnp.tril(jnp.ones((s, s), bool)), scores, -jnp.inf)
  att = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, -1), v).reshape(b, s, d)
  x = x + att @ a["o"]["kernel"]
  xn = rms(x, 1e-5) * p["norm2"]["scale"]
  r = jnp.maximum(xn @ p["mlp"]["fc"]["kernel"], 0)
  return x + (0.5 * r * r) @ p["mlp"]["proj"]["kernel"]


def ref_loss(p, ids, targets, h0, n_list, k_list):
  """Per-sequence unrolled loop: n_b iterations on stop_gradient'ed inputs, then k_b with gradient."""
  sg = jax.lax.stop_gradient
  total = 0.0
  for b in range(ids.shape[0]):
    i, t = ids[b:b + 1], targets[b:b + 1]
    x = p["embed"]["embedding"][i]
    for blk in p["prelude"].values():
      x = ref_block(blk, x, i)
    e = rms(x, 1e-5) * p["prelude_norm"]["scale"]

    def step(q, h, e):
      delta = jax.nn.softplus(q["injection"]["dt_bias"])
      decay = jnp.exp(-delta * jnp.exp(q["injection"]["A_log"]))
      u = decay * h + delta * (e @ q["injection"]["B"]["kernel"])
      for blk in q["core"].values():
        u = ref_block(blk, u, i)
      return u
    h = h0[b:b + 1]
    for _ in range(n_list[b]):
      h = step(sg(p), h, sg(e))
    h = sg(h)
    for _ in range(k_list[b]):
      h = step(p, h, e)
    y = h @ p["C"]["kernel"]
    for blk in p["coda"].values():
      y = ref_block(blk, y, i)
    logits = (rms(y, 1e-5) * p["final_norm"]["scale"]) @ p["embed"]["embedding"].T
    lp = jax.nn.log_softmax(logits, -1)
    total = total - jnp.take_along_axis(lp, t[..., None], -1).sum()
  return total / targets.size


def model_loss(state, graphdef, ids, targets, key, n_B, k_B):
  m = nnx.merge(graphdef, state)
  y, _ = m.hidden(ids, n_B, k_B, key=key, grad_steps=2)
  lp = jax.nn.log_softmax(m.logits(y), -1)
  return -jnp.take_along_axis(lp, targets[..., None], -1).mean()


_REFERENCE = {}


def _float64_reference(pure, ids, targets, h0, n_list, k_list):
  """(loss, gradients, how far full backprop's core gradient is from them) of the float64 reference, computed
  once per distinct input: the scan and unrolled cases below share parameters, batch, state and depths (the
  key is the bytes of all of them, so a case whose inputs differ computes its own)."""
  arrays = jax.tree.leaves(pure) + [ids, targets, h0]
  digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in arrays)).hexdigest()
  key = (digest, tuple(n_list), tuple(k_list))
  if key not in _REFERENCE:
    b = len(n_list)
    with jax.enable_x64(True):
      p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), pure)
      h064 = jnp.asarray(np.asarray(h0), jnp.float64)
      loss64, g64 = jax.value_and_grad(ref_loss)(p64, ids, targets, h064, n_list, k_list)
      g64 = jax.tree.map(np.asarray, g64)
      # The same loss with full backprop through every iteration: must differ, or the test could not fail.
      g_full = jax.grad(ref_loss)(p64, ids, targets, h064, [0] * b, [4, 1, 5, 3][:b])
      core_diff = np.abs(np.asarray(g_full["core"][0]["mlp"]["fc"]["kernel"]) -
                         g64["core"][0]["mlp"]["fc"]["kernel"]).max()
    _REFERENCE[key] = (float(loss64), g64, core_diff)
  return _REFERENCE[key]


@pytest.mark.parametrize("grad_unroll,split,n_list,k_list", [
    (False, 1, [2, 0, 3], [2, 1, 2]), (True, 1, [2, 0, 3], [2, 1, 2]),
    # the split no-grad loop: halves [0, 2] (to n = 2 together) and [1, 5] (alone from 2 to 5, n = 1 masked)
    (True, 2, [0, 2, 1, 5], [2, 1, 2, 2]),
    # split 4: [0, 2] to n = 2 together, then [1, 5] from 2: [1] (nothing left) and [5] alone to 5
    (True, 4, [0, 2, 1, 5], [2, 1, 2, 2])])
def test_truncated_backprop_matches_float64_unrolled(grad_unroll, split, n_list, k_list):
  cfg = tiny_cfg(grad_unroll=grad_unroll, no_grad_split=split)
  m = perturbed_model(cfg)
  b = len(n_list)
  ids = jax.random.randint(jax.random.key(1), (b, S), 0, V)
  targets = jax.random.randint(jax.random.key(2), (b, S), 0, V)
  key = jax.random.key(3)
  graphdef, state = nnx.split(m, nnx.Param)
  loss, grads = jax.jit(jax.value_and_grad(lambda s, *a: model_loss(s, graphdef, *a)))(
      state, ids, targets, key, jnp.array(n_list), jnp.array(k_list))
  h0 = M.sampler.init_state(key, (b, S, D), cfg.state_init, D)
  pure = nnx.to_pure_dict(state)
  loss64, g64, core_diff = _float64_reference(pure, ids, targets, h0, n_list, k_list)
  assert abs(float(loss) - float(loss64)) < 1e-5
  g32 = jax.tree.map(np.asarray, nnx.to_pure_dict(grads))
  flat64 = dict(jax.tree_util.tree_flatten_with_path(g64)[0])
  for path, g in jax.tree_util.tree_flatten_with_path(g32)[0]:
    ref = flat64[path]
    scale = np.abs(ref).max() + 1e-12
    assert np.abs(g - ref).max() / scale < 2e-4, jax.tree_util.keystr(path)
  assert core_diff > 1e-3 * np.abs(g64["core"][0]["mlp"]["fc"]["kernel"]).max()


def test_no_gradient_through_no_grad_iterations():
  """Gradients depend on the no-grad prefix only through its (constant) output state."""
  cfg = tiny_cfg(state_init="zero")
  m = perturbed_model(cfg, seed=1)
  ids = jax.random.randint(jax.random.key(4), (2, S), 0, V)
  targets = jax.random.randint(jax.random.key(5), (2, S), 0, V)
  graphdef, state = nnx.split(m, nnx.Param)
  jaxpr = jax.make_jaxpr(jax.grad(model_loss))(state, graphdef, ids, targets, jax.random.key(0),
                                               jnp.array([3, 3]), jnp.array([2, 2]))
  # The while loop (no-grad phase) appears once, in the forward only: it has no transpose in the backward.
  text = str(jaxpr)
  assert text.count("while[") == 1


def test_causality():
  cfg = tiny_cfg()
  m = perturbed_model(cfg, seed=2)
  ids = jax.random.randint(jax.random.key(6), (1, S), 0, V)
  t = 5
  ids2 = ids.at[0, t].set((ids[0, t] + 1) % V)
  for loops in (1, 3):
    a, b = np.asarray(m(ids, loops=loops)), np.asarray(m(ids2, loops=loops))
    np.testing.assert_array_equal(a[0, :t], b[0, :t])
    assert np.abs(a[0, t:] - b[0, t:]).max() > 0


def test_one_compilation_for_all_loop_counts_and_depths():
  cfg = tiny_cfg()
  m = perturbed_model(cfg, seed=3)
  graphdef, state = nnx.split(m)
  traces = {"fwd": 0, "train": 0}

  @jax.jit
  def fwd(state, ids, loops):
    traces["fwd"] += 1
    return nnx.merge(graphdef, state)(ids, loops=loops)

  ids = jax.random.randint(jax.random.key(7), (2, S), 0, V)
  outs = [np.asarray(fwd(state, ids, jnp.int32(t))) for t in range(1, 17)]
  assert traces["fwd"] == 1
  assert not np.array_equal(outs[0], outs[5])
  np.testing.assert_allclose(outs[3], np.asarray(m(ids, loops=4)), rtol=1e-5, atol=1e-5)  # jit vs eager

  graphdef_p, pstate = nnx.split(m, nnx.Param)

  @jax.jit
  def train_grad(pstate, ids, n_B, k_B):
    traces["train"] += 1
    return jax.grad(model_loss)(pstate, graphdef_p, ids, ids, jax.random.key(0), n_B, k_B)

  grads = [train_grad(pstate, ids, jnp.array(n), jnp.array([2, 1])) for n in ([0, 1], [5, 2], [9, 0])]
  assert traces["train"] == 1
  a, b = (np.asarray(g["core"][0]["mlp"]["fc"]["kernel"]) for g in grads[:2])
  assert not np.array_equal(a, b)


def test_inference_is_deterministic_and_key_dependent():
  m = perturbed_model(tiny_cfg(), seed=4)
  ids = jax.random.randint(jax.random.key(8), (2, S), 0, V)
  np.testing.assert_array_equal(np.asarray(m(ids)), np.asarray(m(ids)))
  assert np.abs(np.asarray(m(ids, key=jax.random.key(1))) - np.asarray(m(ids))).max() > 0


@pytest.mark.parametrize("kind,split", [("parcae", 1), ("parcae", 2), ("gpt", 1)])
def test_hidden_at_gives_hidden_at_every_count_in_one_pass(kind, split):
  """hidden_at runs the loop once to the largest count and reads out at each requested one: the hidden states
  and telemetry equal hidden()'s at that count (compiled both ways; the same operations, so to float32
  rounding); a GPT gives its one output at every count."""
  cfg = tiny_cfg(no_grad_split=split, kind=kind)
  m = perturbed_model(cfg, seed=5)
  graphdef, state = nnx.split(m)
  ids = jax.random.randint(jax.random.key(9), (4, S), 0, V)
  loops = [1, 2, 3, 5, 8]

  @jax.jit
  def at(state, loops_K):
    readout = lambda y, aux: (y, aux.get("rel_residual", 0.0), aux.get("state_norm", 0.0))
    return nnx.merge(graphdef, state).hidden_at(ids, loops_K, readout)

  @jax.jit
  def one(state, t):
    n_B = jnp.full((4,), t, jnp.int32)
    return nnx.merge(graphdef, state).hidden(ids, n_B, jnp.zeros((4,), jnp.int32), grad_steps=0)

  ys, rel, norm = at(state, jnp.asarray(loops, jnp.int32))
  assert ys.shape == (len(loops), 4, S, D)
  for i, t in enumerate(loops):
    y, tel = one(state, jnp.int32(t))
    np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y), rtol=1e-6, atol=1e-6)
    if kind == "parcae":
      assert float(rel[i]) == pytest.approx(float(tel["rel_residual"]), rel=1e-6)
      assert float(norm[i]) == pytest.approx(float(tel["state_norm"]), rel=1e-6)
  assert (kind == "gpt") == np.array_equal(np.asarray(ys[0]), np.asarray(ys[-1]))


def test_rel_residual_telemetry_is_each_sequences_last_step():
  """rel_residual = mean over tokens of |h_t - h_(t-1)| / |h_t| at each sequence's own depth t = n + k."""
  cfg = tiny_cfg(state_init="zero")  # h0 = 0 whatever the batch shape, so loop_state can replay each row
  m = perturbed_model(cfg, seed=3)
  ids = jax.random.randint(jax.random.key(7), (4, S), 0, V)
  n_B, k_B = jnp.array([2, 0, 3, 0]), jnp.array([2, 1, 0, 0])
  _, tel = m.hidden(ids, n_B, k_B, key=jax.random.key(0), grad_steps=2)
  want = []
  for b, t in enumerate([4, 1, 3, 0]):
    if t == 0:
      want.append(np.zeros(S))
      continue
    h_t = np.asarray(m.loop_state(ids[b:b + 1], loops=t)[1][0], np.float64)
    h_p = np.asarray(m.loop_state(ids[b:b + 1], loops=t - 1)[1][0], np.float64)
    want.append(np.linalg.norm(h_t - h_p, axis=-1) / np.linalg.norm(h_t, axis=-1))
  np.testing.assert_allclose(float(tel["rel_residual"]), np.mean(want), rtol=1e-5)
  assert float(tel["rel_residual"]) > 0.01  # the loop moves the state, so the check has something to see


def _saved_activation_bytes(fn, *args, lead=(2, S)):
  """Bytes of the [B, S, ...] arrays autodiff keeps for the backward pass of fn (the activations, not the
  weights; parsed from jax's public residual report)."""
  import contextlib
  import io
  import re
  from jax.ad_checkpoint import print_saved_residuals
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(fn, *args)
  total = 0
  for dt, dims in re.findall(r"^(\w+)\[([\d,]*)\]", buf.getvalue(), re.M):
    shape = tuple(int(d) for d in dims.split(",") if d)
    if shape[:2] != lead:
      continue
    total += int(np.prod(shape)) * jnp.dtype(
        {"f32": "float32", "bf16": "bfloat16", "i32": "int32", "s32": "int32", "u32": "uint32",
         "bool": "bool", "f16": "float16", "key<fry>": "uint32"}.get(dt, "float32")).itemsize
  return total


@pytest.mark.parametrize("kind", ["gpt", "parcae"])
def test_block_remat_keeps_less_and_changes_nothing(kind):
  """model.block_remat: GPT's blocks (Parcae's prelude and coda) recompute in the backward pass: the
  gradients are those without remat, and autodiff keeps a fraction of the activations ("dots": the
  matmul outputs, "full": the block inputs, "mlp_act": all but the MLP's activation)."""
  ids = jax.random.randint(jax.random.key(8), (2, S), 0, V)
  targets = jax.random.randint(jax.random.key(9), (2, S), 0, V)
  grads, kept = {}, {}
  stages = {"prelude_layers": 2, "coda_layers": 2}  # two blocks per non-looped stage (GPT: n_layers)
  for policy in ("none", "dots", "full", "mlp_act"):
    gd, st = nnx.split(perturbed_model(tiny_cfg(kind=kind, n_layers=4, block_remat=policy, **stages), seed=4),
                       nnx.Param)

    def loss(s, gd=gd):
      return model_loss(s, gd, ids, targets, jax.random.key(0), jnp.array([1, 2]), jnp.array([1, 2]))
    grads[policy] = jax.tree.map(np.asarray, nnx.to_pure_dict(jax.grad(loss)(st)))
    kept[policy] = _saved_activation_bytes(loss, st)
  # block_remat_first: only the first block of each stage recomputes; the kept bytes fall in between
  gd, st = nnx.split(perturbed_model(tiny_cfg(kind=kind, n_layers=4, block_remat="full", block_remat_first=1,
                                              **stages), seed=4), nnx.Param)

  def loss1(s, gd=gd):
    return model_loss(s, gd, ids, targets, jax.random.key(0), jnp.array([1, 2]), jnp.array([1, 2]))
  grads["first1"] = jax.tree.map(np.asarray, nnx.to_pure_dict(jax.grad(loss1)(st)))
  kept["first1"] = _saved_activation_bytes(loss1, st)
  for policy in ("dots", "full", "first1", "mlp_act"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9), grads[policy], grads["none"])
  assert kept["full"] < kept["dots"] < kept["none"], kept
  # "mlp_act": exactly one [B, S, F] float32 array (ReLU^2's output) less per block, 4 blocks
  cfg = tiny_cfg()
  assert kept["none"] - kept["mlp_act"] == 4 * 2 * S * cfg.ffn_mult * cfg.d_model * 4, kept
  assert kept["full"] < 0.5 * kept["none"], kept
  assert kept["full"] < kept["first1"] < kept["none"], kept


def test_grad_unroll_is_straight_line_and_remat_still_recomputes():
  """model.grad_unroll: the grad phase leaves no loop in the program (so no stacked residual buffers), and the
  per-iteration remat still keeps less than no remat (the CSE shield is on outside a scan)."""
  ids = jax.random.randint(jax.random.key(8), (2, S), 0, V)
  targets = jax.random.randint(jax.random.key(9), (2, S), 0, V)
  kept, whiles = {}, {}
  for unroll, policy in ((False, "full"), (True, "full"), (True, "none")):
    gd, st = nnx.split(perturbed_model(tiny_cfg(grad_unroll=unroll, remat=policy), seed=4), nnx.Param)

    def loss(s, gd=gd):
      return model_loss(s, gd, ids, targets, jax.random.key(0), jnp.array([1, 2]), jnp.array([2, 2]))
    text = jax.jit(jax.grad(loss)).lower(st).as_text()
    whiles[unroll, policy] = text.count("stablehlo.while")
    kept[unroll, policy] = _saved_activation_bytes(loss, st)
  # The scan's forward and backward loops are gone; the no-grad phase's while loop stays.
  assert whiles[False, "full"] - 2 == whiles[True, "full"] == whiles[True, "none"] >= 1, whiles
  assert kept[True, "full"] < 0.5 * kept[True, "none"], kept


def test_block_remat_is_validated():
  with pytest.raises(ValueError, match="model.block_remat='some'"):
    M.validate_model_config(tiny_cfg(block_remat="some"))


def test_no_grad_split_runs_the_deeper_halves_alone():
  """split=2: the no-grad loop's second while loop sees half the batch (each shard's deeper half), split=4 a
  third one a quarter; the hidden states equal split=1's, and the executed-iteration count (MFU) is the
  shallower halves' deepest n plus half of what the deeper halves execute; under a (data 2) mesh the halves
  are per shard."""
  n_B, k_B = jnp.array([0, 1, 2, 5]), jnp.array([1, 1, 1, 1])
  ids = jax.random.randint(jax.random.key(1), (4, S), 0, V)
  outs, batches = {}, {}
  for split in (1, 2, 4):
    m = perturbed_model(tiny_cfg(no_grad_split=split))
    seen = []
    real = m._core_fn

    def spy(real=real, seen=seen):
      step = real()
      return lambda st, carry, *a: seen.append(carry[0].shape[0]) or step(st, carry, *a)
    m._core_fn = spy
    outs[split] = np.asarray(m.hidden(ids, n_B, k_B, grad_steps=1)[0])
    batches[split] = sorted(set(seen))
  assert batches == {1: [4], 2: [2, 4], 4: [1, 2, 4]}, batches
  np.testing.assert_allclose(outs[2], outs[1], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(outs[4], outs[1], rtol=1e-6, atol=1e-6)
  assert float(M.looped.executed_no_grad_iters(n_B, 2)) == 1 + 0.5 * (5 - 1)
  assert float(M.looped.executed_no_grad_iters(n_B, 4)) == 1 + 0.5 * ((2 - 1) + 0.5 * (5 - 2))
  assert float(M.looped.executed_no_grad_iters(n_B, 1)) == 5
  mesh = jax.make_mesh((2, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:2],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):  # shards [0, 1] and [2, 5]: shallower halves 0 and 2
    assert float(M.looped.executed_no_grad_iters(n_B, 2)) == 2 + 0.5 * (5 - 2)
    assert float(M.looped.executed_no_grad_iters(n_B, 4)) == 2 + 0.5 * (5 - 2)  # one row per shard: no quarter
    # 8 rows, shards [0 1 2 3 | 1 2 4 6]: all to 2 (lower halves [0 1], [1 2]), [2 3] and [4 6] to 4, [3] and [6] to 6
    n8 = jnp.array([0, 1, 2, 3, 1, 2, 4, 6])
    assert float(M.looped.executed_no_grad_iters(n8, 4)) == 2 + 0.5 * ((4 - 2) + 0.5 * (6 - 4))
  with pytest.raises(ValueError, match="model.no_grad_split=3"):
    M.validate_model_config(tiny_cfg(no_grad_split=3))


def _eqns(jaxpr, in_while=False):
  """(equation, whether it runs inside a while loop's body) for every equation of a jaxpr, nested ones
  (jit, custom_vjp, scan, while) included."""
  for eqn in jaxpr.eqns:
    yield eqn, in_while
    for name, v in eqn.params.items():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
          body = in_while or (eqn.primitive.name == "while" and name == "body_jaxpr")
          yield from _eqns(inner, body)


def test_frozen_kernels_are_cast_once_per_loop_not_per_iteration(monkeypatch):
  """bf16 compute: the no-grad loop reads its weights already in bf16 (no float32 -> bf16 cast of a [D, .]
  kernel inside the while body), with the loss and gradients bit for bit those of casting at every use."""
  cfg = tiny_cfg(compute_dtype="bfloat16")
  graphdef, state = nnx.split(perturbed_model(cfg, seed=5), nnx.Param)
  ids = jax.random.randint(jax.random.key(1), (2, S), 0, V)
  args = (graphdef, ids, ids, jax.random.key(0), jnp.array([3, 5]), jnp.array([2, 1]))
  f = jax.value_and_grad(model_loss)

  def kernel_casts(fn):
    eqns = list(_eqns(jax.make_jaxpr(fn)(state, *args).jaxpr))
    assert any(w for _, w in eqns)
    return sum(1 for e, w in eqns if w and e.primitive.name == "convert_element_type"
               and e.params["new_dtype"] == jnp.bfloat16 and e.invars[0].aval.ndim == 2
               and e.invars[0].aval.shape[0] in (D, 4 * D))
  assert kernel_casts(f) == 0
  loss, grads = jax.jit(f)(state, *args)
  monkeypatch.setattr(M.layers, "kernels_in", lambda st, cd, quant: st)  # the cast at every use
  jax.clear_caches()  # the traced loop bodies are cached by function, not by what they look up
  assert kernel_casts(f) > 0
  loss0, grads0 = jax.jit(f)(state, *args)
  assert np.asarray(loss) == np.asarray(loss0)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
