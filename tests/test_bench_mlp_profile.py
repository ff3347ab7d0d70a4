"""bench/mlp_profile.py: the in-kernel profiler's trace parser on a synthetic two-tile trace (the profiler itself
runs only on a Hopper GPU), and the profile buffer's size per kernel."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import mlp_profile  # noqa: E402
from parcae.model import mlp_kernels as mk  # noqa: E402


def test_parser_splits_each_tile_into_its_k_loop_and_epilogue():
  """K loop 690 cycles a tile (refill 90 before the first wgmma, wgmmas 500, 100 between them), epilogue 290
  (store 100, store wait 100, the rest 90), one 20-cycle gap over two tiles (check_parser's asserts)."""
  mlp_profile.check_parser()


def test_profile_space_counts_every_region_of_the_busiest_warpgroup(monkeypatch):
  """parcae-small's MLP (32768 x 768 -> 3072) on 132 SMs in 2-SM clusters: 128 row-tile pairs x 12 column
  tiles over 66 clusters, so a compute warpgroup runs at most 24 tiles. Detail 1: kloop + epilogue per tile;
  detail 3 for the pair-like kernel with an h fetch (2 outputs of 2 pieces of 64 columns): + tile, math,
  h_fetch, h_wait, 4 per stored piece (4 pieces) and 12 K steps; + the drain and the trace's 2-entry header
  (counted by hand; an undersized buffer is undefined behaviour in the profiler)."""
  m, k, n = 32768, 768, 3072
  monkeypatch.setattr(mk, "PROFILE_DETAIL", 1)
  assert mk.profile_space(m, k, n, 1, 128, False, num_sms=132) == 24 * 2 + 3
  monkeypatch.setattr(mk, "PROFILE_DETAIL", 3)
  assert mk.profile_space(m, k, n, 2, 64, True, num_sms=132) == 24 * (2 + 4 + 4 * 4 + 12) + 3


def test_smem_probe_tells_fitting_from_overflowing_buffers():
  """With jax's CUDA plugin (compile-only H100; skipped without it): the library's GEMM (4 stages, [128, 64]
  pieces) fits an H100's shared memory, and the same with 64 KB more at 3 stages is refused as too large."""
  import pytest
  try:
    from parcae.train.targets import target_devices
    target_devices("h100")
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"no compile-only H100 target ({type(e).__name__})")
  out = mlp_profile.smem_probe(extra_kbs=(0, 64), shapes=((4, 64), (3, 64)))
  assert out[(0, 4, 64)] is None and out[(0, 3, 64)] is None, out
  assert "exceeds available shared memory" in out[(64, 3, 64)], out
