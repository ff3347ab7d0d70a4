"""bench/qkv_rope.py on a CPU (--smoke: the jnp stand-in for the fused kernel at a tiny shape)."""
from conftest import load_bench


def test_smoke_checks_and_times_both_paths(tmp_path, monkeypatch):
  """The check finds the stand-in equal to itself (no element differs) and every path and op is timed."""
  monkeypatch.setenv("OUT", str(tmp_path))
  out = load_bench("qkv_rope").main(["--smoke"])["tiny"]
  assert out["shape"] == [256, 256]
  assert all(v["differ"] == 0.0 for v in out["check"].values()) and set(out["check"]) == set("qkvr")
  for impl in ("unfused", "fused"):
    for op in ("fwd", "fwd_res", "vjp"):
      assert out[f"{impl}_{op}_ms"] > 0
  assert (tmp_path / "qkv_rope.json").exists()
