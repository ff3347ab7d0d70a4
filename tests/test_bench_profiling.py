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


def test_cublas_calls_are_described_by_their_shapes():
  """A GPU program's cuBLAS call (text as XLA prints it) is named by result = operands and contracting dims."""
  hlo = """
  %a.1 = bf16[32768,768]{1,0} parameter(0)
  %b.2 = bf16[768,3072]{1,0} parameter(1)
  %custom-call.7 = (bf16[32768,3072]{1,0}, s8[33554432]{0}) custom-call(%a.1, %b.2), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_batch_dimensions":[],"lhs_contracting_dimensions":["1"],"rhs_batch_dimensions":[],"rhs_contracting_dimensions":["0"]},"epilogue":"RELU"}}
"""
  desc = profiling.describe_fusions(hlo)
  assert desc["custom-call.7"] == "bf16[32768,3072] = bf16[32768,768] x bf16[768,3072] (contracting 1, 0)"


def test_idle_gaps_sum_the_waits_between_kernels_by_the_pair_around_them():
  events = [(30, 10, "a"), (0, 10, "a"), (15, 5, "b"), (45, 5, "b"), (50, 1, "c"), (52, 3, "a")]  # unsorted
  g = profiling.idle_gaps(events)
  assert g["busy_ms"] == 34 / 1e3 and g["span_ms"] == 55 / 1e3
  assert abs(g["idle_ms"] - (5 + 10 + 5 + 1) / 1e3) < 1e-12
  assert dict(g["by_pair"]) == {("a", "b"): (0.01, 2), ("b", "a"): (0.01, 1), ("c", "a"): (0.001, 1)}
  assert g["by_pair"][-1][0] == ("c", "a")  # largest first


def test_memsets_are_summed_by_the_kernel_after_them():
  stream = [(0, 2, "Memset 3"), (3, 1, "Memset 3"), (5, 10, "nvjet_gemm"), (20, 4, "Memset 3"), (30, 9, "cudnn_bwd"),
            (40, 3, "Memset 3")]
  other = [(1, 5, "Memset 3"), (9, 2, "fusion_1")]
  events = [{"ph": "X", "name": "Memset 3", "dur": 2, "args": {"bytes": 64}}]
  got = profiling.memsets_by_next_kernel({(1, 1): stream, (1, 2): other}, events)
  assert got["count"] == 5 and abs(got["ms"] - 15e-3) < 1e-12 and got["args"] == {"bytes": 64}
  assert dict(got["by_next"]) == {"nvjet_gemm": (3e-3, 2), "fusion_1": (5e-3, 1), "cudnn_bwd": (4e-3, 1),
                                  "(end)": (3e-3, 1)}


def test_clock_samples_are_summarised_and_junk_lines_skipped():
  text = ("1980, 120.5, Not Active, Not Active\n"
          "1500, 690.0, Active, Not Active\n"
          "[N/A], [N/A], [N/A], [N/A]\n"
          "1740, 650.5, Active, Not Active\n"
          "17")  # cut off when the sampler was stopped
  s = profiling.parse_clock_samples(text)
  assert s["samples"] == 3
  assert s["clock_mhz_mean"] == (1980 + 1500 + 1740) / 3 and s["clock_mhz_min"] == 1500
  assert s["power_w_max"] == 690.0 and abs(s["power_w_mean"] - (120.5 + 690 + 650.5) / 3) < 1e-9
  assert s["power_capped"] == 2 / 3 and s["hw_slowdown"] == 0
  assert profiling.parse_clock_samples("") == {}


def test_clock_sampler_without_nvidia_smi_is_empty(monkeypatch):
  monkeypatch.setenv("PATH", "/nonexistent")
  with profiling.GpuClocks() as c:
    pass
  assert c.summary() == {}


def test_sustained_timing_reports_energy_per_call(monkeypatch):
  """bench/profiling.sustained (fused_mlp.py and attention.py --sustain): ms per call over back-to-back calls, with the sampled clock and power and
  their product, the energy per call (here a stand-in sampler: this machine has no GPU)."""
  fm = profiling

  class Fake:
    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def summary(self):
      return {"clock_mhz_mean": 1650.0, "power_w_mean": 660.0}
  monkeypatch.setattr(fm, "GpuClocks", Fake)
  calls = []
  r = fm.sustained(lambda a: calls.append(1) or a + 1, (jnp.ones(4),), 7)
  assert len(calls) == 8  # one warm-up call, then the timed ones
  assert r["clock_mhz_mean"] == 1650.0 and r["ms_sustained"] > 0
  assert abs(r["mj_per_call"] - 660.0 * r["ms_sustained"]) < 1e-3 * 660  # W x ms = mJ (ms rounded to 1e-4)
  monkeypatch.setattr(fm, "GpuClocks", type("NoGpu", (Fake,), {"summary": lambda self: {}}))
  assert "mj_per_call" not in fm.sustained(lambda a: a, (jnp.ones(4),), 2)


def test_two_profiles_are_compared_by_kind_and_by_the_work_each_op_does(tmp_path, capsys):
  """Ops are matched across programs by what they compute (description, else the name without XLA's numbering),
  per step, largest change first; the CLI prints the same."""
  old = {"total_us": 4000.0, "by_kind_us": {"gemm": 3000.0, "elementwise fusion": 1000.0},
         "ops": {"nvjet_a": [3000.0, 4], "loop_add_fusion_7": [600.0, 2, "f32[8] fwd add"],
                 "loop_mul_fusion_3": [400.0, 2]}}
  new = {"total_us": 3600.0, "by_kind_us": {"gemm": 3000.0, "elementwise fusion": 500.0, "custom kernel": 100.0},
         "ops": {"nvjet_a": [3000.0, 4], "loop_add_fusion_9": [200.0, 2, "f32[8] fwd add"],
                 "loop_mul_fusion_12": [300.0, 2], "closing_norm": [100.0, 2]}}
  c = profiling.compare_profiles(old, new, steps=2)
  assert c["total_ms"] == (2.0, 1.8)
  assert c["by_kind_ms"]["elementwise fusion"] == (0.5, 0.25) and c["by_kind_ms"]["custom kernel"] == (0.0, 0.05)
  assert c["moved_ms"][0] == ("f32[8] fwd add", 0.3, 0.1)  # fusion_7 and fusion_9: the same work
  assert c["moved_ms"][1] == ("loop_mul_fusion", 0.2, 0.15)
  assert ("closing_norm", 0.0, 0.05) in c["moved_ms"] and ("nvjet_a", 1.5, 1.5) in c["moved_ms"]
  import json
  (tmp_path / "o.json").write_text(json.dumps(old))
  (tmp_path / "n.json").write_text(json.dumps(new))
  profiling._diff_main([str(tmp_path / "o.json"), str(tmp_path / "n.json")])
  out = capsys.readouterr().out
  assert "old 2.00 ms, new 1.80 ms (-0.20)" in out and "-0.200  f32[8] fwd add" in out


def test_profiles_with_instruction_tables_match_gemms_by_shape_not_by_the_cublas_kernel_picked():
  """Where both files have the per-instruction table, a GEMM is matched by its shapes: the autotuner may pick
  another cuBLAS kernel for the same GEMM in each program, which matching by kernel name reads as work moved.
  Other instructions are matched by instruction and kernel without XLA's numbering; a file without the table
  falls back to the per-kernel match."""
  gemm = "bf16[8,4] = bf16[8,2] x bf16[2,4] (contracting 1, 0)"
  old = {"total_us": 3000.0, "by_kind_us": {"gemm": 2000.0, "custom kernel": 1000.0},
         "ops": {"nvjet_x": [2000.0, 2], "_grad_kernel": [1000.0, 2]},
         "hlo_ops": {"custom-call.3": [2000.0, 2, "nvjet_x", gemm], "pallas_call.7": [1000.0, 2, "_grad_kernel"]}}
  new = {"total_us": 2800.0, "by_kind_us": {"gemm": 1900.0, "custom kernel": 900.0},
         "ops": {"nvjet_y": [1900.0, 2], "_grad_kernel": [900.0, 2]},
         "hlo_ops": {"custom-call.5": [1900.0, 2, "nvjet_y", gemm], "pallas_call.2": [900.0, 2, "_grad_kernel"]}}
  moved = profiling.compare_profiles(old, new, steps=2)["moved_ms"]
  assert len(moved) == 2 and moved[0] == (gemm, 1.0, 0.95), moved
  assert moved[1] == ("pallas_call: _grad_kernel", 0.5, 0.45)
  moved = profiling.compare_profiles(old, {k: v for k, v in new.items() if k != "hlo_ops"}, steps=2)["moved_ms"]
  assert moved[0] == ("nvjet_x", 1.0, 0.0) and ("nvjet_y", 0.0, 0.95) in moved
