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
