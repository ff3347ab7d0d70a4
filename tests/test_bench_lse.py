"""bench/lse.py: the candidate gradient kernels it times compute what the library's kernel computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_bench
from parcae.model import lse

@pytest.mark.parametrize("three", [False, True])
@pytest.mark.parametrize("hot", [True, False])
def test_variants_match_the_library_kernel(three, hot, monkeypatch):
  """Over 4 column tiles: the same log-sum-exp within 2e-6, the same target logits, and gradients equal but
  for entries one bf16 rounding apart (their float32 log-sum-exps differ in the last bits)."""
  monkeypatch.setattr(lse, "GRAD_COLS", 512)
  bench = load_bench("lse")
  x = (4.0 * jax.random.normal(jax.random.key(0), (16, 2048), jnp.float32)).at[3].add(50.0).astype(jnp.bfloat16)
  t = jax.random.randint(jax.random.key(1), (16,), 0, 2048)
  want = [np.asarray(a, np.float32) for a in lse.row_lse_grad(x, t, 0.01, jnp.bfloat16)]
  got = [np.asarray(a, np.float32) for a in bench.variant_lse_grad(x, t, 0.01, jnp.bfloat16, three=three, hot=hot)]
  np.testing.assert_allclose(got[0], want[0], rtol=2e-6, atol=0)
  np.testing.assert_array_equal(got[1], want[1])
  rel = np.abs(got[2] - want[2]) / np.maximum(np.abs(want[2]), 1e-30)
  assert rel.max() <= 2.0 ** -7 and (got[2] != want[2]).mean() < 1e-3, (rel.max(), (got[2] != want[2]).mean())
  rows = np.arange(16)
  assert np.all(want[2][rows, np.asarray(t)] < 0)  # the one-hot is in both (the fix-up path writes it outside)
  np.testing.assert_array_equal(got[2][rows, np.asarray(t)], want[2][rows, np.asarray(t)])


def test_grad_smoke_run_with_sustain_records_each_kernel(tmp_path, monkeypatch):
  """`lse.py --grad --smoke --sustain S` times the library kernel and the two-pass path sustained too: each row
  of lse_grad.json carries ms_sustained (here, without nvidia-smi, no clock or energy fields); `--hints` adds
  the library kernel with its L2 hints (same results as without, up to the one-rounding flips both have)."""
  import json
  import sys
  for name in ("GRAD_ROWS", "GRAD_COLS", "GRAD_WARPS", "GRAD_STAGES", "GRAD_EVICT", "GRAD_REVERSE"):  # the sweep sets them; restored after
    monkeypatch.setattr(lse, name, getattr(lse, name))
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(sys, "argv", ["lse.py", "--grad", "--smoke", "--sustain", "0.001", "--hints",
                                    "none,evict+reverse"])
  load_bench("lse").main()
  rows = json.load(open(tmp_path / "lse_grad.json"))["rows"]
  assert rows and all(r["sustained"]["ms_sustained"] > 0 and r["before_sustained"]["ms_sustained"] > 0 for r in rows)
  by = {r["variant"]: r for r in rows}
  assert set(by) == {"library", "library+evict+reverse"} and by["library+evict+reverse"]["hint"] == "evict+reverse"
  assert all(by[k]["lse_diff"] < 1e-5 and by[k]["grad_frac_differ"] < 1e-3 for k in by), by


def test_inplace_check_finds_the_same_bits(monkeypatch, tmp_path):
  """bench/lse.py --inplace (smoke, interpret mode): the in-place bf16 gradient equals the float32 path's rounded
  once, with equal log-sum-exps and target logits."""
  import argparse
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(lse, "GRAD_COLS", 512)
  (row,) = load_bench("lse").inplace_main(argparse.Namespace(smoke=True, chunks="", vocab=0))
  assert row["lse_equal"] and row["target_equal"] and row["grad_equal_fraction"] == 1.0, row
