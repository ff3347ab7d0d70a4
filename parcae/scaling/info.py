"""`parcae info`: parameter counts and FLOPs per token of a config, in both conventions."""
from __future__ import annotations

from parcae.scaling.flops import executed_flops_per_token, expected_depths, param_counts, reference_flops_per_token


def model_info(cfg) -> dict:
  m, seq = cfg.model, cfg.train.seq_len
  info = {"model": m.kind}
  info.update(param_counts(m))
  info["flops_per_token_reference"] = reference_flops_per_token(m)
  info["flops_per_token_reference_note"] = "reference cost.py: 6N per VE/lookup param, mu and s, no causal halving"
  info["flops_per_token_train_executed"] = executed_flops_per_token(m, seq)
  info["flops_per_token_forward"] = executed_flops_per_token(m, seq, train=False)
  info["flops_note"] = (f"executed work at seq_len={seq}: matmuls only (lookups are free), tied head counted, "
                        "causal attention = half the SxS map; train uses E[n], E[k] of the sampler")
  if m.kind == "parcae":
    e_n, e_k = expected_depths(m)
    info["expected_no_grad_iterations"], info["expected_grad_iterations"] = round(e_n, 6), round(e_k, 6)
  info["tokens_per_step"] = cfg.train.micro_batch_size * cfg.train.grad_accum * seq
  return info
