"""Quantized training end to end: the recipe reaches every GEMM of every loop iteration, the sharded trainer
runs with it, bf16 is the plain model, mxfp8 is close to it, and stochastic recipes are seeded."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import parcae.quant as pq
from parcae.cli import main as cli_main
from parcae.model import build
from parcae.model.config import grad_depth
from parcae.train.loop import train
from parcae.train.step import micro_loss
sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import VOCAB, tiny_config, train_rows, write_dataset  # noqa: E402

GEMMS_PER_BLOCK = 2 + 2  # qkv (one GEMM), o and fc, proj (the value-embedding gate stays high precision)


class TrainCfg:
  loss_chunk = 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("data"))


def model_cfg(core_layers=1, compute_dtype="float32"):
  m = tiny_config("unused").model
  m.core_layers, m.compute_dtype = core_layers, compute_dtype
  return m


def batch(b=4, s=16, seed=1):
  ids = jax.random.randint(jax.random.key(seed), (b, s + 1), 0, VOCAB)
  return {"inputs": ids[:, :-1], "targets": ids[:, 1:]}


def perturbed(model):
  """Give the zero-initialised output projections (attn.o, mlp.proj) small random values, so that every
  GEMM of the model influences the output (at init the branches add exactly zero, whatever the recipe)."""
  _, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [p if np.any(np.asarray(p)) else 0.05 * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def grad_fn(model):
  """jit(value_and_grad) of the trainer's micro-batch loss, with the quant key as an argument."""
  graphdef, params = nnx.split(model, nnx.Param)
  n_B, k_B = jnp.array([1, 3, 2, 0], jnp.int32), jnp.array([2, 1, 2, 2], jnp.int32)

  def loss(p, b, quant_key):
    return micro_loss(p, graphdef, b, n_B, k_B, (jax.random.key(5), quant_key), TrainCfg)[0]
  return params, jax.jit(jax.value_and_grad(loss))


def record_qdot_calls(monkeypatch):
  """Patch parcae.quant.qdot (Linear looks it up at call time) to log, at trace time, the recipe and key of
  every call and, at run time, every executed call's key. It then runs the plain matmul: the wiring is under
  test here, not the numerics (tests/test_quant_dense.py), and the plain matmul compiles in seconds."""
  traced, executed = [], []

  def logged(x, w, recipe, *, key=None, compute_dtype=jnp.bfloat16, act=None):
    traced.append((recipe, key is not None))
    if key is not None:
      jax.debug.callback(lambda k: executed.append(np.asarray(k).tobytes()), jax.random.key_data(key))
    return jnp.dot((x if act is None else act(x)).astype(compute_dtype), w.astype(compute_dtype))

  monkeypatch.setattr(pq, "qdot", logged)
  return traced, executed


def test_every_loop_iteration_quantizes_with_its_own_key(monkeypatch):
  """Both loop phases (the no-grad while_loop and the grad scan) send every core GEMM through qdot with the
  recipe, and each executed GEMM gets a distinct key (folded per stage, iteration, phase and block)."""
  traced, executed = record_qdot_calls(monkeypatch)
  cfg = model_cfg(core_layers=2)
  model = build(cfg, jax.random.key(0), quant="quartet")
  assert {blk.attn.q.quant for blk in model.core} == {"quartet"}
  assert {blk.mlp.proj.quant for blk in model.core} == {"quartet"}
  params, f = grad_fn(model)
  loss, _ = f(params, batch(), jax.random.key(6))
  jax.block_until_ready(loss)
  n_max, k_steps = 3, grad_depth(cfg)  # n_B above: max 3; the scan runs grad_depth iterations
  per_core = GEMMS_PER_BLOCK * cfg.core_layers
  expected = GEMMS_PER_BLOCK * (cfg.prelude_layers + cfg.coda_layers) + per_core * (n_max + k_steps)
  assert {r for r, _ in traced} == {"quartet"}
  assert all(has_key for _, has_key in traced)
  # Traced: prelude, while body, scan body, coda (each loop body once; remat recomputes without retracing
  # a different key). Executed: every iteration of both loops, each GEMM with a key of its own.
  assert len(set(executed)) == expected, (len(set(executed)), expected)
  assert len(executed) >= expected


def test_quantized_layers_read_and_keep_the_compute_dtype_operand():
  """A quantized Linear hands its GEMM the compute-dtype (bf16) operand, as a hardware quantize kernel reads
  it, not the float32 norm output: half the bytes for the kernels, and the backward keeps no float32 copy."""
  import contextlib
  import io
  from jax.ad_checkpoint import print_saved_residuals
  from parcae.model.layers import Linear
  lin = Linear(0.05 * jax.random.normal(jax.random.key(0), (64, 96)), jnp.bfloat16, "quartet")
  gd, st = nnx.split(lin)
  x = jax.random.normal(jax.random.key(1), (32, 64), jnp.float32)  # float32, as the residual stream's norms give

  def loss(st, x):
    return jnp.sum(nnx.merge(gd, st)(x, jax.random.key(2)).astype(jnp.float32))
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    print_saved_residuals(loss, st, x)
  kept = [line.split(" ")[0] for line in buf.getvalue().splitlines()]
  assert "bf16[32,64]" in kept and "f32[32,64]" not in kept, kept
  g = jax.jit(jax.grad(loss, argnums=1))(st, x)
  assert g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g))


def test_bf16_recipe_is_the_plain_model(monkeypatch):
  """Routing every Linear through qdot(..., "bf16") changes nothing, bit for bit, in the forward (at the
  training depth split) and in the gradients; the quant key is ignored."""
  cfg = model_cfg(compute_dtype="bfloat16")
  plain = perturbed(build(cfg, jax.random.key(0)))
  params, f_plain = grad_fn(plain)
  b = batch()
  loss0, g0 = f_plain(params, b, jax.random.key(6))
  logits0 = jax.jit(lambda m, x: m(x, loops=3))(plain, b["inputs"])

  orig = pq.qdot
  monkeypatch.setattr(pq, "qdot", lambda x, w, recipe, **kw: orig(x, w, "bf16", **kw))
  routed = perturbed(build(cfg, jax.random.key(0), quant="mxfp8"))  # Linear takes the qdot path
  params_r, f_routed = grad_fn(routed)
  jax.tree.map(np.testing.assert_array_equal, params, params_r)  # the recipe does not change the init
  loss1, g1 = f_routed(params_r, b, jax.random.key(99))
  logits1 = jax.jit(lambda m, x: m(x, loops=3))(routed, b["inputs"])
  np.testing.assert_array_equal(np.asarray(logits0), np.asarray(logits1))
  assert float(loss0) == float(loss1)
  jax.tree.map(np.testing.assert_array_equal, g0, g1)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def gemm_error(recipe):
  """Relative L2 error of one quantized GEMM on Gaussian data, against float64 numpy."""
  x = np.random.default_rng(0).standard_normal((64, 64))
  w = 0.1 * np.random.default_rng(1).standard_normal((64, 128))
  y = pq.qdot(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), recipe, compute_dtype=jnp.float32)
  return rel_err(y, x @ w)


def test_mxfp8_forward_differs_but_stays_close():
  """The model's logits under MXFP8 move (it is really quantized) but stay close: errors of small relative
  size propagate linearly, so the logits' relative error is a small multiple of one GEMM's (measured here,
  ~4% for E4M3 with 3 mantissa bits) -- below 3x with ~5 quantized GEMMs in series per stage adding in
  quadrature -- does not grow with loop count (the loop is contractive), and is far below NVFP4's."""
  cfg = model_cfg()
  ids = batch()["inputs"]
  logits = {}
  for recipe in ("bf16", "mxfp8", "nvfp4"):
    m = perturbed(build(cfg, jax.random.key(0), quant=recipe))
    f = jax.jit(lambda m, x, t: m(x, loops=t))  # loop count traced: one compilation for both
    logits[recipe] = [np.asarray(f(m, ids, jnp.int32(t))) for t in (1, 3)]
  e8 = [rel_err(a, b) for a, b in zip(logits["mxfp8"], logits["bf16"])]
  e4 = [rel_err(a, b) for a, b in zip(logits["nvfp4"], logits["bf16"])]
  g8, g4 = gemm_error("mxfp8"), gemm_error("nvfp4")
  assert 0.01 < g8 < 0.05 and g4 > 2.5 * g8, (g8, g4)  # the formats' own error sizes (3 vs 1 mantissa bits)
  for t in range(2):
    assert 0 < e8[t] < 3 * g8, (e8, g8)
    assert e4[t] > 2.5 * e8[t], (e4, e8)  # linear propagation keeps the formats' ratio
  assert e8[1] < 1.5 * e8[0], e8  # 3 loop iterations do not amplify the error of 1


def test_pallas_impl_model_forward_equals_jnp(monkeypatch):
  """A model built with quant "mxfp8@pallas" (config quant.impl=pallas) runs every GEMM operand through the
  one-pass kernels (interpret mode on CPU) and gives the jnp recipe's logits bit for bit, in the loop too."""
  from parcae.quant.kernels import rotq
  calls = []
  kernel = rotq.rotate_quantize
  monkeypatch.setattr(rotq, "rotate_quantize", lambda x, *a, **k: calls.append(x.shape) or kernel(x, *a, **k))
  cfg = model_cfg()
  ids = batch()["inputs"]
  out = []
  for spec in ("mxfp8", "mxfp8@pallas"):
    m = perturbed(build(cfg, jax.random.key(0), quant=spec))
    out.append(np.asarray(jax.jit(lambda m, x: m(x, loops=2))(m, ids)))
  # 2 operands x 4 GEMMs (qkv, o, fc, proj) x 3 blocks (prelude, core, coda; the loop body is traced once)
  assert len(calls) == 2 * GEMMS_PER_BLOCK * 3, len(calls)
  np.testing.assert_array_equal(out[0], out[1])


def write_config(tmp_path, cfg):
  path = tmp_path / "cfg.py"
  path.write_text("import ml_collections, json\n"
                  f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
  return str(path)


def test_unknown_recipe_is_refused_with_the_allowed_names(data, tmp_path, capsys):
  cfg = tiny_config(data)
  argv = ["train", "--config", write_config(tmp_path, cfg), "--workdir", str(tmp_path / "w"),
          "--config.quant.recipe=fp4"]
  assert cli_main(argv) == 2
  err = capsys.readouterr().err
  assert "'fp4'" in err and "quartet" in err and "mxfp8" in err
  assert cli_main(argv[:-1] + ["--config.quant.impl=cuda"]) == 2
  assert "quant.impl='cuda'" in capsys.readouterr().err


@pytest.mark.slow
def test_quartet_gradients_are_quantized_and_seeded():
  """Quartet's forward is deterministic (round-to-nearest), its backward uses stochastic rounding and random
  Hadamard signs drawn from the quant key: the loss does not depend on the key, the gradients do, the
  same key gives the same gradients bit for bit, and they differ from bf16's but point the same way."""
  cfg = model_cfg()
  b = batch()
  params, f = grad_fn(perturbed(build(cfg, jax.random.key(0), quant="quartet")))
  la, ga = f(params, b, jax.random.key(1))
  la2, ga2 = f(params, b, jax.random.key(1))
  lb, gb = f(params, b, jax.random.key(2))
  params0, f0 = grad_fn(perturbed(build(cfg, jax.random.key(0))))
  l0, g0 = f0(params0, b, jax.random.key(1))
  assert float(la) == float(la2) == float(lb)
  assert float(la) != float(l0)
  jax.tree.map(np.testing.assert_array_equal, ga, ga2)
  core = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g["core"])]).astype(np.float64)
  qa, qb, q0 = core(ga), core(gb), core(g0)
  assert np.all(np.isfinite(qa))
  assert not np.array_equal(qa, qb)  # stochastic rounding in the grad-phase backward
  cos = qa @ q0 / np.linalg.norm(qa) / np.linalg.norm(q0)
  assert 0.5 < cos < 1 - 1e-6, cos


@pytest.mark.slow
def test_quartet_on_a_data_fsdp_tensor_mesh_trains(data, tmp_path, monkeypatch):
  """`parcae train ... --config.quant.recipe=quartet` on a (data 2, fsdp 2, tensor 2) mesh of the 8 CPU
  devices: finite, falling loss and a finite evaluation, and every GEMM the trainer traced (train step and
  eval) went through qdot with the quartet recipe (so the override reached the model). Determinism given the
  key is tested in-process above."""
  recipes = []
  real = pq.qdot
  monkeypatch.setattr(pq, "qdot", lambda x, w, recipe, **kw: recipes.append(recipe) or real(x, w, recipe, **kw))
  cfg = tiny_config(data, steps=4)
  cfg.train.eval_loops = (3,)
  cfg.checkpoint.every_steps = 4  # one save (~1 s each on this mesh of 8 CPU devices)
  mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  assert cli_main(["train", "--config", write_config(tmp_path, cfg), "--workdir", str(tmp_path / "a"),
                   "--no-progress", *mesh, "--config.quant.recipe=quartet"]) == 0
  rows = train_rows(tmp_path / "a")
  a = [rows[s]["loss"] for s in range(1, 5)]
  assert json.loads((tmp_path / "a" / "config.json").read_text())["quant"]["recipe"] == "quartet"
  assert all(np.isfinite(a)) and a[-1] < a[0], a
  # 4 GEMMs per block x 3 traced blocks (prelude, loop body, coda) in the train step, at least as many in eval
  assert len(recipes) >= 2 * GEMMS_PER_BLOCK * 3 and {r.split("@")[0] for r in recipes} == {"quartet"}, recipes
  evals = json.loads((tmp_path / "a" / "eval.json").read_text())
  assert [r["loops"] for r in evals] == [3] and np.isfinite(evals[0]["val_loss"])


@pytest.mark.parametrize("block_remat", ["none", "full"])
def test_quartet_train_step_lowers_for_cuda_with_per_device_kernels(block_remat, cuda_lowering, monkeypatch):
  """The whole sharded train step (grad accumulation, the no-grad while loop, the remat grad scan, every
  block's fwd / dgrad / wgrad, with and without per-block remat of the prelude and coda) lowers for CUDA with
  the Triton kernels on a (2, 2, 2) mesh, and no kernel sees a whole micro-batch of token rows: each gets its
  device's quarter."""
  from conftest import triton_calls
  from parcae.quant.kernels import rotq
  from train_helpers import lower_sharded_step_for_cuda
  cfg = tiny_config("unused", grad_accum=2)
  cfg.model.compute_dtype, cfg.quant.recipe, cfg.quant.impl = "bfloat16", "quartet", "pallas"
  cfg.model.block_remat = block_remat
  tc = cfg.train
  tc.micro_batch_size *= 4  # a device's token rows (128) a multiple of 64: both 32-row blocks of each SR pair
  rows = set()  # the rows of every operand handed to the kernels (the token operands' are one device's)
  real = rotq.rotate_quantize
  monkeypatch.setattr(rotq, "rotate_quantize", lambda x, *a, **kw: rows.add(x.shape[0]) or real(x, *a, **kw))
  text = lower_sharded_step_for_cuda(cfg)
  assert triton_calls(text)
  tokens = tc.micro_batch_size * tc.seq_len
  assert tokens // 4 in rows and tokens not in rows, rows
