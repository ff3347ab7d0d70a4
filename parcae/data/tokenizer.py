"""Byte-level BPE tokenizer (HF `tokenizers`), trained like the reference's tokenizer.

- Special tokens `<|bos|>`, `<|eos|>`, `<|pad|>` are added first, so they get ids 0, 1, 2.
- No normalizer; text is split with a GPT-4-style regex (numbers in groups of 1-2 digits), then mapped to
  the 256 byte symbols of `ByteLevel`, which are all in the initial alphabet: any UTF-8 text round-trips
  through `encode` / `decode` exactly, and no input is ever unknown.
- As everywhere in HF `tokenizers`, the literal text of a special token (e.g. "<|eos|>") inside a
  document is encoded as that special id; decoding gives the same text back.
- Saved as one `tokenizer.json` (the HF format); `load_tokenizer(path)` reads it back.
"""
from __future__ import annotations

import os
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in this order
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
# GPT-4's split pattern with numbers split into groups of at most two digits (as the reference).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"""
    r"""|\s+(?!\S)|\s+"""
)
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials plus one token per byte, no merges


def _empty_tokenizer() -> Tokenizer:
  tok = Tokenizer(models.BPE(byte_fallback=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
  """Trains a byte-level BPE tokenizer with `vocab_size` tokens (specials included) on `texts`."""
  if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
    raise ValueError(f"vocab_size={vocab_size!r} is too small: a byte-level BPE needs at least "
                     f"{MIN_VOCAB_SIZE} (3 special tokens + 256 bytes); set vocab_size >= {MIN_VOCAB_SIZE}.")
  tok = _empty_tokenizer()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=0, show_progress=show_progress,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=list(SPECIAL_TOKENS))
  tok.train_from_iterator(texts, trainer=trainer)
  check_special_ids(tok, "the freshly trained tokenizer")
  return tok


def check_special_ids(tok: Tokenizer, where: str) -> None:
  """Raises unless `<|bos|>`, `<|eos|>`, `<|pad|>` have ids 0, 1, 2."""
  got = tuple(tok.token_to_id(t) for t in SPECIAL_TOKENS)
  if got != (BOS_ID, EOS_ID, PAD_ID):
    raise ValueError(f"{where}: special tokens {SPECIAL_TOKENS} have ids {got}, expected (0, 1, 2); "
                     "train the tokenizer with data_pipelines.train_tokenizer.")


def save_tokenizer(tok: Tokenizer, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tok.save(path)
  return path


def load_tokenizer(path: str) -> Tokenizer:
  """Loads a `tokenizer.json` and checks its special-token ids."""
  if not os.path.isfile(path):
    raise ValueError(f"tokenizer file {path!r} does not exist; pass the tokenizer.json written by "
                     "`python -m data_pipelines.train_tokenizer`.")
  tok = Tokenizer.from_file(path)
  check_special_ids(tok, f"tokenizer {path!r}")
  return tok


def encode_batch(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
  """Token ids of each text, without BOS/EOS (the shard writer appends EOS after each document)."""
  encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets where available
  return [e.ids for e in encode(texts, add_special_tokens=False)]


def decode(tok: Tokenizer, ids) -> str:
  return tok.decode(list(map(int, ids)), skip_special_tokens=False)
