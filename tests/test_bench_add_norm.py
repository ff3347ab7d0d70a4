"""bench/add_norm.py: the fused residual add + RMSNorm kernels (interpreted here) against float64 and against
autodiff of the model's formula, and lowered for CUDA."""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
sys.path.insert(0, BENCH)
try:
  spec = importlib.util.spec_from_file_location("bench_add_norm", os.path.join(BENCH, "add_norm.py"))
  an = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(an)
finally:
  sys.path.remove(BENCH)


def f64(a):
  return np.asarray(a, np.float64)


@pytest.mark.parametrize("d,rows", [(768, 16), (1024, 8), (320, 4)])
def test_kernels_match_float64(d, rows):
  """s exact; n within bf16's unit roundoff (2^-8) of the float64 value; dx, dscale within 2e-6 of their
  largest entry (float32 sums over a row / the rows); dy = bf16(dx) exactly. D = 320: 64-wide chunks."""
  x, y, scale, ds, dn = an.inputs(64, d, seed=d)
  (s, n), (dx, dy, dsc) = an.kernel_paths(rows, 4, interpret=True)[1](x, y, scale, ds, dn)
  s64 = f64(x) + f64(y.astype(jnp.float32))
  np.testing.assert_array_equal(np.asarray(s), s64.astype(np.float32))
  r64 = 1.0 / np.sqrt(np.mean(s64 * s64, axis=1, keepdims=True) + an.EPS)
  xhat, g = s64 * r64, f64(dn.astype(jnp.float32)) * f64(scale)
  n64 = xhat * f64(scale)
  assert np.all(np.abs(f64(n.astype(jnp.float32)) - n64) <= 2.0 ** -8 * np.abs(n64) + 1e-30)
  dx64 = f64(ds) + r64 * (g - xhat * np.mean(g * xhat, axis=1, keepdims=True))
  dsc64 = np.sum(f64(dn.astype(jnp.float32)) * xhat, axis=0)
  for got, want in ((dx, dx64), (dsc, dsc64)):
    assert np.max(np.abs(f64(got) - want)) <= 2e-6 * np.max(np.abs(want)), np.max(np.abs(f64(got) - want))
  np.testing.assert_array_equal(np.asarray(dy), np.asarray(dx.astype(jnp.bfloat16)))


def test_kernels_match_autodiff_of_the_model_formula():
  """Against jax.vjp of `xla_add_norm` (the block's formula): the same values up to float32 summation order."""
  data = an.inputs(128, 768, seed=1)
  errs = an.compare(an.kernel_paths(32, 4, interpret=True)[1](*data), an.xla_paths()[1](*data))
  assert errs[0] == 0 and errs[1] <= 2.0 ** -7 and max(errs[2], errs[4]) <= 1e-6 and errs[3] <= 2.0 ** -7, errs


def test_kernels_lower_for_cuda(cuda_lowering):
  from conftest import triton_calls
  data = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in an.inputs(256, 768)]
  text = an.kernel_paths(16, 4, interpret=False)[1].trace(*data).lower(lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 2
