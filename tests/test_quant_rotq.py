"""One-pass rotate + quantize kernel (interpret mode) == hadamard.rotate + quantize_dequantize."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.quant import formats as F
from parcae.quant import hadamard as H
from parcae.quant import quantize as Q
from parcae.quant.kernels import rotq

CASES = [  # fmt, scale_mode, rounding, rotate
    ("mxfp4", "rms", "nearest", True),  # quartet forward
    ("mxfp4", "headroom", "stochastic", True),  # quartet backward
    ("mxfp4", "floor", "nearest", False),
    ("mxfp8_e4m3", "rceil", "nearest", False),
    ("nvfp4", "floor", "stochastic", True),  # nvidia_nvfp4 wgrad (16-point rotation)
    ("nvfp4", "floor", "nearest", False),
]


def reference(x, fmt, axis, mode, rounding, key, rotation):
  xr = H.rotate(x, rotation[0], rotation[1], axis) if rotation else x
  f, ax = Q.check_args(xr, fmt, axis, mode, rounding, key, False)
  y, t = Q._qdq_jnp(xr, f, ax, mode, rounding, key, None, True, False)  # pylint: disable=protected-access
  return y, (jnp.abs(t) < f.elem.max_val).astype(jnp.int8)


@pytest.mark.parametrize("fmt,mode,rounding,rotate", CASES)
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_equals_rotate_then_quantize(fmt, mode, rounding, rotate, axis, dtype):
  blk = F.get_format(fmt).block
  x = (3 * jax.random.normal(jax.random.key(0), (64, 96))).astype(dtype)
  x = x.at[5, 7].set(40.0)  # an outlier: clipped entries for the mask
  key = jax.random.key(4)
  rotation = (blk, H.random_signs(jax.random.key(9), blk)) if rotate else None
  got, mask = jax.jit(lambda x: rotq.rotate_quantize(x, fmt, axis, scale_mode=mode, rounding=rounding,
                                                     key=key, rotation=rotation, want_mask=True))(x)
  want, want_mask = jax.jit(lambda x: reference(x, fmt, axis, mode, rounding, key, rotation))(x)
  assert got.dtype == x.dtype and mask.dtype == jnp.int8
  a, b = np.asarray(got, np.float32), np.asarray(want, np.float32)
  if mode == "rms":  # the block mean / variance may sum in another order: scales rarely differ
    assert np.mean(a != b) < 0.01
  else:
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(mask), np.asarray(want_mask))
  assert 0 < np.asarray(mask).sum() <= mask.size


def test_unsupported_shapes_are_refused_with_a_reason():
  assert not rotq.supported(jnp.ones((8, 64)), "mxfp4", 1, None)  # 8 rows: below a 16-row dot tile
  assert not rotq.supported(jnp.ones((64, 64)), "mxfp4", 1, (16, None))  # rotation != block
  assert rotq.supported(jnp.ones((64, 64)), "mxfp4", 0, (32, None))
  with pytest.raises(ValueError, match="jnp path"):
    rotq.rotate_quantize(jnp.ones((8, 64)), "mxfp4", 1)


def test_stochastic_rounding_needs_whole_pairs():
  """With SR a tile holds both blocks of each rng pair: along axis 0 the rows must be a multiple of two
  blocks, along axis 1 the blocks of the [blocks, block] view must pair up. quantize_operand then takes the
  jnp path, with the same values the kernel would give."""
  from parcae.quant.dense import Operand, quantize_operand
  x = jax.random.normal(jax.random.key(0), (32, 48), jnp.float32)  # one 32-row block along axis 0
  assert rotq.supported(x, "mxfp4", 0, None) and not rotq.supported(x, "mxfp4", 0, None, rounding="stochastic")
  assert rotq.supported(jnp.ones((32, 96)), "mxfp4", 1, None, rounding="stochastic")  # 96 view rows: 48 pairs
  assert not rotq.supported(jnp.ones((16, 32)), "mxfp4", 1, None, rounding="stochastic")  # 16: 8 pairs < a tile
  with pytest.raises(ValueError, match="stochastic rounding"):
    rotq.rotate_quantize(x, "mxfp4", 0, rounding="stochastic", key=jax.random.key(1))
  op = Operand("mxfp4", rounding="stochastic")
  got = quantize_operand(x, op, 0, jax.random.key(1), impl="pallas")[0]
  want = Q.quantize_dequantize(x, "mxfp4", axis=0, rounding="stochastic", key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("axis", [0, 1])
def test_launch_shape_does_not_change_values(rounding, axis):
  """The tile (and warps) only change the grid: every tile gives the default's values bit for bit,
  stochastic rounding included (its uniforms are hashed from the global index, not the tile's)."""
  x = (3 * jax.random.normal(jax.random.key(1), (64, 128))).astype(jnp.bfloat16)
  rotation = (32, H.random_signs(jax.random.key(2), 32))
  run = lambda tile: np.asarray(rotq.rotate_quantize(
      x, "mxfp4", axis, scale_mode="headroom", rounding=rounding, key=jax.random.key(3), rotation=rotation,
      want_mask=True, tile=tile, num_warps=8)[0], np.float32)
  want = run(None)
  for tile in (16, 32, 64):
    np.testing.assert_array_equal(run(tile), want)


def relu2(x):
  r = jnp.maximum(x, 0)
  return 0.5 * r * r


@pytest.mark.parametrize("fmt,mode,rounding,rotate", [CASES[0], CASES[1], CASES[4]])
@pytest.mark.parametrize("axis", [0, 1])
def test_act_on_the_loaded_tile_equals_act_first(fmt, mode, rounding, rotate, axis):
  """act (the MLP's ReLU^2) evaluated inside the kernel == the kernel on act(x), bit for bit, mask included
  (NVFP4's tensor scale is taken from act(x) too)."""
  blk = F.get_format(fmt).block
  x = (3 * jax.random.normal(jax.random.key(0), (64, 96))).astype(jnp.bfloat16).at[5, 7].set(9.0)
  rotation = (blk, H.random_signs(jax.random.key(9), blk)) if rotate else None
  run = lambda x, act: jax.jit(lambda x: rotq.rotate_quantize(
      x, fmt, axis, scale_mode=mode, rounding=rounding, key=jax.random.key(4), rotation=rotation,
      want_mask=True, act=act))(x)
  (got, gmask), (want, wmask) = run(x, relu2), run(relu2(x), None)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  np.testing.assert_array_equal(np.asarray(gmask), np.asarray(wmask))
  plain = np.asarray(run(x, None)[0], np.float32)  # control: act changes the result
  assert np.mean(plain != np.asarray(got, np.float32)) > 0.3


def test_act_lowers_inside_the_triton_kernel(cuda_lowering):
  """The kernel with a custom_jvp act (the model's ReLU^2) lowers for CUDA as one Triton call."""
  from conftest import triton_calls
  from parcae.model.layers import relu2 as model_relu2
  x = jax.ShapeDtypeStruct((256, 128), jnp.bfloat16)
  text = jax.jit(lambda x: rotq.rotate_quantize(x, "mxfp4", 1, scale_mode="rms", rotation=(32, None),
                                                act=model_relu2)[0]).trace(x).lower(
      lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 1
