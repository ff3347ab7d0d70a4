"""Shard writer and reader: round trip, index fields, and one clear error per kind of bad input."""
import json
import os

import numpy as np
import pytest

from parcae.data import shards


def _write(path, docs, vocab=1000, shard_tokens=10, split="train"):
  w = shards.ShardWriter(str(path), split, vocab_size=vocab, eos_id=1, shard_tokens=shard_tokens)
  for d in docs:
    w.add(d, num_bytes=2 * len(d))
  return w.close()


DOCS = [[5, 6, 7], [8] * 12, [9, 10], list(range(100, 131))]


def _expected():
  return np.concatenate([np.r_[d, 1] for d in DOCS])


def test_round_trip_across_shards_and_index_fields(tmp_path):
  entry = _write(tmp_path, DOCS)
  exp = _expected()
  assert entry["num_tokens"] == exp.size and entry["num_docs"] == 4 and entry["num_bytes"] == 2 * 48
  assert exp.size == 52 and [s["num_tokens"] for s in entry["shards"]] == [10] * 5 + [2]
  s = shards.TokenStream(str(tmp_path), "train", verify_checksums=True)
  assert s.num_tokens == exp.size and np.array_equal(s.tokens(), exp)
  # Reads wrap around the end of the stream and cross shard boundaries.
  assert np.array_equal(s.read(exp.size - 3, 25), np.r_[exp, exp][exp.size - 3:exp.size + 22])
  idx = json.load(open(tmp_path / "index.json"))
  assert idx["dtype"] == "uint16" and idx["vocab_size"] == 1000 and idx["eos_id"] == 1
  raw = np.fromfile(tmp_path / entry["shards"][0]["file"], dtype="<u2")
  assert np.array_equal(raw, exp[:10])


def test_second_split_keeps_the_first_and_large_vocab_uses_uint32(tmp_path):
  _write(tmp_path, DOCS)
  _write(tmp_path, [[3, 4]], split="val")
  idx = shards.load_index(str(tmp_path))
  assert sorted(idx["splits"]) == ["train", "val"]
  with pytest.raises(ValueError, match="vocab_size"):
    _write(tmp_path, [[3]], vocab=70000, split="other")
  big = tmp_path / "big"
  _write(big, [[70000, 3]], vocab=70001)
  assert shards.load_index(str(big))["dtype"] == "uint32"
  assert np.array_equal(shards.TokenStream(str(big), "train").tokens(), [70000, 3, 1])


def test_writer_rejects_ids_outside_the_vocab(tmp_path):
  with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
    _write(tmp_path, [[5, 1000]])


def _broken(tmp_path, how):
  entry = _write(tmp_path, DOCS)
  first = tmp_path / entry["shards"][0]["file"]
  idx_path = tmp_path / "index.json"
  idx = json.load(open(idx_path))
  if how == "missing_shard":
    os.remove(first)
  elif how == "truncated":
    first.write_bytes(first.read_bytes()[:-2])
  elif how == "flipped":
    b = bytearray(first.read_bytes()); b[0] ^= 1; first.write_bytes(bytes(b))
  elif how == "empty":
    first.write_bytes(b"")
    idx["splits"]["train"]["shards"][0]["num_tokens"] = 0
  elif how == "no_shards":
    idx["splits"]["train"]["shards"] = []
  elif how == "big_id":
    idx["vocab_size"] = 50  # the last document holds ids 100..130
  elif how == "bad_json":
    idx_path.write_text("{not json")
    return
  json.dump(idx, open(idx_path, "w"))


@pytest.mark.parametrize("how,verify,message", [
    ("missing_shard", False, "missing shard file"),
    ("truncated", False, "corrupt shard .* size mismatch"),
    ("flipped", True, "corrupt shard .* checksum mismatch"),
    ("empty", False, "empty shard"),
    ("no_shards", False, "split 'train' .* is empty"),
    ("big_id", True, "train-00002.bin. holds token id 109 >= vocab_size=50"),  # ids 100..109
    ("bad_json", False, "corrupt index"),
])
def test_bad_shards_raise_one_clear_error(tmp_path, how, verify, message):
  _broken(tmp_path, how)
  with pytest.raises(ValueError, match=message):
    shards.TokenStream(str(tmp_path), "train", verify_checksums=verify)


def test_bad_ids_are_caught_on_read_without_checksums(tmp_path):
  _broken(tmp_path, "big_id")
  s = shards.TokenStream(str(tmp_path), "train", verify_checksums=False)
  assert np.array_equal(s.read(0, 4), [5, 6, 7, 1])  # clean part reads fine
  with pytest.raises(ValueError, match=">= vocab_size=50"):
    s.tokens()


def test_flipped_byte_passes_size_check_when_not_verifying(tmp_path):
  _broken(tmp_path, "flipped")
  s = shards.TokenStream(str(tmp_path), "train", verify_checksums=False)
  assert s.read(0, 1)[0] == 5 ^ 1


def test_missing_directory_and_index(tmp_path):
  with pytest.raises(ValueError, match="data directory .* does not exist"):
    shards.TokenStream(str(tmp_path / "nope"), "train")
  with pytest.raises(ValueError, match="missing index"):
    shards.TokenStream(str(tmp_path), "train")
