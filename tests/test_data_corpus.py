"""Embedded corpus (real, deterministic, disjoint splits) and the txt / JSONL / parquet readers."""
import json
import re
from collections import Counter

import pytest

from parcae.data import corpus


def test_embedded_corpus_is_real_text_of_useful_size():
  train, val = corpus.embedded_documents("train"), corpus.embedded_documents("val")
  text = "".join(train)
  assert len(text.encode("utf-8")) > 2_000_000
  words = re.findall(r"[a-z]+", text.lower())
  top = {w for w, _ in Counter(words).most_common(30)}
  assert {"the", "self", "if", "return"} <= top  # English prose and Python code
  assert any("Python Software Foundation" in d for d in train + val)  # the stdlib's LICENSE.txt
  assert sum(ch.isprintable() or ch in "\n\t" for ch in text[:100_000]) > 0.999 * 100_000


def test_embedded_corpus_is_deterministic_and_splits_are_disjoint():
  named = corpus.embedded_named_documents()
  corpus.embedded_named_documents.cache_clear()
  assert corpus.embedded_named_documents() == named  # re-read from disk, same order and text
  names = [n for n, _ in named]
  assert names == sorted(names) and len(set(names)) == len(names)
  train, val = corpus.embedded_documents("train"), corpus.embedded_documents("val")
  assert len(train) + len(val) == len(named) and val
  val_names = {n for n in names if corpus.is_val(n, corpus.VAL_FRACTION)}
  assert 0.01 < len(val_names) / len(names) < 0.08
  assert [t for n, t in named if n in val_names] == val
  assert [t for n, t in named if n not in val_names] == train
  assert corpus.embedded_fingerprint() == corpus.embedded_fingerprint()


def test_is_val_fraction_matches_its_rate():
  names = [f"doc-{i}" for i in range(20000)]
  rate = sum(corpus.is_val(n, 0.05) for n in names) / len(names)
  assert abs(rate - 0.05) < 4 * (0.05 * 0.95 / len(names)) ** 0.5  # 4 sigma of a binomial


def test_readers(tmp_path):
  (tmp_path / "a.txt").write_text("hello\nworld", encoding="utf-8")
  with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
    for t in ["one", "two ü"]:
      f.write(json.dumps({"body": t, "id": 1}) + "\n")
    f.write("\n")
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"content": ["p1", None, "p3"]}), tmp_path / "c.parquet")
  assert list(corpus.read_documents(str(tmp_path / "a.txt"))) == [("a.txt", "hello\nworld")]
  assert [t for _, t in corpus.read_documents(str(tmp_path / "b.jsonl"), "body")] == ["one", "two ü"]
  assert [t for _, t in corpus.read_documents(str(tmp_path / "c.parquet"), "content")] == ["p1", "p3"]
  with pytest.raises(ValueError, match="field 'text'"):
    list(corpus.read_documents(str(tmp_path / "b.jsonl")))
  with pytest.raises(ValueError, match="no column 'text'"):
    list(corpus.read_documents(str(tmp_path / "c.parquet")))
  (tmp_path / "d.csv").write_text("x")
  with pytest.raises(ValueError, match="unsupported extension"):
    list(corpus.read_documents(str(tmp_path / "d.csv")))
  with pytest.raises(ValueError, match="does not exist"):
    list(corpus.read_documents(str(tmp_path / "missing.txt")))
  with pytest.raises(ValueError, match="split 'test' does not exist"):
    corpus.embedded_documents("test")
