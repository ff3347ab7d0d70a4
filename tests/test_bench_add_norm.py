"""bench/add_norm.py: its kernel path (the library's kernels at a launch shape) and XLA path agree."""
from conftest import load_bench
from parcae.model import add_norm


def test_kernel_and_xla_paths_agree(monkeypatch):
  an = load_bench("add_norm")
  for name in ("ROWS", "WARPS"):  # the bench sets the launch shape when tracing; restored afterwards
    monkeypatch.setattr(add_norm, name, getattr(add_norm, name))
  data = an.inputs(64, 768, seed=1)
  errs = an.compare(an.kernel_paths(32, 4, interpret=True)[1](*data), an.xla_paths()[1](*data))
  assert errs[0] == 0 and errs[1] <= 2.0 ** -7 and max(errs[2], errs[4]) <= 1e-6 and errs[3] <= 2.0 ** -7, errs


def test_smoke_run_with_sustain_records_each_kernel(tmp_path, monkeypatch):
  """`add_norm.py --smoke --sustain S` times the kernels' and XLA's forward + backward sustained too: each row
  of add_norm.json carries ms_sustained for both."""
  import json
  import sys
  for name in ("ROWS", "WARPS"):
    monkeypatch.setattr(add_norm, name, getattr(add_norm, name))
  monkeypatch.setenv("OUT", str(tmp_path))
  monkeypatch.setattr(sys, "argv", ["add_norm.py", "--smoke", "--sustain", "0.001"])
  load_bench("add_norm").main()
  rows = json.load(open(tmp_path / "add_norm.json"))["rows"]
  assert rows and all(r["sustained"]["ms_sustained"] > 0 and r["xla_sustained"]["ms_sustained"] > 0 for r in rows)
