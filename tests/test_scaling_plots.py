"""Every scaling plot writes a non-empty PNG (valid signature) and SVG; the CLI's --plot-dir writes them too."""
import numpy as np
import pytest

from parcae.scaling import fit, plots, results

COLS = ("run", "mu", "params", "tokens", "flops", "loops", "val_loss", "budget")


@pytest.fixture(scope="module")
def table():
  """Small noiseless sweep: 3 budgets x 4 µ, each run evaluated at T in {1, 2, 4, 8, 12}."""
  cols = {c: [] for c in COLS}
  for C in (1e18, 2e18, 4e18):
    for mu in (1.0, 2.0, 4.0, 8.0):
      D = C / (2e8 * mu)
      base = 1.8 + 0.5 * mu ** -0.6 + 2800.0 * D ** -0.4
      for T in (1, 2, 4, 8, 12):
        row = (f"C{C:.0e}_mu{mu:g}", mu, 1.4e8, D, C, T, base + 0.8 * np.exp(-1.5 * T / mu), C)
        for c, v in zip(COLS, row):
          cols[c].append(v)
  cols["quant_recipe"] = ["bf16"] * len(cols["run"])
  return results.table_from_columns(cols)


def _check(paths):
  assert [p.rsplit(".", 1)[1] for p in paths] == ["png", "svg"]
  with open(paths[0], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(paths[1]) as f:
    svg = f.read()
  assert "<svg" in svg and len(svg) > 1000


def test_all_plots_write_png_and_svg(tmp_path, table):
  iso = fit.fit_isoflop(table, n_boot=10)
  train = fit.fit_training(table, n_boot=0, n_starts=64, heldout=False)
  tt = fit.fit_testtime(table.select(np.isin(table["run"], table.runs()[:3])), n_boot=0, n_starts=32)
  uni = fit.fit_unified(table, n_boot=0, n_starts=64, heldout=False)
  prec = fit.fit_precision(table, n_boot=0, n_starts=64, heldout=False)
  _check(plots.plot_isoflop(table, iso, str(tmp_path / "iso")))
  _check(plots.plot_frontier(table, train, str(tmp_path / "frontier")))
  _check(plots.plot_testtime(table, tt, str(tmp_path / "sub" / "tt")))  # creates missing folders
  for name, res in (("train", train), ("tt", tt), ("uni", uni), ("prec", prec)):
    _check(plots.plot_pred_vs_obs(table, res, str(tmp_path / f"po_{name}")))


def test_cli_plot_dir(tmp_path, table, capsys):
  path = tmp_path / "r.csv"
  names = list(table.columns)
  lines = [",".join(names)] + [",".join(str(table[c][i]) for c in names) for i in range(len(table))]
  path.write_text("\n".join(lines) + "\n")
  out = tmp_path / "plots"
  assert fit.fit_main(["--results", str(path), "--law", "isoflop", "--n-boot", "5", "--plot-dir", str(out)]) == 0
  _check([str(out / "isoflop.png"), str(out / "isoflop.svg")])
  assert "wrote" in capsys.readouterr().err
