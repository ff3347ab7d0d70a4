"""The backward's one-pass mask + inverse rotation + act-derivative kernel (interpret mode) == the jnp path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.model.layers import relu2
from parcae.quant import hadamard as H
from parcae.quant.kernels import unrot


def operands(m=64, k=96):
  dr = jax.random.normal(jax.random.key(0), (m, k)).astype(jnp.bfloat16)
  mask = (jax.random.uniform(jax.random.key(1), (m, k)) < 0.9).astype(jnp.int8)
  x = (2 * jax.random.normal(jax.random.key(2), (m, k))).astype(jnp.bfloat16)
  return dr, mask, x


@pytest.mark.parametrize("act", [None, relu2])
@pytest.mark.parametrize("signs", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_the_jnp_path(act, signs, masked):
  dr, mask, x = operands()
  rotation = (32, H.random_signs(jax.random.key(3), 32) if signs else None)
  mask = mask if masked else None
  got = jax.jit(lambda *a: unrot.unrotate(*a, rotation, act))(dr, mask, x)
  want = jax.jit(lambda *a: unrot.reference(*a, rotation, act))(dr, mask, x)
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  if masked:  # control: the mask matters
    assert not np.array_equal(np.asarray(got, np.float32),
                              np.asarray(unrot.reference(dr, None, x, rotation, act), np.float32))


def test_reference_is_the_float64_formula():
  """mask, then v @ M^T / sqrt(n) per block, then ReLU^2's derivative max(x, 0): within one bf16 rounding
  of each of the two rounded steps."""
  dr, mask, x = operands()
  signs = H.random_signs(jax.random.key(3), 32)
  got = np.asarray(unrot.reference(dr, mask, x, (32, signs), relu2), np.float64)
  mat = np.asarray(H.sign_matrix(32, signs), np.float64) / np.sqrt(32)
  d = np.where(np.asarray(mask) != 0, np.asarray(dr, np.float64), 0).reshape(64, 3, 32)
  want = (d @ mat.T).reshape(64, 96) * np.maximum(np.asarray(x, np.float64), 0)
  np.testing.assert_allclose(got, want, rtol=2 * 2.0 ** -8, atol=1e-6 * np.abs(want).max())
  wrong = (d @ mat).reshape(64, 96) * np.maximum(np.asarray(x, np.float64), 0)  # control: M, not M^T
  assert not np.allclose(got, wrong, rtol=2 * 2.0 ** -8, atol=1e-6 * np.abs(want).max())


def test_launch_shape_does_not_change_values():
  dr, mask, x = operands(128, 64)
  run = lambda tile: np.asarray(unrot.unrotate(dr, mask, x, (32, None), relu2, tile=tile), np.float32)
  want = run(None)
  for tile in (16, 32, 64):
    np.testing.assert_array_equal(run(tile), want)


def test_lowers_as_one_triton_kernel(cuda_lowering):
  from conftest import triton_calls
  a = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
  m = jax.ShapeDtypeStruct((256, 128), jnp.int8)
  text = jax.jit(lambda d, m, x: unrot.unrotate(d, m, x, (32, None), relu2)).trace(a, m, a).lower(
      lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 1


def test_refuses_shapes_it_cannot_run():
  with pytest.raises(ValueError, match="jnp path"):
    unrot.unrotate(jnp.ones((8, 48), jnp.bfloat16), None, jnp.ones((8, 48), jnp.bfloat16), (32, None))
