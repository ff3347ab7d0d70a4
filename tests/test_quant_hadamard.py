"""Block Hadamard rotations: orthogonality and invariance of the GEMM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.quant import hadamard as H


@pytest.mark.parametrize("n", H.SIZES)
def test_orthonormal_and_entries(n):
  h = H.sylvester(n)
  np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
  np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n))  # a true Hadamard matrix, scaled
  m = np.asarray(H.matrix(n, H.random_signs(jax.random.key(n), n)), np.float64)
  pm = np.asarray(H.sign_matrix(n, H.random_signs(jax.random.key(n), n)), np.float64)
  assert set(np.unique(pm)) == {-1.0, 1.0}
  np.testing.assert_allclose(pm / np.sqrt(n), m, rtol=1e-7)
  np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-6)


def bf16_64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float64)


@pytest.mark.parametrize("n", H.SIZES)
@pytest.mark.parametrize("random", [False, True])
def test_rotation_preserves_product(n, random):
  """(x M)(w M)^T = x w^T for the bf16-rounded operands the rotation reads."""
  rng = np.random.default_rng(n)
  x = rng.standard_normal((8, 256)).astype(np.float32)
  w = rng.standard_normal((16, 256)).astype(np.float32)
  signs = H.random_signs(jax.random.key(1), n) if random else None
  xr, wr = H.rotate(jnp.asarray(x), n, signs, -1), H.rotate(jnp.asarray(w), n, signs, -1)
  got = np.asarray(xr, np.float64) @ np.asarray(wr, np.float64).T
  np.testing.assert_allclose(got, bf16_64(x) @ bf16_64(w).T, atol=2e-4)
  back = np.asarray(H.rotate(xr, n, signs, -1, inverse=True))
  np.testing.assert_allclose(back, x, rtol=0, atol=2 * 2.0**-8 * np.abs(x).max())  # two bf16 roundings
  assert not np.allclose(np.asarray(xr), x)


@pytest.mark.parametrize("n", H.SIZES)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rotation_equals_matrix_in_float64(n, axis):
  """rotate(x) is bf16(x) @ diag(s) H_n / sqrt(n) along any axis, to f32 accumulation error."""
  rng = np.random.default_rng(n + axis)
  shape = [6, 10, 12]
  shape[axis] = 256
  x = rng.standard_normal(shape).astype(np.float32)
  signs = H.random_signs(jax.random.key(n), n)
  m = np.asarray(H.matrix(n, signs), np.float64)
  xm = np.moveaxis(bf16_64(x), axis, -1)
  for inverse, mm in ((False, m), (True, m.T)):
    want = np.moveaxis((xm.reshape(xm.shape[:-1] + (-1, n)) @ mm).reshape(xm.shape), -1, axis)
    got = np.asarray(jax.jit(lambda v: H.rotate(v, n, signs, axis, inverse))(jnp.asarray(x)), np.float64)
    # products exact, n-term f32 sums and one scale: error <= (n + 1) 2^-24 sum|x_i| / sqrt(n)
    np.testing.assert_allclose(got, want, rtol=0, atol=(n + 1) * 2.0**-24 * np.sqrt(n) * np.abs(x).max())


def test_rotate_other_axis_and_block_locality():
  x = np.zeros((64, 3), np.float32)
  x[5, 1] = 1.0
  y = np.asarray(H.rotate(jnp.asarray(x), 32, axis=0))
  assert np.count_nonzero(y[:32, 1]) == 32 and not y[32:].any() and not y[:, [0, 2]].any()


def test_bad_size():
  with pytest.raises(ValueError, match="one of"):
    H.sylvester(24)
  with pytest.raises(ValueError, match="multiple of the Hadamard size"):
    H.rotate(jnp.ones((2, 40)), 16)
  with pytest.raises(ValueError, match="one of"):
    H.rotate(jnp.ones((2, 48)), 24)
