"""Validation loss and bits per byte of a trained run at any loop count (`parcae eval`), and the demo."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from parcae import data as pdata
from parcae.train import checkpoint as ckpt
from parcae.train import mesh as pmesh
from parcae.train.config import with_defaults
from parcae.train.loop import evaluate, init_state, use_compile_cache
from parcae.train.step import make_eval_step


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by `parcae train`")
  with open(path) as f:
    return with_defaults(json.load(f))


def load_params(cfg, workdir: str, step=None):
  """(graphdef, params on the mesh, mesh, step) from a training run, or from `parcae convert --out DIR`."""
  mesh = pmesh.make_mesh(cfg.mesh)
  graphdef, _, _, abstract, shardings = init_state(cfg, mesh)
  ckdir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckdir) and os.path.isdir(os.path.join(workdir, "params")):
    from flax import nnx
    from parcae.convert import load_params as load_converted
    params = nnx.split(load_converted(workdir, cfg.model, quant=cfg.quant.recipe), nnx.Param)[1]
    return graphdef, jax.device_put(params, shardings["params"]), mesh, 0
  checkpointer = ckpt.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"), every_steps=1)
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first")
  state, _, _ = checkpointer.restore(step, ckpt.abstract_like(abstract, shardings))
  checkpointer.close()
  return graphdef, state["params"], mesh, step


def evaluate_run(workdir: str, loops=None, num_batches=None, step=None) -> list[dict]:
  """Deterministic validation loss and bpb per loop count (one compilation for all loop counts)."""
  cfg = load_run_config(workdir)
  use_compile_cache(cfg.train.compile_cache_dir)
  graphdef, params, mesh, step = load_params(cfg, workdir, step)
  if loops is None:
    loops = list(range(1, 2 * cfg.model.mean_recurrence + 1)) if cfg.model.kind == "parcae" else [1]
  if any(t < 1 for t in loops):
    raise ValueError(f"--loops must be >= 1, got {loops}")
  tc = cfg.train
  val = pdata.eval_batches(cfg.data, split=cfg.data.val_split, seq_len=tc.seq_len, batch_size=tc.eval_batch_size,
                           num_batches=num_batches or tc.eval_batches, process_index=jax.process_index(),
                           process_count=jax.process_count())
  bpt = (pdata.dataset_info(cfg.data).get("bytes_per_token") or {}).get(cfg.data.val_split)
  eval_step = pmesh.MeshBound(jax.jit(make_eval_step(graphdef, tc.loss_chunk)), mesh)  # see layers.shard_heads
  rows = evaluate(eval_step, params, val, loops, bpt, NamedSharding(mesh, P(("data", "fsdp"), None)))
  return [{**r, "step": int(step)} for r in rows]


def plot_loss_vs_loops(rows, path: str, train_mean: int | None = None):
  """Validation loss against the test-time loop count and, for a looped model, the last iteration's
  relative update beside it (log scale: a settling loop state falls geometrically)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  looped = all("rel_residual" in r for r in rows)
  fig, axes = plt.subplots(1, 2 if looped else 1, figsize=(10 if looped else 5, 3.5), squeeze=False)
  loops = [r["loops"] for r in rows]
  panels = [("val_loss", "validation loss (nats/token)", "linear")]
  panels += [("rel_residual", "relative update |h_T - h_(T-1)| / |h_T|", "log")] if looped else []
  for ax, (key, label, scale) in zip(axes[0], panels):
    ax.plot(loops, [r[key] for r in rows], "o-")
    ax.set_yscale(scale)
    if train_mean:
      ax.axvline(train_mean, color="gray", ls="--", label=f"training mean ({train_mean})")
      ax.legend()
    ax.set_xlabel("test-time loop count T")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def unigram_entropy(data_cfg, split: str | None = None) -> float:
  """Entropy (nats/token) of the token frequencies of a split: the loss of the best context-free model."""
  import numpy as np
  from parcae.data.pipeline import open_split
  stream = open_split(data_cfg, split or data_cfg.train_split)
  counts = np.bincount(stream.tokens(), minlength=stream.vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def run_demo(config_path: str, workdir: str, overrides=()):
  """`make demo`: train the tiny CPU model, evaluate at loops 1..2*mean, plot loss against loop count."""
  from parcae.config import load_config
  from parcae.train.loop import train
  cfg = load_config(config_path, overrides)
  train(cfg, workdir)
  mu = cfg.model.mean_recurrence
  rows = evaluate_run(workdir, loops=list(range(1, 2 * mu + 1)))
  plot = os.path.join(workdir, "val_loss_vs_loops.png")
  plot_loss_vs_loops(rows, plot, train_mean=mu)
  unigram = unigram_entropy(cfg.data)
  print("\nloops  val_loss  bpb     rel_residual  state_norm")
  for r in rows:
    bpb = "-" if r["bpb"] is None else f"{r['bpb']:.4f}"
    print(f"{r['loops']:5d}  {r['val_loss']:.4f}  {bpb:6s}  {r.get('rel_residual', float('nan')):12.4g}  "
          f"{r.get('state_norm', float('nan')):10.4g}")
  print(f"unigram entropy of the training split: {unigram:.4f} nats/token "
        f"(a model that ignores context cannot go below it)")
  with open(os.path.join(workdir, "loops_eval.json"), "w") as f:
    json.dump({"rows": rows, "unigram_entropy": unigram}, f, indent=2)
  print(f"plot: {plot}")
