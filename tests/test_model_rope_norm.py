"""The RoPE + QK-norm kernels (parcae.model.rope_norm; interpret mode here) against the jnp path and float64.

On a GPU (real Triton kernels) run them with XLA_FLAGS=--xla_allow_excess_precision=false: XLA then rounds the
jnp path's intermediates to bf16 where the program does, as the kernels do (bench/RESULTS.md, session 25)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcae import model as M
from parcae.model import layers, rope_norm

# (batch, seq, tensor shards, heads, head_dim): one shard; heads split over two shards (tensor parallel layout)
SHAPES = [(2, 128, 1, 2, 128), (1, 64, 2, 4, 64)]


def jnp_path(y, cos, sin, h, norm=True):
  """Attention.project's unfused path on the GEMM output y [B, S, T, 3, G]."""
  b, s, t, _, g = y.shape
  q, k, v = (y[:, :, :, i].reshape(b, s, h, t * g // h) for i in range(3))
  q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
  return (layers.qk_norm(q), layers.qk_norm(k), v) if norm else (q, k, v)


def f64_path(y, cos, sin, h, eps):
  """The same math in float64 with no intermediate rounding."""
  b, s, t, _, g = y.shape
  y = y.astype(jnp.float64)
  c, sn = cos.astype(jnp.float64)[None, :s, None], sin.astype(jnp.float64)[None, :s, None]

  def rot_norm(x):
    x0, x1 = jnp.split(x, 2, axis=-1)
    r = jnp.concatenate([x0 * c - x1 * sn, x0 * sn + x1 * c], -1)
    return r / jnp.sqrt(jnp.mean(r * r, -1, keepdims=True) + eps)
  q, k, v = (y[:, :, :, i].reshape(b, s, h, t * g // h) for i in range(3))
  return rot_norm(q), rot_norm(k), v


def _case(shape, seed=0):
  b, s, t, h, k = shape
  y = (3 * jax.random.normal(jax.random.key(seed), (b, s, t, 3, h * k // t))).astype(jnp.bfloat16)
  cos, sin = layers.rope_tables(s, k, 50000.0)
  cts = tuple(jax.random.normal(jax.random.key(seed + 1 + i), (b, s, h, k)).astype(jnp.bfloat16) for i in range(3))
  return y, cos, sin, h, cts


def _grad(fn, y, cts):
  """The y cotangent of fn at y, jitted (the interpreted kernels otherwise dispatch op by op on a CPU)."""
  return np.asarray(jax.jit(lambda y, cts: jax.vjp(fn, y)[1](cts)[0])(y, cts), np.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_equal_the_jnp_path_up_to_the_norms_summation_order(shape):
  """Values and the y gradient of the kernels against autodiff of the jnp path: equal except at a few
  elements, by at most one bf16 rounding of the RoPE output (2^-7 relative; the compilers may contract the
  rotation's products differently, the RMS sums run in another order, the backward is a closed form)."""
  y, cos, sin, h, cts = _case(shape)
  fused = jax.jit(lambda y: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True))
  plain = lambda y: jnp_path(y, cos, sin, h)
  unnormed = jax.jit(lambda y: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=False))(y)
  for got, want in ((fused(y), plain(y)), (unnormed, jnp_path(y, cos, sin, h, norm=False))):
    for a, b in zip(got, want):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      assert a.shape == b.shape
      assert np.all(np.abs(a - b) <= 2.0 ** -6 * np.abs(b)) and (a != b).mean() < 1e-3
  ga, gb = _grad(fused, y, cts), _grad(plain, y, cts)
  assert np.abs(ga - gb).max() <= 2.0 ** -7 * np.abs(gb).max() and (ga != gb).mean() < 1e-3


@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_float64_within_bf16_rounding(shape):
  """Against the float64 formulas (values and gradient): within bf16 rounding, as the jnp path is."""
  jax.config.update("jax_enable_x64", True)
  try:
    y, cos, sin, h, cts = _case(shape, seed=3)
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    exact = lambda y: f64_path(y, cos, sin, h, eps)
    fused = jax.jit(lambda y: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True))
    for a, b in zip(fused(y), exact(y)):
      a, b = np.asarray(a, np.float64), np.asarray(b)
      assert np.all(np.abs(a - b) <= 2.0 ** -7 * np.abs(b) + 2.0 ** -8 * 2.0 ** -7), np.abs(a - b).max()
    g64 = np.asarray(jax.vjp(exact, y.astype(jnp.float64))[1](tuple(c.astype(jnp.float64) for c in cts))[0])
    err = np.abs(_grad(fused, y, cts) - g64).max() / np.abs(g64).max()
    err_jnp = np.abs(_grad(lambda y: jnp_path(y, cos, sin, h), y, cts) - g64).max() / np.abs(g64).max()
    assert err < 2.0 ** -6 and err <= 1.5 * err_jnp, (err, err_jnp)
  finally:
    jax.config.update("jax_enable_x64", False)


def _ve_case(shape, seed=0):
  """Value embeddings [B, S, H x K] and their gate [B, S, H] in (0, 2), float32 as Attention.project forms them."""
  b, s, t, h, k = shape
  ve = jax.random.normal(jax.random.key(seed + 10), (b, s, h * k))
  gate = 2.0 * jax.nn.sigmoid(jax.random.normal(jax.random.key(seed + 11), (b, s, h)))
  return ve, gate


def _ve_jnp(y, cos, sin, h, ve, gate):
  """Attention.project's unfused path with value embeddings."""
  q, k, v = jnp_path(y, cos, sin, h)
  b, s = v.shape[:2]
  return q, k, (v.astype(jnp.float32) + gate[..., None] * ve.reshape(v.shape)).astype(v.dtype)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_value_embeddings_inside_the_kernels_match_float64_and_the_jnp_path(shape, gather):
  """v = bf16(v + gate * ve) formed in the kernels' v programs: v equal to the jnp path's and within bf16
  rounding of float64; the cotangents of ve (gate * dv) and of the gate (sum over K of dv * ve, from the
  backward kernel) within float32 rounding of float64, y's v columns exactly dv; q and k as without value
  embeddings. gather: the kernels read ve = table[ids] from the table, and the ve handed in (only the
  cotangent's carrier) is NaN: any read of it would show."""
  jax.config.update("jax_enable_x64", True)
  try:
    y, cos, sin, h, cts = _case(shape, seed=7)
    ve, gate = _ve_case(shape, seed=7)
    table_ids = None
    if gather:
      table = jax.random.normal(jax.random.key(12), (96, ve.shape[-1]))
      ids = jax.random.randint(jax.random.key(13), ve.shape[:2], 0, 96)
      ve, table_ids = table[ids], (table, ids)
    stand_in = jnp.full_like(ve, jnp.nan) if gather else ve
    fused = lambda y, ve, gate: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True, ve_BxSxD=ve,
                                                     gate_BxSxH=gate, ve_table_ids=table_ids)
    got = jax.jit(fused)(y, stand_in, gate)
    want = _ve_jnp(y, cos, sin, h, ve, gate)
    # one compiler may contract v + gate * ve into a fused multiply-add and the other not: the float32 sums
    # then differ by a rounding, which moves a bf16 result near a rounding midpoint by one ulp (2 of 65,536 here)
    _equal_but_rare_last_bit(got[2], want[2])
    for a, b in zip(got[:2], jax.jit(lambda y: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True))(y)[:2]):
      assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))  # q, k untouched by ve
    b_, s_ = y.shape[:2]
    v64 = (y[:, :, :, 2].reshape(b_, s_, h, -1).astype(jnp.float64)
           + gate.astype(jnp.float64)[..., None] * ve.astype(jnp.float64).reshape(b_, s_, h, -1))
    a = np.asarray(got[2], np.float64)
    assert np.all(np.abs(a - v64) <= 2.0 ** -8 * np.abs(v64) + 1e-30), np.abs(a - v64).max()
    dy, dve, dgate = jax.jit(lambda *a: jax.vjp(fused, *a[:3])[1](a[3]))(y, stand_in, gate, cts)
    dv64 = np.asarray(cts[2], np.float64)
    ve64 = np.asarray(ve, np.float64).reshape(dv64.shape)
    dve64 = (np.asarray(gate, np.float64)[..., None] * dv64).reshape(ve.shape)
    dgate64 = np.sum(dv64 * ve64, axis=-1)
    assert np.abs(np.asarray(dve) - dve64).max() <= 2.0 ** -23 * np.abs(dve64).max()
    assert np.abs(np.asarray(dgate) - dgate64).max() <= 1e-5 * np.abs(dgate64).max(), np.abs(dgate - dgate64).max()
    dy_v = np.asarray(dy, np.float32)[:, :, :, 2].reshape(dv64.shape)
    assert np.array_equal(dy_v, np.asarray(cts[2], np.float32))
    gy = np.asarray(jax.jit(lambda y, c: jax.vjp(lambda y: _ve_jnp(y, cos, sin, h, ve, gate), y)[1](c)[0])(y, cts))
    assert np.abs(np.asarray(dy, np.float32) - gy).max() <= 2.0 ** -7 * np.abs(gy).max()
  finally:
    jax.config.update("jax_enable_x64", False)


def _tiny_attention(rope_impl, d=256, h=2):
  cfg = M.default_model_config()
  cfg.d_model, cfg.n_heads, cfg.rope_impl = d, h, rope_impl

  class Holder(nnx.Module):
    def __init__(self):
      self.attn = layers.Attention(cfg, jax.random.key(0), with_ve=True, cd=jnp.float32, quant="bf16")
  return Holder()


def test_attention_with_the_kernels_equals_the_xla_path_with_its_gradients():
  """A whole attention layer (value embeddings too, float32 compute) with rope_impl "pallas" and "xla": same
  output and parameter gradients; "auto" keeps the jnp path on a CPU."""
  m_k, m_x = _tiny_attention("pallas"), _tiny_attention("xla")
  for lin in ("o",):  # the output projection is zero at init: give it values so gradients reach q, k, v
    for m in (m_k, m_x):
      getattr(m.attn, lin).kernel[...] = 0.02 * jax.random.normal(jax.random.key(9), (256, 256))
  x = jax.random.normal(jax.random.key(1), (2, 64, 256))
  ids = jax.random.randint(jax.random.key(2), (2, 64), 0, M.default_model_config().vocab_size)
  rope = layers.rope_tables(64, 128, 50000.0)

  def loss(m):  # the value-embedding table's gradient too (the kernels read its rows at ids)
    return jnp.sum(jnp.sin(m.attn(x, rope, m.attn.lookup_ve(ids))))
  with jax.default_matmul_precision("highest"):  # on a GPU: float32 GEMMs, not TF32 (an H100's default)
    (lk, gk), (lx, gx) = (nnx.jit(nnx.value_and_grad(loss))(m) for m in (m_k, m_x))
  assert float(lk) == pytest.approx(float(lx), rel=1e-5)
  for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gx)):  # float32: summation-order error of each leaf
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())
  on_gpu = jax.devices()[0].platform == "gpu"  # this test also runs on the GPU machine (real Triton kernels)
  assert _tiny_attention("auto").attn._fused_rope((2, 64, 1, 3, 256), True) == on_gpu
  assert _tiny_attention("pallas").attn._fused_rope((2, 64, 1, 3, 256), True)


def test_pallas_rope_impl_refuses_shapes_it_cannot_run():
  with pytest.raises(ValueError, match="rope_impl='pallas'.*divisible by 32"):  # rope_norm.ROWS
    _tiny_attention("pallas").attn._fused_rope((2, 40, 1, 3, 256), True)
  cfg = M.default_model_config()
  cfg.rope_impl = "triton"
  with pytest.raises(ValueError, match="model.rope_impl='triton'"):
    M.validate_model_config(cfg)


def _equal_but_rare_last_bit(a, b):
  """bf16 a == b except at most 1 in 10,000 elements, and those by one bf16 ulp. Why not bit for bit: each
  device's interpreted kernel sees a block of another shape (half the rows, half the heads) and XLA's CPU code
  for its norm's float32 sum depends on that shape at LLVM -O0 (the tests' level, see conftest): 2 of 65,536
  outputs moved by one ulp there, none at XLA's default level. A small output of the rotation's cancellation
  (x cos - y sin) carries the float32 rounding of its operands, so the bound is one bf16 ulp of the element or
  8 float32 ulps of the tensor's largest element, whichever is larger. A sharding bug (wrong rows, heads or
  rotation) moves most elements by far more."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  tol = np.maximum(np.abs(b) * 2.0**-7, np.abs(b).max() * 2.0**-20)
  bad = a != b
  assert bad.mean() <= 1e-4 and np.all(np.abs(a - b)[bad] <= tol[bad]), (bad.sum(), np.abs(a - b).max())


def test_kernels_run_per_device_under_a_mesh_and_lower_for_cuda(cuda_lowering, monkeypatch):
  """Under a (data 2, tensor 2) mesh the kernels get each device's rows and heads (shard_map), give the
  unsharded values (also for heads that do not divide the tensor axis), and both lower through Triton."""
  from conftest import triton_calls
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)  # as parcae.train.mesh builds it
  y, cos, sin, h, cts = _case((4, 64, 2, 4, 64), seed=5)
  f = lambda y: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True)
  want = f(y)
  y3, cos3, sin3, _, _ = _case((4, 64, 1, 3, 64), seed=6)
  f3 = lambda y: rope_norm.rope_qk_norm(y, cos3, sin3, n_heads=3, norm=True)
  want3 = f3(y3)
  ys = jax.device_put(y, NamedSharding(mesh, P("data", None, "tensor", None, None)))
  with jax.set_mesh(mesh):
    got = jax.jit(f)(ys)
    for a, b in zip(got, want):
      _equal_but_rare_last_bit(a, b)
    # 3 heads do not divide the tensor axis: Attention then gives y one shard (T = 1), whole on every device
    got3 = jax.jit(f3)(jax.device_put(y3, NamedSharding(mesh, P("data", None, None, None, None))))
    for a, b in zip(got3, want3):
      _equal_but_rare_last_bit(a, b)
    shapes = []
    real = rope_norm._local
    monkeypatch.setattr(rope_norm, "_local", lambda y2, *a: shapes.append(y2.shape) or real(y2, *a))
    monkeypatch.setattr(rope_norm, "_backend", lambda interpret: (False, __import__(
        "parcae.quant.kernels.qdq", fromlist=["x"]).backend(False, rope_norm.WARPS)[2]))
    loss = lambda y: sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(f(y), cts))
    text = jax.jit(jax.value_and_grad(loss)).trace(ys).lower(lowering_platforms=("cuda",)).as_text()
  assert len(triton_calls(text)) == 2  # forward and backward
  assert shapes and set(shapes) == {(2 * 64, 3 * 2 * 64)}, shapes  # a device's 2 sequences and its 2 heads (of 4)


@pytest.mark.parametrize("batch_axis", ["data", "fsdp"])
def test_value_embeddings_per_device_under_a_mesh(batch_axis, cuda_lowering, monkeypatch):
  """With value embeddings under a (data 2, tensor 2) mesh each device's call gets its rows, its heads'
  gates and its rows' ids with its heads' table columns (the kernels gather); under (fsdp 2, tensor 2), whose
  fsdp axis shards the table, the looked-up rows instead. v and the cotangents of y, ve and the gate equal
  the unsharded call's (within one bf16 / float32 rounding, see _equal_but_rare_last_bit), and the step
  lowers with the Triton kernels."""
  from conftest import triton_calls
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2, 2), (batch_axis, "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shape = (4, 64, 2, 4, 64)
  y, cos, sin, h, cts = _case(shape, seed=8)
  _, gate = _ve_case(shape, seed=8)
  table = jax.random.normal(jax.random.key(14), (96, 4 * 64))
  ids = jax.random.randint(jax.random.key(15), (4, 64), 0, 96)
  ve = table[ids]
  f = lambda y, ve, gate: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True, ve_BxSxD=ve, gate_BxSxH=gate,
                                                 ve_table_ids=(table, ids))
  loss = lambda *a: sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(f(*a), cts))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  want, want_g = f(y, ve, gate), grads(y, ve, gate)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  args = (put(y, P(batch_axis, None, "tensor", None, None)), put(ve, P(batch_axis)), put(gate, P(batch_axis)))
  with jax.set_mesh(mesh):
    got, got_g = jax.jit(f)(*args), grads(*args)
    shapes = []
    real = rope_norm._local
    record = lambda y2, ve_in, g: shapes.append((y2.shape, tuple(a.shape for a in ve_in), g.shape))
    monkeypatch.setattr(rope_norm, "_local", lambda y2, *a: record(y2, *a[2:4]) or real(y2, *a))
    monkeypatch.setattr(rope_norm, "_backend", lambda interpret: (False, __import__(
        "parcae.quant.kernels.qdq", fromlist=["x"]).backend(False, rope_norm.WARPS)[2]))
    text = jax.jit(jax.value_and_grad(loss)).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  for a, b in zip(got, want):
    _equal_but_rare_last_bit(a, b)
  _equal_but_rare_last_bit(got_g[0], want_g[0])
  for a, b in zip(got_g[1:], want_g[1:]):  # float32: the gate's sum over K runs on the same 64 channels
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max(), np.abs(a - b).max()
  assert len(triton_calls(text)) == 2
  gathered = ((2 * 64,), (96, 2 * 64)) if batch_axis == "data" else ()  # a device's ids and its heads' columns
  assert shapes and set(shapes) == {((2 * 64, 3 * 2 * 64), ((2 * 64, 2 * 64),) + gathered, (2, 2 * 64))}, shapes


def test_backward_keeps_the_rounded_rope_output_not_the_gemm_output():
  """The forward hands the backward the rounded RoPE output of q and k (as autodiff of the jnp path keeps),
  not the GEMM output y, whose v columns attention keeps already: no more residual bytes than the jnp path."""
  import contextlib
  import io
  import re
  from jax.ad_checkpoint import print_saved_residuals
  y, cos, sin, h, cts = _case(SHAPES[0])

  def kept(fn):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      print_saved_residuals(lambda y: sum(jnp.sum(o.astype(jnp.float32) * c) for o, c in zip(fn(y), cts)), y)
    out = []
    for line in buf.getvalue().splitlines():
      m = re.match(r"(\w+)\[([\d,]*)\]", line)
      if m and "parcae/model/" in line:  # the loss's own products aside
        shape = tuple(int(d) for d in m.group(2).split(",") if d)
        size = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4}[m.group(1)]
        out.append((shape, int(np.prod(shape)) * size, line))
    return out
  fused = kept(lambda y: rope_norm.rope_qk_norm(y, cos, sin, n_heads=h, norm=True))
  plain = kept(lambda y: jnp_path(y, cos, sin, h))
  big = [r for r in fused if r[1] >= y.size // 3 * 2]
  assert [r[0] for r in big] == [(y.shape[0] * y.shape[1], 2 * y.shape[-1])], fused  # q and k RoPE outputs
  assert sum(r[1] for r in fused) <= sum(r[1] for r in plain), (fused, plain)


@pytest.mark.parametrize("split", [1, 2])
def test_sharded_train_step_with_the_kernels_lowers_for_cuda_per_device(split, cuda_lowering, monkeypatch):
  """The whole train step (grad accumulation, the no-grad while loop, the remat grad scan, prelude and coda)
  with rope_impl "pallas" lowers for CUDA on a (2, 2, 2) mesh with the Triton kernels, each call on one
  device's rows (a quarter of the micro-batch) and heads (one of two); with the split no-grad loop the deeper
  halves' loop calls them on half of each device's rows (the halves stay on their devices)."""
  from conftest import triton_calls
  from parcae.quant.kernels import qdq
  from train_helpers import lower_sharded_step_for_cuda, tiny_config
  cfg = tiny_config("unused", grad_accum=2, seq_len=64)
  cfg.model.compute_dtype, cfg.model.rope_impl, cfg.model.max_seq_len = "bfloat16", "pallas", 64
  cfg.model.no_grad_split = split
  tc = cfg.train
  shapes = set()
  real = rope_norm._local
  monkeypatch.setattr(rope_norm, "_local", lambda y2, *a: shapes.add(y2.shape) or real(y2, *a))
  monkeypatch.setattr(rope_norm, "_backend", lambda interpret: (False, qdq.backend(False, rope_norm.WARPS)[2]))
  text = lower_sharded_step_for_cuda(cfg)
  assert len(triton_calls(text)) >= 2
  d = cfg.model.d_model
  rows = tc.micro_batch_size // 4 * tc.seq_len
  assert shapes == {(rows // h, 3 * d // 2) for h in range(1, split + 1)}, shapes
