"""bench/lse_smem.py: the shared-memory Mosaic GPU candidate for the loss head's log-sum-exp + gradient. On a
CPU its knob and shape checks; with jax's CUDA plugin the kernel lowered and compiled for a compile-only H100
at the training shape; on a Hopper GPU its results against the library's Triton kernel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_bench
from parcae.model import lse, mlp_kernels as mk

N, V = 8192, 32768  # the training loss's chunk: one row of bf16 logits = 64 KB


@pytest.fixture
def smem(monkeypatch):
  """The bench module, its launch knobs restored after the test."""
  mod = load_bench("lse_smem")
  for name in ("BUFFERS", "LOOKAHEAD", "SLICE", "APPROX", "ALIAS"):
    monkeypatch.setattr(mod, name, getattr(mod, name))
  return mod


def test_default_knobs_fit_an_h100_cta(smem):
  """3 row buffers of 64 KB (+ barriers and the reduction scratch) fit the CTA's 227 KB; 4 do not."""
  smem.check(N, V)
  assert 3 * 65536 < smem.smem_bytes(V) <= smem.SMEM_LIMIT
  assert smem.smem_bytes(V, buffers=4) > smem.SMEM_LIMIT


@pytest.mark.parametrize("knobs,match", [
    (dict(BUFFERS=4), "shared memory"),
    (dict(LOOKAHEAD=3), "LOOKAHEAD"),
    (dict(BUFFERS=2, LOOKAHEAD=2), "LOOKAHEAD"),
    (dict(LOOKAHEAD=0), "LOOKAHEAD"),
    (dict(SLICE=3072), "SLICE"),
    (dict(SLICE=512), "SLICE"),
])
def test_bad_knobs_are_refused_with_the_knob_named(smem, knobs, match):
  """Knob values the kernel cannot run with raise a ValueError naming the knob, before any lowering."""
  for k, v in knobs.items():
    setattr(smem, k, v)
  with pytest.raises(ValueError, match=match):
    smem.check(N, V)


@pytest.mark.parametrize("n,v,dt,out,match", [
    (N, 32768 + 128, jnp.bfloat16, jnp.bfloat16, "multiple of 256"),
    (N, 256 * 257, jnp.bfloat16, jnp.bfloat16, "at most"),
    (N, V, jnp.float32, jnp.bfloat16, "bf16"),
    (N, V, jnp.bfloat16, jnp.float32, "bf16"),
])
def test_unsupported_shapes_and_dtypes_are_refused(smem, n, v, dt, out, match):
  """Vocabularies that are not whole 256-wide rows of one TMA box, and non-bf16 logits or gradients."""
  with pytest.raises(ValueError, match=match):
    smem.check(n, v, dt, out)


def test_compare_counts_differing_gradient_entries(smem):
  """`compare`: lse max |diff|, equal targets, the fraction of differing gradient entries and their largest
  relative difference (one bf16 ulp at 0.5: 2^-8, relative 2^-7)."""
  d = jnp.full((4, 256), 0.5, jnp.bfloat16)
  want = (jnp.zeros(4), jnp.ones(4), d)
  got = (jnp.full(4, 1e-6), jnp.ones(4), d.at[1, 3].set(jnp.bfloat16(0.5) + jnp.bfloat16(2.0 ** -8)))
  stats = smem.compare(got, want)
  assert stats["target_equal"] and stats["lse_diff"] == pytest.approx(1e-6)
  assert stats["grad_frac_differ"] == 1 / 1024 and stats["grad_max_rel"] == 2.0 ** -7


def _h100_or_skip():
  try:
    from parcae.train.targets import target_devices
    return jax.sharding.SingleDeviceSharding(target_devices("h100")[0])
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no compile-only H100 target ({type(e).__name__})")


@pytest.mark.parametrize("knobs", [dict(), dict(ALIAS=True), dict(BUFFERS=2, SLICE=2048)])
def test_kernel_compiles_for_an_h100(smem, knobs):
  """With jax's CUDA plugin (compile-only H100; skipped without it): the kernel at the training shape
  [8192, 32768] lowers to a Mosaic GPU call and compiles (192 KB of row buffers in shared memory), through
  plgpu.kernel, through pallas_call with d over x (ALIAS), and with 2 buffers and narrower slices; outputs
  lse / target logit [N] float32 and d [N, V] bf16."""
  sh = _h100_or_skip()
  for k, v in knobs.items():
    setattr(smem, k, v)
  f = jax.jit(lambda x, t: smem.row_lse_grad_smem(x, t, 1.0 / (8 * V), jnp.bfloat16))
  lowered = f.lower(jax.ShapeDtypeStruct((N, V), jnp.bfloat16, sharding=sh),
                    jax.ShapeDtypeStruct((N,), jnp.int32, sharding=sh))
  assert "mosaic_gpu" in lowered.as_text()
  assert [(o.shape, o.dtype) for o in lowered.out_info] == [((N,), jnp.float32), ((N,), jnp.float32),
                                                            ((N, V), jnp.bfloat16)]
  lowered.compile()


def test_aliased_kernel_writes_over_donated_logits_without_a_copy(smem):
  """With the CUDA plugin: ALIAS (pallas_call, d over x) compiled with the logits donated has no copy of them
  (the [N, V] gradient lives in x's buffer); without donation XLA copies x once (the bench's timing case)."""
  sh = _h100_or_skip()
  smem.ALIAS = True
  x, t = (jax.ShapeDtypeStruct((N, V), jnp.bfloat16, sharding=sh), jax.ShapeDtypeStruct((N,), jnp.int32, sharding=sh))
  fn = lambda x, t: smem.row_lse_grad_smem(x, t, 1.0 / (8 * V), jnp.bfloat16)
  assert smem.copies(jax.jit(fn, donate_argnums=0), x, t) == 0
  assert smem.copies(jax.jit(fn), x, t) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not mk.hopper(), reason="the Mosaic GPU kernel runs on a Hopper GPU (H100 / H200) only")
@pytest.mark.parametrize("n,v,alias", [(8192, 32768, False), (8192, 32768, True), (300, 4096, False)])
def test_kernel_matches_the_triton_kernel_on_a_hopper_gpu(smem, n, v, alias):
  """On the GPU, logits of std 4 with row 0 shifted by +80: lse within 2e-6 relative of the Triton kernel's
  (float32 sums in another order), the same target logits, gradients equal but for entries one bf16 rounding
  apart (under 1e-3 of them), the target's entry negative in every row. n = 300: programs with 2 and 3 rows."""
  smem.ALIAS = alias
  x = (4.0 * jax.random.normal(jax.random.key(0), (n, v), jnp.float32)).at[0].add(80.0).astype(jnp.bfloat16)
  t = jax.random.randint(jax.random.key(1), (n,), 0, v)
  g = 1.0 / (8 * v)
  want = [np.asarray(a, np.float32) for a in jax.jit(lambda x, t: lse.row_lse_grad(x, t, g, jnp.bfloat16))(x, t)]
  got = [np.asarray(a, np.float32) for a in jax.jit(lambda x, t: smem.row_lse_grad_smem(x, t, g))(x, t)]
  np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=0)
  np.testing.assert_array_equal(got[1], want[1])
  stats = smem.compare(got, want)
  assert stats["grad_frac_differ"] < 1e-3 and stats["grad_max_rel"] <= 2.0 ** -7, stats
  assert np.all(got[2][np.arange(n), np.asarray(t)] < 0)
