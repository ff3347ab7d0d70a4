"""Read and validate the tidy sweep results table (CSV or Parquet) without pandas.

One row per run x step x test-time loop count. Required columns:

  run       run name (string)
  mu        mean training recurrence of the run
  params    parameter count of the model (fixed within a sweep)
  tokens    training tokens consumed when the row was evaluated
  flops     training FLOPs consumed when the row was evaluated
  loops     test-time loop count T the loss was measured at
  val_loss  validation loss (nats/token)

Any other column (`budget`, `model`, `quant_recipe`, `step`, ...) is kept: numeric when every value parses
as a float, otherwise as strings.

Non-finite losses: `on_nonfinite="drop"` (default) drops those rows with a `warnings.warn` naming the runs;
`on_nonfinite="error"` refuses the table. A diverged run is common in sweeps; dropping keeps the rest usable
while the warning keeps it visible.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import warnings

import numpy as np

REQUIRED = ("run", "mu", "params", "tokens", "flops", "loops", "val_loss")
NUMERIC = ("mu", "params", "tokens", "flops", "loops", "val_loss")
NONFINITE_MODES = ("drop", "error")


class ResultsError(ValueError):
  """The results table cannot be used as given (the message names the problem and the fix)."""


@dataclasses.dataclass
class Table:
  """Columns of equal length: name -> 1-D numpy array (float64 or str)."""

  columns: dict[str, np.ndarray]

  def __len__(self) -> int:
    return len(next(iter(self.columns.values()))) if self.columns else 0

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self.columns:
      raise ResultsError(f"results table has no column {name!r}; columns: {sorted(self.columns)}")
    return self.columns[name]

  def __contains__(self, name: str) -> bool:
    return name in self.columns

  def select(self, mask: np.ndarray) -> "Table":
    """Rows where `mask` (bool array or integer index array) selects."""
    return Table({k: v[mask] for k, v in self.columns.items()})

  def runs(self) -> list[str]:
    """Run names in order of first appearance."""
    names, first = np.unique(self["run"], return_index=True)
    return [str(n) for n in names[np.argsort(first)]]


def _as_column(values) -> np.ndarray:
  """Float64 column when every value parses as a float, else a string column."""
  try:
    return np.asarray([float(v) for v in values], dtype=np.float64)
  except (TypeError, ValueError):
    return np.asarray([str(v) for v in values], dtype=str)


def table_from_columns(columns: dict, on_nonfinite: str = "drop") -> Table:
  """Validated Table from a dict of equal-length sequences (used by the loaders and by tests)."""
  cols = {}
  for k, v in columns.items():
    v = list(v)
    cols[str(k)] = np.asarray([str(x) for x in v], dtype=str) if k == "run" else _as_column(v)
  return validate(Table(cols), on_nonfinite=on_nonfinite)


def _read_csv(path: str) -> dict[str, list]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
      raise ResultsError(f"results file {path!r} is empty; expected a header row with {list(REQUIRED)}")
    rows = list(reader)
  return {name: [r[name] for r in rows] for name in reader.fieldnames}


def _read_parquet(path: str) -> dict[str, list]:
  try:
    import pyarrow.parquet as pq
  except ImportError as e:  # pyarrow is an optional (dev) dependency
    raise ResultsError(f"reading {path!r} needs pyarrow (pip install pyarrow), or write the table as CSV") from e
  return pq.read_table(path).to_pydict()


def load_results(path: str, on_nonfinite: str = "drop") -> Table:
  """Load a results table from .csv or .parquet and validate it (see module docstring)."""
  if not os.path.exists(path):
    raise ResultsError(f"results file {path!r} does not exist; pass --results with a .csv or .parquet file")
  ext = os.path.splitext(path)[1].lower()
  if ext == ".csv":
    raw = _read_csv(path)
  elif ext in (".parquet", ".pq"):
    raw = _read_parquet(path)
  else:
    raise ResultsError(f"results file {path!r} has extension {ext!r}; use .csv or .parquet")
  return table_from_columns(raw, on_nonfinite=on_nonfinite)


def validate(table: Table, on_nonfinite: str = "drop") -> Table:
  """Check required columns, types and losses; return the table with non-finite-loss rows dropped."""
  if on_nonfinite not in NONFINITE_MODES:
    raise ResultsError(f"on_nonfinite={on_nonfinite!r}; allowed: {NONFINITE_MODES}")
  missing = [c for c in REQUIRED if c not in table.columns]
  if missing:
    raise ResultsError(f"results table is missing column(s) {missing}; required: {list(REQUIRED)}")
  if len(table) == 0:
    raise ResultsError("results table is empty (no rows); run the sweep first or point --results at its output")
  for c in NUMERIC:
    if table[c].dtype.kind != "f":
      raise ResultsError(f"column {c!r} must be numeric; found non-numeric values such as {table[c][0]!r}")
  for c in ("mu", "params", "tokens", "flops", "loops"):
    bad = ~(np.isfinite(table[c]) & (table[c] > 0))
    if bad.any():
      runs = sorted(set(table["run"][bad].tolist()))
      raise ResultsError(f"column {c!r} must be finite and > 0; {int(bad.sum())} bad row(s) in runs {runs}")
  bad = ~np.isfinite(table["val_loss"]) | (table["val_loss"] <= 0)
  if bad.any():
    runs = sorted(set(table["run"][bad].tolist()))
    msg = f"{int(bad.sum())} row(s) with non-finite or non-positive val_loss in runs {runs}"
    if on_nonfinite == "error":
      raise ResultsError(msg + "; drop those runs, or load with on_nonfinite='drop'")
    warnings.warn(msg + "; dropping them", stacklevel=2)
    table = table.select(~bad)
    if len(table) == 0:
      raise ResultsError("results table has no rows left after dropping non-finite losses")
  return table


def require_points(n: int, needed: int, what: str) -> None:
  """Raise a clear error when a fit has fewer data points than it needs."""
  if n < needed:
    raise ResultsError(f"{what}: {n} point(s), need at least {needed}; add runs / loop counts to the sweep")


def final_rows(table: Table) -> Table:
  """For each run, the rows at its last evaluation (largest `step` if present, else largest `tokens`)."""
  key = table["step"] if "step" in table and table["step"].dtype.kind == "f" else table["tokens"]
  keep = np.zeros(len(table), dtype=bool)
  runs = table["run"]
  for r in np.unique(runs):
    idx = runs == r
    keep |= idx & (key == key[idx].max())
  return table.select(keep)


def eval_rows(table: Table, eval_loops: str | int = "mu") -> Table:
  """Final rows of each run at its evaluation loop count: T = round(mu) (eval_loops='mu') or a fixed T."""
  fin = final_rows(table)
  if eval_loops == "mu":
    target = np.round(fin["mu"])
  else:
    try:
      target = np.full(len(fin), float(eval_loops))
    except ValueError as e:
      raise ResultsError(f"eval_loops={eval_loops!r}; use 'mu' or an integer loop count") from e
  sel = fin.select(np.isclose(fin["loops"], target))
  lacking = sorted(set(fin.runs()) - set(sel.runs()))
  if lacking:
    raise ResultsError(f"runs {lacking} have no final row at loops == {eval_loops} "
                       "(the training law needs each run's loss at its eval loop count); "
                       "pass eval_loops=<T> for a loop count every run has")
  _, first = np.unique(sel["run"], return_index=True)
  return sel.select(np.sort(first))


def where(table: Table, conditions: dict) -> Table:
  """Rows where every column equals its value (numeric columns compare as floats)."""
  keep = np.ones(len(table), dtype=bool)
  for col, val in conditions.items():
    data = table[col]
    try:
      keep &= np.isclose(data, float(val)) if data.dtype.kind == "f" else data == str(val)
    except ValueError as e:
      raise ResultsError(f"column {col!r} is numeric; {val!r} is not a number") from e
  if not keep.any():
    raise ResultsError(f"no rows match {conditions}; check the column values in the results table")
  return table.select(keep)


def require_single(table: Table, cols=("params", "model", "quant_recipe")) -> None:
  """Fixed-size laws need one model at one precision: refuse a table that mixes them."""
  for col in cols:
    if col in table:
      vals = np.unique(table[col])
      if len(vals) > 1:
        shown = [v.item() if hasattr(v, "item") else v for v in vals[:5]]
        raise ResultsError(f"results table mixes {len(vals)} {col} values {shown}; these laws hold at one "
                           f"model size and precision: select one with --where {col}=VALUE")
