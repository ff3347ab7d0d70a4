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
  np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-6)


@pytest.mark.parametrize("n", H.SIZES)
@pytest.mark.parametrize("random", [False, True])
def test_rotation_preserves_product(n, random):
  rng = np.random.default_rng(n)
  x = rng.standard_normal((8, 256)).astype(np.float32)
  w = rng.standard_normal((16, 256)).astype(np.float32)
  signs = H.random_signs(jax.random.key(1), n) if random else None
  m = H.matrix(n, signs)
  xr, wr = H.rotate(jnp.asarray(x), m, -1), H.rotate(jnp.asarray(w), m, -1)
  got = np.asarray(xr, np.float64) @ np.asarray(wr, np.float64).T
  np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), atol=2e-4)
  back = H.rotate(xr, m, -1, inverse=True)
  np.testing.assert_allclose(np.asarray(back), x, atol=2e-5)
  assert not np.allclose(np.asarray(xr), x)


def test_rotate_other_axis_and_block_locality():
  x = np.zeros((64, 3), np.float32)
  x[5, 1] = 1.0
  y = np.asarray(H.rotate(jnp.asarray(x), H.matrix(32), axis=0))
  assert np.count_nonzero(y[:32, 1]) == 32 and not y[32:].any() and not y[:, [0, 2]].any()


def test_bad_size():
  with pytest.raises(ValueError, match="one of"):
    H.sylvester(24)
  with pytest.raises(ValueError, match="multiple of the Hadamard size"):
    H.rotate(jnp.ones((2, 40)), H.matrix(16))
