"""micro_cpu: a 4-run micro sweep for tests and smoke checks: mu in {1, 2} x 2 FLOP budgets, a tiny Parcae
(d_model 32, one block per stage), 16-token sequences, 7..19 steps per run.

Command (the tests point data at synthetic shards with --config.base.data.kind=shards
--config.base.data.path=DIR; on its own it uses the embedded corpus):
  parcae sweep --config configs/sweeps/micro_cpu.py --out runs/sweep_micro
  parcae fit --results runs/sweep_micro/results.csv --law testtime
Expected: 4 runs, each well under a minute on CPU (mostly compilation); results.csv with 4 runs x
(1 in-training + 1 final) evaluations x 4 loop counts. The losses are barely trained; this checks plumbing.
"""
import ml_collections

from parcae.model.config import default_model_config
from parcae.train.config import default_config


def base_config():
  m = default_model_config()
  m.vocab_size = 2048
  m.d_model = 32
  m.n_heads = 2
  m.prelude_layers, m.core_layers, m.coda_layers = 1, 1, 1
  m.value_embeds = False  # keeps the parameter count independent of s
  m.max_seq_len = 16
  m.compute_dtype = "float32"
  c = default_config(m)
  c.data.kind = "embedded"
  c.data.vocab_size = 2048
  c.train.seq_len = 16
  c.train.micro_batch_size = 8  # 128 tokens per step
  c.train.log_every = 5
  c.train.eval_batches = 2
  c.train.eval_batch_size = 8
  c.optim.lr = 3e-3
  c.optim.muon_lr = 1e-2
  c.checkpoint.every_steps = 5
  c.checkpoint.async_save = False
  c.mesh.data = -1
  c.wandb.enabled = False
  return c


def get_config():
  c = ml_collections.ConfigDict()
  c.base = base_config()  # embedded run config
  c.mu = (1, 2)  # mean training recurrences; s = ceil(mu / 2) = 1
  c.budgets = (2.5e8, 6e8)  # training FLOPs (reference convention)
  c.flops_convention = "reference"  # FLOPs per token convention
  c.eval_loops = "1-4"  # test-time loop counts at the final step
  c.intermediate_evals = 1  # one validation half way
  c.min_steps = 5  # the micro budgets give 7..19 steps
  c.out = "runs/sweep_micro"  # output directory
  return c
