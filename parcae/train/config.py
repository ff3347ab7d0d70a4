"""The full run configuration: one small section per concern, each with one comment per field.

    cfg.model       parcae.model.config   architecture, loop, depth sampler, precision
    cfg.train       below                 steps, batch, seed, logging/eval cadence, loss head
    cfg.optim       parcae.train.optim    AdamW / MuonAdamW, schedule, clipping
    cfg.data        parcae.data           corpus / shards
    cfg.mesh        parcae.train.mesh     data / fsdp / tensor axis sizes
    cfg.checkpoint  below                 cadence and retention
    cfg.quant       below                 simulated low-precision recipe
    cfg.wandb       parcae.train.metrics  experiment tracking
"""
from __future__ import annotations

import ml_collections


def default_train_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 1000  # optimizer steps
  c.seed = 0  # model init, depth sampling, loop-state init and data order all derive from it
  c.micro_batch_size = 8  # sequences per micro-batch, global over all devices
  c.grad_accum = 1  # micro-batches per optimizer step (global batch = micro_batch_size * grad_accum)
  c.seq_len = 256  # tokens per sequence
  c.depth_grouping = True  # sort a step's sequences by sampled depth before splitting into micro-batches
  c.loss_chunk = 0  # tokens per chunk of the chunked loss head (0 = full logits at once)
  c.log_every = 10  # steps between metric rows
  c.eval_every = 0  # steps between validations (0 = only at the end)
  c.eval_batches = 4  # validation batches per loop count
  c.eval_batch_size = 8  # sequences per validation batch
  c.eval_loops = (1, 2, 4, 0)  # validation loop counts; 0 stands for model.mean_recurrence
  c.loss_guard = 0.0  # stop if the loss exceeds this after loss_guard_tokens (0 = off)
  c.loss_guard_tokens = 10_000_000_000  # tokens after which the loss guard is active
  c.profile = False  # write a jax.profiler trace of a few steps into the workdir
  c.compile_cache_dir = "~/.cache/parcae/xla"  # persistent XLA compilation cache ("" = off; JAX_COMPILATION_CACHE_DIR wins)
  return c


def default_checkpoint_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every_steps = 100  # save cadence (also saved at the end and on SIGTERM / SIGINT)
  c.keep_last = 3  # most recent checkpoints kept
  c.keep_every = 0  # additionally keep every M-th step forever (0 = none)
  c.async_save = True  # write in the background while training continues
  return c


def default_quant_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.recipe = "bf16"  # bf16 (off) | mxfp8 | mxfp4 | nvfp4 | nvfp4_scalesearch | quartet | nvidia_nvfp4
  c.impl = "auto"  # quantizers: auto (pallas on a GPU, else jnp) | jnp (XLA-fused) | pallas (one-pass Triton kernels)
  return c


def default_config(model_cfg) -> ml_collections.ConfigDict:
  from parcae.data import default_data_config
  from parcae.train.mesh import default_mesh_config
  from parcae.train.metrics import default_wandb_config
  from parcae.train.optim import default_optim_config
  c = ml_collections.ConfigDict()
  c.model = model_cfg
  c.train = default_train_config()
  c.optim = default_optim_config()
  c.data = default_data_config()
  c.mesh = default_mesh_config()
  c.checkpoint = default_checkpoint_config()
  c.quant = default_quant_config()
  c.wandb = default_wandb_config()
  return c


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config (its config.json) with every field added to the defaults since it was written
  set to its default, so runs written by an older version still evaluate, resume and compare."""
  from parcae.model.config import default_model_config

  def merge(base, new):
    out = dict(base)
    for k, v in new.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  return ml_collections.ConfigDict(merge(default_config(default_model_config()).to_dict(), saved))


# The reference's training recipes (spec 5.1-5.2): 256 x 2048 tokens per optimizer step, MuonAdamW,
# trapezoid schedule with a 50% linear cooldown, 80 tokens per nominal parameter.
# size: (micro_batch_size, grad_accum, steps, adamw lr)
REFERENCE_RECIPES = {
    "small": (32, 8, 21_362, 8e-3),
    "medium": (16, 16, 56_457, 8e-3),
    "large": (8, 32, 117_492, 6e-3),
    "xlarge": (8, 32, 198_364, 6e-3),
}


def reference_config(kind: str, size: str) -> ml_collections.ConfigDict:
  """Full config of the reference's `kind`-`size` run (e.g. parcae, small = parcae-small-140m)."""
  from parcae.model.config import size_config
  c = default_config(size_config(kind, size))
  micro, accum, steps, lr = REFERENCE_RECIPES[size]
  c.train.micro_batch_size, c.train.grad_accum, c.train.steps = micro, accum, steps
  c.train.seq_len = 2048
  # Chunked head: the logits of 2048 tokens at a time (memory; see bench/). Larger chunks where the
  # reference's peak memory leaves room (H100, same call, bench/RESULTS.md "2026-12-05, session 15"):
  # parcae-small 8192: +1.3% tokens/s, 15.1 -> 15.6 GiB (reference 16.3); gpt-medium 4096: +0.8%,
  # 21.1 -> 21.2 GiB (reference 21.5).
  c.train.loss_chunk = {("parcae", "small"): 8192, ("gpt", "medium"): 4096}.get((kind, size), 2048)
  if kind == "parcae" and size != "xlarge":
    # The reference keeps every activation of the grad iterations (it checkpoints only xlarge); so do we, as
    # straight-line code: 14-15% faster than a rematerialized scan at the reference's peak memory
    # (bench/RESULTS.md, "2026-12-01, later").
    c.model.grad_unroll, c.model.remat = True, "none"
  if kind == "parcae":
    # Each batch shard's deeper half runs the last no-grad iterations alone: same iterations per sequence,
    # executed no-grad iterations 5.29 -> 4.67 per micro-batch, +2.1% tokens/s on parcae-small
    # (bench/RESULTS.md, "2026-12-01, session 8").
    c.model.no_grad_split = 2
  if kind == "gpt" and size == "medium":
    # Without remat the peak is 21.7 GiB (the reference's: 21.5). Recomputing ReLU^2's output in the first two
    # blocks keeps as little as "dots" on the first block (21.2 GiB measured; that cost ~1% speed, session
    # 6) for less work: no recomputed attention, 6.8 GB less memory traffic per step; on the H100 +0.8% tokens/s
    # over "dots" on the first block at the same peak (bench/RESULTS.md, "2026-12-05, session 18").
    c.model.block_remat, c.model.block_remat_first = "mlp_act", 2
  c.train.eval_every = 500
  c.train.log_every = 10
  c.optim.lr, c.optim.muon_lr = lr, 8e-3
  c.checkpoint.every_steps = 500
  c.data.kind = "shards"
  c.data.path = "data/fineweb-edu"  # output of data_pipelines (see README)
  return c
