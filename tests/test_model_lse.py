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
  from parcae.quant.kernels import qdq
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
    monkeypatch.setattr(lse, "_backend", lambda interpret: (False, qdq.backend(False, lse.WARPS)[2]))
    text = jax.jit(lse.row_lse).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 1


def test_sharded_train_step_lowers_with_the_kernel_per_device(cuda_lowering, monkeypatch):
  """The whole train step with lse_impl "pallas" on a (2, 2, 2) mesh lowers for CUDA with the kernel in the
  forward's loss head, each call on one device's rows (a quarter of a chunk) and half of the vocabulary."""
  from conftest import triton_calls
  from parcae.quant.kernels import qdq
  from train_helpers import lower_sharded_step_for_cuda, tiny_config
  cfg = tiny_config("unused", grad_accum=2, seq_len=64)
  cfg.model.compute_dtype, cfg.model.lse_impl, cfg.model.rope_impl = "bfloat16", "pallas", "xla"
  cfg.train.loss_chunk = 256
  shapes = set()
  real = lse._local
  monkeypatch.setattr(lse, "_local", lambda x, i: shapes.add(x.shape) or real(x, i))
  monkeypatch.setattr(lse, "_backend", lambda interpret: (False, qdq.backend(False, lse.WARPS)[2]))
  text = lower_sharded_step_for_cuda(cfg)
  assert len(triton_calls(text)) >= 1
  assert shapes == {(256 // 4, cfg.model.vocab_size // 2)}, shapes
