"""The loss head's one-pass log-sum-exp kernel (interpreted on the CPU): against float64, against the two-pass
formula inside the loss (values and gradients), per device under a mesh, and lowered for CUDA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.model import lse
from parcae.model.loss import token_nll


def logits(n, v, dtype, seed=0):
  x = 4.0 * jax.random.normal(jax.random.key(seed), (n, v), jnp.float32)
  x = x.at[0].add(80.0)  # exp(x) would overflow float32 without the shift by the max
  x = x.at[1, v - 1].set(60.0)  # one row's max in its last tile only
  return x.astype(dtype)


def compile_kernels(monkeypatch):
  """The kernels' Triton backend (not interpret mode), for lowering on this CPU for CUDA."""
  real = lse._backend
  monkeypatch.setattr(lse, "_backend", lambda interpret, *a: real(False, *a))


def lse64(x):
  with jax.enable_x64(True):
    return np.asarray(jax.nn.logsumexp(jnp.asarray(np.asarray(x.astype(jnp.float32)), jnp.float64), axis=1))


# float32 sums of up to 4096 terms, against float64: the two-pass formula meets the same bound (asserted).
TOL = 2e-6


@pytest.mark.parametrize("n,v,dtype", [(32, 4096, jnp.bfloat16), (48, 192, jnp.float32), (16, 2048 + 64, jnp.bfloat16)])
def test_kernel_matches_float64(n, v, dtype):
  x = logits(n, v, dtype)
  want = lse64(x)
  got = np.asarray(lse.row_lse(x))
  two_pass = np.asarray(jax.nn.logsumexp(x.astype(jnp.float32), axis=1))
  assert got.dtype == np.float32 and got.shape == (n,)
  bound = TOL * np.maximum(1.0, np.abs(want))
  assert np.all(np.abs(two_pass - want) <= bound)
  assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


def test_tile_width_and_support():
  assert lse._cols(32768) == lse.MAX_COLS and lse._cols(2048 + 64) == 64 and lse._cols(96) == 0
  assert lse.supported(2048, 32768) and not lse.supported(2048 + 8, 32768) and not lse.supported(32, 96)
  assert lse.supported(32, 2048 + 64) and not lse.supported(32, 2048 + 64, min_cols=256)


def loss_inputs(seed=0, b=2, s=32, d=32, v=256):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(k1, (b, s, d)), 0.5 * jax.random.normal(k2, (v, d)),
          jax.random.randint(k3, (b, s), 0, v), jax.random.uniform(k4, (b, s)))


@pytest.mark.parametrize("cd,chunk", [(jnp.bfloat16, 16), (jnp.float32, 0)])
def test_loss_with_the_kernel_equals_the_two_pass_loss(cd, chunk):
  """Same per-token values and gradients up to float32 summation order (the backward is shared: it reads the
  forward's log-sum-exp)."""
  y, table, targets, w = loss_inputs()
  outs = {}
  for impl in ("xla", "pallas"):
    f = lambda y, t: jnp.sum(w * token_nll(y, t, targets, cd, chunk, impl))
    outs[impl] = (token_nll(y, table, targets, cd, chunk, impl), *jax.grad(f, argnums=(0, 1))(y, table))
  for a, b in zip(outs["pallas"], outs["xla"]):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * max(1.0, np.abs(b).max()))


def test_pallas_impl_refuses_shapes_it_cannot_run():
  y, table, targets, _ = loss_inputs(v=96)
  with pytest.raises(ValueError, match="lse_impl='pallas' needs .*vocabulary 96"):
    token_nll(y, table, targets, jnp.float32, 16, "pallas")
  np.testing.assert_array_equal(np.asarray(token_nll(y, table, targets, jnp.float32, 16, "auto")),
                                np.asarray(token_nll(y, table, targets, jnp.float32, 16, "xla")))
  from parcae.model.config import default_model_config, validate_model_config
  cfg = default_model_config()
  cfg.lse_impl = "triton"
  with pytest.raises(ValueError, match="model.lse_impl='triton'"):
    validate_model_config(cfg)


def test_per_device_under_a_mesh_and_lowered_for_cuda(cuda_lowering, monkeypatch):
  """Under a (data 2, tensor 2) mesh each device's kernel gets its rows and its slice of the vocabulary and
  the slices' results combine to the unsharded values; it lowers to one Triton call."""
  from conftest import triton_calls
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x = logits(64, 2048, jnp.bfloat16, seed=1)
  want = np.asarray(lse.row_lse(x))
  shapes = []
  real = lse._local
  monkeypatch.setattr(lse, "_local", lambda x, i: shapes.append(x.shape) or real(x, i))
  with jax.set_mesh(mesh):
    got = jax.jit(lse.row_lse)(jax.device_put(x, NamedSharding(mesh, P("data", "tensor"))))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=TOL * np.abs(want).max())
    assert shapes == [(32, 1024)], shapes
    compile_kernels(monkeypatch)
    text = jax.jit(lse.row_lse).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 1


@pytest.mark.parametrize("mesh", [(2, 2, 2), (2, 4, 1)])
def test_sharded_train_step_lowers_with_the_kernel_per_device(cuda_lowering, monkeypatch, mesh):
  """The whole train step with lse_impl "pallas" lowers for CUDA with a kernel in the loss head, per device.
  On a (2, 2, 2) mesh the log-sum-exp kernel takes one device's rows (a quarter of a chunk) and half of the
  vocabulary (the gradient is XLA's: it needs the log-sum-exp over the whole vocabulary); on (2, 4, 1) the
  gradient kernel takes an eighth of each chunk's rows and the whole vocabulary."""
  from conftest import triton_calls
  from train_helpers import lower_sharded_step_for_cuda, tiny_config
  cfg = tiny_config("unused", grad_accum=2, seq_len=64)
  cfg.model.compute_dtype, cfg.model.lse_impl, cfg.model.rope_impl = "bfloat16", "pallas", "xla"
  cfg.train.loss_chunk = 256
  shapes, grad_shapes = set(), set()
  real, real_grad = lse._local, lse.row_lse_grad
  monkeypatch.setattr(lse, "_local", lambda x, i: shapes.add(x.shape) or real(x, i))
  monkeypatch.setattr(lse, "row_lse_grad", lambda x, *a: grad_shapes.add(x.shape) or real_grad(x, *a))
  compile_kernels(monkeypatch)
  text = lower_sharded_step_for_cuda(cfg, mesh)
  assert len(triton_calls(text)) >= 1
  v = cfg.model.vocab_size
  if mesh[2] > 1:
    assert shapes == {(256 // 4, v // 2)} and not grad_shapes, (shapes, grad_shapes)
  else:
    assert grad_shapes == {(256 // 8, v)} and not shapes, (shapes, grad_shapes)


def softmax_grad64(x, t, g):
  """(exp(x - lse) - onehot(t)) * g in float64 from the float32 view of x."""
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  p = np.exp(xf - lse64(x)[:, None])
  p[np.arange(len(xf)), np.asarray(t)] -= 1.0
  return p * g


@pytest.mark.parametrize("dtype,cols,hints", [(jnp.bfloat16, 256, ""), (jnp.float32, 512, ""),
                                              (jnp.bfloat16, 4096, ""), (jnp.bfloat16, 256, "evict+reverse"),
                                              (jnp.float32, 512, "reverse")])
def test_grad_kernel_matches_float64(dtype, cols, hints, monkeypatch):
  """The training loss's kernel: log-sum-exp within TOL of float64 (running max over 8, 4 and 1 column tiles:
  row 0 shifted by +80, row 1's max in its last tile), the target logit exact, and the logit gradient within
  one rounding of the output dtype (its unit roundoff, relative) of the float64 formula, plus float32's error.
  Also with the L2 hints (GRAD_EVICT's loads and stores, GRAD_REVERSE's second loop from the last tile)."""
  monkeypatch.setattr(lse, "GRAD_COLS", cols)
  monkeypatch.setattr(lse, "GRAD_EVICT", "evict" in hints)
  monkeypatch.setattr(lse, "GRAD_REVERSE", "reverse" in hints)
  n, v, g = 32, 2048, 0.37
  x = logits(n, v, jnp.bfloat16, seed=3)
  t = jax.random.randint(jax.random.key(4), (n,), 0, v).at[1].set(v - 1)
  got_lse, got_t, got_d = lse.row_lse_grad(x, t, g, dtype)
  want = lse64(x)
  assert got_d.dtype == dtype and got_d.shape == (n, v) and got_lse.shape == got_t.shape == (n,)
  assert np.all(np.abs(np.asarray(got_lse) - want) <= TOL * np.maximum(1.0, np.abs(want)))
  np.testing.assert_array_equal(np.asarray(got_t), np.asarray(x.astype(jnp.float32))[np.arange(n), np.asarray(t)])
  ref = softmax_grad64(x, t, g)
  unit = 2.0 ** -8 if dtype == jnp.bfloat16 else 2.0 ** -24  # 8 and 24 significant bits
  # float32 error of exp(x - lse): |x - lse| <= ~100 here, so ~100 * 2^-24 relative before the rounding
  bound = (unit + 1e-5) * np.abs(ref) + 1e-30
  err = np.abs(np.asarray(got_d, np.float64) - ref)
  assert np.all(err <= bound), (err / bound).max()
  assert np.abs(ref).max() > 0.1 and (np.abs(ref) > 0).mean() > 0.5  # the check is not over zeros


def test_grad_kernel_support(monkeypatch):
  assert lse.grad_supported(8192, 32768) and lse._cols(32768, lse.GRAD_COLS) == lse.GRAD_COLS
  assert lse._cols(2048 + 64, lse.GRAD_COLS) == 64 and not lse.grad_supported(8192, 96)
  monkeypatch.setattr(lse, "GRAD_ROWS", 4)
  assert not lse.grad_supported(8192 + 2, 32768) and lse.grad_supported(8192 + 4, 32768)


def test_mean_loss_with_the_grad_kernel_over_several_tiles(monkeypatch):
  """The training loss with the kernel (4 column tiles of the vocabulary) against the XLA formula: the loss
  within TOL, and each gradient entry within 2^-8 of the sum of |terms| it adds up (one bf16 rounding of each
  logit-gradient entry may flip between the two, whose log-sum-exps differ in the last float32 bits)."""
  from parcae.model.loss import mean_token_nll
  monkeypatch.setattr(lse, "GRAD_COLS", 64)
  y, table, targets, _ = loss_inputs(seed=2, v=256)
  called = []
  real = lse.row_lse_grad
  monkeypatch.setattr(lse, "row_lse_grad", lambda *a: called.append(a[0].shape) or real(*a))
  outs = {impl: jax.value_and_grad(lambda y, t: mean_token_nll(y, t, targets, jnp.bfloat16, 32, impl, 0.5),
                                   argnums=(0, 1))(y, table) for impl in ("pallas", "xla")}
  assert called == [(32, 256)], called  # traced once inside the chunk scan
  (v1, g1), (v2, g2) = outs["pallas"], outs["xla"]
  assert abs(float(v1) - float(v2)) <= TOL * abs(float(v2))
  yc, tc = (np.asarray(a.astype(jnp.bfloat16), np.float64) for a in (y.reshape(-1, y.shape[-1]), table))
  x = jnp.dot(y.astype(jnp.bfloat16).reshape(-1, y.shape[-1]), table.astype(jnp.bfloat16).T)
  a_dl = np.abs(softmax_grad64(x, targets.reshape(-1), 0.5 / targets.size))
  for a, b, bound in zip(g1, g2, (2.0 ** -8 * a_dl @ np.abs(tc), 2.0 ** -8 * a_dl.T @ np.abs(yc))):
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(bound.shape)
    assert np.all(diff <= bound + 1e-6 * np.abs(np.asarray(b)).max()), (diff / bound).max()


def test_grad_kernel_lowers_for_cuda(cuda_lowering, monkeypatch):
  """The gradient kernel (two loops over dynamic column tiles) lowers to one Triton call."""
  from conftest import triton_calls
  compile_kernels(monkeypatch)
  x = jax.ShapeDtypeStruct((64, 32768), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((64,), jnp.int32)
  f = jax.jit(lambda x, t: lse.row_lse_grad(x, t, 1 / 3, jnp.bfloat16))
  assert len(triton_calls(f.trace(x, t).lower(lowering_platforms=("cuda",)).as_text())) == 1


@pytest.mark.parametrize("dtype,aliased", [(jnp.bfloat16, True), (jnp.float32, False)])
def test_grad_kernel_writes_over_the_logits(cuda_lowering, monkeypatch, dtype, aliased):
  """Lowered for CUDA, the gradient kernel's call gives its first output the logits' buffer (operand 0) where
  the gradient has the logits' dtype (one [N, V] array less at the loss head's peak), and no buffer otherwise."""
  from conftest import triton_calls
  compile_kernels(monkeypatch)
  x = jax.ShapeDtypeStruct((64, 32768), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((64,), jnp.int32)
  f = jax.jit(lambda x, t: lse.row_lse_grad(x, t, 1 / 3, dtype))
  ((_, call),) = triton_calls(f.trace(x, t).lower(lowering_platforms=("cuda",)).as_text())
  alias = "output_operand_alias<output_tuple_indices = [0], operand_index = 0"
  assert (alias in call) == aliased, call[-600:]


@pytest.mark.parametrize("evict", [False, True])
def test_grad_kernel_l2_hints_reach_the_ptx(evict, monkeypatch, tmp_path):
  """With jax's CUDA plugin (compile-only H100; skipped without it): GRAD_EVICT's cache hints are in the
  compiled kernel's PTX (L2::evict_last on the first loop's loads, L2::evict_first on the second loop's loads and
  the stores) and absent without it."""
  import glob
  try:
    from parcae.train.targets import target_devices
    sh = jax.sharding.SingleDeviceSharding(target_devices("h100")[0])
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no compile-only H100 target ({type(e).__name__})")
  compile_kernels(monkeypatch)
  monkeypatch.setattr(lse, "GRAD_EVICT", evict)
  x = jax.ShapeDtypeStruct((64, 32768), jnp.bfloat16, sharding=sh)
  t = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=sh)
  f = jax.jit(lambda x, t: lse.row_lse_grad(x, t, 1 / 3, jnp.bfloat16))
  f.lower(x, t).compile(compiler_options={"xla_dump_to": str(tmp_path)})
  ptx = "".join(open(p).read() for p in glob.glob(str(tmp_path / "*.ptx")))
  assert "ld.global" in ptx
  for hint in ("L2::evict_last", "L2::evict_first", "st.global.L1::evict_first"):
    assert (hint in ptx) == evict, hint
