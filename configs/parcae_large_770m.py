"""parcae-large-770m: the PyTorch reference implementation's parcae large recipe.

Command (after tokenizing a corpus into data/fineweb-edu with data_pipelines/, see README):
  parcae train --config configs/parcae_large_770m.py --workdir runs/parcae_large
Inspect sizes and FLOPs first:
  parcae info --config configs/parcae_large_770m.py
Expected: params_total as in the reference (see tests/test_model_params.py); MuonAdamW, 256 x 2048 tokens
per step, trapezoid schedule.
"""
from parcae.train.config import reference_config


def get_config():
  return reference_config("parcae", "large")
