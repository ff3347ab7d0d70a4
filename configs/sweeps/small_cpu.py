"""small_cpu: the real small recurrence sweep on CPU. mu in {1, 2, 4, 6, 8} x 3 FLOP budgets = 15 runs of a
tiny Parcae (d_model 64, 1 prelude / 1 core / 1 coda block, no value embeddings, 287k parameters of which 131k
are the tied embedding) on the embedded corpus (data.kind="embedded", 2048-token BPE), no download.

Command:
  parcae sweep --config configs/sweeps/small_cpu.py --out runs/sweep_small
  parcae fit --results runs/sweep_small/results.csv --law testtime --plot-dir docs/figures
  parcae fit --results runs/sweep_small/results.csv --law training --plot-dir docs/figures
  parcae fit --results runs/sweep_small/results.csv --law isoflop --plot-dir docs/figures
Expected: 22 minutes measured on 2 shared CPU cores (15 runs of 57..540 steps of 1024 tokens, each with ~30 s of start-up
and compilation); a results table of 15 runs x (2-3 in-training + 1 final) evaluations x 16 loop counts (816 rows). Final
losses 4.1-5.9 nats, rising with mu at every budget (mu=1 compute-optimal this early in training); measured
numbers and fits: docs/sweep.md.

Value embeddings are off because with an odd number of unique layers the alternate-layer VE rule depends on
s = ceil(mu/2), so the parameter count would change with mu and the fixed-size laws would refuse the table.
"""
import ml_collections

from parcae.model.config import default_model_config
from parcae.train.config import default_config


def base_config():
  m = default_model_config()
  m.vocab_size = 2048
  m.d_model = 64
  m.n_heads = 2
  m.prelude_layers, m.core_layers, m.coda_layers = 1, 1, 1
  m.value_embeds = False
  m.max_seq_len = 64
  m.compute_dtype = "float32"  # bf16 matmuls are slow on CPU
  c = default_config(m)
  c.data.kind = "embedded"
  c.data.vocab_size = 2048
  c.train.seq_len = 64
  c.train.micro_batch_size = 16  # 1024 tokens per step
  c.train.log_every = 10
  c.train.eval_batches = 4
  c.train.eval_batch_size = 16
  c.optim.lr = 4e-3
  c.optim.muon_lr = 1e-2
  c.checkpoint.every_steps = 100
  c.mesh.data = -1
  c.wandb.enabled = False
  return c


def get_config():
  c = ml_collections.ConfigDict()
  c.base = base_config()  # embedded run config (the tiny model above)
  c.mu = (1, 2, 4, 6, 8)  # mean training recurrences; s = ceil(mu / 2)
  c.budgets = (1.5e11, 3e11, 6e11)  # training FLOPs (reference convention): 135..540 steps at mu=1, 57..228 at mu=8
  c.flops_convention = "reference"  # the reference's cost accounting, attention at block size = seq_len
  c.eval_loops = "1-16"  # every run evaluated at T = 1..16 (test-time law needs >= 4 points per run)
  c.intermediate_evals = 2  # validations every floor(steps / 3) steps
  c.out = "runs/sweep_small"  # output directory
  return c
