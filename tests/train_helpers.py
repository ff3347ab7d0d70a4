"""Shared fixtures for the trainer tests: a tiny model config and a synthetic token-shard dataset."""
import json
import os

import numpy as np

from parcae.data.shards import ShardWriter
from parcae.model.config import default_model_config
from parcae.train.config import default_config

VOCAB = 128


def write_dataset(path, n_docs=300, seed=0):
  """Random 'documents' with a learnable structure (each token often followed by token+1)."""
  rng = np.random.default_rng(seed)
  for split, n in (("train", n_docs), ("val", 40)):
    w = ShardWriter(path, split, vocab_size=VOCAB, eos_id=1, shard_tokens=4096)
    for _ in range(n):
      start = rng.integers(3, VOCAB, size=rng.integers(8, 60))
      doc = np.where(rng.random(start.size) < 0.7, (np.roll(start, 1) + 1) % (VOCAB - 3) + 3, start)
      w.add(doc.astype(np.int64), 2 * doc.size)
    w.close()
  return path


def tiny_config(data_path, **train):
  m = default_model_config()
  m.vocab_size, m.d_model, m.n_heads, m.max_seq_len, m.compute_dtype = VOCAB, 64, 2, 32, "float32"
  m.prelude_layers, m.core_layers, m.coda_layers = 1, 1, 1
  m.mean_recurrence, m.mean_backprop_depth = 3, 2
  c = default_config(m)
  c.data.kind, c.data.path = "shards", str(data_path)
  c.train.steps, c.train.seq_len, c.train.micro_batch_size = 6, 16, 8
  c.train.log_every, c.train.eval_batches, c.train.eval_batch_size = 1, 2, 8
  c.train.eval_loops = (1, 3)
  c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
  c.wandb.enabled = False
  c.optim.lr, c.optim.muon_lr = 3e-3, 1e-2
  for k, v in train.items():
    c.train[k] = v
  return c


def train_rows(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r for r in rows if r.get("kind") is None}


def lower_sharded_step_for_cuda(cfg, shape=(2, 2, 2)):
  """StableHLO text of cfg's whole train step on a data x fsdp x tensor mesh (`shape`) of the 8 CPU devices,
  lowered for CUDA (with the `cuda_lowering` fixture, the kernels lower through Triton)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from parcae.train import mesh as pmesh
  from parcae.train.loop import init_state
  from parcae.train.step import make_train_step
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
  mesh = pmesh.make_mesh(cfg.mesh, jax.devices())
  graphdef, optimizer, _, abstract, shardings = init_state(cfg, mesh)
  batch_sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
  tc = cfg.train
  batch = {k: jax.ShapeDtypeStruct((tc.grad_accum, tc.micro_batch_size, tc.seq_len), jnp.int32, sharding=batch_sh)
           for k in ("inputs", "targets")}
  step = jax.jit(make_train_step(graphdef, optimizer, tc), in_shardings=(shardings, batch_sh, P()),
                 out_shardings=(shardings, None))
  run = {k: jax.ShapeDtypeStruct((), jnp.int32) for k in ("total_steps", "warmup_steps", "cooldown_steps")}
  with jax.set_mesh(mesh):
    return step.trace(abstract, batch, run).lower(lowering_platforms=("cuda",)).as_text()


def loss_and_grads(model_cfg, ids):
  """A model built from model_cfg, its parameters perturbed (so no gradient is zero by init): the jitted loss
  mean(logits^2) of a Parcae pass (no-grad iterations n = [1, 2], grad iterations k = [2, 1]) on ids and its
  gradients. For comparing two implementations of one model bit for bit."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from parcae import model as M
  graphdef, state = nnx.split(M.build(model_cfg, jax.random.key(0)))
  state = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape, a.dtype), state)

  def loss(state):
    model = nnx.merge(graphdef, state)
    y, _ = model.hidden(ids, jnp.array([1, 2]), jnp.array([2, 1]), key=jax.random.key(3), grad_steps=2)
    return jnp.mean(model.logits(y).astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss))(state)
