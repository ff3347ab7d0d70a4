"""Pre-tokenized token shards on disk: the writer and the random-access reader.

Format (version 1). A data directory holds
  index.json          {"format": "parcae-token-shards", "version": 1,
                       "dtype": "uint16" | "uint32",   # uint16 iff vocab_size <= 65536
                       "vocab_size": V, "eos_id": 1,
                       "tokenizer": "tokenizer.json" | null,     # relative to the directory
                       "splits": {"train": {"num_tokens": N, "num_docs": D, "num_bytes": B,
                                            "shards": [{"file": "train-00000.bin", "num_tokens": n,
                                                        "sha256": "..."}, ...]},
                                  "val": {...}}}
  <split>-NNNNN.bin   flat little-endian token ids, read with np.memmap.
A split's token stream is its shards concatenated in index order. Every document is written as its tokens
followed by one EOS (no BOS), so documents are separated by EOS and the stream ends with EOS. `num_bytes`
is the UTF-8 size of the split's documents: bytes per token = num_bytes / num_tokens (for bits per byte).

Checks: opening a split always checks that the directory, index and shard files exist, that each file's
size equals num_tokens * itemsize and that no shard or split is empty; with `verify_checksums` it also
hashes every shard and scans it for ids >= vocab_size. Every read also checks its tokens against
vocab_size, so a bad id is reported even when checksums are not verified. Problems raise ValueError.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable

import numpy as np

FORMAT, VERSION = "parcae-token-shards", 1
INDEX = "index.json"
DEFAULT_SHARD_TOKENS = 1 << 27  # 128M tokens (256 MB of uint16) per shard file


def dtype_for_vocab(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def _write_json_atomic(path: str, obj) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# Writing

class ShardWriter:
  """Appends documents (token ids) to one split of a data directory; `close()` writes the index.

  Other splits already in the directory's index are kept; vocab_size / eos_id / dtype must match them.
  """

  def __init__(self, data_dir: str, split: str, *, vocab_size: int, eos_id: int,
               tokenizer_file: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS):
    if eos_id >= vocab_size:
      raise ValueError(f"eos_id={eos_id} must be < vocab_size={vocab_size}.")
    self.data_dir, self.split, self.shard_tokens = data_dir, split, int(shard_tokens)
    self.dtype = dtype_for_vocab(vocab_size)
    os.makedirs(data_dir, exist_ok=True)
    self.index = {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "vocab_size": vocab_size,
                  "eos_id": eos_id, "tokenizer": tokenizer_file, "splits": {}}
    path = os.path.join(data_dir, INDEX)
    if os.path.exists(path):
      old = load_index(data_dir)
      bad = {k: (old[k], self.index[k]) for k in ("vocab_size", "eos_id", "dtype") if old[k] != self.index[k]}
      if bad:
        raise ValueError(f"{path} does not match this split (index, now): {bad}; write to a new directory "
                         "or re-shard all splits with the same tokenizer.")
      self.index["splits"] = {s: v for s, v in old["splits"].items() if s != split}
      self.index["tokenizer"] = tokenizer_file or old.get("tokenizer")
    self.shards: list[dict] = []
    self.buf: list[np.ndarray] = []
    self.buf_tokens = self.num_docs = self.num_bytes = 0
    self.vocab_size, self.eos = vocab_size, np.array([eos_id], self.dtype)

  def add(self, ids, num_bytes: int = 0) -> None:
    """Adds one document: its ids, then EOS. `num_bytes` is its UTF-8 size."""
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
      raise ValueError(f"document {self.num_docs} of split {self.split!r} has token ids outside "
                       f"[0, {self.vocab_size}); the tokenizer does not match vocab_size.")
    self.buf += [arr.astype(self.dtype), self.eos]
    self.buf_tokens += arr.size + 1
    self.num_docs += 1
    self.num_bytes += int(num_bytes)
    while self.buf_tokens >= self.shard_tokens:
      self._flush(self.shard_tokens)

  def _flush(self, n: int) -> None:
    flat = np.concatenate(self.buf)
    head, rest = flat[:n], flat[n:]
    name = f"{self.split}-{len(self.shards):05d}.bin"
    path = os.path.join(self.data_dir, name)
    head.astype(self.dtype.newbyteorder("<"), copy=False).tofile(path)
    self.shards.append({"file": name, "num_tokens": int(head.size), "sha256": _sha256_file(path)})
    self.buf, self.buf_tokens = ([rest] if rest.size else []), int(rest.size)

  def close(self) -> dict:
    """Flushes the last shard and writes index.json; returns the split's index entry."""
    if self.buf_tokens:
      self._flush(self.buf_tokens)
    if not self.shards:
      raise ValueError(f"split {self.split!r} got no documents; check the input files.")
    entry = {"num_tokens": sum(s["num_tokens"] for s in self.shards), "num_docs": self.num_docs,
             "num_bytes": self.num_bytes, "shards": self.shards}
    self.index["splits"][self.split] = entry
    _write_json_atomic(os.path.join(self.data_dir, INDEX), self.index)
    return entry


def write_split(docs: Iterable[str], tok, data_dir: str, split: str, *, batch_docs: int = 256,
                shard_tokens: int = DEFAULT_SHARD_TOKENS, tokenizer_file: str | None = None,
                progress: bool = False, total: int | None = None) -> dict:
  """Tokenizes `docs` (strings) with `tok` (a tokenizers.Tokenizer) into split `split` of `data_dir`."""
  from parcae.data import tokenizer as tk  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  tk.check_special_ids(tok, "the tokenizer given to write_split")
  w = ShardWriter(data_dir, split, vocab_size=tok.get_vocab_size(), eos_id=tk.EOS_ID,
                  tokenizer_file=tokenizer_file, shard_tokens=shard_tokens)
  bar = tqdm(total=total, unit="doc", desc=f"tokenizing {split}", disable=not progress)
  batch: list[str] = []

  def flush():
    for text, ids in zip(batch, tk.encode_batch(tok, batch)):
      w.add(ids, len(text.encode("utf-8")))
    bar.update(len(batch))
    batch.clear()

  for text in docs:
    batch.append(text)
    if len(batch) >= batch_docs:
      flush()
  if batch:
    flush()
  bar.close()
  return w.close()


# ---------------------------------------------------------------------------------------------------------
# Reading

def load_index(data_dir: str) -> dict:
  """Reads and checks index.json of `data_dir`."""
  if not os.path.isdir(data_dir):
    raise ValueError(f"data directory {data_dir!r} does not exist; set data.path to a directory written by "
                     "`python -m data_pipelines.shard`, or use data.kind='embedded'.")
  path = os.path.join(data_dir, INDEX)
  if not os.path.isfile(path):
    raise ValueError(f"missing index: {path!r} does not exist; {data_dir!r} is not a shard directory "
                     "(write one with `python -m data_pipelines.shard`).")
  try:
    with open(path, encoding="utf-8") as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"corrupt index {path!r}: not valid JSON ({e}); re-run the shard writer.") from None
  if index.get("format") != FORMAT or index.get("version") != VERSION:
    raise ValueError(f"{path!r} is not a {FORMAT} v{VERSION} index (format={index.get('format')!r}, "
                     f"version={index.get('version')!r}); re-shard with this version of parcae.")
  if index.get("dtype") not in ("uint16", "uint32"):
    raise ValueError(f"{path!r}: dtype {index.get('dtype')!r} is not one of 'uint16', 'uint32'.")
  return index


class TokenStream:
  """The token stream of one split: random access over its memory-mapped shards, wrapping at the end."""

  def __init__(self, data_dir: str, split: str, *, verify_checksums: bool = False):
    self.index = load_index(data_dir)
    self.data_dir, self.split = data_dir, split
    self.vocab_size, self.eos_id = int(self.index["vocab_size"]), int(self.index["eos_id"])
    splits = self.index["splits"]
    if split not in splits:
      raise ValueError(f"split {split!r} is not in {data_dir!r} (splits: {sorted(splits)}); set "
                       "data.train_split / data.val_split to one of them.")
    entry = splits[split]
    dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
    self.maps, self.names = [], []
    for sh in entry["shards"]:
      path = os.path.join(data_dir, sh["file"])
      n = int(sh["num_tokens"])
      if not os.path.isfile(path):
        raise ValueError(f"missing shard file {path!r} listed in {INDEX}; re-run the shard writer.")
      if n <= 0 or os.path.getsize(path) == 0:
        raise ValueError(f"empty shard {path!r} (num_tokens={n}); re-run the shard writer.")
      if os.path.getsize(path) != n * dtype.itemsize:
        raise ValueError(f"corrupt shard {path!r}: size mismatch, {os.path.getsize(path)} bytes on disk but "
                         f"the index says {n} tokens x {dtype.itemsize} bytes; re-run the shard writer.")
      if verify_checksums and _sha256_file(path) != sh["sha256"]:
        raise ValueError(f"corrupt shard {path!r}: checksum mismatch with {INDEX}; re-run the shard writer.")
      self.maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))
      self.names.append(path)
      if verify_checksums:
        self._check_ids(self.maps[-1], len(self.maps) - 1)
    if not self.maps:
      raise ValueError(f"split {split!r} of {data_dir!r} is empty (no shards); re-run the shard writer.")
    self.offsets = np.cumsum([0] + [m.shape[0] for m in self.maps])
    self.num_tokens = int(self.offsets[-1])
    self.num_bytes = int(entry.get("num_bytes", 0))
    self.num_docs = int(entry.get("num_docs", 0))

  def _check_ids(self, arr: np.ndarray, shard: int) -> None:
    if arr.size and int(arr.max()) >= self.vocab_size:
      raise ValueError(f"shard {self.names[shard]!r} holds token id {int(arr.max())} >= vocab_size="
                       f"{self.vocab_size}; the shards were written with another tokenizer.")

  def read(self, start: int, length: int) -> np.ndarray:
    """Tokens at stream positions start, ..., start+length-1 (mod num_tokens) as int32."""
    out = np.empty(length, np.int32)
    pos, filled = start % self.num_tokens, 0
    while filled < length:
      i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
      lo = pos - int(self.offsets[i])
      take = min(length - filled, self.maps[i].shape[0] - lo)
      piece = self.maps[i][lo:lo + take]
      self._check_ids(piece, i)
      out[filled:filled + take] = piece
      filled += take
      pos = (pos + take) % self.num_tokens
    return out

  def tokens(self) -> np.ndarray:
    """The whole stream as one int32 array (for tests and small splits)."""
    return self.read(0, self.num_tokens)
