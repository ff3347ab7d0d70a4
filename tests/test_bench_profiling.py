"""bench/profiling.py: naming what a profiled fusion computes, and the coarse kernel classes."""
import importlib.util
import os

import jax
import jax.numpy as jnp

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "profiling.py")
spec = importlib.util.spec_from_file_location("profiling", SCRIPT)
profiling = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profiling)


def test_fusions_are_described_by_shape_pass_and_op_under_both_spellings():
  """On a real optimized program (this CPU's): every fusion gets its output shape and whether the backward
  pass made it, under the HLO's name (`fusion.3`) and the profiler's (`fusion_3`)."""
  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)
  w, x = jnp.ones((16, 32)), jnp.ones((8, 16))
  hlo = jax.jit(jax.grad(loss)).lower(w, x).compile().as_text()
  desc = profiling.describe_fusions(hlo)
  assert desc, hlo[:2000]
  dotted = [k for k in desc if "." in k]
  for k in dotted:
    assert desc[k] == desc[k.replace(".", "_")]
  assert any(" bwd " in v for v in desc.values()) and any(" fwd " in v for v in desc.values()), desc
  assert all(v.split()[0].startswith(("f32[", "(")) for v in desc.values()), desc


def test_kernel_classes():
  assert profiling.op_kind("nvjet_sm90_tst_128x128_64x6_2x1_v_bz_NNT") == "gemm"
  assert profiling.op_kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
  assert profiling.op_kind("input_reduce_fusion_92") == "reduction fusion"
  assert profiling.op_kind("loop_multiply_fusion_25") == "elementwise fusion"
  assert profiling.op_kind("_fwd_kernel") == "custom kernel"
  assert profiling.op_kind("Memset 0") == "copy / transpose"
