"""ScaleSearch: per block, try neighbouring scale codes and keep the one with least squared error.

NVFP4: E4M3 codes c0 + k around c0 = the max-based code, k in `window` (default [-6, 6]; codes
kept in [8, 126], i.e. normal scales as torchao emits). MX: E8M0 exponents e0 + k (default
[-1, 2]). Ties keep the candidate nearest to the max-based scale. The dequantized value is still
code * scale, so this is a drop-in replacement for the max-based scale.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from parcae.quant import formats as F
from parcae.quant import quantize as Q

DEFAULT_WINDOW = {"e4m3": (-6, 6), "e8m0": (-1, 2)}


def _offsets(window):
  lo, hi = window
  if lo > 0 or hi < 0:
    raise ValueError(f"window {window} must contain 0 (the max-based scale); e.g. (-6, 6)")
  return sorted(range(lo, hi + 1), key=lambda k: (abs(k), k))  # base first: ties keep it


def search_blocks(xb, fmt: F.Format, window, consts=None, two_level=True, baxis=-1):
  """Quantize-dequantize f32 blocks of xb (block axes `baxis`) with the searched scale (a lax.scan
  over candidate offsets, base first, so ties keep the max-based scale)."""
  xb = xb.astype(jnp.float32)
  amax = jnp.max(jnp.abs(xb), axis=baxis, keepdims=True)
  if fmt.scale == "e4m3":
    c0 = F.e4m3_code(Q.nv_block_scale(amax, consts, two_level, jnp.divide))

    def candidate(k):
      s = F.e4m3_value(jnp.clip(c0 + k, 8, 126))
      return Q.nv_apply_scale(xb, s, consts, two_level, None)[0]
  else:
    e0 = Q._mx_exponent(amax, fmt.elem, "floor", jnp.divide)  # pylint: disable=protected-access

    def candidate(k):
      e = jnp.clip(e0 + k, -126, 127)
      return F.mul_pow2(F.round_to_grid(F.mul_pow2(xb, -e), fmt.elem), e)

  def step(best, k):
    cand = candidate(k)
    sse = jnp.sum((cand - xb) ** 2, axis=baxis, keepdims=True)
    take = sse < best[1]
    return (jnp.where(take, cand, best[0]), jnp.where(take, sse, best[1])), None

  offs = _offsets(window)
  first = candidate(offs[0])
  init = (first, jnp.sum((first - xb) ** 2, axis=baxis, keepdims=True))
  best, _ = jax.lax.scan(step, init, jnp.asarray(offs[1:], jnp.int32)) if len(offs) > 1 else (init, None)
  return jnp.where(amax != amax, jnp.float32(jnp.nan), best[0])


def quantize_dequantize_search(x, fmt, *, axis=-1, window=None, two_level=True,
                               tensor_scale=None, block_2d=False):
  """Like quantize_dequantize (nearest rounding) but with ScaleSearch block scales."""
  f, ax = Q.check_args(x, fmt, axis, "floor", "nearest", None, block_2d)
  window = DEFAULT_WINDOW[f.scale] if window is None else tuple(window)
  xb, baxis, back = Q.to_blocks(x.astype(jnp.float32), ax, f.block, block_2d)
  consts = None
  if f.scale == "e4m3":
    sg = (Q.nv_tensor_scale(x) if tensor_scale is None else tensor_scale) if two_level else 1.0
    consts = Q.nv_consts(sg)
  return back(search_blocks(xb, f, window, consts, two_level, baxis)).astype(x.dtype)


def mse_reduction(fmt="nvfp4", *, n=1 << 20, window=None, two_level=False, key=None,
                  dist="gaussian"):
  """MSE of max-based vs searched scales on i.i.d. data; returns a dict with the reduction."""
  key = jax.random.key(0) if key is None else key
  shape = (n // 256, 256)
  if dist == "gaussian":
    x = jax.random.normal(key, shape, jnp.float32)
  elif dist == "laplace":
    x = jax.random.laplace(key, shape, jnp.float32)
  elif dist == "uniform":
    x = jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
  else:
    raise ValueError(f"dist {dist!r} is not valid; use gaussian | laplace | uniform")

  @jax.jit
  def errs(x):
    base = Q.quantize_dequantize(x, fmt, two_level=two_level) if fmt == "nvfp4" else \
        Q.quantize_dequantize(x, fmt)
    srch = quantize_dequantize_search(x, fmt, window=window, two_level=two_level)
    return jnp.mean((base - x) ** 2), jnp.mean((srch - x) ** 2), jnp.mean(x * x)

  b, s, p = (float(v) for v in errs(x))
  return {"fmt": fmt, "window": list(window or DEFAULT_WINDOW[F.get_format(fmt).scale]),
          "dist": dist, "n": shape[0] * shape[1], "mse_base": b, "mse_search": s,
          "rel_mse_base": b / p, "rel_mse_search": s / p, "reduction": 1.0 - s / b}
