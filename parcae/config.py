"""Config files, command-line overrides and validation.

A config file is a Python module with `get_config() -> ml_collections.ConfigDict` (see configs/). Overrides are
`--config.a.b=value` (or `a.b=value`); the value is parsed to the type of the existing field, and unknown keys
fail with the closest known key named.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os

import ml_collections


def load_module(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist; pass --config configs/<recipe>.py")
  name = "parcae_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config() function")
  return module


def all_keys(cfg, prefix="") -> list[str]:
  keys = []
  for k, v in cfg.items():
    full = f"{prefix}{k}"
    keys += all_keys(v, full + ".") if isinstance(v, ml_collections.ConfigDict) else [full]
  return keys


def _parse_value(raw: str, current):
  if isinstance(current, bool):
    if raw.lower() in ("true", "1", "yes"):
      return True
    if raw.lower() in ("false", "0", "no"):
      return False
    raise ValueError(f"expected true/false, got {raw!r}")
  if isinstance(current, int):
    return int(raw)
  if isinstance(current, float):
    return float(raw)
  if isinstance(current, str) or current is None:
    return raw
  return ast.literal_eval(raw)  # tuples, lists


def apply_override(cfg, item: str) -> None:
  """Apply one `--config.a.b=value` override in place."""
  body = item[len("--config."):] if item.startswith("--config.") else item
  if "=" not in body:
    raise ValueError(f"override {item!r} must look like --config.section.field=value")
  key, raw = body.split("=", 1)
  parts = key.split(".")
  node = cfg
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      close = difflib.get_close_matches(key, all_keys(cfg), n=1)
      hint = f"; did you mean {close[0]!r}?" if close else "; run `parcae info --config FILE` to list keys"
      raise ValueError(f"unknown config key {key!r}{hint}")
    if i < len(parts) - 1:
      node = node[part]
  current = node[parts[-1]]
  try:
    value = _parse_value(raw, current)
  except (ValueError, SyntaxError) as err:
    raise ValueError(f"cannot parse {raw!r} for config key {key!r} (a {type(current).__name__}): {err}") from None
  with node.unlocked():
    node[parts[-1]] = value


def validate(cfg) -> None:
  """Every section validates its own fields (errors name `section.field`)."""
  from parcae.model.config import validate_model_config
  validate_model_config(cfg.model)
  if "optim" in cfg:
    from parcae.train.optim import validate_optim_config
    validate_optim_config(cfg.optim)
  if "quant" in cfg:
    from parcae.quant import validate_recipe
    try:
      validate_recipe(cfg.quant.recipe)
    except ValueError as err:
      raise ValueError(f"quant.recipe={cfg.quant.recipe!r}: {err}") from None
    from parcae.quant.dense import IMPLS
    if cfg.quant.get("impl", "auto") not in IMPLS:
      raise ValueError(f"quant.impl={cfg.quant.impl!r} is not valid; use one of {IMPLS}")
  if "train" in cfg:
    for f in ("steps", "micro_batch_size", "grad_accum", "seq_len"):
      if cfg.train[f] < 1:
        raise ValueError(f"train.{f}={cfg.train[f]} must be >= 1")
    if cfg.train.seq_len > cfg.model.max_seq_len:
      raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    _check_loss_chunk(cfg.train)


def _check_loss_chunk(tc) -> None:
  """The chunked loss head splits each batch's tokens into loss_chunk-sized chunks (a chunk at least the batch
  means no chunking): check it against the training and the validation batches before anything runs."""
  chunk = tc.get("loss_chunk", 0)
  for what, seqs in (("train.micro_batch_size", tc.micro_batch_size), ("train.eval_batch_size",
                                                                        tc.get("eval_batch_size", 0))):
    n = seqs * tc.seq_len
    if 0 < chunk < n and n % chunk:
      raise ValueError(f"train.loss_chunk={chunk} does not divide the {n} tokens of a batch of {what}={seqs} "
                       f"x train.seq_len={tc.seq_len}; set train.loss_chunk to a divisor of {n} (or 0: no chunks)")


def load_config(path: str, overrides=()) -> ml_collections.ConfigDict:
  cfg = load_module(path).get_config()
  cfg.lock()
  for item in overrides:
    apply_override(cfg, item)
  validate(cfg)
  return cfg
