"""bench/pingpong_mlp.py: the ping-pong GEMM run by Pallas' GPU interpreter on the CPU (simulated shared
memory, barriers, TMA copies and wgmma): every output tile written with the right values, every barrier phase
observed by the threads that wait on it (the interpreter raises otherwise), no data race between the memory
warpgroup's copies and the compute warpgroups' reads."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import pingpong_mlp  # noqa: E402
from parcae.model import mlp_kernels  # noqa: E402

gpu_interpret = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params",
                                    reason="this jax has no Pallas GPU interpreter")
callbacks = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.gpu_callbacks")


@pytest.mark.parametrize("op,stages,piece,schedule,swizzle", [
    ("gemm", 3, 64, "pingpong", False), ("fwd", 2, 128, "pingpong", False), ("pair", 3, 64, "pingpong", False),
    ("bwd", 2, 128, "pingpong", False), ("gemm", 3, 64, "concurrent", False), ("bwd", 2, 128, "concurrent", False),
    ("pair", 3, 64, "pingpong", True)])
def test_pingpong_kernel_under_the_gpu_interpreter(op, stages, piece, schedule, swizzle):
  """9 tiles of [128, 128] over 2 programs: program 0 runs pairs 0, 2, 4 (pair 4 without its odd tile), program 1
  pairs 1, 3; 4 K steps through rings of 2-3 stages, so stages are reused within a tile and across tiles. The
  concurrent schedule (both K loops at once, stages fed alternately) and swizzled output buffers through the
  same checks."""
  m, k, n = 384, 256, 384
  x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(1), (k, n)) / 16).astype(jnp.bfloat16)
  h = jax.random.normal(jax.random.key(2), (m, n), jnp.bfloat16)
  callbacks.reset_gpu_interpret_mode_state()
  # bwd: h fetched during the K loop and read in the epilogue; w as [K, N] (trans_b=False: the interpreter
  # has no transposed wgmma operand, so the GPU run's error check is the transposed load's only test)
  got = pingpong_mlp.pingpong(x, w, op, stages, piece, num_sms=2,
                              interpret=gpu_interpret.InterpretGPUParams(detect_races=True),
                              h_MxN=h if op == "bwd" else None, trans_b=False, schedule=schedule,
                              out_swizzle=swizzle)
  assert not callbacks.get_races().races_found
  want = {"gemm": lambda: (jnp.dot(x, w),), "fwd": lambda: (mlp_kernels.relu2(jnp.dot(x, w)),),
          "pair": lambda: (jnp.dot(x, w), mlp_kernels.relu2(jnp.dot(x, w))),
          "bwd": lambda: (jnp.dot(x, w) * jnp.maximum(h, 0),)}[op]()
  assert len(got) == len(want)
  for a, b in zip(got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    # both round a float32 sum of the same products to bf16: equal but where the summation orders round apart
    np.testing.assert_allclose(a, b, rtol=2 ** -7, atol=2 ** -8 * np.abs(b).max())
    assert np.mean(a != b) < 0.02


@pytest.mark.parametrize("schedule", ["pingpong", "concurrent"])
def test_k_loops_alone_release_every_stage(schedule):
  """op "kloop" stores nothing: its barriers still complete in order (the interpreter raises on a phase left
  unobserved, and a missing release hangs) and no copy races a wgmma's read."""
  x = jax.random.normal(jax.random.key(0), (384, 256), jnp.bfloat16)
  w = jax.random.normal(jax.random.key(1), (256, 384), jnp.bfloat16)
  callbacks.reset_gpu_interpret_mode_state()
  (out,) = pingpong_mlp.pingpong(x, w, "kloop", 3, 64, num_sms=2, trans_b=False, schedule=schedule,
                                 interpret=gpu_interpret.InterpretGPUParams(detect_races=True))
  assert out.shape == (384, 384) and not callbacks.get_races().races_found


def test_unknown_schedule_names_the_valid_ones():
  x = jnp.zeros((256, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="pingpong.*concurrent"):
    pingpong_mlp.pingpong(x, x, "gemm", schedule="cooperative", interpret=True)
