"""ScaleSearch: never worse than the max-based scale per block; ~27% lower NVFP4 MSE on N(0,1)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.quant import quantize_dequantize
from parcae.quant import scalesearch as S


def test_gaussian_nvfp4_reduction_matches_paper_band():
  # The paper reports 27% for NVFP4 on Gaussian data; window +-6 reproduces 27.1% (spec).
  # 2^20 samples: the estimate's sampling spread is ~0.2%, so [25%, 29%] is a real check.
  r = S.mse_reduction("nvfp4", n=1 << 20, window=(-6, 6))
  assert 0.25 < r["reduction"] < 0.29, r
  assert 0.0085 < r["rel_mse_base"] < 0.0095  # spec: NVFP4 single level 0.0090
  small = S.mse_reduction("nvfp4", n=1 << 18, window=(-1, 1))
  assert 0.15 < small["reduction"] < 0.20, small  # spec: 17.5% with k in [-1, 1]


@pytest.mark.parametrize("fmt,kw", [("nvfp4", {}), ("mxfp4", {})])
def test_per_block_error_never_worse(fmt, kw):
  x = jax.random.laplace(jax.random.key(0), (64, 128))
  blk = 16 if fmt == "nvfp4" else 32
  base = jax.jit(lambda x: quantize_dequantize(x, fmt, **kw))(x)
  srch = jax.jit(lambda x: S.quantize_dequantize_search(x, fmt, **kw))(x)
  eb = np.asarray(jnp.sum(((base - x) ** 2).reshape(-1, blk), -1))
  es = np.asarray(jnp.sum(((srch - x) ** 2).reshape(-1, blk), -1))
  assert (es <= eb).all() and (es < eb).any()


def test_window_zero_is_max_based():
  x = jax.random.normal(jax.random.key(2), (8, 64))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda x: S.quantize_dequantize_search(x, "nvfp4", window=(0, 0)))(x)),
      np.asarray(jax.jit(lambda x: quantize_dequantize(x, "nvfp4"))(x)))
  with pytest.raises(ValueError, match="must contain 0"):
    S.quantize_dequantize_search(x, "nvfp4", window=(1, 3))
