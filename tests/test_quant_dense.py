"""qdot: bf16 is exactly the plain matmul; quantized recipes' GEMMs use the quantized operands."""
import functools

import jax
import jax.extend.core  # noqa: F401  (jaxprs_in_params)
import jax.numpy as jnp
import numpy as np
import pytest

from parcae.quant import RECIPES, qdot, quantize_dequantize, validate_recipe
from parcae.quant import hadamard as H
from parcae.quant.scalesearch import quantize_dequantize_search

M, K, N = 64, 64, 96
f32 = jnp.float32


def inputs(dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(1), (2, M // 2, K)).astype(dtype)
  w = (0.1 * jax.random.normal(jax.random.key(2), (K, N))).astype(dtype)
  g = jax.random.normal(jax.random.key(3), (2, M // 2, N)).astype(jnp.float32)
  return x, w, g


def vjp(recipe, x, w, g, key, cd):
  y, pull = jax.vjp(lambda x, w: qdot(x, w, recipe, key=key, compute_dtype=cd), x, w)
  return (y, *pull(g.astype(cd)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bf16_recipe_is_exactly_plain_matmul(dtype):
  x, w, g = inputs(dtype)
  cd = jnp.bfloat16
  y, dx, dw = jax.jit(functools.partial(vjp, "bf16", key=None, cd=cd))(x, w, g)
  # Both sides jitted: eager and jitted bf16 dots may use different CPU kernels (seen on jax 0.11.2).
  def plain(x, w, g):
    y0, pull = jax.vjp(lambda x, w: jnp.dot(x.astype(cd), w.astype(cd)), x, w)
    return (y0, *pull(g.astype(cd)))
  y0, dx0, dw0 = jax.jit(plain)(x, w, g)
  for a, b in ((y, y0), (dx, dx0), (dw, dw0)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def q(x, fmt, axis, **kw):
  return quantize_dequantize(x, fmt, axis=axis, **kw)


def dot(a, b):
  return jnp.dot(a.astype(f32), b.astype(f32), precision="highest")


def hand_written(recipe, x, w, g, key):
  """The three GEMMs written out with the public quantizers (f32 compute)."""
  x2, g2 = x.reshape(M, K), g.reshape(M, N)
  k = jax.random.split(key, 8)
  if recipe in ("mxfp8", "mxfp4", "nvfp4", "nvfp4_scalesearch"):
    fmt, kw = {"mxfp8": ("mxfp8_e4m3", {"scale_mode": "rceil"}), "mxfp4": ("mxfp4", {}),
               "nvfp4": ("nvfp4", {}), "nvfp4_scalesearch": ("nvfp4", {})}[recipe]
    if recipe == "nvfp4_scalesearch":
      y = dot(quantize_dequantize_search(x2, fmt, axis=1), quantize_dequantize_search(w, fmt, axis=0))
    else:
      y = dot(q(x2, fmt, 1, **kw), q(w, fmt, 0, **kw))
    dx = dot(q(g2, fmt, 1, **kw), q(w, fmt, 1, **kw).T)
    dw = dot(q(x2, fmt, 0, **kw).T, q(g2, fmt, 0, **kw))
  elif recipe == "quartet":
    xr, wr = H.rotate(x2, 32, None, 1), H.rotate(w, 32, None, 0)
    xq, wq = q(xr, "mxfp4", 1, scale_mode="rms"), q(wr, "mxfp4", 0, scale_mode="rms")
    y = dot(xq, wq)
    sr = {"scale_mode": "headroom", "rounding": "stochastic"}
    sd, sw = H.random_signs(k[6], 32), H.random_signs(k[7], 32)
    dxr = dot(q(H.rotate(g2, 32, sd, 1), "mxfp4", 1, key=k[2], **sr),
              q(H.rotate(wq, 32, sd, 1), "mxfp4", 1, key=k[3], **sr).T)
    dwr = dot(q(H.rotate(xq, 32, sw, 0), "mxfp4", 0, key=k[4], **sr).T,
              q(H.rotate(g2, 32, sw, 0), "mxfp4", 0, key=k[5], **sr))
    # QuEST mask: entries the forward quantizer clipped (|x / scale| >= 6) get no gradient;
    # scale = 2^floor(log2(0.48708 * std)) per 32-block, exponent via frexp (exact).
    def keep(v):  # v [R, 32k] blocked along the last axis
      vb = v.reshape(v.shape[0], -1, 32)
      _, p = jnp.frexp(0.48708 * jnp.std(vb, -1, keepdims=True) + 1e-8)
      return (jnp.abs(vb / 2.0 ** (p - 1).astype(f32)) < 6).reshape(v.shape)
    mx, mw = keep(xr), keep(wr.T).T
    dx = H.rotate(dxr * mx, 32, None, 1, inverse=True)
    dw = H.rotate(dwr * mw, 32, None, 0, inverse=True)
  elif recipe == "nvidia_nvfp4":
    wq = quantize_dequantize(w, "nvfp4", block_2d=True)
    y = dot(q(x2, "nvfp4", 1), wq)
    dx = dot(q(g2, "nvfp4", 1, rounding="stochastic", key=k[2]), wq.T)
    dw = dot(q(H.rotate(x2, 16, H.TE_SIGNS_16, 0), "nvfp4", 0).T,
             q(H.rotate(g2, 16, H.TE_SIGNS_16, 0), "nvfp4", 0, rounding="stochastic", key=k[5]))
  return y.reshape(2, M // 2, N), dx.reshape(x.shape), dw


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "bf16"])
def test_recipe_gemms_use_quantized_operands(recipe):
  x, w, g = inputs()
  key = jax.random.key(7)
  got = jax.jit(functools.partial(vjp, recipe, cd=jnp.float32))(x, w, g, key)
  hw = functools.partial(hand_written, recipe)
  want = jax.jit(hw)(x, w, g, key)
  exact = jax.vjp(lambda x, w: jnp.dot(x, w, precision="highest"), x, w)
  ref = (exact[0], *exact[1](g))
  for name, a, b, r in zip(("y", "dx", "dw"), got, want, ref):
    a, b, r = (np.asarray(v, np.float64) for v in (a, b, r))
    # same quantized operands, f32 GEMMs that may sum in another order: ~1e-6 relative
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)
    rel = np.sum((a - r) ** 2) / np.sum(r**2)
    assert 1e-6 < rel < 0.35, (name, rel)  # quantized (not exact), but still close to the truth


def test_key_changes_stochastic_recipes_only():
  x, w, g = inputs()
  for recipe, random in (("nvidia_nvfp4", True), ("mxfp4", False)):
    f = jax.jit(functools.partial(vjp, recipe, cd=jnp.float32))
    a, b = f(x, w, g, jax.random.key(0)), f(x, w, g, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))  # forward is RTN
    assert (not np.array_equal(np.asarray(a[2]), np.asarray(b[2]))) == random
    c = f(x, w, g, None)  # None -> fixed key: deterministic
    np.testing.assert_array_equal(np.asarray(c[2]), np.asarray(f(x, w, g, None)[2]))


def test_validate_recipe_lists_names():
  assert validate_recipe("quartet") == "quartet"
  with pytest.raises(ValueError, match="nvfp4_scalesearch"):
    validate_recipe("fp4")
  with pytest.raises(ValueError, match="recipe must be one of"):
    qdot(jnp.ones((2, 32)), jnp.ones((32, 32)), "int4")


@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4", "nvfp4", "quartet", "nvidia_nvfp4"])
def test_pallas_impl_matches_jnp(recipe):
  """impl="pallas" (one-pass rotate + quantize kernels, interpret mode here) gives the jnp path's outputs
  and gradients. The quantized operands are bit-identical (tests/test_quant_rotq.py); the f32 GEMMs on
  them may sum in another order when XLA fuses the two programs differently (seen: 1 of 6144 dw entries
  off by 1e-6 of max|dw|), and Quartet's RMS block scales may too. dx and dw come out in the inputs' bf16:
  a float32 sum ~1e-6 away can round to the neighbouring bf16 value, so each entry may also differ by one
  spacing of its dtype at its value (seen on another CPU: one dw entry 3.375 against 3.390625)."""
  x, w, g = inputs(jnp.bfloat16)
  key = jax.random.key(3)
  f = lambda impl: jax.jit(lambda x, w, g: vjp_impl(recipe, x, w, g, key, impl))(x, w, g)
  for name, a, b in zip(("y", "dx", "dw"), f("pallas"), f("jnp")):
    assert a.dtype == b.dtype == (jnp.float32 if name == "y" else jnp.bfloat16), name
    nmant = jnp.finfo(a.dtype).nmant  # explicit mantissa bits: 7 (bf16), 23 (float32)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if recipe == "quartet":
      np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05 * np.abs(b).max(), err_msg=name)
      assert np.mean(a == b) > 0.9, name
    else:
      spacing = np.exp2(np.floor(np.log2(np.maximum(np.abs(b), 1e-30))) - nmant)
      assert np.all(np.abs(a - b) <= 1e-4 * np.abs(b).max() + spacing), name
      assert np.mean(a == b) > 0.999, name


def vjp_impl(recipe, x, w, g, key, impl):
  y, pull = jax.vjp(lambda x, w: qdot(x, w, recipe, key=key, compute_dtype=jnp.float32, impl=impl), x, w)
  return (y, *pull(g.astype(jnp.float32)))


def test_bad_impl_is_refused():
  x, w, _ = inputs()
  with pytest.raises(ValueError, match="impl"):
    qdot(x, w, "mxfp4", impl="cuda")


def test_recipe_spec_selects_the_implementation():
  """"mxfp4@pallas" (what a model's layers carry for quant.impl=pallas) is qdot(..., impl="pallas")."""
  from parcae.quant import quant_spec
  x, w, _ = inputs(jnp.bfloat16)
  assert quant_spec("quartet", "jnp") == "quartet" and quant_spec("quartet", "pallas") == "quartet@pallas"
  assert quant_spec("bf16", "auto") == "bf16"  # the default config: the plain model, no quantization keys
  a = jax.jit(lambda x, w: qdot(x, w, "mxfp4@pallas"))(x, w)
  b = jax.jit(lambda x, w: qdot(x, w, "mxfp4", impl="pallas"))(x, w)
  np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert validate_recipe("nvfp4@pallas") == "nvfp4@pallas"
  with pytest.raises(ValueError, match="unknown quantization recipe 'fp4'"):
    validate_recipe("fp4@pallas")
  with pytest.raises(ValueError, match="impl 'cuda'"):
    validate_recipe("mxfp4@cuda")


def test_auto_impl_is_pallas_on_a_gpu_only(monkeypatch):
  """impl "auto" (the trainer's default) resolves to the Triton kernels when tracing for a GPU and to the
  jnp path elsewhere, where those kernels would only run interpreted."""
  from parcae.quant import dense
  x, w, _ = inputs(jnp.bfloat16)
  assert dense.resolve_impl("auto") == "jnp"  # this test runs on the CPU
  np.testing.assert_array_equal(np.asarray(qdot(x, w, "mxfp4@auto"), np.float32),
                                np.asarray(qdot(x, w, "mxfp4", impl="jnp"), np.float32))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert dense.resolve_impl("auto") == "pallas" and dense.resolve_impl("jnp") == "jnp"
  with pytest.raises(ValueError, match="impl 'triton' is not valid"):
    dense.resolve_impl("triton")


def _mesh_layer(recipe, impl, x, w, g):
  from parcae.model.layers import relu2
  recipe, _, act = recipe.partition("+")  # "quartet+relu2": the MLP's fc2 (ReLU^2 inside the kernels)
  act = relu2 if act else None
  y, pull = jax.vjp(lambda x, w: qdot(x, w, recipe, key=jax.random.key(3), impl=impl, act=act), x, w)
  return (y, *pull(g))


@pytest.mark.parametrize("recipe", ["quartet", "quartet+relu2", "mxfp8", "nvfp4", "nvidia_nvfp4"])
def test_pallas_under_a_batch_sharded_mesh_runs_per_device_rows(recipe, monkeypatch):
  """Under jax.set_mesh with the trainer's axes, the kernels quantize each device's token rows
  (shard_map; XLA would otherwise gather the whole operand onto every device) and the result equals the
  jnp path under the same mesh bit for bit: stochastic-rounding uniforms use the global row index and
  NVFP4's tensor scale the whole operand's amax. Weights (rows = K) are quantized whole."""
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from parcae.quant.kernels import rotq
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  m, k, n = 256, 64, 96
  x = jax.random.normal(jax.random.key(0), (m, k)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (k, n)) / 8
  g = jax.random.normal(jax.random.key(2), (m, n)).astype(jnp.bfloat16)
  rows_seen = []
  real = rotq.rotate_quantize
  monkeypatch.setattr(rotq, "rotate_quantize", lambda x, *a, **kw: rows_seen.append(x.shape[0]) or real(x, *a, **kw))
  with jax.set_mesh(mesh):
    rows = NamedSharding(mesh, P(("data", "fsdp"), None))
    xs, gs = jax.device_put(x, rows), jax.device_put(g, rows)
    got = jax.jit(functools.partial(_mesh_layer, recipe, "pallas"))(xs, w, gs)
    want = jax.jit(functools.partial(_mesh_layer, recipe, "jnp"))(xs, w, gs)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert m // 4 in rows_seen  # token operands: a quarter of the rows on each of the 4 data x fsdp shards
  assert m not in rows_seen  # never the whole token operand
  assert k in rows_seen or recipe == "nvidia_nvfp4"  # weights whole (nvidia_nvfp4's are 16x16 2-D: jnp path)


@pytest.mark.parametrize("recipe", ["quartet", "quartet+relu2", "mxfp8", "nvidia_nvfp4"])
def test_triton_lowering_under_a_mesh_gets_device_rows(recipe, cuda_lowering, monkeypatch):
  """Without a GPU, lower the layer for CUDA (the Triton kernels, not interpret mode) under a (2, 2, 2) mesh:
  every kernel lowers, token operands reach their kernel as one device's rows (M / 4), weights whole."""
  from conftest import triton_calls
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from parcae.quant.kernels import rotq
  from parcae.quant.kernels import unrot
  rows_seen, unrot_rows = set(), set()
  real, real_unrot = rotq.rotate_quantize, unrot.unrotate
  monkeypatch.setattr(rotq, "rotate_quantize", lambda x, *a, **kw: rows_seen.add(x.shape[0]) or real(x, *a, **kw))
  monkeypatch.setattr(unrot, "unrotate", lambda d, *a, **kw: unrot_rows.add(d.shape[0]) or real_unrot(d, *a, **kw))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  m, k, n = 512, 128, 256
  rows = NamedSharding(mesh, P(("data", "fsdp"), None))
  x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=rows)
  w = jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=NamedSharding(mesh, P()))
  g = jax.ShapeDtypeStruct((m, n), jnp.bfloat16, sharding=rows)
  with jax.set_mesh(mesh):
    text = jax.jit(functools.partial(_mesh_layer, recipe, "pallas")).trace(x, w, g).lower(
        lowering_platforms=("cuda",)).as_text()
  quartet = recipe.startswith("quartet")
  assert len(triton_calls(text)) == (7 if quartet else {"mxfp8": 6, "nvidia_nvfp4": 4}[recipe])  # + unrot
  assert m // 4 in rows_seen and m not in rows_seen, rows_seen
  assert unrot_rows == ({m // 4} if quartet else set()), unrot_rows


def test_pallas_inside_a_callers_shard_map_stays_per_device():
  """A caller that already maps over the batch axes (its own shard_map; check_vma=False, as Pallas kernels
  need there) gets the kernel on its local rows, not a second shard_map over the same axes."""
  from jax.sharding import AxisType, PartitionSpec as P
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  x = jax.random.normal(jax.random.key(0), (256, 64)).astype(jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (64, 96)) / 8
  local = lambda x, w: qdot(x, w, "mxfp8", impl="pallas")
  with jax.set_mesh(mesh):
    got = jax.jit(jax.shard_map(local, in_specs=(P(("data", "fsdp")), P()), out_specs=P(("data", "fsdp")),
                                axis_names={"data", "fsdp"}, check_vma=False))(x, w)
  want = jax.jit(lambda x, w: qdot(x, w, "mxfp8", impl="jnp"))(x, w)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("impl", ["jnp", "pallas"])
@pytest.mark.parametrize("recipe", ["bf16", "mxfp8", "nvfp4", "quartet", "nvidia_nvfp4"])
def test_act_is_the_same_as_applying_it_first(recipe, impl):
  """qdot(h, w, act=relu2) == qdot(relu2(h), w): outputs and both gradients bit for bit (the model's ReLU^2
  with its custom derivative; Pallas in interpret mode), while relu2(h) is never an operand of its own."""
  from parcae.model.layers import relu2
  h, w, g = inputs(jnp.bfloat16)
  key = jax.random.key(3)
  run = lambda f, act: jax.jit(lambda h, w, g: (lambda y, pull: (y, *pull(g.astype(jnp.bfloat16))))(
      *jax.vjp(lambda h, w: qdot(f(h), w, recipe, key=key, impl=impl, act=act), h, w)))(h, w, g)
  fused, first = run(lambda h: h, relu2), run(relu2, None)
  for name, a, b in zip(("y", "dh", "dw"), fused, first):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
  plain = run(lambda h: h, None)  # control: the activation matters
  assert not np.array_equal(np.asarray(plain[0], np.float32), np.asarray(fused[0], np.float32))
  with pytest.raises(ValueError, match="elementwise"):
    qdot(h, w, recipe if recipe != "bf16" else "mxfp8", act=lambda h: h[..., :8])


def _pallas_outputs(jaxpr):
  """Output dtypes of every pallas_call in a (closed) jaxpr, sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      out.append(tuple(str(v.aval.dtype) for v in eqn.outvars))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out += _pallas_outputs(sub)
  return out


def test_clip_masks_only_under_differentiation():
  """Quartet's forward kernels write their int8 clip masks only when a backward will read them: not in the
  primal (the no-grad loop iterations, evaluation)."""
  x, w, g = inputs(jnp.bfloat16)
  f = lambda x, w: qdot(x, w, "quartet", impl="pallas")
  primal = _pallas_outputs(jax.make_jaxpr(f)(x, w).jaxpr)
  under_vjp = _pallas_outputs(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[0])(x, w).jaxpr)
  assert len(primal) == 2 and all("int8" not in o for o in primal), primal
  assert sum("int8" in o for o in under_vjp) == 2, under_vjp


def test_fwdq_recipes_do_not_keep_the_input():
  """Quartet's backward reads the forward-quantized operands only: x itself is not a residual (before: one
  more [M, K] array per layer); with act, x (the activation's input) is, and act(x) is not."""
  import contextlib
  import io
  from jax.ad_checkpoint import print_saved_residuals
  from parcae.model.layers import relu2
  x, w, _ = inputs(jnp.bfloat16)

  def kept(act):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      print_saved_residuals(lambda x, w: jnp.sum(qdot(x, w, "quartet", act=act).astype(jnp.float32)), x, w)
    return [ln for ln in buf.getvalue().splitlines() if ln.startswith(f"bf16[{M},{K}]")]
  plain, fused = kept(None), kept(relu2)
  assert len(plain) == 1 and "_qdq_jnp" in plain[0], plain  # xq only
  assert len(fused) == 2 and "reshape" in fused[0] + fused[1], fused  # x (reshaped to 2-D) and xq
  assert not any("relu2" in ln or "activate" in ln for ln in fused), fused
