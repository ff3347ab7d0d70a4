"""The residual add + RMSNorm kernels (model/add_norm.py, interpreted here): against float64, against autodiff
of the block's formula, inside a whole model (`model.norm_impl`), per device under a mesh, lowered for CUDA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcae.model import add_norm
from parcae.model import config as C
from parcae.model import build

EPS = 1e-6


def f64(a):
  return np.asarray(a, np.float64)


def inputs(n, d, seed=0, y_dtype=jnp.bfloat16):
  ks = jax.random.split(jax.random.key(seed), 5)
  return (3.0 * jax.random.normal(ks[0], (n, d), jnp.float32),
          jax.random.normal(ks[1], (n, d), jnp.float32).astype(y_dtype),
          1.0 + 0.1 * jax.random.normal(ks[2], (d,), jnp.float32),
          jax.random.normal(ks[3], (n, d), jnp.float32),
          jax.random.normal(ks[4], (n, d), jnp.float32).astype(jnp.bfloat16))


def formula(x, y, scale, eps=EPS, cd=jnp.bfloat16):
  """layers.Block's add and norm2 (layers.rms_norm, then the MLP's cast to the compute dtype)."""
  s = x + y.astype(jnp.float32)
  return s, ((s * jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + eps)) * scale).astype(cd)


@pytest.mark.parametrize("d", [768, 1024, 320])
def test_kernels_match_float64(d):
  """s exact; n within bf16's unit roundoff (2^-8) of the float64 value; dx, dscale within 2e-6 of their
  largest entry (float32 sums over a row / over the rows); dy = bf16(dx) exactly. D = 320: 64-wide chunks."""
  x, y, scale, ds, dn = inputs(64, d, seed=d)
  s, n, r = add_norm.forward(x, y, scale, EPS, jnp.bfloat16)
  dx, dy, dsc = add_norm.backward(s, r, scale, ds, dn, jnp.bfloat16)
  s64 = f64(x) + f64(y.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(s), s64.astype(np.float32))
  r64 = 1.0 / np.sqrt(np.mean(s64 * s64, axis=1, keepdims=True) + EPS)
  xhat, g = s64 * r64, f64(dn.astype(jnp.float32)) * f64(scale)
  n64 = xhat * f64(scale)
  assert np.all(np.abs(f64(n.astype(jnp.float32)) - n64) <= 2.0 ** -8 * np.abs(n64) + 1e-30)
  dx64 = f64(ds) + r64 * (g - xhat * np.mean(g * xhat, axis=1, keepdims=True))
  dsc64 = np.sum(f64(dn.astype(jnp.float32)) * xhat, axis=0)
  for got, want in ((dx, dx64), (dsc, dsc64)):
    assert np.max(np.abs(f64(got) - want)) <= 2e-6 * np.max(np.abs(want)), np.max(np.abs(f64(got) - want))
  np.testing.assert_array_equal(np.asarray(dy), np.asarray(dx.astype(jnp.bfloat16)))


@pytest.mark.parametrize("y_dtype,cd", [(jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.float32)])
def test_custom_vjp_matches_autodiff_of_the_formula(y_dtype, cd):
  """Values and the cotangents of x, y and scale against jax.vjp of `formula`: float32 outputs within 2e-6 of
  their largest entry (summation order), compute-dtype ones within one rounding (2^-7 of the entry)."""
  x, y, scale, ds, dn = inputs(128, 768, seed=1, y_dtype=y_dtype)
  x, y, ds = (a.reshape(2, 64, 768) for a in (x, y, ds))
  dn = dn.reshape(2, 64, 768).astype(cd)
  got_out, got_vjp = jax.vjp(lambda *a: add_norm.add_rms_norm(*a, EPS, cd), x, y, scale)
  want_out, want_vjp = jax.vjp(lambda *a: formula(*a, cd=cd), x, y, scale)
  for got, want in zip(got_out + got_vjp((ds, dn)), want_out + want_vjp((ds, dn))):
    assert got.dtype == want.dtype and got.shape == want.shape
    g, w = f64(got.astype(jnp.float32)), f64(want.astype(jnp.float32))
    tol = 2e-6 * np.abs(w).max() if got.dtype == jnp.float32 else 2.0 ** -7 * np.abs(w) + 1e-30
    assert np.all(np.abs(g - w) <= tol), np.abs(g - w).max()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_closing_norm_matches_autodiff_and_reads_no_residual_cotangent(dtype, monkeypatch):
  """`rms_norm_of_sum` (a stage's last add + closing norm, the sum not returned): its value and the cotangents
  of x, y and scale against jax.vjp of the formula's normalized output (tolerances as above); its backward
  kernel gets no ds operand, and equals the add_rms_norm backward given ds = 0 bit for bit."""
  x, y, scale, _, dn = inputs(128, 768, seed=7)
  x, y = (a.reshape(2, 64, 768) for a in (x, y))
  dn = dn.reshape(2, 64, 768).astype(dtype)
  seen = []
  real_b = add_norm.backward
  monkeypatch.setattr(add_norm, "backward", lambda s, r, sc, ds, *a: seen.append(ds is None) or real_b(s, r, sc, ds, *a))
  got_n, got_vjp = jax.vjp(lambda *a: add_norm.rms_norm_of_sum(*a, EPS, dtype), x, y, scale)
  want_n, want_vjp = jax.vjp(lambda *a: formula(*a, cd=dtype)[1], x, y, scale)
  got, want = (got_n,) + got_vjp(dn), (want_n,) + want_vjp(dn)
  assert seen == [True], seen
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    tol = 2e-6 * np.abs(f64(w)).max() if g.dtype == jnp.float32 else 2.0 ** -7 * np.abs(f64(w)) + 1e-30
    g, w = f64(g.astype(jnp.float32)), f64(w.astype(jnp.float32))
    assert np.all(np.abs(g - w) <= tol), np.abs(g - w).max()
  with_zero_ds = jax.vjp(lambda *a: add_norm.add_rms_norm(*a, EPS, dtype), x, y, scale)[1]((jnp.zeros_like(x), dn))
  for g, w in zip(got_vjp(dn), with_zero_ds):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _tiny(impl, kind="parcae", cd="float32"):
  c = C.default_model_config()
  c.kind, c.vocab_size, c.d_model, c.n_heads, c.max_seq_len, c.compute_dtype = kind, 64, 64, 2, 16, cd
  c.prelude_layers, c.core_layers, c.coda_layers, c.n_layers = 1, 2, 1, 4  # GPT: one stage of 4 blocks
  c.mean_recurrence, c.mean_backprop_depth = 3, 2
  c.norm_impl = impl
  return c


@pytest.mark.parametrize("kind,block_remat", [("parcae", "none"), ("gpt", "none"), ("gpt", "full")])
def test_model_with_the_kernels_matches_the_xla_path(kind, block_remat, monkeypatch):
  """A whole model's loss and parameter gradients (float32 compute and GEMMs) with norm_impl "pallas" against
  "xla": within 1e-5 of each leaf's largest entry (the kernels' row sums run in another order), and the kernels are
  really taken, forward and backward: for norm2 in every block and for norm1 in every block but a stage's
  first (the previous block's last residual add fused into it), counted on GPT's one stage of 4 blocks, and
  for the closing norms (the last add fused into the final norm, and into Parcae's prelude norm)."""
  ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  calls = []
  real_f, real_b, real_op = add_norm.forward, add_norm.backward, add_norm.add_rms_norm
  real_close = add_norm.rms_norm_of_sum
  monkeypatch.setattr(add_norm, "forward", lambda *a: calls.append("fwd") or real_f(*a))
  monkeypatch.setattr(add_norm, "backward", lambda *a: calls.append("bwd") or real_b(*a))
  monkeypatch.setattr(add_norm, "add_rms_norm", lambda *a: calls.append("op") or real_op(*a))
  monkeypatch.setattr(add_norm, "rms_norm_of_sum", lambda *a: calls.append("close") or real_close(*a))

  def grads(impl):
    cfg = _tiny(impl, kind)
    cfg.block_remat = block_remat  # "full": each block under jax.checkpoint, its (x, MLP output) pair out
    m = build(cfg, jax.random.key(0))
    graphdef, state = nnx.split(m)
    state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), state)

    def loss(state):
      model = nnx.merge(graphdef, state)
      if kind == "gpt":
        return jnp.mean(model(ids).astype(jnp.float32) ** 2)
      y, _ = model.hidden(ids, jnp.array([1, 2]), jnp.array([2, 1]), key=jax.random.key(3), grad_steps=2)
      return jnp.mean(model.logits(y).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss))(state)

  with jax.default_matmul_precision("highest"):  # float32 GEMMs on a GPU too (its default is TF32, whose
    want = grads("xla")                         # rounding turns the kernels' other summation order into 1e-4)
    assert not calls
    got = grads("pallas")
  assert "fwd" in calls and "bwd" in calls, calls
  if kind == "gpt":
    assert calls.count("op") == 4 + 3, calls
  assert calls.count("close") == (1 if kind == "gpt" else 2), calls  # the final norm (and the prelude's)
  assert abs(float(got[0]) - float(want[0])) <= 1e-6 * abs(float(want[0]))
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    g, w = f64(g), f64(w)
    assert np.all(np.abs(g - w) <= 1e-5 * max(np.abs(w).max(), 1e-12)), np.abs(g - w).max()


def test_pallas_refuses_shapes_it_cannot_run_and_auto_falls_back():
  m = build(_tiny("pallas"), jax.random.key(0))
  with pytest.raises(ValueError, match=rf"norm_impl='pallas' needs tokens per device divisible by {add_norm.ROWS}"):
    m(jnp.zeros((1, add_norm.ROWS // 2), jnp.int32))
  auto = build(_tiny("auto"), jax.random.key(0))
  xla = build(_tiny("xla"), jax.random.key(0))
  ids = jnp.zeros((2, 16), jnp.int32)
  np.testing.assert_array_equal(np.asarray(auto(ids)), np.asarray(xla(ids)))  # a CPU: XLA's path
  cfg = _tiny("triton")
  with pytest.raises(ValueError, match="model.norm_impl='triton'"):
    C.validate_model_config(cfg)


def test_auto_is_the_default_and_takes_the_kernels_when_compiling_for_a_gpu():
  """The default config's norm_impl ("auto") picks the kernels for a GPU target where the shape allows and
  XLA's path on this CPU; "xla" never takes them."""
  from parcae import compile_target
  assert C.default_model_config().norm_impl == "auto"
  block = build(_tiny("auto"), jax.random.key(0)).core[0]
  xla_block = build(_tiny("xla"), jax.random.key(0)).core[0]
  usable, odd = (2, 16, 64), (1, add_norm.ROWS // 2, 64)
  assert not block.add_norm_kernels(usable)
  with compile_target.compiling_for("gpu"):
    assert block.add_norm_kernels(usable) and not block.add_norm_kernels(odd)
    assert not xla_block.add_norm_kernels(usable)


def test_per_device_under_a_mesh_and_lowered_for_cuda(cuda_lowering, monkeypatch):
  """Under a (data 2, fsdp 2) mesh each device's kernel takes its quarter of the rows and the results equal
  the unsharded ones (the scale's gradient summed over devices); the op lowers to two Triton calls; under a
  "tensor" axis the kernels do not apply."""
  from conftest import triton_calls
  mesh = jax.make_mesh((2, 2, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x, y, scale, ds, dn = (a.reshape(4, 32, -1) if a.ndim == 2 else a for a in inputs(128, 256, seed=5))
  f = lambda x, y, scale: add_norm.add_rms_norm(x, y, scale, EPS, jnp.bfloat16)
  grad = lambda x, y, scale: jax.vjp(f, x, y, scale)[1]((ds, dn))
  want = grad(x, y, scale)
  shapes = []
  real = add_norm.forward
  monkeypatch.setattr(add_norm, "forward", lambda x, *a: shapes.append(x.shape) or real(x, *a))
  with jax.set_mesh(mesh):
    assert add_norm.usable(x.shape) and not add_norm.usable((2, 32, 256))  # 2 sequences: not every device
    got = jax.jit(grad)(x, y, scale)
  assert shapes == [(32, 256)], shapes
  for g, w in zip(got, want):
    np.testing.assert_allclose(f64(g.astype(jnp.float32)), f64(w.astype(jnp.float32)), rtol=0,
                               atol=1e-6 * np.abs(f64(w.astype(jnp.float32))).max())
  tmesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                        axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(tmesh):
    assert not add_norm.usable(x.shape)
  real_backend = add_norm._backend
  monkeypatch.setattr(add_norm, "_backend", lambda interpret: real_backend(False))
  text = jax.jit(grad).trace(x, y, scale).lower(lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 2
  close = lambda x, y, scale: jax.vjp(lambda *a: add_norm.rms_norm_of_sum(*a, EPS, jnp.bfloat16), x, y, scale)[1](dn)
  text = jax.jit(close).trace(x, y, scale).lower(lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 2  # the closing norm: the same forward, the backward without ds


def test_sharded_train_step_lowers_with_the_kernels(cuda_lowering, monkeypatch):
  """The whole train step with norm_impl "pallas" on a (data 2, fsdp 4) mesh lowers for CUDA, each kernel on
  one device's rows (an eighth of a micro-batch's tokens)."""
  from conftest import triton_calls
  from train_helpers import lower_sharded_step_for_cuda, tiny_config
  cfg = tiny_config("unused", grad_accum=2, seq_len=64)
  cfg.model.compute_dtype, cfg.model.norm_impl = "bfloat16", "pallas"
  cfg.model.rope_impl = cfg.model.lse_impl = "xla"
  shapes = set()
  real_f, real_backend = add_norm.forward, add_norm._backend
  monkeypatch.setattr(add_norm, "forward", lambda x, *a: shapes.add(x.shape) or real_f(x, *a))
  monkeypatch.setattr(add_norm, "_backend", lambda interpret: real_backend(False))
  text = lower_sharded_step_for_cuda(cfg, (2, 4, 1))
  assert len(triton_calls(text)) >= 2
  tokens = cfg.train.micro_batch_size * cfg.train.seq_len
  assert shapes == {(tokens // 8, cfg.model.d_model)}, shapes
