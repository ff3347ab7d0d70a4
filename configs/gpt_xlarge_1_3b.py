"""gpt-xlarge-1.3b: the PyTorch reference implementation's gpt xlarge recipe.

Command (after tokenizing a corpus into data/fineweb-edu with data_pipelines/, see README):
  parcae train --config configs/gpt_xlarge_1_3b.py --workdir runs/gpt_xlarge
Inspect sizes and FLOPs first:
  parcae info --config configs/gpt_xlarge_1_3b.py
Expected: params_total as in the reference (see tests/test_model_params.py); MuonAdamW, 256 x 2048 tokens
per step, trapezoid schedule.
"""
from parcae.train.config import reference_config


def get_config():
  return reference_config("gpt", "xlarge")
