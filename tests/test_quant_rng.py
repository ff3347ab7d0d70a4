"""Counter-based uniforms for stochastic rounding: range, uniformity, independence, layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.quant import rng as R


def test_range_grid_and_uniformity():
  u = np.asarray(R.uniform_moved(R.seed(jax.random.key(0)), (1 << 20,), 0), np.float64)
  assert u.min() >= 0 and u.max() < 1
  np.testing.assert_array_equal(u * 2**23, np.floor(u * 2**23))  # on the 2^-23 grid
  # chi-square over 256 equal bins: df 255, mean 255, sd 22.6 -> 6 sd bound
  counts = np.bincount((u * 256).astype(int), minlength=256)
  exp = len(u) / 256
  chi2 = np.sum((counts - exp) ** 2 / exp)
  assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2
  assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / len(u))


def test_neighbours_and_seeds_uncorrelated():
  n = 1 << 18
  a = np.asarray(R.uniform_moved(R.seed(jax.random.key(1)), (n,), 0), np.float64) - 0.5
  b = np.asarray(R.uniform_moved(R.seed(jax.random.key(2)), (n,), 0), np.float64) - 0.5
  bound = 6 / np.sqrt(n)  # correlation of independent uniforms ~ N(0, 1/n)
  assert abs(np.corrcoef(a[1:], a[:-1])[0, 1]) < bound  # consecutive counters
  assert abs(np.corrcoef(a, b)[0, 1]) < bound  # two keys
  assert not np.array_equal(a, b)


def test_nearby_seeds_are_not_shifted_streams():
  """Seed words (s0 + d, s1) must not replay (s0, s1)'s stream d elements later (an added seed would)."""
  n, s0, s1 = 1 << 16, 12345, 0x9E3779B9
  a = np.asarray(R.uniform_moved(jnp.array([s0, s1], jnp.uint32), (n,), 0))
  for d in (1, 5, 32):
    b = np.asarray(R.uniform_moved(jnp.array([s0 + d, s1], jnp.uint32), (n,), 0))
    for j in range(-40, 41):  # b[i] against a[i + j]
      x, y = (a[j:], b[:n - j]) if j >= 0 else (a[:n + j], b[-j:])
      assert np.mean(x == y) < 1e-3, (d, j)  # equal only by chance (2^-23 grid)


@pytest.mark.parametrize("ax", [0, 1, 2])
def test_moved_layout_index(ax):
  """The number an element gets depends on its position in the axis-last layout only."""
  shape = (3, 5, 4)
  sd = R.seed(jax.random.key(3))
  got = np.asarray(R.uniform_moved(sd, shape, ax))
  moved = tuple(d for i, d in enumerate(shape) if i != ax) + (shape[ax],)
  flat = np.asarray(R.uniform_moved(sd, moved, len(shape) - 1))
  np.testing.assert_array_equal(np.moveaxis(got, ax, -1), flat)
  idx = np.asarray(R.moved_index(shape, ax))
  np.testing.assert_array_equal(np.moveaxis(idx, ax, -1).ravel(), np.arange(idx.size))


def test_too_many_elements():
  with pytest.raises(ValueError, match="chunks"):
    R.check_size((1 << 16, 1 << 16, 2))


def test_avalanche():
  """Flipping any one bit of the element index flips each of u's 23 bits with probability 1/2 (4096
  random indices per input bit: sd 0.0078, bound 0.05). A weak mixer (e.g. the affine map alone, or a
  single multiply) fails this by far."""
  sd = R.seed(jax.random.key(4))
  idx = jnp.asarray(np.random.default_rng(0).integers(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32))
  bits = lambda i: np.asarray(R.uniform_from_index(i, sd[0], sd[1]) * 2.0**23).astype(np.uint32)
  base = bits(idx)
  for b in range(32):
    flipped = base ^ bits(idx ^ jnp.uint32(1 << b))
    rate = ((flipped[:, None] >> np.arange(23)[None, :]) & 1).mean(0)
    assert np.abs(rate - 0.5).max() < 0.05, (b, rate)
