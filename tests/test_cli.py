"""End-to-end CLI: info, train, eval (one compilation for every loop count), demo plot helper."""
import json
import os
import sys

import pytest

from parcae.cli import main as cli_main

sys.path.insert(0, os.path.dirname(__file__))
from train_helpers import tiny_config, write_dataset  # noqa: E402


def test_info_json(capsys):
  assert cli_main(["info", "--config", "configs/parcae_small_140m.py", "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["params_total"] == 144_323_136
  assert info["flops_per_token_reference"] == pytest.approx(1.359902976e9)
  assert 0 < info["flops_per_token_train_executed"] < info["flops_per_token_reference"]
  assert cli_main(["info", "--config", "configs/gpt_small_140m.py", "--json",
                   "--config.model.n_layers=3"]) == 0
  assert json.loads(capsys.readouterr().out)["params_total"] < 143_141_184


def test_unknown_command_and_missing_config(capsys):
  assert cli_main(["frobnicate"]) == 2
  assert cli_main(["info", "--config", "configs/nope.py"]) == 2
  assert "does not exist" in capsys.readouterr().err


def test_train_then_eval_json(tmp_path, capsys):
  data = write_dataset(tmp_path / "data")
  cfg = tiny_config(data, steps=2)
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text("import ml_collections, json\n"
                      f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
  work = tmp_path / "run"
  assert cli_main(["train", "--config", str(cfg_file), "--workdir", str(work), "--no-progress",
                   "--config.mesh.data=8"]) == 0
  capsys.readouterr()
  from parcae.train import step as step_mod
  traces = []
  orig = step_mod.make_eval_step

  def counting(*a, **k):
    f = orig(*a, **k)

    def wrapped(*args):
      traces.append(1)
      return f(*args)
    return wrapped
  step_mod.make_eval_step = counting
  import parcae.eval.loss as L
  L.make_eval_step = counting
  try:
    assert cli_main(["eval", "--workdir", str(work), "--loops", "1,2,3,5,8", "--json",
                     "--plot", str(tmp_path / "p.png")]) == 0
  finally:
    step_mod.make_eval_step = orig
    L.make_eval_step = orig
  rows = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  assert [r["loops"] for r in rows] == [1, 2, 3, 5, 8]
  assert all(r["val_loss"] > 0 and r["bpb"] > 0 for r in rows)
  assert len(traces) == 1  # traced once: one compilation serves all five loop counts
  assert os.path.getsize(tmp_path / "p.png") > 1000


def _config_files(sub=""):
  root = os.path.join(os.path.dirname(__file__), "..", "configs", sub)
  return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".py"))


@pytest.mark.parametrize("path", _config_files(), ids=os.path.basename)
def test_every_config_file_is_a_runnable_recipe(path, capsys):
  """Each file loads and validates through the CLI, its docstring holds the command and the expected
  result, and a reference size has the reference's exact parameter count."""
  from parcae.config import load_module
  doc = load_module(path).__doc__ or ""
  assert "parcae " in doc and "Expected" in doc, f"{path}: docstring lacks the command or the expected result"
  assert cli_main(["info", "--config", path, "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  from test_model_params import REFERENCE
  name = os.path.basename(path)[:-3]  # e.g. parcae_small_140m
  kind, size = name.split("_")[:2]
  if (kind, size) in REFERENCE:
    assert info["params_total"] == REFERENCE[(kind, size)][0]


@pytest.mark.parametrize("path", _config_files("sweeps"), ids=os.path.basename)
def test_every_sweep_config_plans(path):
  from parcae.config import load_module
  from parcae.scaling import sweep
  assert "parcae sweep" in (load_module(path).__doc__ or "")
  plans = sweep.plan_runs(sweep.load_sweep_config(path))
  assert plans and all(p["steps"] >= 1 for p in plans)


def test_info_compile_reports_the_step_memory_without_allocating(tmp_path, capsys):
  """`parcae info --compile`: the train step compiled from abstract shapes on the config's mesh (8 CPU devices,
  data parallel). XLA's argument bytes per device are the whole train state (replicated) less the optimizer's
  last-call metrics (read by nothing, so jit drops them), one device's share of the batch and the three
  run-length scalars; every state byte is donated to the output (alias)."""
  import jax
  from parcae.train import mesh as pmesh
  from parcae.train.loop import init_state
  cfg = tiny_config(str(tmp_path / "no_data_needed"))
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text("import ml_collections, json\n"
                      f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
  assert cli_main(["info", "--config", str(cfg_file), "--json", "--compile", "--config.mesh.data=8"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["compile.devices"] == 8 and info["compile.mesh"]["data"] == 8
  cfg.mesh.data = 8
  abstract = init_state(cfg, pmesh.make_mesh(cfg.mesh, jax.devices()))[3]
  nbytes = lambda t: sum((jax.eval_shape(jax.random.key_data, x).size * 4 if jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else x.size * x.dtype.itemsize) for x in jax.tree.leaves(t))
  state, unread = nbytes(abstract), nbytes(abstract["opt"].metrics)
  tc = cfg.train
  batch = 2 * tc.grad_accum * tc.micro_batch_size * tc.seq_len * 4 // 8
  assert info["compile.argument_gib"] * 2**30 == state - unread + batch + 3 * 4
  assert info["compile.alias_gib"] * 2**30 == state - unread
  assert info["compile.peak_estimate_gib"] > info["compile.argument_gib"] + info["compile.temp_gib"] * 0.99
