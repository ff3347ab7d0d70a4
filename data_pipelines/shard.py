"""Tokenize text files into a parcae shard directory (format: parcae/data/shards.py).

  python -m data_pipelines.shard --tokenizer tok/tokenizer.json --input data/*.parquet \
      --output shards/ --val-fraction 0.01
  python -m data_pipelines.shard --tokenizer tok/tokenizer.json --input val.jsonl --output shards/ --split val

With --val-fraction, each document goes to "val" iff the hash of its name (file name plus row number)
falls below the fraction, else to "train" (the inputs are read once per split). Otherwise all documents go to --split. Existing other splits of
the output directory are kept. The tokenizer is copied into the directory as tokenizer.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

from parcae.data import corpus, shards
from parcae.data import tokenizer as tk


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m data_pipelines.shard", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokenizer", required=True, help="tokenizer.json from data_pipelines.train_tokenizer")
  p.add_argument("--input", nargs="+", required=True, help="input files: .txt, .jsonl, .parquet")
  p.add_argument("--output", required=True, help="shard directory to write (index.json + .bin files)")
  p.add_argument("--split", default="train", help="split name when --val-fraction is 0")
  p.add_argument("--val-fraction", type=float, default=0.0, help="share of documents sent to 'val'")
  p.add_argument("--text-field", default="text", help="JSONL field / parquet column holding the text")
  p.add_argument("--shard-tokens", type=int, default=shards.DEFAULT_SHARD_TOKENS, help="tokens per file")
  p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  return p.parse_args(argv)


def run(args) -> dict:
  if not 0.0 <= args.val_fraction < 1.0:
    raise ValueError(f"--val-fraction={args.val_fraction} must be in [0, 1).")
  tok = tk.load_tokenizer(args.tokenizer)
  os.makedirs(args.output, exist_ok=True)
  dst = os.path.join(args.output, "tokenizer.json")
  if os.path.abspath(args.tokenizer) != os.path.abspath(dst):
    shutil.copyfile(args.tokenizer, dst)
  splits = ["train", "val"] if args.val_fraction > 0 else [args.split]
  out = {}
  for split in splits:
    docs = (text for path in args.input for name, text in corpus.read_documents(path, args.text_field)
            if len(splits) == 1 or corpus.is_val(name, args.val_fraction) == (split == "val"))
    out[split] = shards.write_split(docs, tok, args.output, split, shard_tokens=args.shard_tokens,
                                    tokenizer_file="tokenizer.json", progress=not args.no_progress)
  return out


def main(argv=None) -> int:
  args = parse_args(argv)
  for split, e in run(args).items():
    print(f"{split}: {e['num_docs']} documents, {e['num_tokens']} tokens, {len(e['shards'])} shard(s), "
          f"{e['num_bytes'] / e['num_tokens']:.3f} bytes/token")
  return 0


if __name__ == "__main__":
  sys.exit(main())
