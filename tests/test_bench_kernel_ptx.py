"""bench/kernel_ptx.py: its PTX parsing and its bank-conflict model (the compile itself needs jax's CUDA plugin)."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import kernel_ptx  # noqa: E402


def test_bank_conflicts_of_the_wgmma_layout():
  # 8 rows x 4 words per warp: a pitch of 32 banks puts all 8 rows on the same 4 banks
  assert kernel_ptx.conflict_ways(128, swizzled=False) == 8
  assert kernel_ptx.conflict_ways(256, swizzled=False) == 8
  assert kernel_ptx.conflict_ways(128, swizzled=True) == 1
  # a padded row (33 words) shifts each row by one bank: rows r and words w meet on bank r + w, at most 4 lanes
  assert kernel_ptx.conflict_ways(132, swizzled=False) == 4


def test_shared_memory_accesses_are_counted_with_their_address_registers():
  ptx = """
	st.shared.b32 	[%rd2], %r230;
	st.shared.b32 	[%rd2+1024], %r231;
	st.shared.b32 	[%rd3+16], %r232;
	ld.shared.v2.b16 	{%rs13, %rs14}, [%rd4];
	st.global.b32 	[%rd9], %r1;
	cp.async.bulk.wait_group.read 	0;
"""
  assert kernel_ptx.smem_accesses(ptx) == {"st.shared.b32": (3, 2), "ld.shared.v2.b16": (1, 1)}
