"""demo_cpu: a tiny Parcae trained on CPU on the embedded corpus (text that ships with Python), no download.

Command:
  parcae train --config configs/demo_cpu.py --workdir runs/demo
  parcae eval --workdir runs/demo --loops 1,2,3,4,5,6,7,8
or simply `make demo` (trains, evaluates at loops 1..2*mean and plots validation loss against loop count).
Expected: a few minutes on 2 CPU cores; validation loss well below the corpus's unigram entropy, falling with
loop count up to about the training mean (see README for the measured numbers).
"""
from parcae.model.config import default_model_config
from parcae.train.config import default_config


def get_config():
  m = default_model_config()
  m.vocab_size = 2048
  m.d_model = 128
  m.n_heads = 2
  m.prelude_layers, m.core_layers, m.coda_layers = 1, 2, 1
  m.mean_recurrence = 4
  m.mean_backprop_depth = 2
  m.max_seq_len = 256
  m.compute_dtype = "float32"  # bf16 matmuls are slow on CPU
  c = default_config(m)
  c.data.kind = "embedded"
  c.data.vocab_size = 2048
  c.train.steps = 300
  c.train.seq_len = 128
  c.train.micro_batch_size = 16
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_batches = 4
  c.train.eval_batch_size = 16
  c.optim.lr = 4e-3
  c.optim.muon_lr = 1e-2
  c.checkpoint.every_steps = 100
  c.mesh.data = -1
  c.wandb.enabled = False  # set True (offline by default) to track the demo with wandb
  return c
