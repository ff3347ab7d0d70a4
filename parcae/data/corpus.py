"""Where documents come from: the embedded default corpus and readers for txt / JSONL / parquet files.

Embedded corpus: the Python standard library's own sources, which ship with every Python and need no
download. One document per `.py` file under `sysconfig.get_paths()["stdlib"]` (code, comments and
docstrings: real English prose mixed with code) plus the `LICENSE.txt` next to them, read in sorted
relative-path order. Test suites, site-packages, compiled-extension folders and the `encodings/` codec
tables are left out. The text is a pure function of the installed Python version (about 11 MB on 3.11).

Train / validation split: a document goes to "val" iff the SHA-256 of its name (the path relative to the
stdlib folder) falls below `val_fraction` (default 3%); the same rule splits files in `data_pipelines.shard`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
from typing import Iterator

VAL_FRACTION = 0.03  # share of embedded documents (by name hash) in the "val" split
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                        "lib-dynload", "encodings", "ensurepip"})
SPLITS = ("train", "val")


def is_val(name: str, val_fraction: float) -> bool:
  """Deterministic split rule: the first 8 bytes of sha256(name) as a fraction of 2**64."""
  h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
  return h < val_fraction * 2.0**64


def _stdlib_files() -> list[tuple[str, str]]:
  """(relative name, absolute path) of the embedded corpus files, in sorted order."""
  root = sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
    for f in sorted(filenames):
      if f.endswith(".py") or (f == "LICENSE.txt" and dirpath == root):
        full = os.path.join(dirpath, f)
        out.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
  out.sort()
  if not out:
    raise ValueError(f"no Python sources found under the stdlib folder {root!r}; the embedded corpus "
                     "needs a standard CPython install (or use data kind='shards').")
  return out


@functools.lru_cache(maxsize=1)
def embedded_named_documents() -> tuple[tuple[str, str], ...]:
  """All embedded documents as (name, text), in deterministic order."""
  docs = []
  for name, path in _stdlib_files():
    with open(path, "rb") as f:
      text = f.read().decode("utf-8", errors="replace")
    if text.strip():
      docs.append((name, text))
  return tuple(docs)


def embedded_documents(split: str, val_fraction: float = VAL_FRACTION) -> list[str]:
  """Texts of the embedded corpus's `split` ("train" or "val")."""
  if split not in SPLITS:
    raise ValueError(f"embedded corpus split {split!r} does not exist; use one of {SPLITS}.")
  want_val = split == "val"
  return [t for n, t in embedded_named_documents() if is_val(n, val_fraction) == want_val]


def embedded_fingerprint(val_fraction: float = VAL_FRACTION) -> str:
  """SHA-256 over the names and texts of the embedded corpus (the cache key of its shards)."""
  h = hashlib.sha256(f"val_fraction={val_fraction!r}\n".encode())
  for name, text in embedded_named_documents():
    h.update(name.encode() + b"\0" + text.encode("utf-8") + b"\0")
  return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Readers for data_pipelines.shard: each yields (document name, text).

def read_txt(path: str) -> Iterator[tuple[str, str]]:
  """A .txt file is one document."""
  with open(path, "rb") as f:
    yield os.path.basename(path), f.read().decode("utf-8", errors="replace")


def read_jsonl(path: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
  """One document per non-empty line of a JSONL file, from its `text_field` string."""
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if not line.strip():
        continue
      try:
        text = json.loads(line)[text_field]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{i + 1}: expected a JSON object with a string field {text_field!r} "
                         f"({type(e).__name__}: {e}); pass the right --text-field.") from None
      if not isinstance(text, str):
        raise ValueError(f"{path}:{i + 1}: field {text_field!r} is {type(text).__name__}, not a string; "
                         "pass the right --text-field.")
      yield f"{os.path.basename(path)}:{i}", text


def read_parquet(path: str, text_field: str = "text", batch_rows: int = 1024) -> Iterator[tuple[str, str]]:
  """One document per row of a parquet file, from its string column `text_field` (via pyarrow)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pf = pq.ParquetFile(path)
  if text_field not in pf.schema_arrow.names:
    raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); "
                     "pass the right --text-field.")
  i = 0
  for batch in pf.iter_batches(batch_size=batch_rows, columns=[text_field]):
    for text in batch.column(0).to_pylist():
      if text is not None:
        yield f"{os.path.basename(path)}:{i}", text
      i += 1


def read_documents(path: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
  """Documents of one input file, by extension: .txt (whole file), .jsonl/.json (lines), .parquet."""
  if not os.path.isfile(path):
    raise ValueError(f"input file {path!r} does not exist.")
  ext = os.path.splitext(path)[1].lower()
  if ext in (".txt", ".text", ".md"):
    return read_txt(path)
  if ext in (".jsonl", ".json", ".ndjson"):
    return read_jsonl(path, text_field)
  if ext == ".parquet":
    return read_parquet(path, text_field)
  raise ValueError(f"input file {path!r} has unsupported extension {ext!r}; "
                   "use .txt, .jsonl or .parquet.")
