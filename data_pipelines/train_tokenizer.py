"""Train a byte-level BPE tokenizer (specials <|bos|>, <|eos|>, <|pad|> = ids 0, 1, 2).

  python -m data_pipelines.train_tokenizer --input a.jsonl b.parquet c.txt --vocab-size 32768 \
      --output tok/tokenizer.json
  python -m data_pipelines.train_tokenizer --embedded --vocab-size 1024 --output tok/tokenizer.json
"""
from __future__ import annotations

import argparse
import itertools
import sys

from parcae.data import corpus
from parcae.data import tokenizer as tk


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m data_pipelines.train_tokenizer", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--input", nargs="+", help="text files: .txt (one document), .jsonl, .parquet")
  src.add_argument("--embedded", action="store_true", help="train on the embedded corpus's train split")
  p.add_argument("--output", required=True, help="path of the tokenizer.json to write")
  p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size, specials included")
  p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
  p.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop after this many characters")
  p.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many chars per document")
  return p.parse_args(argv)


def texts(args):
  if args.embedded:
    docs = iter(corpus.embedded_documents("train"))
  else:
    docs = (t for path in args.input for _, t in corpus.read_documents(path, args.text_field))
  budget = args.max_chars
  for t in docs:
    t = t[:args.doc_cap]
    budget -= len(t)
    yield t
    if budget <= 0:
      return


def main(argv=None) -> int:
  args = parse_args(argv)
  tok = tk.train_tokenizer(texts(args), args.vocab_size, show_progress=sys.stderr.isatty())
  tk.save_tokenizer(tok, args.output)
  print(f"wrote {args.output}: vocab_size={tok.get_vocab_size()}, "
        f"specials={dict(zip(tk.SPECIAL_TOKENS, itertools.count()))}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
