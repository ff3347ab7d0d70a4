"""`parcae train`: the top-level training loop. Read it top to bottom.

Everything a run needs lives in its workdir: config.json, metrics.jsonl, checkpoints/, eval.json.
A workdir that already holds checkpoints is resumed (params, optimizer state, step, RNG and data position),
and SIGTERM / SIGINT save a checkpoint before exiting, so a preemption loses no completed step.
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from parcae import compile_target
from parcae import data as pdata
from parcae.model import build
from parcae.scaling.flops import executed_flops_per_token
from parcae.train import checkpoint as ckpt
from parcae.train import mesh as pmesh
from parcae.train import schedules
from parcae.train.distributed import maybe_initialize_distributed
from parcae.train.metrics import DeferredMetrics, MetricsLogger
from parcae.train.optim import make_optimizer
from parcae.train.step import make_eval_step, make_train_step

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per device


def peak_flops_per_device():
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


def resolve_eval_loops(cfg):
  loops = [cfg.model.mean_recurrence if t == 0 else int(t) for t in cfg.train.eval_loops]
  return sorted(set(loops)) if cfg.model.kind == "parcae" else [1]


def use_compile_cache(path: str) -> str | None:
  """Keeps compiled programs in `path` (train.compile_cache_dir) across processes, so a resumed or repeated
  run and every run of a sweep that differs only in train.steps skip XLA compilation. A directory set
  before (JAX_COMPILATION_CACHE_DIR, jax.config) is kept; returns the directory in use."""
  current = jax.config.jax_compilation_cache_dir
  if current or not path:
    return current
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as err:  # e.g. a read-only home on a cluster: train anyway, without the cache
    warnings.warn(f"train.compile_cache_dir={path!r} cannot be created ({err}); compiling without a persistent "
                  "cache. Set it to a writable directory, or to '' to turn it off.")
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path


def init_state(cfg, mesh):
  """Abstract and concrete train state, built directly into its sharding (no full copy on one device)."""
  from parcae.quant import quant_spec  # pylint: disable=g-import-not-at-top
  quant = quant_spec(cfg.quant.recipe, cfg.quant.get("impl", "auto"))

  def create():
    model = build(cfg.model, jax.random.key(cfg.train.seed), quant=quant)
    graphdef, params = nnx.split(model, nnx.Param)
    opt = make_optimizer(cfg.optim, params)
    return {"params": params, "opt": opt.init(params), "step": jnp.int32(0),
            "key": jax.random.fold_in(jax.random.key(cfg.train.seed), 1)}

  abstract = jax.eval_shape(create)
  param_sh = pmesh.param_shardings(abstract["params"], mesh)
  rep = NamedSharding(mesh, P())
  shardings = {"params": param_sh, "opt": pmesh.opt_state_shardings(abstract["opt"], abstract["params"], mesh),
               "step": rep, "key": rep}
  graphdef = nnx.split(nnx.eval_shape(lambda: build(cfg.model, jax.random.key(0), quant=quant)), nnx.Param)[0]
  optimizer = make_optimizer(cfg.optim, abstract["params"])
  return graphdef, optimizer, create, abstract, shardings


def jit_train_step(graphdef, optimizer, train_cfg, shardings, mesh, donate: bool = True):
  """(the jitted step (state, batch, run) -> (state, metrics) bound to `mesh`, the batch sharding)."""
  batch_sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))  # [accum, micro, seq]: micro split
  step = jax.jit(make_train_step(graphdef, optimizer, train_cfg),
                 in_shardings=(shardings, batch_sh, NamedSharding(mesh, P())), out_shardings=(shardings, None),
                 donate_argnums=0 if donate else ())
  return pmesh.MeshBound(step, mesh), batch_sh


def run_length_arrays(cfg, mesh):
  """The run length (train.steps and the schedule's warm-up / cool-down) as replicated int32 scalars: the
  train step's third argument."""
  run = schedules.run_length(cfg.optim, cfg.train.steps)
  return jax.device_put({k: np.int32(v) for k, v in run.items()}, NamedSharding(mesh, P()))


def check_batch(cfg, mesh):
  n_data = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.train.micro_batch_size % n_data:
    raise ValueError(f"train.micro_batch_size={cfg.train.micro_batch_size} must be divisible by the "
                     f"data-parallel devices (mesh data*fsdp = {n_data}); change it or mesh.data/mesh.fsdp")


def put_batch(batch, accum, sharding):
  """Host batch [micro*accum (local), S] -> global device arrays [accum, micro, S]."""
  out = {}
  for name, x in batch.items():
    x = np.asarray(x).reshape(accum, -1, x.shape[-1])
    out[name] = jax.make_array_from_process_local_data(sharding, x)
  return out


def evaluate(eval_step, params, batches, loops_list, bytes_per_token, sharding):
  """Validation loss (nats/token), bits per byte and the loop telemetry (`step.EVAL_TELEMETRY`, averaged over
  the batches) at each loop count: one pass over the loop per batch serves every count."""
  loops = sorted(set(int(t) for t in loops_list))
  loops_K = jnp.asarray(loops, jnp.int32)
  sums, count, telemetry = np.zeros(len(loops)), 0.0, {}
  for b in batches:
    b = {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in b.items()}
    s, c, tel = jax.device_get(eval_step(params, b, loops_K))
    sums, count = sums + np.asarray(s, np.float64), count + float(c)
    for k, v in tel.items():
      telemetry[k] = telemetry.get(k, 0.0) + np.asarray(v, np.float64) / len(batches)
  rows = []
  for i, t in enumerate(loops):
    loss = float(sums[i] / count)
    bpb = loss / math.log(2) / bytes_per_token if bytes_per_token else None
    rows.append({"loops": t, "val_loss": loss, "bpb": bpb, **{k: float(v[i]) for k, v in telemetry.items()}})
  return rows


def train(cfg, workdir: str, *, progress: bool = True, max_steps: int | None = None, devices=None) -> dict:
  """Train `cfg` in `workdir` (resuming if it holds checkpoints). max_steps: stop after that many steps of
  this call (a later call resumes); devices: the devices of the mesh (default: all)."""
  maybe_initialize_distributed()
  use_compile_cache(cfg.train.compile_cache_dir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=2))
  mesh = pmesh.make_mesh(cfg.mesh, devices)
  run = run_length_arrays(cfg, mesh)
  tc = cfg.train
  global_batch = tc.micro_batch_size * tc.grad_accum
  check_batch(cfg, mesh)

  # ---- data
  if cfg.data.kind == "embedded":
    pdata.prepare_embedded(pdata.data_dir(cfg.data), vocab_size=cfg.data.vocab_size)
  info = pdata.dataset_info(cfg.data)
  if info["vocab_size"] > cfg.model.vocab_size:
    raise ValueError(f"the data's vocabulary ({info['vocab_size']}) exceeds model.vocab_size="
                     f"{cfg.model.vocab_size}; raise model.vocab_size")
  it = pdata.make_train_iterator(cfg.data, seq_len=tc.seq_len, global_batch=global_batch, seed=tc.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count())
  val = pdata.eval_batches(cfg.data, split=cfg.data.val_split, seq_len=tc.seq_len,
                           batch_size=tc.eval_batch_size, num_batches=tc.eval_batches,
                           process_index=jax.process_index(), process_count=jax.process_count())
  bytes_per_token = (info.get("bytes_per_token") or {}).get(cfg.data.val_split)

  # ---- state: fresh or restored
  graphdef, optimizer, create, abstract, shardings = init_state(cfg, mesh)
  checkpointer = ckpt.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                   every_steps=cfg.checkpoint.every_steps, keep_last=cfg.checkpoint.keep_last,
                                   keep_every=cfg.checkpoint.keep_every or None,
                                   async_save=cfg.checkpoint.async_save)
  start = checkpointer.latest_step()
  if start is None:
    state = jax.jit(create, out_shardings=shardings)()
    start = 0
  else:
    state, data_state, _ = checkpointer.restore(start, ckpt.abstract_like(abstract, shardings))
    it.set_state(data_state)
  eval_sh = NamedSharding(mesh, P(("data", "fsdp"), None))
  train_step, batch_sh = jit_train_step(graphdef, optimizer, tc, shardings, mesh)
  eval_step = pmesh.MeshBound(jax.jit(make_eval_step(graphdef, tc.loss_chunk)), mesh)
  eval_loops = resolve_eval_loops(cfg)

  # ---- loop
  logger = MetricsLogger(workdir, total_steps=tc.steps, start_step=start, is_main=is_main,
                         wandb_cfg=cfg.wandb, run_config=cfg, progress=progress)
  deferred, preempt = DeferredMetrics(), ckpt.Preemption()
  tokens_per_step = global_batch * tc.seq_len
  peak = peak_flops_per_device()
  end = tc.steps if max_steps is None else min(tc.steps, start + max_steps)
  last_time, step, stopped, rows = time.time(), start, None, None

  def report(done):
    """Checks a fetched (step, metrics) pair and logs it (every log_every-th step, the first and the last
    step, and the step a signal stopped at); the rate covers the time since the previous fetch."""
    nonlocal last_time
    if done is None:
      return
    prev_step, m = done
    now = time.time()
    m["tokens_per_s"] = tokens_per_step / max(now - last_time, 1e-9)
    last_time = now
    _add_mfu(m, cfg, tc.seq_len, peak)
    if not math.isfinite(m["loss"]):
      raise FloatingPointError(f"non-finite loss at step {prev_step}; last checkpoint: "
                               f"{checkpointer.latest_step()}")
    if tc.loss_guard and prev_step * tokens_per_step > tc.loss_guard_tokens and m["loss"] > tc.loss_guard:
      raise FloatingPointError(f"loss guard: loss {m['loss']:.3f} > train.loss_guard={tc.loss_guard}")
    if prev_step % tc.log_every == 0 or prev_step in (1, end) or preempt.requested:
      logger.log(prev_step, m)

  try:
    for step in range(start + 1, end + 1):
      batch = put_batch(next(it), tc.grad_accum, batch_sh)
      if step == start + 1:  # ahead-of-time compile: report memory before the first step runs
        train_step = compile_and_report(train_step, (state, batch, run), logger, step)
        last_time = time.time()  # tokens_per_s counts training only: not the compile, evaluations or saves
      state, metrics = train_step(state, batch, run)
      report(deferred.push(step, metrics))
      if tc.eval_every and step % tc.eval_every == 0 and step < end:
        jax.block_until_ready(state)  # this step's compute stays in its own rate
        t0 = time.time()
        logger.log_eval(step, evaluate(eval_step, state["params"], val, eval_loops, bytes_per_token, eval_sh))
        last_time += time.time() - t0
      if checkpointer.should_save(step) or preempt.requested:
        # Step `step`'s metrics are logged before its checkpoint exists: a kill after the save loses no row
        # (a resumed run starts at step + 1), and a non-finite loss is caught before it is saved.
        report(deferred.flush())
        t0 = time.time()
        checkpointer.save(step, state, it.get_state(), {"config": cfg.to_dict()}, force=preempt.requested)
        last_time += time.time() - t0
      if preempt.requested:
        stopped = f"signal {preempt.signal}"
        break
    report(deferred.flush())  # the last step (unless a checkpoint took it), checked before its checkpoint
    checkpointer.save(step, state, it.get_state(), {"config": cfg.to_dict()}, force=True)
    rows = evaluate(eval_step, state["params"], val, eval_loops, bytes_per_token, eval_sh)
    logger.log_eval(step, rows)
  finally:
    checkpointer.wait()
    checkpointer.close()
    logger.close()
    preempt.restore_handlers()
  summary = {"step": step, "stopped": stopped, "eval": rows if stopped is None else None}
  if is_main and stopped is None:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(rows, f, indent=2)
  return summary


def compile_and_report(jitted, args, logger, step):
  """Lower and compile the train step once, log its memory analysis (GiB per device), return the executable."""
  t0 = time.time()
  compiled = jitted.lower(*args).compile()
  logger.log(step, {"kind": "compile", "compile_s": time.time() - t0, **memory_row(compiled)})
  return compiled


def memory_row(compiled) -> dict:
  """XLA's memory analysis of a compiled step in GiB per device: arguments, outputs, the donated bytes
  outputs reuse (alias), temporaries, generated code, and peak_estimate = their sum less the alias (before
  allocator fragmentation)."""
  mem = compiled.memory_analysis()
  row = {}
  for name in ("argument", "output", "alias", "temp", "generated_code"):
    value = getattr(mem, f"{name}_size_in_bytes", None) if mem is not None else None
    if value is not None:
      row[f"{name}_gib"] = value / 2**30
  if all(f"{n}_gib" in row for n in ("argument", "output", "alias", "temp")):
    row["peak_estimate_gib"] = (row["argument_gib"] + row["output_gib"] - row["alias_gib"] + row["temp_gib"]
                                + row.get("generated_code_gib", 0.0))
  return row


def compile_train_step(cfg, devices=None, target: str | None = None):
  """(compiled train step, mesh, compile seconds): cfg's step for its mesh on `devices` (default: all),
  compiled from abstract shapes without allocating an array. target: a GPU target such as "h100x8"
  (`parcae.train.targets`) to compile for instead, on compile-only devices with the kernels a GPU run uses
  (needs jax's CUDA plugin, not a GPU)."""
  if target is not None:
    from parcae.train.targets import target_devices  # pylint: disable=g-import-not-at-top
    devices = target_devices(target)
  with compile_target.compiling_for("gpu" if target is not None else compile_target.platform()):
    mesh = pmesh.make_mesh(cfg.mesh, devices)
    check_batch(cfg, mesh)
    graphdef, optimizer, _, abstract, shardings = init_state(cfg, mesh)
    step, batch_sh = jit_train_step(graphdef, optimizer, cfg.train, shardings, mesh)
    tc = cfg.train
    shape = (tc.grad_accum, tc.micro_batch_size, tc.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh) for k in ("inputs", "targets")}
    run = {k: jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
           for k in schedules.run_length(cfg.optim, tc.steps)}
    t0 = time.time()
    compiled = step.lower(ckpt.abstract_like(abstract, shardings), batch, run).compile()
  return compiled, mesh, time.time() - t0


def aot_compile(cfg, devices=None, target: str | None = None) -> dict:
  """`compile_train_step`'s compile time and `memory_row` per device, and the device's memory: whether a
  config fits, before a run starts (on this machine's devices or, with `target`, on GPUs it does not have)."""
  compiled, mesh, seconds = compile_train_step(cfg, devices, target)
  limit = _memory_limit(mesh.devices.flat[0])
  row = {"devices": mesh.devices.size, "device_kind": mesh.devices.flat[0].device_kind,
         "mesh": dict(mesh.shape), "compile_s": seconds, **memory_row(compiled),
         "device_limit_gib": limit / 2**30 if limit else None}  # what jax's allocator may use here
  if target is not None:  # the target GPU's whole memory (jax preallocates XLA_PYTHON_CLIENT_MEM_FRACTION of it)
    from parcae.train.targets import GPUS, parse_target  # pylint: disable=g-import-not-at-top
    row["device_memory_gib"] = GPUS[parse_target(target)[0]][1] / 2**30
  return row


def _memory_limit(device):
  """The device's memory limit in bytes, or None (a CPU, or a compile-only device that has no memory)."""
  try:
    return (device.memory_stats() or {}).get("bytes_limit")
  except jax.errors.JaxRuntimeError:
    return None


def _add_mfu(m, cfg, seq_len, peak):
  """MFU of the executed work (iterations actually run) and of the useful work (the sampled depths)."""
  if cfg.model.kind == "parcae":
    from parcae.model.config import grad_depth
    executed = executed_flops_per_token(cfg.model, seq_len, n=m.get("n_exec_mean", 0.0), k=grad_depth(cfg.model))
    useful = executed_flops_per_token(cfg.model, seq_len, n=m.get("n_mean", 0.0), k=m.get("k_mean", 0.0))
  else:
    executed = useful = executed_flops_per_token(cfg.model, seq_len)
  m["flops_per_token_executed"], m["flops_per_token_useful"] = executed, useful
  if peak:
    n_dev = jax.device_count()  # MFU per device of the whole job
    m["mfu"] = m["tokens_per_s"] * executed / (peak * n_dev)
    m["mfu_useful"] = m["tokens_per_s"] * useful / (peak * n_dev)
