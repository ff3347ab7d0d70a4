"""bench/wgrad.py: every formulation of the weight gradient it times computes x^T dy (smoke shapes, CPU)."""
from conftest import load_bench


def test_every_formulation_is_the_weight_gradient():
  """Each row (the model's autodiff, float32 result, hand-cut K, tokens-minor operands, four uses in one
  product) within 2^-7 of a float32 x^T dy relative to its largest entry; four uses reported per use."""
  bench = load_bench("wgrad")
  shapes = {s: (256, k // 64, n // 64) for s, (m, k, n) in bench.SHAPES.items() if s in ("small_qkv", "small_o")}
  rows = bench.child("default", shapes, bench.FORMS, iters=1, profile=False)
  assert len(rows) == len(shapes) * len(bench.FORMS) and all("error" not in r for r in rows), rows
  assert all(r["ok"] and r["rel_err"] < 2 ** -7 for r in rows), [(r["shape"], r["form"], r["rel_err"]) for r in rows]
  assert {r["form"] for r in rows} == set(bench.FORMS)
