"""Depth sampler statistics (spec 3 and 10) and the loop-state initializations."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.model import default_model_config
from parcae.model.sampler import init_state, sample_depths
from parcae.scaling.flops import expected_depths


def test_poisson_truncated_full_statistics():
  cfg = default_model_config()  # mu = 8, s = 4, per-sequence
  n_draws = 400_000
  n, k = sample_depths(jax.random.key(0), n_draws, cfg)
  n, k = np.asarray(n), np.asarray(k)
  total = n + k
  se_total = total.std() / math.sqrt(n_draws)
  se_k = k.std() / math.sqrt(n_draws)
  # Reference values (spec 10): E[total] = 8.000335, E[k] = 3.940847, P(total < 4) = 0.04238.
  assert abs(total.mean() - 8.000335) < 4 * se_total
  assert abs(k.mean() - 3.940847) < 4 * se_k
  p = 0.04238
  assert abs((total < 4).mean() - p) < 4 * math.sqrt(p * (1 - p) / n_draws)
  assert k.min() >= 1 and k.max() <= 4 and n.min() >= 0
  assert np.all(k == np.minimum(total, 4))
  e_n, e_k = expected_depths(cfg)
  assert e_n + e_k == pytest.approx(8.000335, abs=1e-6)
  assert e_k == pytest.approx(3.940847, abs=1e-6)


def test_per_batch_and_fixed_schemes():
  cfg = default_model_config()
  cfg.sampling_granularity = "per-batch"
  n, k = sample_depths(jax.random.key(1), 64, cfg)
  assert len(set(np.asarray(n).tolist())) == 1 and len(set(np.asarray(k).tolist())) == 1
  cfg.sampling_scheme = "fixed"
  n, k = sample_depths(jax.random.key(1), 8, cfg)
  assert np.all(np.asarray(n) == 4) and np.all(np.asarray(k) == 4)
  cfg.sampling_scheme, cfg.sampling_granularity = "poisson-full", "per-sequence"
  n, k = sample_depths(jax.random.key(2), 100_000, cfg)
  assert np.all(np.asarray(n) == 0)
  assert np.asarray(k).mean() == pytest.approx(expected_depths(cfg)[1], abs=0.05)


def test_sampling_is_a_pure_function_of_the_key():
  cfg = default_model_config()
  a = sample_depths(jax.random.key(7), 32, cfg)
  b = sample_depths(jax.random.key(7), 32, cfg)
  c = sample_depths(jax.random.key(8), 32, cfg)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kind", ["zero", "like-init", "normal", "embed", "unit"])
def test_state_inits(kind):
  x = np.asarray(init_state(jax.random.key(3), (4, 32, 256), kind, 256))
  y = np.asarray(init_state(jax.random.key(3), (4, 32, 256), kind, 256))
  np.testing.assert_array_equal(x, y)
  expected_std = {"zero": 0.0, "like-init": 0.9866 * math.sqrt(2 / 1280), "normal": 1.0,
                  "embed": 1 / 16, "unit": 1.0}[kind]
  assert x.std() == pytest.approx(expected_std, rel=0.02, abs=1e-9)
  if kind == "unit":
    np.testing.assert_allclose(x.mean(-1), 0.0, atol=1e-5)
