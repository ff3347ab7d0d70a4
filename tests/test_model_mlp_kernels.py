"""model/mlp_kernels.py: the fused ReLU^2 MLP's custom VJP (with jnp stand-ins for the Mosaic GPU kernels,
which need a Hopper GPU: bench/fused_mlp.py checks those against float64), per device under a mesh, and the
model's choice of path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from parcae import compile_target, model as M
from parcae.model import layers, mlp_kernels as mk
from train_helpers import loss_and_grads


def _inputs(n=256, d=64, f=256, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (n, d), jnp.bfloat16)
  w1 = (jax.random.normal(ks[1], (d, f)) / 8).astype(jnp.bfloat16)
  w2 = (jax.random.normal(ks[2], (f, d)) / 16).astype(jnp.bfloat16)
  dy = jax.random.normal(ks[3], (n, d), jnp.bfloat16)
  return x, w1, w2, dy


def _xla_mlp(x, w1, w2):
  return jnp.dot(layers.relu2(jnp.dot(x, w1)), w2)


@pytest.mark.parametrize("pair", [False, True])
def test_fused_mlp_value_and_vjp_are_the_xla_programs_bits(pair, monkeypatch):
  """Same value and the same three cotangents, bit for bit, as autodiff of the unfused bf16 formula: the
  custom VJP rounds where XLA rounds (jitted, so XLA's own simplifications apply to both). pair: the forward
  under differentiation through pair_matmul (mk.FWD_PAIR)."""
  monkeypatch.setattr(mk, "FWD_PAIR", pair)
  x, w1, w2, dy = _inputs()
  want_y, want_vjp = jax.vjp(jax.jit(_xla_mlp), x, w1, w2)
  got_y, got_vjp = jax.vjp(jax.jit(lambda *a: mk.relu2_mlp(*a, "jnp")), x, w1, w2)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda *a: mk.relu2_mlp(*a, "jnp"))(x, w1, w2)),
                                np.asarray(want_y))
  np.testing.assert_array_equal(np.asarray(got_y), np.asarray(want_y))
  for got, want, name in zip(got_vjp(dy), want_vjp(dy), ("dx", "dw1", "dw2")):
    assert got.dtype == want.dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    assert np.abs(np.asarray(want, np.float32)).max() > 0, name


@pytest.mark.parametrize("pair", [False, True])
def test_per_device_under_a_mesh_equals_the_unsharded_mlp(pair, monkeypatch):
  """Under (data 2, tensor 2): each device's kernel call gets half the rows and half of F; value and
  gradients equal the single-device ones."""
  monkeypatch.setattr(mk, "FWD_PAIR", pair)
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  x, w1, w2, dy = _inputs()
  loss = lambda x, w1, w2: jnp.sum(mk.relu2_mlp(x, w1, w2, "jnp").astype(jnp.float32) * dy.astype(jnp.float32))
  want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w1, w2)
  shapes = []
  real = mk.KERNELS["jnp"]
  spy = (lambda x, w: shapes.append(("fwd", x.shape, w.shape)) or real[0](x, w),
         lambda g, w, h: shapes.append(("bwd", g.shape, w.shape, h.shape)) or real[1](g, w, h),
         lambda x, w: shapes.append(("pair", x.shape, w.shape)) or real[2](x, w))
  try:
    mk.KERNELS["jnp"] = spy
    with jax.set_mesh(mesh):
      put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
      args = put(x, P("data", None)), put(w1, P(None, "tensor")), put(w2, P("tensor", None))
      got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
      fwd_shapes = list(shapes)
      jax.jit(lambda *a: mk.relu2_mlp(*a, "jnp"))(*args)
  finally:
    mk.KERNELS["jnp"] = real
  assert ("bwd", (128, 64), (128, 64), (128, 128)) in fwd_shapes, fwd_shapes
  assert (("pair", (128, 64), (64, 128)) in fwd_shapes) == pair, fwd_shapes
  assert ("fwd", (128, 64), (64, 128)) in shapes, shapes
  # dx contracts over F, split over "tensor": two bf16 partial products summed (one more bf16 rounding, as
  # any tensor-parallel matmul); dw1 / dw2 are formed per device whole.
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=2.0 ** -8)
  for g, w, name in zip(got[1], want[1], ("dx", "dw1", "dw2")):
    w = np.asarray(w, np.float32)
    np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0, atol=2.0 ** -8 * np.abs(w).max(), err_msg=name)


def _tiny(impl, **kw):
  c = M.default_model_config()
  c.vocab_size, c.d_model, c.n_heads, c.max_seq_len, c.compute_dtype = 64, 64, 2, 8, "bfloat16"
  c.prelude_layers, c.core_layers, c.coda_layers = 1, 1, 1
  c.mean_recurrence, c.mean_backprop_depth = 3, 2
  c.mlp_impl = impl
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize("kind,pair", [("parcae", False), ("gpt", True)])
def test_model_with_the_fused_mlp_path_trains_identically(kind, pair, monkeypatch):
  """A whole model's loss and parameter gradients with mlp_impl "jnp" (the fused path's custom VJP) equal
  mlp_impl "xla" bit for bit, and the fused path is really taken (the stand-in kernels are called)."""
  monkeypatch.setattr(mk, "FWD_PAIR", pair)
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  calls = []
  real = mk.KERNELS["jnp"]

  def grads(impl):
    return loss_and_grads(_tiny(impl, kind=kind), ids)

  want = grads("xla")
  mk.KERNELS["jnp"] = (lambda *a: calls.append("fwd") or real[0](*a), lambda *a: calls.append("bwd") or real[1](*a),
                       lambda *a: calls.append("pair") or real[2](*a))
  try:
    got = grads("jnp")
  finally:
    mk.KERNELS["jnp"] = real
  assert "bwd" in calls and ("pair" in calls) == pair, calls
  assert float(got[0]) == float(want[0])
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_whole_tiles_per_device_under_a_mesh():
  """auto takes the kernels only where every device's rows and F slice are whole tiles."""
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  r = mk.BM * mk.CLUSTER  # the row quantum (a cluster's row tiles)
  assert mk.shapes_ok(r, 64, 256) and not mk.shapes_ok(r + 64, 64, 256)
  with jax.set_mesh(mesh):
    assert mk.shapes_ok(2 * r, 64, 512)       # r rows, F 256 per device
    assert not mk.shapes_ok(2 * r, 64, 256)   # F 128 per device
    assert not mk.shapes_ok(r, 64, 512)       # r / 2 rows per device


def test_auto_is_xla_off_hopper_and_mosaic_refuses_shapes_it_cannot_run():
  if jax.default_backend() != "cpu":
    pytest.skip("asserts what a machine without a Hopper GPU picks")
  m = M.build(_tiny("auto"), jax.random.key(0))
  mlp = m.core[0].mlp if hasattr(m, "core") else m.blocks[0].mlp
  assert mlp._fused_impl(jnp.zeros((2, 8, 64), jnp.bfloat16), False) is None  # this CPU is not a Hopper GPU
  with pytest.raises(ValueError, match=f"tokens per device % {mk.BM * mk.CLUSTER}.*mlp_impl='xla'"):
    mk.relu2_matmul(jnp.zeros((100, 64), jnp.bfloat16), jnp.zeros((64, 256), jnp.bfloat16))
  cfg = _tiny("fused")
  with pytest.raises(ValueError, match="mlp_impl"):
    M.validate_model_config(cfg)
  forced = M.build(_tiny("mosaic"), jax.random.key(0))
  with pytest.raises(ValueError, match="need a Hopper GPU"):
    forced(jnp.zeros((2, 8), jnp.int32))


@pytest.mark.parametrize("pair", [False, True])
def test_sharded_train_step_lowers_with_the_mosaic_kernels_per_device(cuda_lowering, pair, monkeypatch):
  """The whole train step with mlp_impl "mosaic" on a (data 2, fsdp 2, tensor 2) mesh lowers for CUDA: Mosaic
  GPU calls in it, each kernel on one device's rows (a quarter of a micro-batch's tokens) and half of F."""
  from train_helpers import lower_sharded_step_for_cuda, tiny_config
  monkeypatch.setattr(mk, "FWD_PAIR", pair)
  cfg = tiny_config("unused", grad_accum=2, seq_len=mk.BM * mk.CLUSTER // 2)
  cfg.model.compute_dtype, cfg.model.mlp_impl, cfg.model.d_model = "bfloat16", "mosaic", 128  # F / 2 = 256
  cfg.model.rope_impl = cfg.model.lse_impl = cfg.model.attention_impl = "xla"
  shapes = set()
  real = dict(mk.KERNELS)
  mk.KERNELS["mosaic"] = (lambda x, w: shapes.add(("fwd", x.shape, w.shape)) or real["mosaic"][0](x, w),
                          lambda g, w, h: shapes.add(("bwd", g.shape, w.shape, h.shape)) or real["mosaic"][1](g, w, h),
                          lambda x, w: shapes.add(("pair", x.shape, w.shape)) or real["mosaic"][2](x, w))
  try:
    with compile_target.compiling_for("gpu"):
      text = lower_sharded_step_for_cuda(cfg)
  finally:
    mk.KERNELS.update(real)
  rows, d, f = cfg.train.micro_batch_size * cfg.train.seq_len // 4, cfg.model.d_model, cfg.model.ffn_mult * cfg.model.d_model
  want = {("fwd", (rows, d), (d, f // 2)), ("bwd", (rows, d), (f // 2, d), (rows, f // 2))}
  assert shapes == want | ({("pair", (rows, d), (d, f // 2))} if pair else set()), shapes
  assert text.count("mosaic_gpu") >= 2


def test_auto_follows_a_compile_only_targets_gpus():
  """`parcae info --target h100` traces under a mesh of compile-only H100s: the MLP's kernels and their SM
  count are the H100's, not this CPU's (the compile itself: tests/test_train_targets.py, with the plugin)."""
  from jax._src.mesh import AbstractDevice  # what a mesh of a target's GPUs reports while tracing
  gpus = lambda kind, sms: jax.sharding.AbstractMesh(
      (1,), ("data",), abstract_device=AbstractDevice(device_kind=kind, num_cores=sms, platform="gpu"))
  assert not mk.hopper()  # this CPU
  with jax.sharding.use_abstract_mesh(gpus("NVIDIA H100 80GB HBM3", 132)):
    assert mk.hopper() and mk._num_sms() == 132  # pylint: disable=protected-access
  with jax.sharding.use_abstract_mesh(gpus("NVIDIA H200", 132)):
    assert mk.hopper()
  with jax.sharding.use_abstract_mesh(gpus("NVIDIA A100-SXM4-80GB", 108)):
    assert not mk.hopper() and mk._num_sms() == 108  # pylint: disable=protected-access


def test_the_backward_fetches_h_inside_every_k_loop(monkeypatch):
  """The backward kernel's h fetch step lies inside its K loop for any width (a step past the end would hang the
  epilogue on a barrier that never completes): H_FETCH_STEP where the loop is long enough, else half-way."""
  monkeypatch.setattr(mk, "H_FETCH_STEP", 6)
  assert [mk.fetch_step(d // mk.TK) for d in (64, 128, 256, 512, 768, 1024)] == [0, 1, 2, 4, 6, 6]
  for steps in range(1, 40):
    assert 0 <= mk.fetch_step(steps) < steps


def test_an_epilogue_piece_that_does_not_fill_the_tile_is_refused(monkeypatch):
  """A piece width that does not divide the warpgroup's columns would leave columns unwritten; the backward's
  h tile fills its whole buffer, so its piece is the whole tile."""
  x, w = jnp.zeros((256, 64), jnp.bfloat16), jnp.zeros((64, 256), jnp.bfloat16)
  ep = lambda a, _: (a,)
  with pytest.raises(ValueError, match="piece 48 must divide"):
    mk._ws_gemm((x, w), 64, 256, ep, trans_b=False, piece=48)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="with an h operand"):
    mk._ws_gemm((x, w.T, jnp.zeros((256, 256), jnp.bfloat16)), 64, 256, ep, trans_b=True, piece=64)  # pylint: disable=protected-access
  monkeypatch.setattr(mk, "OUT_SWIZZLE", 1)
  with pytest.raises(ValueError, match="piece 32: swizzled output buffers"):
    mk._ws_gemm((x, w), 64, 256, ep, trans_b=False, piece=32)  # pylint: disable=protected-access


@pytest.mark.gpu
@pytest.mark.skipif(not mk.hopper(), reason="the Mosaic GPU kernels run on a Hopper GPU (H100 / H200) only")
@pytest.mark.parametrize("cluster,steps,piece,fetch,swizzle", [(1, 3, 128, 0, 0), (2, 3, 128, 0, 0), (2, 4, 64, 3, 0),
                                                               (2, 3, 32, 5, 0), (2, 4, 64, 3, 1), (2, 3, 128, 0, 1)])
def test_mosaic_kernels_match_xla_on_every_row_on_a_hopper_gpu(cluster, steps, piece, fetch, swizzle, monkeypatch):
  """On the GPU: each kernel's whole output against the same formula through XLA (cuBLAS), on 128 x 4 output
  tiles, about 4 per program of the persistent loop (CLUSTER row tiles per cluster). Both round the float32 accumulator to
  bf16 once, so they differ only where the two summation orders round the other way: by at most a few bf16
  ulps of an entry, and in few entries; a tile written to the wrong place or skipped differs everywhere.
  steps / piece / fetch: the forward kernels' pipeline depth and epilogue piece, the backward's h fetch step;
  swizzle: OUT_SWIZZLE (the h tile is fetched into a swizzled buffer and loaded from it too)."""
  monkeypatch.setattr(mk, "CLUSTER", cluster)
  monkeypatch.setattr(mk, "OUT_SWIZZLE", swizzle)
  for name, value in (("STEPS_NO_H", steps), ("PIECE_NO_H", piece), ("H_FETCH_STEP", fetch)):
    monkeypatch.setattr(mk, name, value)
  m, k, n = 16384, 256, 1024
  ks = jax.random.split(jax.random.key(cluster), 4)
  x, g = (jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in ks[:2])
  w = (jax.random.normal(ks[2], (k, n)) / 16).astype(jnp.bfloat16)
  w2 = (jax.random.normal(ks[3], (n, k)) / 16).astype(jnp.bfloat16)
  h = jnp.dot(x, w)
  mosaic, xla = mk.KERNELS["mosaic"], mk.KERNELS["jnp"]
  for i, args in enumerate(((x, w), (g, w2, h), (x, w))):
    # fresh lambdas: jit caches the trace by function, and the launch shape is read when tracing
    got = jax.tree.leaves(jax.jit(lambda *a, f=mosaic[i]: f(*a))(*args))
    want = jax.tree.leaves(jax.jit(xla[i])(*args))
    for a, b in zip(got, want):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, rtol=2 ** -6, atol=2 ** -6 * float(np.abs(b).max()) / 64)
      assert np.mean(a != b) < 0.02, (i, float(np.mean(a != b)))


_EPILOGUE_CHILD = """
import jax, jax.numpy as jnp, numpy as np
from parcae.model import mlp_kernels as mk
bits = np.arange(2 ** 16, dtype=np.uint16).view(jnp.bfloat16)
grid = jnp.asarray(bits[np.isfinite(bits.astype(np.float32))])  # every finite bf16 value
e = np.arange(60)
da = np.concatenate([[0.0, -0.0, 1.0, -1.0], np.ldexp(1.0 + e / 61, -130 + 4 * e) * np.where(e % 2, -1, 1)])
da = jnp.asarray(da.astype(jnp.bfloat16))
for fn in ("_relu2_epilogue", "_pair_epilogue", "_mask_product_epilogue"):
  a, b = (grid, grid) if fn != "_mask_product_epilogue" else (jnp.repeat(da, grid.size), jnp.tile(grid, da.size))
  outs = []
  for flag in (False, True):
    mk.EPILOGUE_BF16 = flag  # a fresh function each time: jit caches the trace by function
    outs.append(jax.jit(lambda a, b, f=getattr(mk, fn): f(a, b))(a, b))
  for f32, bf16 in zip(*outs):
    assert bf16.dtype == jnp.bfloat16, fn
    np.testing.assert_array_equal(np.asarray(bf16).view(np.uint16), np.asarray(f32).view(np.uint16), err_msg=fn)
print("equal bits")
"""


def test_bf16_epilogues_give_the_float32_epilogues_bits():
  """The kernels' epilogue math in bf16 (EPILOGUE_BF16: packed bf16x2 max / mul on the GPU, each op rounded
  to bf16) against the float32 formula rounded once at the end: equal bits for relu2 and the pair on every
  finite bf16 input (subnormals, zeros of both signs and the largest values included: 0.5 * r is exact, and
  (0.5 * r) * r is rounded once, where r * r * 0.5 would overflow at r = 2^64) and for the mask product on
  every bf16 h against 64 da values across the exponent range. Run where XLA rounds every bf16 op
  (--xla_allow_excess_precision=false, as the GPU's bf16x2 instructions do); with excess precision XLA would
  compute the bf16 formula in float32 and the check would prove nothing. The Hopper test below checks the
  kernels themselves."""
  import os
  import subprocess
  import sys
  env = {**os.environ, "XLA_FLAGS": "--xla_allow_excess_precision=false", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _EPILOGUE_CHILD], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "equal bits" in proc.stdout, proc.stderr[-3000:]


def _mosaic_outputs_per_knob(monkeypatch, knob, values, m, k, n, seed):
  """{value: the three Mosaic kernels' outputs (relu2, backward, pair)} on random [m, k] x [k, n] operands, for
  each value of an mlp_kernels knob (a value that is a tuple of (knob, value) pairs sets those knobs instead);
  and (x, w)."""
  ks = jax.random.split(jax.random.key(seed), 4)
  x, g = (jax.random.normal(kk, (m, k), jnp.bfloat16) for kk in ks[:2])
  w = (jax.random.normal(ks[2], (k, n)) / 16).astype(jnp.bfloat16)
  w2 = (jax.random.normal(ks[3], (n, k)) / 16).astype(jnp.bfloat16)
  h = jnp.dot(x, w)
  outs = {}
  for value in values:
    for name, v in (value if isinstance(value, tuple) else ((knob, value),)):
      monkeypatch.setattr(mk, name, v)
    outs[value] = [jax.tree.leaves(jax.jit(lambda *a, f=f: f(*a))(*args))  # fresh lambdas: traced anew
                   for f, args in zip(mk.KERNELS["mosaic"], ((x, w), (g, w2, h), (x, w)))]
  return outs, (x, w)


def _assert_same_bits(a_outs, b_outs):
  for a, b in zip(jax.tree.leaves(a_outs), jax.tree.leaves(b_outs)):
    np.testing.assert_array_equal(np.asarray(b).view(np.uint16), np.asarray(a).view(np.uint16))


@pytest.mark.gpu
@pytest.mark.skipif(not mk.hopper(), reason="the Mosaic GPU kernels run on a Hopper GPU (H100 / H200) only")
def test_bf16_epilogue_kernels_give_the_float32_epilogues_bits_on_a_hopper_gpu(monkeypatch):
  """On the GPU: relu2, backward and pair with the epilogue's math in bf16 (packed bf16x2 max / mul) and in
  float32 write the same bits (same accumulators; the only difference is the epilogue's arithmetic)."""
  outs, _ = _mosaic_outputs_per_knob(monkeypatch, "EPILOGUE_BF16", (False, True), 16384, 256, 1024, seed=7)
  _assert_same_bits(outs[False], outs[True])


@pytest.mark.gpu
@pytest.mark.skipif(not mk.hopper(), reason="the Mosaic GPU kernels run on a Hopper GPU (H100 / H200) only")
@pytest.mark.parametrize("m", [16384, 256 * 66])
def test_one_pipeline_across_tiles_gives_the_per_tile_pipelines_bits_on_a_hopper_gpu(m, monkeypatch):
  """On the GPU: with CROSS_TILE (one memory pipeline over a program's tiles: START, STEADY..., STOP) the three
  kernels write the same bits as with a pipeline per tile (the same accumulations; only when the loads are
  issued differs). K = 768: 12 steps, whole for the forward's 4 stages and the backward's 3. m = 16384, n = 1024:
  256 tiles over the H100's 66 two-SM programs (3 or 4 each); m = 256 x 66, n = 256: one tile per program (a
  lone tile runs a whole pipeline)."""
  outs, (x, w) = _mosaic_outputs_per_knob(monkeypatch, "CROSS_TILE", (0, 1), m, 768, 1024 if m == 16384 else 256,
                                          seed=3)
  want = np.asarray(jax.jit(mk.KERNELS["jnp"][0])(x, w), np.float32)
  np.testing.assert_allclose(np.asarray(outs[1][0][0], np.float32), want, rtol=2 ** -6,
                             atol=2 ** -6 * float(np.abs(want).max()) / 64)
  _assert_same_bits(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not mk.hopper(), reason="the Mosaic GPU kernels run on a Hopper GPU (H100 / H200) only")
def test_two_output_buffers_give_the_one_buffers_bits_on_a_hopper_gpu(monkeypatch):
  """On the GPU: relu2 and pair storing through two output buffers per warpgroup in turn (OUT_BUFFERS = 2:
  [BM, 32] pieces at 4 stages, [BM, 64] at 3) write the same bits as through one [BM, 64] buffer; 3-4 tiles per
  program, so the buffers' turns run on across tiles (the backward keeps its one buffer: its bits too)."""
  one, two32, two64 = (), (("OUT_BUFFERS", 2), ("PIECE_NO_H", 32)), (("OUT_BUFFERS", 2), ("STEPS_NO_H", 3))
  outs, _ = _mosaic_outputs_per_knob(monkeypatch, None, (one, two32, two64), 16384, 768, 1024, seed=5)
  _assert_same_bits(outs[one], outs[two32])
  _assert_same_bits(outs[one], outs[two64])


def test_output_buffers_must_divide_a_tiles_pieces(monkeypatch):
  """OUT_BUFFERS that do not divide a tile's stored pieces (relu2: one [BM, 128] piece) fail before any kernel
  is built, naming the fix."""
  monkeypatch.setattr(mk, "OUT_BUFFERS", 2)
  x = jax.ShapeDtypeStruct((256, 768), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((768, 1024), jnp.bfloat16)
  with pytest.raises(ValueError, match="OUT_BUFFERS 2: each tile's 1 stored pieces.*use 1 or 2 buffers"):
    mk._ws_gemm((x, w), 768, 1024, mk._relu2_epilogue, trans_b=False, piece=mk.BN)  # pylint: disable=protected-access
  two_pieces = lambda x, w: mk._ws_gemm((x, w), 768, 1024, mk._relu2_epilogue, trans_b=False, piece=64)  # pylint: disable=protected-access
  out = jax.eval_shape(two_pieces, x, w)  # traces
  assert out[0].shape == (256, 1024)
