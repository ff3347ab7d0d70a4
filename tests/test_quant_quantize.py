"""quantize_dequantize against an independent numpy oracle (enumerated grids, explicit ties)."""
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from parcae.quant import formats as F
from parcae.quant import quantize as Q
from parcae.quant import quantize_dequantize

MX = {  # fmt -> (ml_dtypes type or None for int8, emax_elem, mantissa bits)
    "mxfp4": (ml_dtypes.float4_e2m1fn, 2, 1),
    "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 2, 3),
    "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4, 2),
    "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8, 3),
    "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15, 2),
    "mxint8": (None, 0, 6),
}
MODES = ("floor", "rceil", "ceil", "even")


@functools.lru_cache(None)
def grid(dtype):
  """Sorted non-negative finite values of a type, enumerated from its bit patterns."""
  if dtype is None:
    return np.arange(128) / 64.0
  nbits = np.dtype(dtype).itemsize * 8 if dtype not in (ml_dtypes.float4_e2m1fn,
                                                          ml_dtypes.float6_e2m3fn,
                                                          ml_dtypes.float6_e3m2fn) else 8
  codes = np.arange(2 ** min(nbits, 8), dtype=np.uint8)
  vals = codes.view(dtype).astype(np.float64)
  vals = vals[np.isfinite(vals) & (vals >= 0)]
  return np.unique(vals)


def round_nearest_even(t, g):
  """Nearest point of grid g (float64) to |t| clipped to g[-1]; ties -> even index (LSB 0)."""
  a = np.minimum(np.abs(t), g[-1])
  hi = np.clip(np.searchsorted(g, a), 0, len(g) - 1)
  lo = np.maximum(hi - 1, 0)
  dlo, dhi = a - g[lo], g[hi] - a
  pick = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
  return np.sign(t) * g[pick]


def floor_log2(a):
  m, p = np.frexp(a)  # a = m 2^p, m in [0.5, 1): exact
  return p - 1, m != 0.5


def oracle_mx(x, fmt, mode):
  dt, emax, mbits = MX[fmt]
  g = grid(dt)
  xb = x.astype(np.float64).reshape(-1, 32)
  amax = np.abs(xb).max(-1, keepdims=True)
  fl, not_pow2 = floor_log2(amax)
  if mode == "floor":
    e = fl - emax
  elif mode == "ceil":
    e = fl + not_pow2 - emax
  elif mode == "even":
    mant = amax / 2.0**fl
    e = fl + (mant >= 2 - 2.0 ** -(mbits + 1)) - emax
  else:  # rceil: descale computed in f32 as the reference does
    d = (amax.astype(np.float32) / np.float32(g[-1])).astype(np.float64)
    fd, npd = floor_log2(d)
    e = np.clip(fd + npd, -127, 127)
  e = np.clip(e, -127, 128)
  q = round_nearest_even(xb / 2.0**e, g)
  return (q * 2.0**e).reshape(x.shape)


def oracle_nvfp4(x, two_level, sg=None):
  g = grid(ml_dtypes.float4_e2m1fn)
  x32 = x.astype(np.float32).reshape(-1, 16)
  amax = np.abs(x32).max(-1, keepdims=True)
  bs = amax / np.float32(6)
  if two_level:
    sg = np.float32(np.abs(x32).max() / np.float32(2688)) if sg is None else np.float32(sg)
    bs = bs / sg
  q_s = np.clip(bs, np.float32(2**-6), np.float32(448)).astype(ml_dtypes.float8_e4m3fn)
  q_s = q_s.astype(np.float32)
  mult = (np.float32(1) / sg) / q_s if two_level else np.float32(1) / q_s
  t = (x32 * mult).astype(np.float64)
  scale = (sg * q_s) if two_level else q_s
  return (round_nearest_even(t, g) * scale.astype(np.float64)).reshape(x.shape)


def make_input(seed, shape=(8, 128)):
  """Gaussian blocks of widely varying magnitude, spikes, exact powers of two and zeros."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape)
  x *= 2.0 ** rng.integers(-20, 20, size=shape[:-1] + (shape[-1] // 32, 1)).repeat(32, -1).reshape(shape)
  x[0, :32] = 2.0 ** rng.integers(-8, 8, 32)  # a block of exact powers of two
  x[1, 5] *= 1000.0  # spike
  x[2, 32:64] = 0.0  # all-zero block
  x[3, :32] = rng.choice([-1, 1], 32) * rng.choice(grid(ml_dtypes.float4_e2m1fn), 32) * 4
  return x.astype(np.float32)


qdq = jax.jit(quantize_dequantize, static_argnames=(
    "fmt", "axis", "scale_mode", "rounding", "two_level", "block_2d", "impl"))


@pytest.mark.parametrize("fmt", list(MX))
@pytest.mark.parametrize("mode", MODES)
def test_mx_matches_oracle_bit_exact(fmt, mode):
  x = make_input(hash((fmt, mode)) % 1000)
  y = np.asarray(qdq(jnp.asarray(x), fmt, scale_mode=mode))
  np.testing.assert_array_equal(y, oracle_mx(x, fmt, mode).astype(np.float32))


@pytest.mark.parametrize("two_level", [True, False])
def test_nvfp4_matches_oracle_bit_exact(two_level):
  x = make_input(7, (8, 256))
  x *= 2.0 ** -np.repeat(np.arange(16), 16)[None, :].astype(np.float32)  # spread block amaxes
  y = np.asarray(qdq(jnp.asarray(x), "nvfp4", two_level=two_level))
  np.testing.assert_array_equal(y, oracle_nvfp4(x, two_level).astype(np.float32))


def test_bf16_input_keeps_dtype_and_matches_f32_path():
  x = make_input(3).astype(jnp.bfloat16)
  for fmt in ("mxfp4", "mxint8", "nvfp4"):
    y = qdq(jnp.asarray(x), fmt)
    assert y.dtype == jnp.bfloat16
    y32 = qdq(jnp.asarray(x).astype(jnp.float32), fmt)
    # MX values are exact in bf16; two-level NVFP4 scales are not, so compare after the cast
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(y32.astype(jnp.bfloat16), np.float32))


def test_e2m1_decision_points():
  """Spec: <=0.25 -> 0, (0.25,0.75) -> 0.5, [0.75,1.25] -> 1, ..., [3.5,5] -> 4, >5 -> 6."""
  t = np.array([0.25, 0.26, 0.74, 0.75, 1.25, 1.26, 1.74, 1.75, 2.5, 2.51, 3.49, 3.5, 5.0, 5.01, 7])
  want = np.array([0, .5, .5, 1, 1, 1.5, 1.5, 2, 2, 3, 3, 4, 4, 6, 6])
  x = np.zeros((1, 32), np.float32)
  x[0, :15] = t
  x[0, 31] = 4.0  # pin the FLOOR exponent to 0 (amax 7 -> floor(log2 7) - 2 = 0)
  y = np.asarray(qdq(jnp.asarray(np.concatenate([x, -x])), "mxfp4"))
  np.testing.assert_array_equal(y[0, :15], want)
  np.testing.assert_array_equal(y[1, :15], -want)


def test_verified_facts():
  x = np.zeros((1, 32), np.float32)
  x[0, :2] = [3.0, 0.1]  # mxint8: amax 3 -> scale 2, 0.1 -> 0.09375
  np.testing.assert_array_equal(np.asarray(qdq(jnp.asarray(x), "mxint8"))[0, :2], [3.0, 0.09375])
  x = np.zeros((1, 32), np.float32)
  x[0, 0] = 7.5  # FLOOR clips: amax 7.5 -> 6
  assert float(qdq(jnp.asarray(x), "mxfp4")[0, 0]) == 6.0
  assert float(qdq(jnp.asarray(x), "mxfp4", scale_mode="rceil")[0, 0]) == 8.0  # no clipping
  x[0, 0] = 500.0  # E4M3 FLOOR range [256, 512) vs max 448 -> 448
  assert float(qdq(jnp.asarray(x), "mxfp8_e4m3")[0, 0]) == 448.0


def test_special_values():
  x = np.ones((4, 32), np.float32)
  x[0, 3] = np.nan  # MX: NaN scale -> whole block NaN
  x[1, 3] = np.inf  # FLOOR code 253 for fp4; 6 * 2^126 overflows to Inf
  x[2] = 0.0  # zero block -> zeros
  y = np.asarray(qdq(jnp.asarray(x), "mxfp4"))
  assert np.isnan(y[0]).all()
  assert y[1, 3] == np.inf and (y[1, np.arange(32) != 3] == 0).all()
  assert (y[2] == 0).all() and (y[3] == 1).all()
  xn = np.full((4, 16), 0.75, np.float32)  # 0.75 / 6 = 2^-3 is an exact E4M3 scale
  xn[0, 3] = np.nan
  xn[1, 3] = np.inf  # single-level NVFP4: Inf saturates to 6 * 448
  xn[2] = 0.0
  yn = np.asarray(qdq(jnp.asarray(xn), "nvfp4", two_level=False))
  assert np.isnan(yn[0]).all() and yn[1, 3] == 2688.0
  assert (yn[2] == 0).all() and (yn[3] == 0.75).all()


def test_nvfp4_zero_block_scale_and_tensor_amax_block():
  x = np.zeros((1, 32), np.float32)
  x[0, 16:] = np.linspace(-3, 5, 16)
  y = np.asarray(qdq(jnp.asarray(x), "nvfp4"))
  assert (y[0, :16] == 0).all()
  assert y[0, -1] == 5.0  # block holding the tensor amax gets scale 448 -> amax maps to 6 exactly


@pytest.mark.parametrize("fmt", list(MX) + ["nvfp4"])
def test_values_on_grid_and_idempotent(fmt):
  x = make_input(11)
  kw = {"two_level": False} if fmt == "nvfp4" else {}
  y = np.asarray(qdq(jnp.asarray(x), fmt, **kw))
  y2 = np.asarray(qdq(jnp.asarray(y), fmt, **kw))
  np.testing.assert_array_equal(y, y2)
  blk = 16 if fmt == "nvfp4" else 32
  yb = y.reshape(-1, blk).astype(np.float64)
  g = grid(ml_dtypes.float4_e2m1fn if fmt == "nvfp4" else MX[fmt][0])
  for row in yb:
    nz = row[row != 0]
    if nz.size == 0:
      continue
    if fmt == "nvfp4":  # code * E4M3 scale: some E4M3 value s makes row/s lie on the E2M1 grid
      e4 = grid(ml_dtypes.float8_e4m3fn)[1:]
      ok = [np.isin(np.abs(nz) / s, g).all() for s in e4]
      assert any(ok)
    else:  # code * 2^e, e in the E8M0 range
      e = floor_log2(np.abs(nz).max())[0] - MX[fmt][1] - 1
      assert any(np.isin(np.abs(nz) / 2.0**k, g).all() for k in range(e - 1, e + 3))


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8_e4m3", "nvfp4"])
def test_monotone(fmt):
  """Within one block (fixed scale) quantization is monotone non-decreasing."""
  blk = 16 if fmt == "nvfp4" else 32
  v = np.sort(np.random.default_rng(0).uniform(-6, 6, (64, blk - 1)), -1)
  x = np.concatenate([v, np.full((64, 1), 6.5)], -1).astype(np.float32)  # fixed amax per block
  y = np.asarray(qdq(jnp.asarray(x), fmt, two_level=False) if fmt == "nvfp4"
                 else qdq(jnp.asarray(x), fmt))
  assert (np.diff(y[:, :-1], axis=-1) >= 0).all()


@pytest.mark.parametrize("fmt", ["mxfp4", "mxint8", "nvfp4"])
def test_stochastic_rounding_is_unbiased(fmt):
  """Mean of n draws -> input. Per element the SR error is bounded by one grid step d (variance
  <= d^2/4), so |mean - x| < 5 * d / (2 sqrt(n)) fails with probability < 1e-6 per element."""
  n = 2000
  blk = 16 if fmt == "nvfp4" else 32
  rng = np.random.default_rng(1)
  x = rng.uniform(-4, 4, (1, blk)).astype(np.float32)
  x[0, 0] = 4.0  # amax 4: no clipping with any scale rule, fixed step
  kw = {"two_level": False} if fmt == "nvfp4" else {}
  keys = jax.random.split(jax.random.key(0), n)
  f = jax.jit(jax.vmap(lambda k: quantize_dequantize(jnp.asarray(x), fmt, rounding="stochastic",
                                                      key=k, **kw)))
  ys = np.asarray(f(keys)).astype(np.float64)
  det = np.asarray(qdq(jnp.asarray(x), fmt, **kw)).astype(np.float64)
  # largest grid gap at amax 4: fp4 scale 1 (gap 4->6); int8 scale 4 (4/64); nvfp4 scale 0.6875
  step = {"mxfp4": 2.0, "mxint8": 2.0**-4, "nvfp4": 2 * 0.6875}[fmt]
  assert np.all(np.abs(ys.mean(0) - x[0]) < 5 * step / (2 * np.sqrt(n)))
  assert not np.allclose(ys.mean(0), det[0])  # it really is random, not RNE
  assert np.all(np.abs(ys - x) <= step)  # every draw is a neighbouring grid point


def test_errors_name_the_fix():
  x = jnp.ones((2, 32))
  with pytest.raises(ValueError, match="fmt must be one of"):
    quantize_dequantize(x, "fp4")
  with pytest.raises(ValueError, match="explicit PRNG key"):
    quantize_dequantize(x, "mxfp4", rounding="stochastic")
  with pytest.raises(ValueError, match="multiple of"):
    quantize_dequantize(jnp.ones((2, 30)), "mxfp4")
  with pytest.raises(ValueError, match="scale_mode"):
    quantize_dequantize(x, "mxfp4", scale_mode="round")


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp6_e2m3", "mxfp8_e4m3"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_headroom_multiply_equals_the_division(fmt, rounding, monkeypatch):
  """The headroom rule undoes its 3/4 with a multiply by f32(4/3) only where that gives q / 0.75's bits."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((64, 256)) * 2.0 ** rng.integers(-6, 6, (64, 1)), jnp.float32)
  kw = dict(scale_mode="headroom", rounding=rounding, key=jax.random.key(5) if rounding == "stochastic" else None)
  fast = np.asarray(Q.quantize_dequantize(x, fmt, **kw))
  monkeypatch.setattr(Q, "_headroom_mul_exact", lambda elem: False)
  slow = np.asarray(Q.quantize_dequantize(x, fmt, **kw))
  np.testing.assert_array_equal(fast.view(np.uint32), slow.view(np.uint32))
  monkeypatch.undo()
  # E2M1 takes the multiply; formats with 3-bit mantissas would not get the same bits, so keep the division
  assert Q._headroom_mul_exact(F.get_format(fmt).elem) == (fmt == "mxfp4")  # pylint: disable=protected-access


ELEMS = {  # element grid -> its ml_dtypes type (None: the int8 grid k/64)
    F.E2M1: ml_dtypes.float4_e2m1fn, F.E2M3: ml_dtypes.float6_e2m3fn, F.E3M2: ml_dtypes.float6_e3m2fn,
    F.E4M3: ml_dtypes.float8_e4m3fn, F.E5M2: ml_dtypes.float8_e5m2, F.INT8: None,
}


def every_magnitude_input():
  """Every bf16 bit pattern (zeros, subnormals, Inf, NaN) as f32, the same times 1.37 (f32 values
  with more mantissa bits), and 2^16 random f32 bit patterns."""
  b = np.arange(1 << 16, dtype=np.uint32) << 16
  x = b.view(np.float32)
  rnd = np.random.default_rng(5).integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)
  with np.errstate(over="ignore", invalid="ignore"):
    return np.concatenate([x, x * np.float32(1.37), rnd.view(np.float32)])


@pytest.mark.parametrize("elem", list(ELEMS), ids=lambda e: e.name)
def test_round_to_grid_every_magnitude(elem):
  """round_to_grid (nearest and stochastic) against the enumerated grid for every bf16 magnitude:
  the power-of-two rescaling inside it must be exact over the whole f32 range, NaN stays NaN,
  Inf clips to the largest value."""
  t = every_magnitude_input()
  g = grid(ELEMS[elem])
  assert g[-1] == elem.max_val
  fin = ~np.isnan(t)
  with np.errstate(invalid="ignore"):
    t64 = t.astype(np.float64)
  y = np.asarray(jax.jit(lambda v: F.round_to_grid(v, elem))(t))
  assert np.isnan(y[~fin]).all()
  np.testing.assert_array_equal(y[fin], round_nearest_even(t64[fin], g).astype(np.float32))
  # XLA flushes f32 subnormal inputs to zero (DAZ): they round to 0 under either rounding (nearest
  # agrees anyway: every grid's smallest step is far above 2^-126)
  a = np.minimum(np.abs(t64[fin]), g[-1])
  a = np.where(a < 2.0**-126, 0.0, a)
  hi = np.clip(np.searchsorted(g, a, side="right"), 0, len(g) - 1)
  lo = np.where(g[hi] > a, hi - 1, hi)
  frac = (a - g[lo]) / np.where(hi > lo, g[hi] - g[lo], 1.0)
  sr = jax.jit(lambda v, u: F.round_to_grid(v, elem, u))
  for u in (0.0, 0.3, 0.5, 1.0 - 2.0**-24):
    ys = np.asarray(sr(t, jnp.full(t.shape, u, jnp.float32)))
    want = np.sign(t64[fin]) * np.where(u < frac, g[hi], g[lo])
    np.testing.assert_array_equal(ys[fin], want.astype(np.float32))
    assert np.isnan(ys[~fin]).all()
