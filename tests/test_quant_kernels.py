"""Pallas quantize-dequantize (interpret mode on CPU) is bit-identical to the jnp path."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.quant import quantize_dequantize

CASES = [  # fmt, scale_mode, shape, axis, dtype
    ("mxfp4", "floor", (8, 64), -1, jnp.float32),
    ("mxfp4", "even", (3, 5, 32), -1, jnp.bfloat16),
    ("mxfp4", "headroom", (64, 6), 0, jnp.float32),
    ("mxfp8_e4m3", "rceil", (40, 96), -1, jnp.bfloat16),
    ("mxfp8_e4m3", "ceil", (2, 32, 7), 1, jnp.float32),
    ("mxfp6_e3m2", "floor", (4, 128), -1, jnp.float32),
    ("mxint8", "rceil", (9, 32), -1, jnp.bfloat16),
    ("nvfp4", "floor", (24, 48), -1, jnp.float32),
    ("nvfp4", "floor", (32, 10), 0, jnp.bfloat16),
]


def data(shape, dtype, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape) * 2.0 ** rng.integers(-12, 12, shape)
  flat = x.reshape(-1)
  flat[::97] = 0.0
  flat[5] = np.nan if flat.size > 64 else flat[5]
  return jnp.asarray(x, dtype)


@pytest.mark.parametrize("fmt,mode,shape,axis,dtype", CASES)
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_pallas_bit_identical(fmt, mode, shape, axis, dtype, rounding):
  x = data(shape, dtype, hash((fmt, shape)) % 100)
  kw = dict(axis=axis, scale_mode=mode, rounding=rounding, key=jax.random.key(3))
  a = jax.jit(functools.partial(quantize_dequantize, fmt=fmt, **kw))(x)
  b = jax.jit(functools.partial(quantize_dequantize, fmt=fmt, impl="pallas", **kw))(x)
  assert a.dtype == b.dtype == dtype
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_single_level_nvfp4_and_padding():
  x = data((40, 16), jnp.float32, 0)  # 40 blocks: not a power of two -> padded tiles
  f = lambda impl: jax.jit(lambda x: quantize_dequantize(x, "nvfp4", two_level=False, impl=impl))
  np.testing.assert_array_equal(np.asarray(f("jnp")(x)), np.asarray(f("pallas")(x)))


def test_rms_is_jnp_only():
  with pytest.raises(ValueError, match="impl='jnp'"):
    quantize_dequantize(jnp.ones((2, 32)), "mxfp4", scale_mode="rms", impl="pallas")
