"""bench/triton_gemm.py: the fused ReLU^2 GEMM kernels (Pallas interpret mode here) against float64."""
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
spec = importlib.util.spec_from_file_location("triton_gemm", os.path.join(BENCH, "triton_gemm.py"))
tg = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tg)

TILES = tg.Tiles(bm=32, bn=64, bk=32, warps=4, stages=2)  # several programs and K steps on small shapes


def _bf16_f64(a):
  return np.asarray(np.asarray(a, np.float64).astype(np.float32).astype(jnp.bfloat16), np.float64)


def _inputs(m=96, k=128, n=192):
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
  w = (jax.random.normal(ks[1], (k, n)) / np.sqrt(k)).astype(jnp.bfloat16)
  h = jax.random.normal(ks[2], (m, n), jnp.bfloat16)
  return x, w, h


def test_relu2_matmul_is_relu2_of_the_bf16_product():
  """Each entry is 0.5 * max(bf16(x @ w), 0)^2 rounded once to bf16: at most half a bf16 ulp from float64 of
  the same formula (entries whose product lies near a bf16 rounding boundary may round the other way)."""
  x, w, _ = _inputs()
  out = np.asarray(tg.relu2_matmul(x, w, tiles=TILES), np.float64)
  hf = _bf16_f64(np.asarray(x, np.float64) @ np.asarray(w, np.float64))
  ref = 0.5 * np.maximum(hf, 0.0) ** 2
  assert (out[hf <= 0] == 0).all()
  err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)
  assert np.mean(err <= 2.0 ** -8) > 0.99 and err.max() < 2.0 ** -6, err.max()
  plain = np.asarray(tg.relu2_matmul(x, w, tiles=TILES, act=False), np.float64)
  assert np.mean(plain == hf) > 0.99


def test_relu_grad_matmul_is_the_masked_product_with_transposed_weights():
  x, w, h = _inputs()
  g = x
  out = np.asarray(tg.relu_grad_matmul(g, w.T, h, tiles=TILES), np.float64)
  da = _bf16_f64(np.asarray(g, np.float64) @ np.asarray(w, np.float64))
  ref = da * np.maximum(np.asarray(h, np.float64), 0.0)
  assert (out[np.asarray(h) <= 0] == 0).all() and np.any(out != 0)
  err = np.abs(out - ref) / np.maximum(np.abs(ref), 1e-30)
  assert np.mean(err <= 2.0 ** -8) > 0.99 and err.max() < 2.0 ** -6, err.max()


def test_shapes_that_are_not_whole_tiles_are_refused_with_the_fix():
  x, w, _ = _inputs(m=80)
  with pytest.raises(ValueError, match="whole tiles"):
    tg.relu2_matmul(x, w, tiles=TILES)

