"""data_pipelines scripts: tokenizer training and sharding of txt / JSONL / parquet inputs."""
import json
import subprocess
import sys

import numpy as np
import pytest

from data_pipelines import shard, train_tokenizer
from parcae.data import corpus, shards
from parcae.data import tokenizer as tk

TEXTS = [f"Document number {i}: the {'quick ' * (i % 5)}brown fox, naïve café {i * 37}.\n" * (1 + i % 3)
         for i in range(60)]


@pytest.fixture()
def inputs(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "a.txt").write_text(TEXTS[0], encoding="utf-8")
  with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
    for t in TEXTS[1:30]:
      f.write(json.dumps({"text": t}) + "\n")
  pq.write_table(pa.table({"text": TEXTS[30:]}), tmp_path / "c.parquet")
  return [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")]


def _docs_of(stream_ids, tok):
  """Splits a token stream at EOS and decodes each document."""
  cuts = np.flatnonzero(stream_ids == tk.EOS_ID)
  assert cuts[-1] == stream_ids.size - 1  # the stream ends with EOS
  return [tk.decode(tok, d[:-1]) for d in np.split(stream_ids, cuts + 1)[:-1]]


def test_train_then_shard_txt_jsonl_parquet(tmp_path, inputs):
  tok_path = str(tmp_path / "tok" / "tokenizer.json")
  assert train_tokenizer.main(["--input", *inputs, "--vocab-size", "320", "--output", tok_path]) == 0
  tok = tk.load_tokenizer(tok_path)
  out = str(tmp_path / "shards")
  assert shard.main(["--tokenizer", tok_path, "--input", *inputs, "--output", out, "--val-fraction", "0.3",
                     "--shard-tokens", "500", "--no-progress"]) == 0
  names = ["a.txt"] + [f"b.jsonl:{i}" for i in range(29)] + [f"c.parquet:{i}" for i in range(30)]
  is_val = [corpus.is_val(n, 0.3) for n in names]
  assert 0 < sum(is_val) < len(names)
  idx = shards.load_index(out)
  assert idx["tokenizer"] == "tokenizer.json" and idx["vocab_size"] == tok.get_vocab_size()
  for split, want_val in (("train", False), ("val", True)):
    expect = [t for t, v in zip(TEXTS, is_val) if v == want_val]
    s = shards.TokenStream(out, split, verify_checksums=True)
    assert _docs_of(s.tokens(), tok) == expect  # every document, in order, exactly once
    assert s.num_docs == len(expect) and s.num_bytes == sum(len(t.encode()) for t in expect)
  assert len(idx["splits"]["train"]["shards"]) > 1


def test_single_split_and_help(tmp_path, inputs):
  tok_path = str(tmp_path / "tokenizer.json")
  train_tokenizer.main(["--input", inputs[1], "--vocab-size", "300", "--output", tok_path])
  out = str(tmp_path / "s")
  shard.main(["--tokenizer", tok_path, "--input", inputs[2], "--output", out, "--split", "val",
              "--no-progress"])
  assert list(shards.load_index(out)["splits"]) == ["val"]
  with pytest.raises(ValueError, match="val-fraction"):
    shard.main(["--tokenizer", tok_path, "--input", inputs[2], "--output", out, "--val-fraction", "1.5"])
  for mod in ("data_pipelines.shard", "data_pipelines.train_tokenizer"):
    r = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, check=True)
    assert "usage: python -m " + mod in r.stdout
