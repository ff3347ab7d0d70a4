"""bench/generate.py's split check: passes on the real cached path, fails on a cached path that is off by one."""
import importlib.util
import os
import sys

import jax
import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench")
spec = importlib.util.spec_from_file_location("bench_generate", os.path.join(BENCH, "generate.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def smoke():
  model = bench.build("parcae", "small", smoke=True)  # tiny bf16 Parcae, random weights
  prompt = jax.random.randint(jax.random.key(0), (2, 10), 0, model.cfg.vocab_size)
  return model, prompt


def test_split_check_passes_on_the_cached_path(smoke):
  model, prompt = smoke
  r = bench.split_check(model, prompt, loops=3)
  assert r["split_ok"], r
  assert r["split_rel_diff_f32"] <= bench.SPLIT_F32_TOL
  assert 0 < r["split_rel_diff"] <= r["rounding_rel_diff"]  # bf16: nonzero, within its own rounding


def test_split_check_fails_when_decode_writes_the_wrong_position(smoke, monkeypatch):
  """A decode step that reads and writes the cache one position early (a classic off-by-one) must fail."""
  model, prompt = smoke
  real = bench.G.decode_step

  def early(model, cache, tok, **kw):
    return real(model, cache._replace(pos=cache.pos - 1), tok, **kw)

  monkeypatch.setattr(bench.G, "decode_step", early)
  r = bench.split_check(model, prompt, loops=3)
  assert not r["split_ok"], r
  assert r["split_rel_diff_f32"] > 100 * bench.SPLIT_F32_TOL, r
