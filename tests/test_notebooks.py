"""notebooks/scaling_laws.ipynb runs top to bottom against the current library (its code cells, executed in
order as Jupyter would, without Jupyter), and its synthetic sweep gives back the parameters it was built from."""
import json
import os
import tempfile

import numpy as np
import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "scaling_laws.ipynb")


def run_notebook(tmp_path, monkeypatch, results=None):
  import matplotlib
  matplotlib.use("Agg")
  monkeypatch.chdir(os.path.dirname(NOTEBOOK))  # relative paths resolve as in Jupyter
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the notebook's OUT = tempfile.mkdtemp()
  cells = ["".join(c["source"]) for c in json.load(open(NOTEBOOK))["cells"] if c["cell_type"] == "code"]
  setup = cells[0]
  assert "N_BOOT = 50" in setup and "RESULTS = None" in setup, "the notebook's settings cell changed"
  cells[0] = setup.replace("N_BOOT = 50", "N_BOOT = 5")  # fewer bootstrap resamples: seconds, not a minute
  if results:
    cells[0] = cells[0].replace("RESULTS = None", f"RESULTS = {results!r}")
  ns = {}
  for i, src in enumerate(cells):
    exec(compile(src, f"{os.path.basename(NOTEBOOK)}[code cell {i}]", "exec"), ns)  # noqa: S102
  return ns


def test_notebook_recovers_the_synthetic_truth(tmp_path, monkeypatch):
  ns = run_notebook(tmp_path, monkeypatch)
  true, iso, uni, tr = ns["TRUE"], ns["iso"], ns["uni"], ns["tr"]
  assert iso["a"] == pytest.approx(0.4, abs=0.03) and iso["b"] == pytest.approx(0.6, abs=0.03)
  for k in ("E", "X", "x", "y", "Z", "z"):  # 0.2 % noise: the unified fit lands within a few percent
    assert uni[k] == pytest.approx(true[k], rel=0.05), k
  assert tr["E"] == pytest.approx(true["E"] + true["Z"] * np.exp(-true["z"]), rel=0.02)  # read at T = mu
  assert np.mean([f["heldout_mape"] for f in ns["tt"]]) < 1.0
  assert len(ns["paths"]) == 8 and all(p.startswith(str(tmp_path)) and os.path.getsize(p) for p in ns["paths"])


def test_notebook_runs_on_the_measured_cpu_sweep(tmp_path, monkeypatch):
  ns = run_notebook(tmp_path, monkeypatch, results="../docs/sweep_small_results.csv")
  assert len(ns["table"].runs()) == 15
  assert np.isfinite([ns["uni"][k] for k in ("E", "X", "x", "Y", "y", "Z", "z")]).all()
  assert len(ns["iso"]["budgets"]) == 3
