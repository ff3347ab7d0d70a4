"""The data interface the trainer uses: config, train iterator, eval batches, dataset info, embedded data.

Train iterator. The rows of global step s are delivery slots [s*B, (s+1)*B) (B = global_batch; rows and
their order are defined in packing.py); host p of P takes slots [s*B + p*B/P, s*B + (p+1)*B/P), so hosts
never overlap and their union is the single-host batch. A batch is a pure function of (seed, slot), hence
the iterator state is just the next slot (plus the settings it must be resumed with), a small JSON dict.
Resuming with another global_batch or process count is allowed: the next row served stays the same.
grain serves the reads: `grain.MapDataset.range(...).map(batch_at)` turned into an IterDataset whose
threads (`num_workers`) prefetch batches. We do not checkpoint grain's own iterator state: our
`get_state/set_state` rebuild the grain pipeline at the saved slot, which resumes exactly by construction.

Eval batches are the first rows of a split in order (no shuffle, no wrap-around: only rows that fit inside
one pass); with num_batches=None all full batches of the split are returned and a last partial batch is
dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import grain
import ml_collections
import numpy as np

from parcae.data import corpus, packing, shards
from parcae.data import tokenizer as tk

KINDS = ("embedded", "shards")
STATE_VERSION = 1
_EMBEDDED_RECIPE = 1  # bump when the embedded corpus / tokenizer recipe changes (invalidates caches)


def default_data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.kind = "embedded"  # "embedded" (stdlib text, tokenized on first use) | "shards" (a shard directory)
  c.path = "~/.cache/parcae/embedded"  # shard directory ("shards") or cache directory ("embedded")
  c.vocab_size = 1024  # BPE vocabulary trained for kind="embedded" (ignored for "shards")
  c.train_split = "train"  # split name used for training
  c.val_split = "val"  # split name used for evaluation
  c.shuffle = True  # shuffle training rows per epoch (seeded); False serves rows in stream order
  c.num_workers = 0  # grain prefetch threads; 0 reads batches in the calling thread
  c.verify_checksums = False  # hash every shard and scan its ids when opening a split (slow for big data)
  return c


def _check_cfg(cfg) -> None:
  if cfg.kind not in KINDS:
    raise ValueError(f"data.kind={cfg.kind!r} is not one of {KINDS}.")
  if int(cfg.num_workers) < 0:
    raise ValueError(f"data.num_workers={cfg.num_workers} must be >= 0.")


def data_dir(cfg) -> str:
  """The shard directory for `cfg`, preparing the embedded corpus first when kind='embedded'."""
  _check_cfg(cfg)
  path = os.path.abspath(os.path.expanduser(str(cfg.path)))
  if cfg.kind == "embedded":
    return prepare_embedded(path, vocab_size=int(cfg.vocab_size))
  return path


def open_split(cfg, split: str) -> shards.TokenStream:
  return shards.TokenStream(data_dir(cfg), split, verify_checksums=bool(cfg.verify_checksums))


def _check_fits(stream: shards.TokenStream, seq_len: int) -> None:
  if seq_len < 1:
    raise ValueError(f"seq_len={seq_len} must be >= 1.")
  if stream.num_tokens < seq_len + 1:
    raise ValueError(f"seq_len={seq_len} is larger than the dataset: split {stream.split!r} holds only "
                     f"{stream.num_tokens} tokens and one row needs seq_len+1; lower seq_len or add data.")


def _check_hosts(batch: int, process_index: int, process_count: int, what: str) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
  if batch < 1 or batch % process_count:
    raise ValueError(f"{what}={batch} must be a positive multiple of process_count={process_count}.")
  return batch // process_count


def _rows_to_batch(stream: shards.TokenStream, rows: np.ndarray, seq_len: int) -> dict:
  toks = np.stack([stream.read(int(r) * seq_len, seq_len + 1) for r in rows])
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


class TrainIterator:
  """Iterator over this host's training batches; `get_state()` / `set_state()` resume exactly."""

  def __init__(self, stream, *, seq_len, global_batch, seed, process_index, process_count, shuffle,
               num_workers):
    self.stream, self.seq_len, self.global_batch, self.seed = stream, seq_len, global_batch, seed
    self.local_batch = _check_hosts(global_batch, process_index, process_count, "global_batch")
    self.process_index, self.shuffle, self.num_workers = process_index, shuffle, num_workers
    self._start(0)

  def batch_at(self, slot: int) -> dict:
    """This host's part of the global batch that starts at delivery slot `slot`."""
    first = slot + self.process_index * self.local_batch
    rows = packing.rows_for_slots(np.arange(first, first + self.local_batch), seq_len=self.seq_len,
                                  num_tokens=self.stream.num_tokens, seed=self.seed, shuffle=self.shuffle)
    return _rows_to_batch(self.stream, rows, self.seq_len)

  def _start(self, slot: int) -> None:
    self.next_slot = int(slot)
    b, s0 = self.global_batch, self.next_slot
    ds = grain.MapDataset.range(0, 1 << 40).map(lambda i: self.batch_at(s0 + int(i) * b))
    opts = grain.ReadOptions(num_threads=self.num_workers, prefetch_buffer_size=2 * self.num_workers)
    self._it = iter(ds.to_iter_dataset(opts))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self.next_slot += self.global_batch
    return batch

  def get_state(self) -> dict:
    return {"version": STATE_VERSION, "next_slot": self.next_slot, "seed": self.seed,
            "seq_len": self.seq_len, "shuffle": self.shuffle, "num_tokens": self.stream.num_tokens}

  def set_state(self, state: dict) -> None:
    want = {"version": STATE_VERSION, "seed": self.seed, "seq_len": self.seq_len, "shuffle": self.shuffle,
            "num_tokens": self.stream.num_tokens}
    bad = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if bad:
      raise ValueError(f"data iterator state does not match this data setup (saved, now): {bad}; resume "
                       "with the same data, seed, seq_len and shuffle as the checkpoint.")
    self._start(int(state["next_slot"]))


def make_train_iterator(data_cfg, *, seq_len: int, global_batch: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> TrainIterator:
  """Endless iterator of {"inputs", "targets"}: int32[global_batch // process_count, seq_len]."""
  stream = open_split(data_cfg, data_cfg.train_split)
  _check_fits(stream, seq_len)
  return TrainIterator(stream, seq_len=seq_len, global_batch=global_batch, seed=int(seed),
                       process_index=process_index, process_count=process_count,
                       shuffle=bool(data_cfg.shuffle), num_workers=int(data_cfg.num_workers))


def eval_batches(data_cfg, *, split: str = "val", seq_len: int, batch_size: int, num_batches: int | None,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The first rows of `split` in order, as this host's part of global batches of `batch_size` rows."""
  local = _check_hosts(batch_size, process_index, process_count, "eval batch_size")
  stream = open_split(data_cfg, split)
  _check_fits(stream, seq_len)
  available = (stream.num_tokens - 1) // seq_len // batch_size  # rows inside one pass, full batches
  if num_batches is None:
    num_batches = available
  if available < 1 or num_batches > available:
    raise ValueError(f"split {split!r} ({stream.num_tokens} tokens) holds only {available} full eval "
                     f"batches of {batch_size} rows x {seq_len} targets but {max(num_batches, 1)} were asked; "
                     "lower the eval batch size / num_batches or use num_batches=None.")
  out = []
  for b in range(num_batches):
    first = b * batch_size + process_index * local
    out.append(_rows_to_batch(stream, np.arange(first, first + local), seq_len))
  return out


def dataset_info(data_cfg) -> dict:
  """vocab_size, eos_id, tokenizer_path (None if absent), data_dir, and per split: num_tokens and
  bytes_per_token (UTF-8 bytes of the documents / tokens incl. EOS; bits per byte = nats per token /
  (ln 2 * bytes_per_token); None when the shards do not record byte counts)."""
  d = data_dir(data_cfg)
  index = shards.load_index(d)
  info = {"vocab_size": int(index["vocab_size"]), "eos_id": int(index["eos_id"]), "data_dir": d,
          "tokenizer_path": os.path.join(d, index["tokenizer"]) if index.get("tokenizer") else None,
          "num_tokens": {}, "bytes_per_token": {}}
  for name, entry in index["splits"].items():
    info["num_tokens"][name] = int(entry["num_tokens"])
    n_bytes = int(entry.get("num_bytes", 0))  # 0: the writer was not told the text size
    info["bytes_per_token"][name] = n_bytes / int(entry["num_tokens"]) if n_bytes else None
  return info


def prepare_embedded(data_dir: str, vocab_size: int = 1024) -> str:
  """Tokenized embedded corpus under `data_dir` (trains the tokenizer, writes train/val shards); cached.

  The result lives in `data_dir/embedded-v<vocab>-<hash>/`, where the hash covers the corpus text, the
  vocab size, the recipe version and the tokenizers version; a second call returns it at once.
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  key = hashlib.sha256(json.dumps({
      "recipe": _EMBEDDED_RECIPE, "corpus": corpus.embedded_fingerprint(), "vocab_size": vocab_size,
      "tokenizers": tokenizers.__version__, "python": sys.version_info[:3]}).encode()).hexdigest()[:16]
  out = os.path.join(data_dir, f"embedded-v{vocab_size}-{key}")
  if os.path.isfile(os.path.join(out, shards.INDEX)):
    return out
  tmp = f"{out}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  tok = tk.train_tokenizer(corpus.embedded_documents("train"), vocab_size)
  tk.save_tokenizer(tok, os.path.join(tmp, "tokenizer.json"))
  for split in corpus.SPLITS:
    shards.write_split(corpus.embedded_documents(split), tok, tmp, split, tokenizer_file="tokenizer.json")
  try:
    os.rename(tmp, out)
  except OSError:  # another process finished first: keep its copy
    shutil.rmtree(tmp, ignore_errors=True)
  return out
