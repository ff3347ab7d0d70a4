"""bench/hlo_static.py: kernels, bytes and GEMM FLOPs of an optimized GPU program, loop trip counts applied."""
import importlib.util
import os

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "bench", "hlo_static.py")
spec = importlib.util.spec_from_file_location("hlo_static", SCRIPT)
hlo_static = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hlo_static)

# The shape of an XLA GPU program (lines as a compile for an H100 prints them, attributes shortened): a loop
# of known trip count 8 around a cuBLAS GEMM and an elementwise fusion, a loop of data-dependent count, and
# a fusion in the entry computation. Fused computations are not kernels of their own.
HLO = """HloModule jit_step, is_scheduled=true

%fused_add (p0: f32[64,32], p1: bf16[64,32]) -> f32[64,32] {
  %p0 = f32[64,32]{1,0} parameter(0)
  %p1 = bf16[64,32]{1,0} parameter(1)
  %c = f32[64,32]{1,0} convert(%p1)
  ROOT %add = f32[64,32]{1,0} add(%p0, %c)
}

%body (param: (s32[], f32[64,32], bf16[64,128], bf16[128,32])) -> (s32[], f32[64,32], bf16[64,128], bf16[128,32]) {
  %param = (s32[], f32[64,32]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) parameter(0)
  %gte.1 = f32[64,32]{1,0} get-tuple-element(%param), index=1
  %gte.2 = bf16[64,128]{1,0} get-tuple-element(%param), index=2
  %gte.3 = bf16[128,32]{1,0} get-tuple-element(%param), index=3
  %custom-call.7 = (bf16[64,32]{1,0}, s8[4194304]{0}) custom-call(%gte.2, %gte.3), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %gte.4 = bf16[64,32]{1,0} get-tuple-element(%custom-call.7), index=0
  %loop_add_fusion = f32[64,32]{1,0} fusion(%gte.1, %gte.4), kind=kLoop, calls=%fused_add
  %gte.0 = s32[] get-tuple-element(%param), index=0
  ROOT %tuple = (s32[], f32[64,32]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) tuple(%gte.0, %loop_add_fusion, %gte.2, %gte.3)
}

%cond (param.1: (s32[], f32[64,32], bf16[64,128], bf16[128,32])) -> pred[] {
  %param.1 = (s32[], f32[64,32]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

%body2 (p: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p = (s32[], f32[16]{0}) parameter(0)
  %g = f32[16]{0} get-tuple-element(%p), index=1
  %loop_neg_fusion = f32[16]{0} fusion(%g), kind=kLoop, calls=%fused_add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %loop_neg_fusion)
}

%cond2 (p.1: (s32[], f32[16])) -> pred[] {
  %p.1 = (s32[], f32[16]{0}) parameter(0)
  ROOT %lt.1 = pred[] constant(true)
}

ENTRY %main (a: (s32[], f32[64,32], bf16[64,128], bf16[128,32]), b: (s32[], f32[16])) -> f32[64,32] {
  %a = (s32[], f32[64,32]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) parameter(0)
  %b = (s32[], f32[16]{0}) parameter(1)
  %while.1 = (s32[], f32[64,32]{1,0}, bf16[64,128]{1,0}, bf16[128,32]{1,0}) while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"8"},"known_init_step":{"init":"0","step":"1"}}
  %while.2 = (s32[], f32[16]{0}) while(%b), condition=%cond2, body=%body2
  %r = f32[64,32]{1,0} get-tuple-element(%while.1), index=1
  ROOT %input_reduce_fusion = f32[64,32]{1,0} fusion(%r), kind=kInput, calls=%fused_add
}
"""


def test_kernels_bytes_flops_and_trip_counts():
  ks, unknown = hlo_static.kernels(HLO)
  by_name = {k[2]: k for k in ks}
  assert set(by_name) == {"custom-call.7", "loop_add_fusion", "loop_neg_fusion", "input_reduce_fusion"}
  gemm = by_name["custom-call.7"]
  assert gemm[3] == 8  # inside the loop of 8
  assert gemm[4] == 64 * 32 * 2 + 64 * 128 * 2 + 128 * 32 * 2  # product (not the workspace) + both operands
  assert gemm[5] == 2 * 64 * 32 * 128
  assert by_name["loop_add_fusion"][3:5] == (8, 64 * 32 * 4 * 2 + 64 * 32 * 2)
  assert by_name["loop_neg_fusion"][3] == 1 and unknown == ["main/while.2"]
  assert by_name["input_reduce_fusion"][3:5] == (1, 2 * 64 * 32 * 4)
  s = hlo_static.summary(HLO)
  assert s["kinds"]["gemm"] == {"launches": 8, "GB": round(8 * gemm[4] / 1e9, 3),
                                "TFLOP": round(8 * gemm[5] / 1e12, 4)}
  assert s["kinds"]["fusion:kLoop"]["launches"] == 9 and s["loops_with_unknown_trip_count"] == ["main/while.2"]


# The same program with the source tables a compile prints between the module line and the first computation
# (as XLA prints them: a frame's parent_frame_id is its parent's id + 1, so 1 = none): the loop's fusion comes
# from model.py:12 `norm`, called from model.py:30 `block` under train.py:5 `step`; the entry fusion from
# model.py:30 `block` directly; the loop of unknown count's fusion carries no frame.
TABLES = """
FileNames
1 "/src/pkg/model.py"
2 "/src/pkg/train.py"

FunctionNames
1 "norm"
2 "Block.block"
3 "step"

FileLocations
1 {file_name_id=1 function_name_id=1 line=12 end_line=12 column=1 end_column=9}
2 {file_name_id=1 function_name_id=2 line=30 end_line=30 column=1 end_column=9}
3 {file_name_id=2 function_name_id=3 line=5 end_line=5 column=1 end_column=9}

StackFrames
1 {file_location_id=3 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=1 parent_frame_id=3}

"""


def test_sites_group_fusion_bytes_by_source_line():
  module, rest = HLO.split("\n", 1)
  hlo = (module + "\n" + TABLES + rest).replace(
      "kind=kLoop, calls=%fused_add\n  %gte.0",
      'kind=kLoop, calls=%fused_add, metadata={op_name="add" stack_frame_id=3}\n  %gte.0').replace(
      "kind=kInput, calls=%fused_add\n", 'kind=kInput, calls=%fused_add, metadata={stack_frame_id=2}\n')
  frames = hlo_static.stack_frames(hlo)
  assert frames == {"1": ["train.py:5 step"], "2": ["model.py:30 block", "train.py:5 step"],
                    "3": ["model.py:12 norm", "model.py:30 block", "train.py:5 step"]}
  add = 64 * 32 * 4 * 2 + 64 * 32 * 2
  assert hlo_static.sites(hlo, depth=2) == [
      ("model.py:12 norm < model.py:30 block", 8, 8 * add),
      ("model.py:30 block < train.py:5 step", 1, 2 * 64 * 32 * 4),
      ("?", 1, 16 * 4 + 16 * 4)]
  assert hlo_static.sites(HLO)[0][0] == "?"  # no tables: every kernel unattributed
  assert hlo_static.sites(hlo, kinds="__cublas")[0][:2] == ("?", 8)


def test_timed_sites_group_a_profiles_time_by_source_line():
  """Measured time per step by source line: the loop's add (8 calls over 2 steps) and the entry's reduction
  under their frames, an instruction without a frame and one not in the program under "?"."""
  module, rest = HLO.split("\n", 1)
  hlo = (module + "\n" + TABLES + rest).replace(
      "kind=kLoop, calls=%fused_add\n  %gte.0",
      'kind=kLoop, calls=%fused_add, metadata={op_name="add" stack_frame_id=3}\n  %gte.0').replace(
      "kind=kInput, calls=%fused_add\n", 'kind=kInput, calls=%fused_add, metadata={stack_frame_id=2}\n')
  ops = {"loop_add_fusion": [800.0, 16, "k"], "input_reduce_fusion": [300.0, 2], "custom-call.7": [100.0, 16],
         "gone.1": [20.0, 2]}
  got = hlo_static.timed_sites(hlo, ops, depth=1, steps=2)
  assert [r[:2] for r in got] == [("model.py:12 norm", 8), ("model.py:30 block", 1), ("?", 9)], got
  assert [round(r[2], 9) for r in got] == [0.4, 0.15, 0.06], got


# A chunk loop's fusions: one writes a chunk's [8, 32] float32 result into a [4, 8, 32] buffer in place (a
# dynamic-update-slice of its parameter), one reads a chunk of that buffer (a dynamic-slice) and converts it,
# one reads the whole buffer (a reduction over it) and the sliced parameter elsewhere as well.
SLICES = """HloModule jit_chunks, is_scheduled=true

%fused_dus (p0: f32[4,8,32], p1: f32[8,32], p2: s32[]) -> f32[4,8,32] {
  %p0 = f32[4,8,32]{2,1,0} parameter(0)
  %p1 = f32[8,32]{1,0} parameter(1)
  %b = f32[1,8,32]{2,1,0} bitcast(%p1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %dus = f32[4,8,32]{2,1,0} dynamic-update-slice(%p0, %b, %p2, %z, %z)
}

%fused_dus_view (v0: f32[32,32], v1: f32[8,32], v2: s32[]) -> f32[4,8,32] {
  %v0 = f32[32,32]{1,0} parameter(0)
  %vb = f32[4,8,32]{2,1,0} bitcast(%v0)
  %v1 = f32[8,32]{1,0} parameter(1)
  %b.1 = f32[1,8,32]{2,1,0} bitcast(%v1)
  %v2 = s32[] parameter(2)
  %z.3 = s32[] constant(0)
  ROOT %dus.1 = f32[4,8,32]{2,1,0} dynamic-update-slice(%vb, %b.1, %v2, %z.3, %z.3)
}

%fused_ds (q0: f32[4,8,32], q1: s32[]) -> bf16[1,8,32] {
  %q0 = f32[4,8,32]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z.1 = s32[] constant(0)
  %ds = f32[1,8,32]{2,1,0} dynamic-slice(%q0, %q1, %z.1, %z.1), dynamic_slice_sizes={1,8,32}
  ROOT %c = bf16[1,8,32]{2,1,0} convert(%ds)
}

%fused_both (r0: f32[4,8,32], r1: s32[]) -> (f32[1,8,32], f32[4,8,32]) {
  %r0 = f32[4,8,32]{2,1,0} parameter(0)
  %r1 = s32[] parameter(1)
  %z.2 = s32[] constant(0)
  %ds.1 = f32[1,8,32]{2,1,0} dynamic-slice(%r0, %r1, %z.2, %z.2), dynamic_slice_sizes={1,8,32}
  %n = f32[4,8,32]{2,1,0} negate(%r0)
  ROOT %t = (f32[1,8,32]{2,1,0}, f32[4,8,32]{2,1,0}) tuple(%ds.1, %n)
}

ENTRY %main (buf: f32[4,8,32], chunk: f32[8,32], i: s32[]) -> bf16[1,8,32] {
  %buf = f32[4,8,32]{2,1,0} parameter(0)
  %chunk = f32[8,32]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %loop_dynamic_update_slice_fusion = f32[4,8,32]{2,1,0} fusion(%buf, %chunk, %i), kind=kLoop, calls=%fused_dus
  %flat = f32[32,32]{1,0} bitcast(%buf)
  %loop_dynamic_update_slice_fusion.1 = f32[4,8,32]{2,1,0} fusion(%flat, %chunk, %i), kind=kLoop, calls=%fused_dus_view
  %loop_fusion.2 = (f32[1,8,32]{2,1,0}, f32[4,8,32]{2,1,0}) fusion(%loop_dynamic_update_slice_fusion, %i), kind=kLoop, calls=%fused_both
  ROOT %loop_convert_fusion = bf16[1,8,32]{2,1,0} fusion(%loop_dynamic_update_slice_fusion, %i), kind=kLoop, calls=%fused_ds
}
"""


def test_fusions_count_slices_and_in_place_updates_not_whole_buffers():
  by_name = {k[2]: k[4] for k in hlo_static.kernels(SLICES)[0]}
  chunk = 8 * 32 * 4
  assert by_name["loop_dynamic_update_slice_fusion"] == chunk + chunk + 4  # update read, written in place; index
  assert by_name["loop_dynamic_update_slice_fusion.1"] == chunk + chunk + 4  # the same through a bitcast view
  assert by_name["loop_convert_fusion"] == chunk + 4 + 8 * 32 * 2  # one chunk of the buffer read
  assert by_name["loop_fusion.2"] == 4 * chunk + 4 + chunk + 4 * chunk  # read whole (not only sliced)
