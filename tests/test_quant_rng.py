"""Counter-based uniforms for stochastic rounding: range, uniformity, independence, layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.quant import rng as R


@pytest.mark.parametrize("unit", [16, 32])
def test_range_grid_and_uniformity(unit):
  u = np.asarray(R.uniform_moved(R.seed(jax.random.key(0)), (1 << 20,), 0, unit), np.float64)
  assert u.min() >= 0 and u.max() < 1
  np.testing.assert_array_equal(u * 2**16, np.floor(u * 2**16))  # on the 2^-16 grid
  assert len(np.unique(u)) > 0.99 * 2**16  # every 16-bit value occurs (1M draws: ~16 each)
  # chi-square over 256 equal bins: df 255, mean 255, sd 22.6 -> 6 sd bound
  counts = np.bincount((u * 256).astype(int), minlength=256)
  exp = len(u) / 256
  chi2 = np.sum((counts - exp) ** 2 / exp)
  assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2
  assert abs(u.mean() - 0.5) < 6 * np.sqrt(1 / 12 / len(u))


def test_neighbours_pairs_and_seeds_uncorrelated():
  n, unit = 1 << 18, 32
  a = np.asarray(R.uniform_moved(R.seed(jax.random.key(1)), (n,), 0, unit), np.float64) - 0.5
  b = np.asarray(R.uniform_moved(R.seed(jax.random.key(2)), (n,), 0, unit), np.float64) - 0.5
  bound = 6 / np.sqrt(n)  # correlation of independent uniforms ~ N(0, 1/n)
  assert abs(np.corrcoef(a[1:], a[:-1])[0, 1]) < bound  # consecutive counters
  assert abs(np.corrcoef(a, b)[0, 1]) < bound  # two keys
  assert not np.array_equal(a, b)
  pairs = a.reshape(-1, 2, unit)  # the two blocks of each pair: one hash's high and low halves
  first, second = pairs[:, 0].ravel(), pairs[:, 1].ravel()
  assert abs(np.corrcoef(first, second)[0, 1]) < 6 / np.sqrt(first.size)
  joint = np.histogram2d(first, second, bins=16)[0]  # independence: chi-square over 16 x 16 cells
  exp = first.size / 256
  assert np.sum((joint - exp) ** 2 / exp) < 255 + 6 * np.sqrt(2 * 255)


@pytest.mark.parametrize("unit", [16, 32])
def test_pairs_share_one_hash(unit):
  """Element j of block 2m takes the high 16 bits of hash(m * unit + j), element j of block 2m + 1 the low
  16 bits: the kernels' `uniform_pair` on the pair index gives the same numbers as the per-element path."""
  sd = R.seed(jax.random.key(5))
  n = 8 * unit
  u = np.asarray(R.uniform_moved(sd, (n,), 0, unit)).reshape(-1, 2, unit)
  p = jnp.arange(n // 2, dtype=jnp.uint32)
  hi, lo = (np.asarray(v).reshape(-1, unit) for v in R.uniform_pair(p, sd[0], sd[1]))
  np.testing.assert_array_equal(u[:, 0], hi)
  np.testing.assert_array_equal(u[:, 1], lo)
  h = np.asarray(R._hash(p, sd[0], sd[1])).reshape(-1, unit)  # pylint: disable=protected-access
  np.testing.assert_array_equal(u[:, 0] * 2**16, h >> 16)
  np.testing.assert_array_equal(u[:, 1] * 2**16, h & 0xFFFF)
  with pytest.raises(ValueError, match="power of two"):
    R.uniform_moved(sd, (n,), 0, 24)


def test_nearby_seeds_are_not_shifted_streams():
  """Seed words (s0 + d, s1) must not replay (s0, s1)'s stream d elements later (an added seed would)."""
  n, s0, s1 = 1 << 16, 12345, 0x9E3779B9
  a = np.asarray(R.uniform_moved(jnp.array([s0, s1], jnp.uint32), (n,), 0, 16))
  for d in (1, 5, 32):
    b = np.asarray(R.uniform_moved(jnp.array([s0 + d, s1], jnp.uint32), (n,), 0, 16))
    for j in range(-40, 41):  # b[i] against a[i + j]
      x, y = (a[j:], b[:n - j]) if j >= 0 else (a[:n + j], b[-j:])
      assert np.mean(x == y) < 1e-3, (d, j)  # equal only by chance (2^-16 grid: ~1.5e-5)


@pytest.mark.parametrize("ax", [0, 1, 2])
def test_moved_layout_index(ax):
  """The number an element gets depends on its position in the axis-last layout only."""
  shape = (3, 5, 4)
  sd = R.seed(jax.random.key(3))
  got = np.asarray(R.uniform_moved(sd, shape, ax, 2))
  moved = tuple(d for i, d in enumerate(shape) if i != ax) + (shape[ax],)
  flat = np.asarray(R.uniform_moved(sd, moved, len(shape) - 1, 2))
  np.testing.assert_array_equal(np.moveaxis(got, ax, -1), flat)
  idx = np.asarray(R.moved_index(shape, ax))
  np.testing.assert_array_equal(np.moveaxis(idx, ax, -1).ravel(), np.arange(idx.size))


def test_too_many_elements():
  with pytest.raises(ValueError, match="chunks"):
    R.check_size((1 << 16, 1 << 16, 2))


def test_avalanche():
  """Flipping any one bit of the pair index flips each of the 32 bits the pair's two uniforms are made of
  with probability 1/2 (4096 random indices per input bit: sd 0.0078, bound 0.05). A weak mixer (e.g. the
  affine map alone, or a single multiply) fails this by far."""
  sd = R.seed(jax.random.key(4))
  idx = jnp.asarray(np.random.default_rng(0).integers(0, 1 << 31, 4096, dtype=np.uint64).astype(np.uint32))

  def bits(i):
    hi, lo = (np.asarray(v * 2.0**16).astype(np.uint32) for v in R.uniform_pair(i, sd[0], sd[1]))
    return (hi << 16) | lo
  base = bits(idx)
  for b in range(31):
    flipped = base ^ bits(idx ^ jnp.uint32(1 << b))
    rate = ((flipped[:, None] >> np.arange(32)[None, :]) & 1).mean(0)
    assert np.abs(rate - 0.5).max() < 0.05, (b, rate)
