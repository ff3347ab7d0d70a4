"""The loop-boundary kernels (model/loop_boundary.py, interpreted here): against float64, against autodiff of
the loop's formula, inside a whole Parcae model (`model.norm_impl`), per device under a mesh, lowered for CUDA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcae.model import build, loop_boundary
from conftest import CPU_DEFAULT_CODEGEN
from test_model_add_norm import _tiny, f64

EPS = 1e-5


def inputs(b, s, d, seed=0, p_dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 10)
  n = lambda k, dt=jnp.float32: jax.random.normal(k, (b, s, d), jnp.float32).astype(dt)
  prim = (2.0 * n(ks[0]), n(ks[1], p_dtype), 2.0 * n(ks[2]), n(ks[3]),
          jax.random.uniform(ks[4], (d,), jnp.float32, 0.1, 0.99), 1.0 + 0.1 * jax.random.normal(ks[5], (d,)))
  cts = (n(ks[6]), jnp.zeros((b, s), jnp.float32), n(ks[7]), n(ks[8], jnp.bfloat16))
  return prim, cts


def formula(x, p, h, be, decay, scale, live_B, cd=jnp.bfloat16):
  """`looped._update`, `injection.Diagonal.step` and the first block's norm1 cast to the compute dtype."""
  new = x + p.astype(jnp.float32)
  hn = jnp.where(live_B[:, None, None], new, h)
  dist = jnp.sqrt(jnp.sum((new - h) ** 2, axis=-1))
  u = decay * hn + be
  n = ((u * jax.lax.rsqrt(jnp.mean(u * u, axis=-1, keepdims=True) + EPS)) * scale).astype(cd)
  return hn, jax.lax.stop_gradient(dist), u, n


def kernel(x, p, h, be, decay, scale, live_B, cd=jnp.bfloat16):
  return loop_boundary.boundary(x, p, h, (decay, be), live_B, scale, EPS, cd)


@pytest.mark.parametrize("d", [768, 320])
def test_kernels_match_float64(d):
  """h' exact, u within float32's rounding of one multiply-add, n within bf16's unit roundoff (2^-8); every
  cotangent within 2e-6 of its largest entry (float32 row and column sums); dp = bf16(dx) exactly; dead rows
  keep h and pass their cotangent to h, live rows to x and p. D = 320: 64-wide chunks."""
  (x, p, h, be, decay, scale), (dhn, _, du, dn) = inputs(2, 8, d, seed=d)
  live = jnp.array([1.0, 0.0])
  rows = lambda a: a.reshape(16, d)
  live_N = jnp.repeat(live, 8)
  hn, dist, u, n, r = loop_boundary.forward(*map(rows, (x, p, h, be)), live_N, decay, scale, EPS, jnp.bfloat16)
  # dp = bf16(dx) is a bit identity between two outputs: compiled with a user's CPU emitters (see conftest)
  backward = jax.jit(loop_boundary.backward, static_argnums=9, compiler_options=CPU_DEFAULT_CODEGEN)
  dx, dp, dh, dbe, ddec, dsc = backward(hn, u, r, live_N, decay, scale, rows(dhn), rows(du), rows(dn), jnp.bfloat16)
  lv = np.repeat(np.array([True, False]), 8)[:, None]
  new64 = f64(rows(x)) + f64(rows(p).astype(jnp.float32))
  hn64 = np.where(lv, new64, f64(rows(h)))
  np.testing.assert_array_equal(np.asarray(hn), hn64.astype(np.float32))
  u64 = f64(decay) * hn64 + f64(rows(be))
  r64 = 1.0 / np.sqrt(np.mean(u64 * u64, axis=1, keepdims=True) + EPS)
  uhat, g = u64 * r64, f64(rows(dn).astype(jnp.float32)) * f64(scale)
  n64 = uhat * f64(scale)
  assert np.max(np.abs(f64(u) - u64)) <= 2 ** -23 * np.max(np.abs(u64))
  assert np.all(np.abs(f64(n.astype(jnp.float32)) - n64) <= 2.0 ** -8 * np.abs(n64) + 1e-6 * np.abs(n64).max())
  dist64 = np.sqrt(np.sum((new64 - f64(rows(h))) ** 2, axis=1))
  gu = f64(rows(du)) + r64 * (g - uhat * np.mean(g * uhat, axis=1, keepdims=True))
  t = f64(rows(dhn)) + f64(decay) * gu
  want = {"dist": (dist, dist64), "dx": (dx, np.where(lv, t, 0.0)), "dh": (dh, np.where(lv, 0.0, t)),
          "dbe": (dbe, gu), "ddecay": (ddec, np.sum(gu * hn64, axis=0)), "dscale": (dsc, np.sum(
              f64(rows(dn).astype(jnp.float32)) * uhat, axis=0))}
  for name, (got, w) in want.items():
    err = np.max(np.abs(f64(got) - w))
    assert err <= 2e-6 * np.max(np.abs(w)), (name, err)
  np.testing.assert_array_equal(np.asarray(dp), np.asarray(dx.astype(jnp.bfloat16)))
  assert np.all(np.asarray(dx)[8:] == 0) and np.all(np.asarray(dh)[:8] == 0)


@pytest.mark.parametrize("p_dtype,cd", [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32)])
def test_custom_vjp_matches_autodiff_of_the_formula(p_dtype, cd):
  """Values and the cotangents of x, p, h, be, decay and scale against jax.vjp of `formula`: float32 ones
  within 2e-6 of their largest entry (summation order), compute-dtype ones within one rounding (2^-7)."""
  prim, cts = inputs(2, 8, 768, seed=1, p_dtype=p_dtype)
  cts = cts[:3] + (cts[3].astype(cd),)
  live = jnp.array([True, False])
  got, want = ((fn(*prim, live, cd), jax.vjp(lambda *a: fn(*a, live, cd), *prim)[1](cts)) for fn in (kernel, formula))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    tol = 2.0 ** -7 if g.dtype == jnp.bfloat16 else 2e-6
    g, w = f64(g.astype(jnp.float32)), f64(w.astype(jnp.float32))
    assert np.max(np.abs(g - w)) <= tol * max(np.abs(w).max(), 1e-30), np.max(np.abs(g - w))


@pytest.mark.parametrize("split", [1, 2])
def test_parcae_takes_the_kernel_and_matches_the_xla_path(split, monkeypatch):
  """Parcae's loss, parameter gradients and loop telemetry with norm_impl "pallas" (the loop boundary as one
  kernel each way) against "xla": within 1e-5 of each leaf's largest entry; the kernels traced into every
  loop (counted in traces: once per no-grad while loop, twice for the rematerialized grad scan's forward, once
  for its backward, once in `hidden_at`); with the no-grad loop split in halves; and `hidden_at` (test-time
  loop counts in one pass) agrees with "xla" too."""
  ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)
  n_B, k_B = jnp.array([1, 3, 0, 2]), jnp.array([2, 1, 2, 2])
  calls = []
  real_f, real_b = loop_boundary.forward, loop_boundary.backward
  monkeypatch.setattr(loop_boundary, "forward", lambda *a, **k: calls.append("fwd") or real_f(*a, **k))
  monkeypatch.setattr(loop_boundary, "backward", lambda *a: calls.append("bwd") or real_b(*a))

  def run(impl):
    cfg = _tiny(impl, "parcae")
    cfg.no_grad_split = split
    m = build(cfg, jax.random.key(0))
    graphdef, state = nnx.split(m)
    state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), state)

    def loss(state):
      model = nnx.merge(graphdef, state)
      y, tel = model.hidden(ids, n_B, k_B, key=jax.random.key(3), grad_steps=2)
      return jnp.mean(model.logits(y).astype(jnp.float32) ** 2), tel
    (value, tel), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(state)
    at = nnx.merge(graphdef, state).hidden_at(ids, jnp.array([1, 3]), lambda y, aux: (y, aux["rel_residual"]))
    return value, tel, grads, at

  with jax.default_matmul_precision("highest"):  # on a GPU: float32 GEMMs, not TF32 (an H100's default), whose
    want = run("xla")                           # rounding turns the kernel's summation order into ~1e-4
    assert not calls
    got = run("pallas")
  assert calls.count("bwd") == 1 and calls.count("fwd") == 4 + split, calls
  assert abs(float(got[0]) - float(want[0])) <= 1e-6 * abs(float(want[0]))
  for key in ("state_norm", "rel_residual"):
    np.testing.assert_allclose(float(got[1][key]), float(want[1][key]), rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got[2:]), jax.tree.leaves(want[2:])):
    g, w = f64(g), f64(w)
    assert np.all(np.abs(g - w) <= 1e-5 * max(np.abs(w).max(), 1e-12)), np.abs(g - w).max()


def test_per_device_under_a_mesh_and_lowered_for_cuda(cuda_lowering, monkeypatch):
  """Under a (data 2, fsdp 2) mesh each device's kernel takes its quarter of the rows and the results equal
  the unsharded ones (decay's and the scale's gradients summed over devices); lowered for CUDA the op is two
  Triton calls."""
  from conftest import triton_calls
  mesh = jax.make_mesh((2, 2, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  prim, cts = inputs(4, 8, 256, seed=5)
  live = jnp.array([True, False, True, True])
  grad = lambda *a: jax.vjp(lambda *a: kernel(*a, live), *a)[1](cts)
  want = grad(*prim)
  shapes = []
  real = loop_boundary.forward
  monkeypatch.setattr(loop_boundary, "forward", lambda x, *a, **k: shapes.append(x.shape) or real(x, *a, **k))
  with jax.set_mesh(mesh):
    got = jax.jit(grad)(*prim)
  assert shapes == [(8, 256)], shapes
  for g, w in zip(got, want):
    g, w = f64(g.astype(jnp.float32)), f64(w.astype(jnp.float32))
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * np.abs(w).max())
  from parcae.model import add_norm
  real_backend = add_norm._backend
  monkeypatch.setattr(add_norm, "_backend", lambda interpret: real_backend(False))
  text = jax.jit(grad).trace(*prim).lower(lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 2


def test_sharded_train_step_with_the_split_loop_lowers_with_the_kernel(cuda_lowering, monkeypatch):
  """The whole train step (norm_impl "pallas", the no-grad loop split in halves) on a (data 2, fsdp 4) mesh
  lowers for CUDA with the boundary kernel per device: on one device's rows in the whole-batch loops and on
  half of them in the deeper halves' loop."""
  from conftest import triton_calls
  from train_helpers import lower_sharded_step_for_cuda, tiny_config
  from parcae.model import add_norm
  cfg = tiny_config("unused", grad_accum=2, seq_len=64, micro_batch_size=16)
  cfg.model.compute_dtype, cfg.model.norm_impl, cfg.model.no_grad_split = "bfloat16", "pallas", 2
  cfg.model.rope_impl = cfg.model.lse_impl = "xla"
  shapes = set()
  real_f, real_backend = loop_boundary.forward, add_norm._backend
  monkeypatch.setattr(loop_boundary, "forward", lambda x, *a, **k: shapes.add(x.shape) or real_f(x, *a, **k))
  monkeypatch.setattr(add_norm, "_backend", lambda interpret: real_backend(False))
  text = lower_sharded_step_for_cuda(cfg, (2, 4, 1))
  assert len(triton_calls(text)) >= 2
  rows = cfg.train.micro_batch_size * cfg.train.seq_len // 8
  assert shapes == {(rows, cfg.model.d_model), (rows // 2, cfg.model.d_model)}, shapes


@pytest.mark.slow
def test_quartet_recipe_with_the_kernel():
  """Under the Quartet recipe (quantized core GEMMs, stochastic rounding keyed alike) the forward loss with the
  boundary kernel equals the XLA path's to float32 rounding (the quantizers see the same bf16 norm1 output),
  and every parameter gradient points the same way (cosine >= 0.95; the backward's stochastic rounding
  sees float32 cotangents summed in another order, so it may round some entries differently)."""
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  res = {}
  for impl in ("xla", "pallas"):
    cfg = _tiny(impl, "parcae")
    cfg.compute_dtype, cfg.core_layers = "bfloat16", 1  # the boundary feeds the core's first block only
    graphdef, state = nnx.split(build(cfg, jax.random.key(0), quant="quartet"))
    state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), state)

    def loss(state):
      model = nnx.merge(graphdef, state)
      y, _ = model.hidden(ids, jnp.array([3, 1]), jnp.array([1, 2]), key=jax.random.key(3), grad_steps=2,
                          quant_key=jax.random.key(4))
      return jnp.mean(model.logits(y).astype(jnp.float32) ** 2)
    res[impl] = jax.jit(jax.value_and_grad(loss))(state)
  np.testing.assert_allclose(float(res["pallas"][0]), float(res["xla"][0]), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(res["xla"][1]), jax.tree.leaves(res["pallas"][1])):
    a, b = f64(a).ravel(), f64(b).ravel()
    assert np.all(np.isfinite(b)) and a @ b >= 0.95 * np.linalg.norm(a) * np.linalg.norm(b)
