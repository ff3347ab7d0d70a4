"""model/qkv_rope.py: the q/k/v GEMM with RoPE + QK-norm in its epilogue. On a CPU its custom VJP with the jnp
stand-in against Attention.project's other paths, the model's choice of path, and (with jax's CUDA plugin) the
Mosaic GPU kernel compiled for an H100; on a Hopper GPU the kernel itself against the stand-in."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcae import model as M
from parcae.model import layers, mlp_kernels as mk, qkv_rope
from train_helpers import loss_and_grads


def _attention(qkv_impl, rope_impl="pallas", d=256, h=2):
  cfg = M.default_model_config()
  cfg.d_model, cfg.n_heads, cfg.rope_impl, cfg.qkv_impl = d, h, rope_impl, qkv_impl
  return layers.Attention(cfg, jax.random.key(0), with_ve=False, cd=jnp.bfloat16, quant="bf16")


def _project_vjp(attn, x, rope, cts):
  """project's outputs and the cotangents of x and of the layer's parameters for cotangents cts of q, k, v."""
  graph, state = nnx.split(attn)
  outs, vjp = jax.vjp(lambda x, state: nnx.merge(graph, state).project(x, rope), x, state)
  return outs, jax.tree.leaves(vjp(cts))


def _case(b=2, s=128, d=256, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (b, s, d), jnp.float32)
  cts = tuple(jax.random.normal(kk, (b, s, d // 128, 128), jnp.bfloat16) for kk in ks[1:])
  return x, layers.rope_tables(s, 128, 50000.0), cts


def test_custom_vjp_gives_the_unfused_paths_bits():
  """qkv_impl "jnp" (the kernel's custom VJP, its forward a jnp stand-in): q, k, v equal to the XLA path's bit
  for bit, and the cotangents of x and of the three kernels equal to those of the RoPE kernels' path
  (rope_impl "pallas", interpreted), whose backward kernel it shares."""
  x, rope, cts = _case()
  fused = jax.jit(lambda x, cts: _project_vjp(_attention("jnp"), x, rope, cts))
  plain = jax.jit(lambda x, cts: _project_vjp(_attention("xla", "xla"), x, rope, cts))
  kernels = jax.jit(lambda x, cts: _project_vjp(_attention("xla", "pallas"), x, rope, cts))
  (out_f, grads_f), (out_x, _), (_, grads_k) = fused(x, cts), plain(x, cts), kernels(x, cts)
  for a, b in zip(out_f, out_x):
    assert a.shape == b.shape == (2, 128, 2, 128)
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert sum(float(jnp.abs(b).max()) > 0 for b in grads_k) == 4  # x, q, k, v (the unused o: zero)
  for a, b in zip(grads_f, grads_k):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_model_picks_the_fused_path_only_where_it_can_run():
  """"auto" takes the kernel on a Hopper GPU only (the XLA path on a CPU); blocks with value embeddings never take
  it; "mosaic" off a GPU and shapes the kernel cannot tile are refused with the fix; unknown values too."""
  hopper = mk.hopper()  # this test also runs on the GPU machine
  assert _attention("auto")._fused_qkv((2, 128, 256), True) == ("mosaic" if hopper else None)
  assert _attention("auto", rope_impl="xla")._fused_qkv((2, 128, 256), True) is None
  assert _attention("jnp")._fused_qkv((2, 128, 256), True) == "jnp"
  assert _attention("jnp")._fused_qkv((2, 128, 256), False) is None   # tables shorter than the sequence
  if not hopper:
    with pytest.raises(ValueError, match="qkv_impl='mosaic'.*Hopper GPU"):
      _attention("mosaic")._fused_qkv((2, 128, 256), True)
  with pytest.raises(ValueError, match="head_dim 128.*qkv_impl='auto' or 'xla'"):
    _attention("jnp", d=256, h=4)._fused_qkv((2, 128, 256), True)  # head_dim 64
  with pytest.raises(ValueError, match="sequence % 128"):
    _attention("jnp")._fused_qkv((4, 64, 256), True)
  cfg = M.default_model_config()
  cfg.qkv_impl = "triton"
  with pytest.raises(ValueError, match="model.qkv_impl='triton'"):
    M.validate_model_config(cfg)
  cfg = M.default_model_config()
  cfg.d_model, cfg.n_heads, cfg.qkv_impl = 256, 2, "jnp"
  ve = layers.Attention(cfg, jax.random.key(0), with_ve=True, cd=jnp.bfloat16, quant="bf16")
  x, rope, _ = _case()
  ids = jnp.zeros((2, 128), jnp.int32)
  calls = []
  real = qkv_rope.qkv_rope_qk_norm
  try:
    qkv_rope.qkv_rope_qk_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
    ve.project(x, rope, ve.lookup_ve(ids))
    assert not calls  # value embeddings: the GEMM + RoPE path
    _attention("jnp").project(x, rope)
    assert calls
  finally:
    qkv_rope.qkv_rope_qk_norm = real


def _h100_or_skip():
  try:
    from parcae.train.targets import target_devices
    return jax.sharding.SingleDeviceSharding(target_devices("h100")[0])
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no compile-only H100 target ({type(e).__name__})")


@pytest.mark.parametrize("tables", ["gmem", "smem", "smem_stages2_rows128"])
@pytest.mark.parametrize("residual", [False, True])
def test_kernel_compiles_for_an_h100(residual, tables, monkeypatch):
  """With jax's CUDA plugin (compile-only H100; skipped without it): the Mosaic GPU kernel at parcae-small's
  shape lowers and compiles (shared memory, registers), with 3 or 4 outputs, its tables read from global or
  shared memory (`qkv_rope.TABLES`; with 2 pipeline stages and two-piece output buffers too)."""
  sh = _h100_or_skip()
  monkeypatch.setattr(qkv_rope, "TABLES", tables[:4])
  if tables == "smem_stages2_rows128":
    monkeypatch.setattr(qkv_rope, "SMEM_STAGES", 2)
    monkeypatch.setattr(qkv_rope, "SMEM_OUT_ROWS", 2 * qkv_rope.HALF)
  m, d, s = 32768, 768, 2048
  arg = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  f = jax.jit(lambda x, w, c, sn: qkv_rope._kernel(x, w, c, sn, s, residual))
  lowered = f.lower(arg((m, d)), arg((d, 3 * d)), arg((s, 64), jnp.float32), arg((s, 64), jnp.float32))
  assert len(lowered.out_info) == 3 + residual
  assert "mosaic_gpu" in lowered.as_text()
  lowered.compile()


@pytest.mark.gpu
@pytest.mark.skipif(not mk.hopper(), reason="the Mosaic GPU kernel runs on a Hopper GPU (H100 / H200) only")
@pytest.mark.parametrize("b,s,d,tables", [(8, 256, 256, "gmem"), (4, 2048, 768, "gmem"), (4, 2048, 768, "smem")])
def test_kernel_matches_the_stand_in_on_a_hopper_gpu(b, s, d, tables, monkeypatch):
  """On the GPU, inputs whose GEMM is exact (small integers: any summation order gives the same float32
  accumulator): v equal to the stand-in's bit for bit; the RoPE output r and q, k equal but where the compilers
  contract the rotation's products into FMAs differently (and the norm's sum runs in another order): there by
  at most 2^-6 of the element or of its head's RMS, whichever is larger (where x0 c - x1 s cancels, one float32
  rounding of a product is large relative to the result: the H100 showed 1 in 60,000 elements off by up to 36%
  of such a small element), and at under 1 in 1,000 elements. A tile routed to the wrong head, role or rows
  differs everywhere. Also the cotangents through the custom VJP (shared backward kernel and XLA's GEMMs).
  tables: `qkv_rope.TABLES` (the shared-memory tables need a width over 3 K steps)."""
  monkeypatch.setattr(qkv_rope, "TABLES", tables)
  m = b * s
  ks = jax.random.split(jax.random.key(d), 5)
  x = jax.random.randint(ks[0], (m, d), -2, 3).astype(jnp.bfloat16)
  w = jax.random.randint(ks[1], (d, 3 * d), -1, 2).astype(jnp.bfloat16)
  cos, sin = layers.rope_tables(s, 128, 50000.0)
  got = jax.jit(lambda *a: qkv_rope._kernel(*a, s, True))(x, w, cos, sin)
  want = jax.jit(lambda *a: qkv_rope._jnp(*a, s, True))(x, w, cos, sin)
  for i, (a, ref) in enumerate(zip(got, want)):
    a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
    assert a.shape == ref.shape
    if i == 2:
      np.testing.assert_array_equal(a, ref)
    heads = ref.reshape(m, -1, 128)
    scale = np.maximum(np.abs(heads), np.sqrt(np.mean(heads * heads, -1, keepdims=True))).reshape(ref.shape)
    assert np.all(np.abs(a - ref) <= 2.0 ** -6 * scale), (i, np.abs(a - ref).max())
    assert (a != ref).mean() < 1e-3, (i, (a != ref).mean())
  no_grad = jax.jit(lambda *a: qkv_rope._kernel(*a, s, False))(x, w, cos, sin)
  for a, ref in zip(no_grad, got):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(ref, np.float32))
  cts = tuple(jax.random.normal(kk, (m, d), jnp.bfloat16) for kk in ks[2:])
  grads = [jax.jit(lambda x, w, impl=impl: jax.vjp(lambda x, w: qkv_rope._local(x.reshape(b, s, d), w, cos, sin, s, impl), x, w)[1](
      cts))(x, w) for impl in ("mosaic", "jnp")]
  for a, ref in zip(*grads):
    a, ref = np.asarray(a, np.float32), np.asarray(ref, np.float32)
    assert np.abs(a - ref).max() <= 2.0 ** -6 * np.abs(ref).max(), np.abs(a - ref).max()


def test_model_with_the_fused_qkv_path_trains_as_the_rope_kernels_path():
  """A whole Parcae model (bf16, head_dim 128, looped with no-grad and grad iterations): loss and parameter
  gradients with qkv_impl "jnp" (the fused path's custom VJP, in every block without value embeddings) as those
  of qkv_impl "xla" with the RoPE kernels (interpreted), whose backward kernel it shares; the fused path is
  taken in the no-grad and the grad passes. (GPT's blocks are the same `layers.Block`s, built from the same
  model config: a GPT case, 15 s of the suite on a 2-core CPU, tested nothing this one does not.)"""
  ids = jax.random.randint(jax.random.key(1), (2, 128), 0, 64)
  calls = []
  real = qkv_rope.KERNELS["jnp"]

  def grads(qkv_impl):
    c = M.default_model_config()
    c.kind, c.vocab_size, c.d_model, c.n_heads, c.max_seq_len = "parcae", 64, 256, 2, 128
    c.n_layers, c.prelude_layers, c.core_layers, c.coda_layers = 3, 1, 2, 1
    c.mean_recurrence, c.mean_backprop_depth = 3, 2
    c.compute_dtype, c.qkv_impl, c.rope_impl = "bfloat16", qkv_impl, "pallas"
    return loss_and_grads(c, ids)

  want = grads("xla")
  qkv_rope.KERNELS["jnp"] = lambda *a, residual: calls.append(residual) or real(*a, residual=residual)
  try:
    got = grads("jnp")
  finally:
    qkv_rope.KERNELS["jnp"] = real
  assert True in calls and False in calls, calls
  # Not bit for bit in the looped model: there XLA's CPU compiler drops one of the interpreted RoPE kernel's bf16
  # roundings (a float32 -> bf16 -> float32 cast pair, under its default --xla_allow_excess_precision; with
  # that off the two are equal bit for bit), which the stand-in keeps (lax.reduce_precision). So: the loss to
  # 2^-14 and each gradient leaf to one bf16 ulp of its largest entry (2^-7 of it: the bf16 gradients' roundings
  # may fall the other way); a wrong head, role or rotation moves them by O(1).
  assert float(got[0]) == pytest.approx(float(want[0]), rel=2.0 ** -14)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.abs(g - w).max() <= 2.0 ** -7 * np.abs(w).max(), (np.abs(g - w).max(), np.abs(w).max())


def test_table_placement_and_a_short_k_loop(monkeypatch):
  """TABLES "auto" (the default) puts the tables in shared memory where the K loop is longer than SMEM_STAGES
  steps, else reads them from global memory; "smem" asked for a width of that many K steps or fewer is refused
  by name, and so is an unknown placement."""
  assert qkv_rope.TABLES == "auto"
  assert [qkv_rope.placement(d) for d in (128, 192, 256, 768)] == ["gmem", "gmem", "smem", "smem"]
  monkeypatch.setattr(qkv_rope, "SMEM_STAGES", 4)
  assert [qkv_rope.placement(d) for d in (256, 320, 1024)] == ["gmem", "smem", "smem"]
  monkeypatch.setattr(qkv_rope, "TABLES", "gmem")
  assert qkv_rope.placement(1024) == "gmem"
  monkeypatch.setattr(qkv_rope, "TABLES", "smem")
  monkeypatch.setattr(qkv_rope, "SMEM_STAGES", 4)
  x, w = jnp.zeros((512, 256), jnp.bfloat16), jnp.zeros((256, 768), jnp.bfloat16)  # 4 K steps
  cos, sin = layers.rope_tables(256, 128, 50000.0)
  with pytest.raises(ValueError, match="TABLES='smem'.*width > 256"):
    qkv_rope._kernel(x, w, cos, sin, 256, False)
  monkeypatch.setattr(qkv_rope, "TABLES", "tmem")
  with pytest.raises(ValueError, match="TABLES='tmem'"):
    qkv_rope._kernel(x, w, cos, sin, 256, False)


@pytest.mark.parametrize("tables,stages,d,want", [("auto", 3, 768, "smem"), ("auto", 4, 256, "gmem"),
                                                   ("gmem", 3, 768, "gmem")])
def test_kernel_launches_the_gemm_its_placement_names(tables, stages, d, want, monkeypatch):
  """`_kernel` hands mlp_kernels._ws_gemm the placement's launch (recorded instead of run, so on any machine):
  "smem" its SMEM_STAGES stages, SMEM_OUT_ROWS-row buffers, the table fetch and its scratch; "gmem" none of
  those and the library's stage count. (At 3 stages every width the kernel supports, 256 and up, gets "smem".)"""
  launches = []
  monkeypatch.setattr(mk, "_ws_gemm", lambda *a, **kw: launches.append(kw) or "launched")
  monkeypatch.setattr(qkv_rope, "TABLES", tables)
  monkeypatch.setattr(qkv_rope, "SMEM_STAGES", stages)
  s = 256
  x, w = jnp.zeros((1024, d), jnp.bfloat16), jnp.zeros((d, 3 * d), jnp.bfloat16)
  cos, sin = layers.rope_tables(s, 128, 50000.0)
  assert qkv_rope._kernel(x, w, cos, sin, s, True) == "launched"
  (kw,) = launches
  smem = {"steps": qkv_rope.SMEM_STAGES, "out_rows": qkv_rope.SMEM_OUT_ROWS}
  if want == "smem":
    assert {k: kw[k] for k in smem} == smem and kw["tile_fetch"] is not None and len(kw["tile_scratch"]) == 2, kw
  else:
    assert kw["steps"] == mk.STEPS_NO_H and not {"tile_fetch", "tile_scratch", "out_rows"} & set(kw), kw
