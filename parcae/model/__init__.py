"""Parcae (looped) and GPT models in Flax NNX.

    model = parcae.model.build(config.model, key=jax.random.key(0))
    logits_BxSxV = model(input_ids_BxS, loops=None, key=None)   # float32
"""
from __future__ import annotations

import jax

from parcae.model.config import default_model_config, size_config, validate_model_config
from parcae.model.gpt import GPT
from parcae.model.looped import Parcae


def build(model_cfg, key=None, quant: str = "bf16"):
  """Validate `model_cfg` and build the model with float32 parameters (reference init)."""
  validate_model_config(model_cfg)
  key = jax.random.key(0) if key is None else key
  cls = Parcae if model_cfg.kind == "parcae" else GPT
  return cls(model_cfg, key, quant=quant)


__all__ = ["build", "default_model_config", "size_config", "validate_model_config", "Parcae", "GPT"]
