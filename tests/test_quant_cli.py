"""parcae quant-error: reads .npy/.npz, reports per format/scale rule, JSON output."""
import json

import numpy as np
import pytest

from parcae.quant.cli import quant_error_main


def test_quant_error_json(tmp_path, capsys):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "t.npz", a=rng.standard_normal((4, 64)).astype(np.float32),
           odd=np.ones((3, 7), np.float32))
  rc = quant_error_main(["--input", str(tmp_path / "t.npz"), "--formats", "mxfp4", "nvfp4",
                         "--scale-modes", "floor", "even", "--json"])
  assert rc == 0
  out = json.loads(capsys.readouterr().out)
  got = {(r["tensor"], r["format"], r["scale_mode"]): r for r in out["rows"]}
  assert set(got) == {("a", "mxfp4", "floor"), ("a", "mxfp4", "even"), ("a", "nvfp4", "floor"),
                      ("a", "nvfp4_1l", "floor")}
  assert any("odd" in n for n in out["notes"])
  r = got[("a", "mxfp4", "floor")]
  assert 0.003 < r["rel_mse"] < 0.05  # MXFP4 on N(0,1) is ~0.013 (spec)
  assert r["rel_mse"] == pytest.approx(r["mse"] / np.mean(np.load(tmp_path / "t.npz")["a"] ** 2 * 1.0))


def test_quant_error_gaussian_table(capsys):
  assert quant_error_main(["--gaussian", "4096", "--formats", "mxfp8_e4m3"]) == 0
  out = capsys.readouterr().out
  assert "gaussian" in out and out.count("mxfp8_e4m3") == 4


def test_quant_error_bad_args():
  with pytest.raises(ValueError, match="fmt must be one of"):
    quant_error_main(["--gaussian", "256", "--formats", "fp4"])
  with pytest.raises(SystemExit):
    quant_error_main(["--formats", "mxfp4"])


def test_quant_error_search_rows(capsys):
  """--search adds a ScaleSearch row after each max-based floor row; on N(0,1) NVFP4 it removes about a
  quarter of the squared error (the paper's 27%), and never adds error (the max-based scale is a candidate)."""
  assert quant_error_main(["--gaussian", "65536", "--formats", "nvfp4", "mxfp4", "--scale-modes", "floor",
                           "even", "--search", "--json"]) == 0
  rows = json.loads(capsys.readouterr().out)["rows"]
  search = {r["format"]: r for r in rows if r["scale_mode"] == "search"}
  assert set(search) == {"nvfp4", "nvfp4_1l", "mxfp4"}  # not after the "even" row
  for label, r in search.items():
    base = next(b for b in rows if b["format"] == label and b["scale_mode"] == "floor")
    assert r["mse"] <= base["mse"] and r["reduction"] == pytest.approx(1 - r["mse"] / base["mse"])
  assert 0.22 < search["nvfp4_1l"]["reduction"] < 0.32
  assert 0.0 < search["mxfp4"]["reduction"] < 0.15
