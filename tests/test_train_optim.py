"""MuonAdamW / AdamW against an independent float64 numpy implementation of spec §5.3-5.5; routing on the
real parameter names (plain dict and nnx.State); clipping vs optax; non-finite skipping; per-step rates."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from parcae.train import optim, schedules

# Spec §5.3 Polar Express coefficients, typed from the spec (not imported from the implementation).
PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


# ------------------------------------------------------------------ float64 numpy reference (torch layout)

def np_polar(G):
  X = G / (np.linalg.norm(G) * 1.02 + 1e-6)
  R, C = X.shape
  for a, b, c in PE:
    if R > C:
      A = X.T @ X
      X = a * X + X @ (b * A + c * A @ A)
    else:
      A = X @ X.T
      X = a * X + (b * A + c * A @ A) @ X
  return X


class NpMuonAdamW:
  """Spec §5.3-5.5 in float64. Weights are held in the reference's torch layout [out, in] (W = kernel.T),
  vectors as they are. Rates: trapezoid lr, momentum ramp, linearly decaying Muon wd, constant AdamW wd."""

  def __init__(self, weights, groups, cfg, total):
    self.W = {k: np.array(v, np.float64) for k, v in weights.items()}
    self.groups, self.cfg, self.total, self.step, self.count = groups, cfg, total, 0, 0
    self.m = {k: np.zeros_like(v) for k, v in self.W.items()}
    self.v = {}
    for k, w in self.W.items():
      if groups[k] == "muon":
        R, C = w.shape
        self.v[k] = np.zeros((R, 1)) if R >= C else np.zeros((1, C))
      else:
        self.v[k] = np.zeros_like(w)

  def rates(self, s):
    c, T = self.cfg, self.total
    cd = int(c.cooldown_fraction * T)
    mult = 1.0 if s <= T - cd else max((T - s) / cd, c.min_lr / c.lr)
    mom = c.muon_momentum_start + (c.muon_momentum - c.muon_momentum_start) * min(
        s / c.muon_momentum_warmup_steps, 1.0)
    return c.lr * mult, c.muon_lr * mult, mom, c.muon_wd * (1 - s / T)

  def update(self, grads):
    c = self.cfg
    g = {k: np.array(v, np.float64) for k, v in grads.items()}
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    if not np.isfinite(norm):
      self.step += 1
      return
    if norm >= c.grad_clip:
      g = {k: x * c.grad_clip / norm for k, x in g.items()}
    lr, muon_lr, mom, muon_wd = self.rates(self.step)
    self.step += 1
    self.count += 1
    for k, W in self.W.items():
      if self.groups[k] == "muon":
        self.m[k] = mom * self.m[k] + (1 - mom) * g[k]
        X = np_polar((1 - mom) * g[k] + mom * self.m[k])
        R, C = W.shape
        v_mean = np.mean(X * X, axis=1, keepdims=True) if R >= C else np.mean(X * X, axis=0, keepdims=True)
        self.v[k] = c.muon_beta2 * self.v[k] + (1 - c.muon_beta2) * v_mean
        U = X / np.sqrt(np.maximum(self.v[k], 1e-10))
        U = U * np.linalg.norm(X) / np.linalg.norm(U)
        lr_e = muon_lr * np.sqrt(max(1.0, R / C))
        self.W[k] = W - lr_e * U - lr_e * muon_wd * W * (U * W >= 0)
      else:
        wd = c.weight_decay if W.ndim >= 2 else 0.0
        W = W * (1 - lr * wd)
        self.m[k] = c.b1 * self.m[k] + (1 - c.b1) * g[k]
        self.v[k] = c.b2 * self.v[k] + (1 - c.b2) * g[k] ** 2
        m_hat = self.m[k] / (1 - c.b1 ** self.count)
        v_hat = self.v[k] / (1 - c.b2 ** self.count)
        self.W[k] = W - lr * m_hat / (np.sqrt(v_hat) + c.eps)


# ---------------------------------------------------------------------------------------- fixtures

D = 8
# Our layout: kernels [in, out]. (torch rows, cols) noted; "stack" is a [2, in, out] stacked-layer kernel.
SHAPES = {
    "embed/embedding": (11, D),
    "core/0/attn/q/kernel": (D, 12),       # torch 12x8: tall
    "core/0/attn/k/kernel": (D, D),        # square
    "core/0/attn/v/kernel": (D, D),        # square again (same shape as k)
    "core/0/attn/o/kernel": (12, D),       # torch 8x12: wide
    "core/0/attn/ve_gate/kernel": (32, 2),  # torch 2x32: wide gate
    "core/0/mlp/fc/kernel": (D, 4 * D),    # torch 32x8: tall, lr x2
    "core/0/mlp/proj/kernel": (4 * D, D),
    "core/0/norm1/scale": (D,),
    "injection/A_log": (D,),
    "injection/B/kernel": (D, D),
    "C/kernel": (D, D),
    "stack/mlp/fc/kernel": (2, D, 2 * D),  # two stacked torch 16x8 matrices
}


def _nested(flat):
  out = {}
  for path, x in flat.items():
    node = out
    *head, last = path.split("/")
    for h in head:
      node = node.setdefault(h, {})
    node[last] = x
  return out


def _flat(tree):
  return {optim.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _cfg(**kw):
  c = optim.default_optim_config()
  c.update(dict(weight_decay=0.1, muon_momentum_warmup_steps=4, muon_ortho_dtype="float32"))
  c.update(kw)
  return c


def _params_and_grads(seed, n_steps, scales):
  rng = np.random.default_rng(seed)
  params = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
  params["core/0/attn/k/kernel"][0, :] = 0.0  # exact zeros: the cautious mask [u*p >= 0] keeps decay off
  grads = [{k: (scales[t] * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
           for t in range(n_steps)]
  return params, grads


def _to_torch_layout(flat):
  """Split the stacked kernel into its matrices and transpose every >= 2-D weight to [out, in]."""
  out = {}
  for k, x in flat.items():
    x = np.asarray(x, np.float64)
    if x.ndim == 3:
      for i in range(x.shape[0]):
        out[f"{k}#{i}"] = x[i].T
    else:
      out[k] = x.T if x.ndim == 2 else x
  return out


def _run_both(cfg, total, n_steps, scales, seed=0):
  params, grads = _params_and_grads(seed, n_steps, scales)
  groups = {k: g for k, g in optim.param_routes(_nested(params))}
  np_groups = {k2: groups[k2.split("#")[0]] for k2 in _to_torch_layout(params)}
  ref = NpMuonAdamW(_to_torch_layout(params), np_groups, cfg, total)
  tree = jax.tree.map(jnp.asarray, _nested(params))
  tx = optim.make_optimizer(cfg, tree, total)
  state = tx.init(tree)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(jax.tree.map(jnp.asarray, _nested(g)), state, tree)
    tree = optax.apply_updates(tree, u)
    ref.update(_to_torch_layout(g))
  return params, _flat(tree), state, ref


def _rel(a, b):
  return np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b)


# ------------------------------------------------------------------------------------------ tests

def test_muon_adamw_matches_float64_reference_f32_path():
  # 6 steps over the momentum ramp (4 steps), into the cool-down (total 8), clipped and unclipped grads.
  cfg = _cfg()
  scales = [1.0, 1e-3, 1.0, 2e-3, 0.5, 1e-3]
  params0, got, state, ref = _run_both(cfg, total=8, n_steps=6, scales=scales)
  got_t, p0_t = _to_torch_layout(got), _to_torch_layout(params0)
  for k in ref.W:
    # Compare the accumulated change (params are O(1), the change is what the optimizer computed).
    assert _rel(got_t[k] - p0_t[k], ref.W[k] - p0_t[k]) < 1e-5, k
  mu, nu = _to_torch_layout(_flat(state.mu)), _to_torch_layout(_flat(state.nu))
  for k in ref.W:
    assert _rel(mu[k], ref.m[k]) < 1e-5, k
    assert _rel(nu[k], ref.v[k]) < 1e-5, k
  assert int(state.count) == 6 and int(state.step) == 6


def test_polar_express_bf16_close_to_float64():
  # bf16 rounding (unit roundoff 2^-9 ~ 2e-3) of X, X X^T and the polynomial each iteration, amplified by
  # the coefficients (|a|+|b|+|c| ~ 46.5 in the first): measured 0.020-0.025 relative on these shapes (a
  # numpy emulation that rounds after every single op gives ~0.05), so the bound is 0.05. The singular
  # values (what Muon relies on) stay in the f64 Polar Express band [0.859, 1.141] up to bf16 rounding.
  rng = np.random.default_rng(0)
  for shape in [(64, 256), (256, 64)]:
    g = rng.standard_normal(shape)
    x64 = np_polar(g)
    xbf = np.asarray(optim.polar_express(jnp.asarray(g, jnp.float32), 5, jnp.bfloat16), np.float64)
    assert _rel(xbf, x64) < 0.05, shape
    sv = np.linalg.svd(xbf, compute_uv=False)
    assert 0.84 < sv.min() and sv.max() < 1.16, (shape, sv.min(), sv.max())
    x32 = np.asarray(optim.polar_express(jnp.asarray(g, jnp.float32), 5, jnp.float32), np.float64)
    assert _rel(x32, x64) < 1e-5, shape


def test_muon_adamw_bf16_path_close_to_float64_reference():
  # Full optimizer step with the reference's bf16 orthogonalization. On these toy matrices (2-32 wide) the
  # NorMuon statistics average only 2-12 entries and do not damp the Polar Express error; measured
  # per-matrix error 0.016-0.09 over seeds 0-2 (0.03-0.057 for seed 0); bound 0.1. The f32 path is
  # checked at 1e-5 above.
  cfg = _cfg(muon_ortho_dtype="bfloat16")
  params0, got, _, ref = _run_both(cfg, total=8, n_steps=1, scales=[1.0])
  got_t, p0_t = _to_torch_layout(got), _to_torch_layout(params0)
  errs = {k: _rel(got_t[k] - p0_t[k], ref.W[k] - p0_t[k]) for k in ref.W if ref.groups[k] == "muon"}
  assert max(errs.values()) < 0.1, errs
  assert min(errs.values()) > 1e-3, errs  # really ran in bf16 (the f32 path is ~1e-6)
  adam = {k: _rel(got_t[k] - p0_t[k], ref.W[k] - p0_t[k]) for k in ref.W if ref.groups[k] == "adamw"}
  assert max(adam.values()) < 1e-5, adam


def test_muon_lr_shape_factor():
  # Spec §10: Muon lr x2 for (4d x d) fc weights (our kernel [d, 4d]), x1 for proj, square and gates.
  rng = np.random.default_rng(1)
  for shape, factor in [((D, 4 * D), 2.0), ((4 * D, D), 1.0), ((D, D), 1.0), ((32, 2), 1.0)]:
    g = rng.standard_normal(shape)
    u, _, _ = optim.muon_leaf(jnp.asarray(g, jnp.float32), jnp.zeros(shape), jnp.zeros(shape),
                              jnp.zeros(optim._muon_nu_shape(shape)), lr=0.1, momentum=0.0, beta2=0.95,
                              wd=0.0, ns_steps=5, ortho_dtype=jnp.float32)
    x = np_polar(g.T)  # NorMuon keeps the Frobenius norm, so ||u|| = lr_eff * ||X||
    assert np.linalg.norm(np.asarray(u)) / (0.1 * np.linalg.norm(x)) == pytest.approx(factor, rel=1e-5)


REAL_PATHS = {
    "embed/embedding": ((64, D), "adamw"),
    "prelude/0/attn/q/kernel": ((D, D), "muon"),
    "prelude/0/attn/k/kernel": ((D, 4), "muon"),
    "core/1/attn/v/kernel": ((D, 4), "muon"),
    "coda/0/attn/o/kernel": ((D, D), "muon"),
    "blocks/3/attn/o/kernel": ((D, D), "muon"),
    "core/0/attn/ve_gate/kernel": ((32, 2), "muon"),
    "core/0/attn/ve_table/embedding": ((64, 4), "adamw"),
    "coda/1/norm1/scale": ((D,), "adamw"),
    "core/0/norm2/scale": ((D,), "adamw"),
    "prelude/1/mlp/fc/kernel": ((D, 4 * D), "muon"),
    "core/0/mlp/proj/kernel": ((4 * D, D), "muon"),
    "injection/A_log": ((D,), "adamw"),
    "injection/dt_bias": ((D,), "adamw"),
    "injection/B/kernel": ((D, D), "adamw"),
    "injection/W/kernel": ((2 * D, D), "adamw"),
    "prelude_norm/scale": ((D,), "adamw"),
    "C/kernel": ((D, D), "adamw"),
    "final_norm/scale": ((D,), "adamw"),
}


def test_route_real_parameter_names():
  for path, (shape, want) in REAL_PATHS.items():
    assert optim.route(path, jnp.zeros(shape)) == want, path
  # ndim < 2 is AdamW whatever the name; unknown >= 2-D weights are Muon (the reference's default).
  assert optim.route("core/0/attn/q/bias", jnp.zeros((D,))) == "adamw"
  assert optim.route("something/new/kernel", jnp.zeros((D, D))) == "muon"


def test_param_routes_on_nested_dict_and_adamw_only():
  tree = _nested({k: jnp.zeros(s) for k, (s, _) in REAL_PATHS.items()})
  assert dict(optim.param_routes(tree)) == {k: g for k, (_, g) in REAL_PATHS.items()}
  assert set(dict(optim.param_routes(tree, "adamw")).values()) == {"adamw"}


class _Attn(nnx.Module):
  def __init__(self, rngs):
    self.q = nnx.Linear(D, D, use_bias=False, rngs=rngs)
    self.ve_gate = nnx.Linear(32, 2, use_bias=False, rngs=rngs)
    self.ve_table = nnx.Embed(64, 4, rngs=rngs)


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.attn = _Attn(rngs)
    self.norm1 = nnx.RMSNorm(D, rngs=rngs)


class _Injection(nnx.Module):
  def __init__(self, rngs):
    self.A_log = nnx.Param(jnp.zeros((D,)))
    self.B = nnx.Linear(D, D, use_bias=False, rngs=rngs)


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(64, D, rngs=rngs)
    self.core = nnx.List([_Block(rngs), _Block(rngs)])
    self.injection = _Injection(rngs)
    self.C = nnx.Linear(D, D, use_bias=False, rngs=rngs)


def test_nnx_state_routing_and_update():
  model = _Tiny(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  routes = dict(optim.param_routes(params))
  assert routes == {
      "C/kernel": "adamw", "embed/embedding": "adamw",
      "core/0/attn/q/kernel": "muon", "core/1/attn/q/kernel": "muon",
      "core/0/attn/ve_gate/kernel": "muon", "core/1/attn/ve_gate/kernel": "muon",
      "core/0/attn/ve_table/embedding": "adamw", "core/1/attn/ve_table/embedding": "adamw",
      "core/0/norm1/scale": "adamw", "core/1/norm1/scale": "adamw",
      "injection/A_log": "adamw", "injection/B/kernel": "adamw"}
  # One step on nnx.State grads: same result as on the equivalent plain nested dict.
  grads = jax.tree.map(lambda x: jnp.cos(3.0 * x) + 0.1, params)
  tx = optim.make_optimizer(_cfg(), params, 10)
  plain = lambda t: _nested(_flat(t))
  plain_params, plain_grads = plain(params), plain(grads)  # copies taken before nnx.update below
  u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  new = optax.apply_updates(params, u)
  assert isinstance(new, nnx.State)
  nnx.update(model, new)
  np.testing.assert_array_equal(np.asarray(model.C.kernel[...]), np.asarray(_flat(new)["C/kernel"]))
  tx2 = optim.make_optimizer(_cfg(), plain_params, 10)
  u2, _ = jax.jit(tx2.update)(plain_grads, tx2.init(plain_params), plain_params)
  assert _flat(u2).keys() == _flat(u).keys()
  for k, x in _flat(u2).items():
    np.testing.assert_allclose(np.asarray(_flat(u)[k]), np.asarray(x), rtol=1e-6, atol=1e-9)


def test_clip_equals_optax_and_feeds_the_step():
  rng = np.random.default_rng(2)
  tree = {"a": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32), "b": jnp.asarray(rng.standard_normal(7))}
  for max_norm in [0.5, 1.0, 100.0]:
    got, norm = optim.clip_by_global_norm(tree, max_norm)
    want, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    assert float(norm) == pytest.approx(float(optax.global_norm(tree)), rel=1e-6)
    for k in tree:
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)
  # Inside the optimizer: grad_norm metric is pre-clip; first-step buffers hold the clipped grads.
  params = _nested({"core/0/mlp/fc/kernel": jnp.ones((D, 4 * D)), "final_norm/scale": jnp.ones((D,))})
  grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
  cfg = _cfg()
  tx = optim.make_optimizer(cfg, params, 10)
  _, st = jax.jit(tx.update)(grads, tx.init(params), params)
  pre = float(optax.global_norm(grads))
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  assert float(optim.optimizer_metrics(st)["grad_norm"]) == pytest.approx(pre, rel=1e-6)
  np.testing.assert_allclose(np.asarray(st.mu["core"]["0"]["mlp"]["fc"]["kernel"]),
                             0.15 * np.asarray(clipped["core"]["0"]["mlp"]["fc"]["kernel"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(st.mu["final_norm"]["scale"]),
                             (1 - cfg.b1) * np.asarray(clipped["final_norm"]["scale"]), rtol=1e-6)


def test_nonfinite_step_is_skipped_under_jit():
  rng = np.random.default_rng(3)
  shapes = {"core/0/attn/q/kernel": (D, 12), "injection/A_log": (D,), "C/kernel": (D, D)}
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)]
  tree = jax.tree.map(jnp.asarray, _nested(params))
  tx = optim.make_optimizer(_cfg(), tree, 10)
  update = jax.jit(tx.update)
  _, st1 = update(jax.tree.map(jnp.asarray, _nested(grads[0])), tx.init(tree), tree)
  bad = dict(grads[1])
  bad["core/0/attn/q/kernel"] = bad["core/0/attn/q/kernel"].copy()
  bad["core/0/attn/q/kernel"][1, 2] = np.nan
  for g, loss in [(bad, None), (grads[1], jnp.float32(np.inf))]:
    u, st2 = update(jax.tree.map(jnp.asarray, _nested(g)), st1, tree, loss=loss)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u))
    for a, b in zip(jax.tree.leaves((st1.mu, st1.nu, st1.count)), jax.tree.leaves((st2.mu, st2.nu, st2.count))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    m = optim.optimizer_metrics(st2)
    assert float(m["skipped"]) == 1.0 and int(m["skipped_total"]) == 1 and int(m["step"]) == 2
  # A finite step afterwards is applied and resets the last-step flag.
  u, st3 = update(jax.tree.map(jnp.asarray, _nested(grads[1])), st2, tree, loss=jnp.float32(2.0))
  assert float(optim.optimizer_metrics(st3)["skipped"]) == 0.0 and int(st3.count) == 2
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
  # With skipping off, the non-finite step goes through.
  tx_off = optim.make_optimizer(_cfg(skip_nonfinite=False), tree, 10)
  u, _ = jax.jit(tx_off.update)(jax.tree.map(jnp.asarray, _nested(bad)), tx_off.init(tree), tree)
  assert not bool(jnp.all(jnp.isfinite(u["core"]["0"]["attn"]["q"]["kernel"])))


def test_per_step_rates_follow_the_spec():
  cfg, T = optim.default_optim_config(), 21_362
  for s in [0, 1, 150, 299, 300, 1000, 10_681, 15_000, 21_361]:
    hp = optim.hyperparams_at(cfg, s, schedules.run_length(cfg, T))
    assert float(hp["muon_momentum"]) == pytest.approx(0.85 + 0.10 * min(s / 300, 1), rel=1e-6)
    assert float(hp["muon_wd"]) == pytest.approx(0.2 * (1 - s / T), rel=1e-5, abs=1e-9)
    assert float(hp["weight_decay"]) == 0.0
    lr = 8e-3 if s <= 10_681 else 8e-3 * (T - s) / 10_681
    assert float(hp["lr"]) == pytest.approx(lr, rel=1e-5)
    assert float(hp["muon_lr"]) == pytest.approx(lr, rel=1e-5)  # muon_lr = lr = 8e-3 here
  # The metrics of each call report the rates used by that call (step 0, 1, 2).
  params = _nested({"core/0/mlp/fc/kernel": jnp.ones((D, 4 * D)), "final_norm/scale": jnp.ones((D,))})
  tx = optim.make_optimizer(optim.default_optim_config(), params, 4)
  st, upd = tx.init(params), jax.jit(tx.update)
  for s in range(3):
    _, st = upd(jax.tree.map(jnp.ones_like, params), st, params)
    m, hp = optim.optimizer_metrics(st), optim.hyperparams_at(
        optim.default_optim_config(), s, schedules.run_length(optim.default_optim_config(), 4))
    for k in ("lr", "muon_lr", "muon_momentum", "muon_wd"):
      assert float(m[k]) == pytest.approx(float(hp[k]), rel=1e-6), (s, k)


@pytest.mark.parametrize("field,value", [
    ("name", "sgd"), ("schedule", "exp"), ("lr", -1e-3), ("muon_lr", -1.0), ("b2", 1.0),
    ("muon_ns_steps", 6), ("muon_ortho_dtype", "float16"), ("cooldown_fraction", 1.5), ("grad_clip", -1.0)])
def test_validation_names_the_field(field, value):
  cfg = optim.default_optim_config()
  cfg[field] = value
  with pytest.raises(ValueError, match=f"optim.{field}="):
    optim.validate_optim_config(cfg)
  optim.validate_optim_config(optim.default_optim_config())


def test_run_length_given_per_call_equals_the_built_in_one():
  """update(..., run=) with traced int32 lengths (the trainer's way) gives the updates of an optimizer built
  for that length; without either, a clear error."""
  params = _nested({"core/0/mlp/fc/kernel": jnp.linspace(-1, 1, D * 4 * D).reshape(D, 4 * D),
                    "final_norm/scale": jnp.ones((D,))})
  grads = jax.tree.map(lambda x: jnp.sin(5.0 * x) + 0.2, params)
  cfg = _cfg(warmup_fraction=0.3)
  built, bare = optim.make_optimizer(cfg, params, 7), optim.make_optimizer(cfg, params)
  run = {k: jnp.int32(v) for k, v in schedules.run_length(cfg, 7).items()}
  s1, s2 = built.init(params), bare.init(params)
  for _ in range(3):  # warm-up steps: the multiplier depends on the run length at every one of them
    u1, s1 = jax.jit(built.update)(grads, s1, params)
    u2, s2 = jax.jit(lambda g, s, p, r: bare.update(g, s, p, run=r))(grads, s2, params, run)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-9)
    assert float(s2.metrics["lr"]) == pytest.approx(float(s1.metrics["lr"]), rel=1e-6)
  with pytest.raises(ValueError, match="run length"):
    bare.update(grads, s2, params)


def test_same_shape_muon_leaves_stacked_equal_one_call_per_leaf():
  """The update runs Muon once per (shape, dtype) group, the group's matrices stacked on a batch axis; each
  leaf's update, momentum and second moment equal muon_leaf's on that leaf alone (bf16 Polar Express, as
  the shipped recipes run it), within one float32 rounding of the update's entries."""
  cfg = _cfg(muon_ortho_dtype="bfloat16")
  params, grads = _params_and_grads(3, 1, [1.0])
  tree, g_tree = (jax.tree.map(jnp.asarray, _nested(t)) for t in (params, grads[0]))
  tx = optim.make_optimizer(cfg, tree, 8)
  state = tx.init(tree)
  u, new = jax.jit(tx.update)(g_tree, state, tree)
  routes = [r for _, r in optim.param_routes(tree, cfg.name)]
  leaves = [jax.tree.leaves(t) for t in (g_tree, tree, state.mu, state.nu, u, new.mu, new.nu)]
  groups = optim._same_shape_groups(leaves[1], routes)
  assert max(len(gr) for gr in groups) >= 2  # k and v: [D, D] (B and C are AdamW's)
  _, g_norm = optim.clip_by_global_norm(leaves[0], cfg.grad_clip)
  hp = optim.hyperparams_at(cfg, jnp.int32(0), optim.schedules.run_length(cfg, 8))
  scale = jnp.minimum(1.0, cfg.grad_clip / g_norm) if cfg.grad_clip else 1.0
  one = jax.jit(lambda g, p, m, v: optim.muon_leaf(
      g * scale, p, m, v, lr=hp["muon_lr"], momentum=hp["muon_momentum"], beta2=cfg.muon_beta2,
      wd=hp["muon_wd"], ns_steps=cfg.muon_ns_steps, ortho_dtype=jnp.bfloat16))
  for i in (i for gr in groups for i in gr):
    want = one(*(leaves[k][i] for k in range(4)))
    for got, w in zip((leaves[4][i], leaves[5][i], leaves[6][i]), want):
      got, w = np.asarray(got), np.asarray(w)
      assert np.abs(got - w).max() <= 2.0 ** -22 * np.abs(w).max(), (i, np.abs(got - w).max())
