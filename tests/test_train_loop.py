"""The trainer end to end on CPU: resume, sharding, gradient accumulation, preemption, bad input."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from parcae.cli import main as cli_main
from parcae.train.loop import train
sys.path.insert(0, os.path.dirname(__file__))
from conftest import shared_once, xla_flags  # noqa: E402
from train_helpers import tiny_config, train_rows, write_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return write_dataset(tmp_path_factory.mktemp("data"))


def one_device():
  return jax.devices()[:1]


class Crash(Exception):
  pass


def test_resume_is_bitwise_identical(data, tmp_path, monkeypatch):
  """A run stopped by max_steps, then crashed right after a periodic checkpoint, then resumed, logs every
  step once and reproduces the straight run's losses."""
  straight, split = tmp_path / "straight", tmp_path / "split"
  cfg = tiny_config(data)
  cfg.mesh.data = 1
  train(cfg, str(straight), progress=False, devices=one_device())
  train(cfg, str(split), progress=False, devices=one_device(), max_steps=3)
  assert sorted(train_rows(split)) == [1, 2, 3]
  from parcae.train import checkpoint as ckpt
  save = ckpt.Checkpointer.save

  def save_then_crash(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == 4:
      raise Crash
  monkeypatch.setattr(ckpt.Checkpointer, "save", save_then_crash)
  with pytest.raises(Crash):
    train(cfg, str(split), progress=False, devices=one_device())
  monkeypatch.undo()
  # Step 4's metrics (fetched one step late in steady state) were logged before its checkpoint was written.
  assert sorted(train_rows(split)) == [1, 2, 3, 4]
  train(cfg, str(split), progress=False, devices=one_device())
  a, b = train_rows(straight), train_rows(split)
  assert [a[s]["loss"] for s in range(1, 7)] == [b[s]["loss"] for s in range(1, 7)]
  assert a[6]["loss"] < a[1]["loss"]
  import json
  logged = [r["step"] for r in map(json.loads, open(split / "metrics.jsonl")) if r.get("kind") is None]
  assert logged == [1, 2, 3, 4, 5, 6]  # each step once, in order
  assert all(np.isfinite(b[s]["tokens_per_s"]) for s in range(1, 7))  # the last step's rate too


def test_loss_guard_stops_before_the_checkpoint_of_the_guarded_step(data, tmp_path):
  """A step whose loss trips the guard is never checkpointed: its metrics are checked before the save (the
  tiny config saves every 2 steps; the guard arms after step 1's tokens, so step 2 trips it)."""
  cfg = tiny_config(data)
  cfg.mesh.data = 1
  cfg.train.loss_guard, cfg.train.loss_guard_tokens = 0.01, cfg.train.micro_batch_size * cfg.train.seq_len
  with pytest.raises(FloatingPointError, match="loss guard"):
    train(cfg, str(tmp_path / "run"), progress=False, devices=one_device())
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
  assert sorted(train_rows(tmp_path / "run")) == [1]


def test_run_length_is_an_argument_of_the_compiled_step(data):
  """Runs that differ only in train.steps (a data-budget sweep) lower to one program, and that one executable
  follows the run length it is given (fails if the schedule's lengths are baked in as constants)."""
  import jax.numpy as jnp
  from parcae.train import mesh as pmesh
  from parcae.train import schedules
  from parcae.train.loop import init_state, jit_train_step, run_length_arrays
  texts, built = [], {}
  for steps in (6, 50):
    cfg = tiny_config(data, steps=steps)
    cfg.optim.warmup_fraction = 0.1  # warm-up 0 steps at 6, 5 steps at 50
    mesh = pmesh.make_mesh(cfg.mesh, one_device())
    graphdef, optimizer, create, abstract, shardings = init_state(cfg, mesh)
    step, batch_sh = jit_train_step(graphdef, optimizer, cfg.train, shardings, mesh, donate=False)
    shape = (cfg.train.grad_accum, cfg.train.micro_batch_size, cfg.train.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh) for k in ("inputs", "targets")}
    texts.append(step.lower(abstract, batch, run_length_arrays(cfg, mesh)).as_text())
    built[steps] = (cfg, mesh, step, create, shardings, shape)
  assert texts[0] == texts[1]
  cfg, mesh, step, create, shardings, shape = built[6]
  state = jax.jit(create, out_shardings=shardings)()
  ones = {k: jnp.ones(shape, jnp.int32) for k in ("inputs", "targets")}
  lrs = []
  for steps in (6, 50):  # the steps=6 executable, given each run length
    cfg.train.steps = steps
    lrs.append(float(step(state, ones, run_length_arrays(cfg, mesh))[1]["opt/lr"]))
    want = cfg.optim.lr * float(schedules.multiplier(cfg.optim, 0, schedules.run_length(cfg.optim, steps)))
    assert lrs[-1] == pytest.approx(want, rel=1e-6)
  assert lrs[1] == pytest.approx(lrs[0] / 5, rel=1e-6)


def test_eval_rows_carry_the_loop_telemetry(data):
  """Each loop count's eval row holds the final loop state's norm and the last iteration's relative update,
  averaged over the batches. From a zero loop state one iteration's update is the whole state: exactly 1;
  a GPT has no loop and no such fields."""
  import jax.numpy as jnp
  from flax import nnx
  from parcae import data as pdata
  from parcae.model import build
  from parcae.train.loop import evaluate
  from parcae.train.step import make_eval_step
  for kind in ("parcae", "gpt"):
    cfg = tiny_config(data)
    cfg.model.kind, cfg.model.state_init = kind, "zero"
    graphdef, params = nnx.split(build(cfg.model, jax.random.key(0)), nnx.Param)
    val = pdata.eval_batches(cfg.data, split="val", seq_len=16, batch_size=4, num_batches=2)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    rows = evaluate(jax.jit(make_eval_step(graphdef)), params, val, [1, 3], None, sharding)
    if kind == "gpt":
      assert set(rows[0]) == {"loops", "val_loss", "bpb"}
      continue
    assert rows[0]["rel_residual"] == pytest.approx(1.0, abs=1e-6)
    model = nnx.merge(graphdef, params)
    for row, t in zip(rows, (1, 3)):  # the batch mean of what the model reports for each batch
      aux = [model.hidden(jnp.asarray(b["inputs"]), jnp.full((4,), t), jnp.zeros((4,), jnp.int32), grad_steps=0)[1]
             for b in val]
      for k in ("state_norm", "rel_residual"):
        assert row[k] == pytest.approx(np.mean([float(a[k]) for a in aux]), rel=1e-5), (t, k)
    assert rows[1]["rel_residual"] != rows[0]["rel_residual"]
  # At init the loop state barely depends on the tokens (batch means agree to ~1e-5), so the averaging is
  # checked with a stand-in step whose telemetry is known per batch and loop count.
  fake = lambda params, b, loops_K: (jnp.ones(loops_K.shape), jnp.float32(1.0),
                                     {"state_norm": b["inputs"][0, 0].astype(jnp.float32) * loops_K})
  firsts = [float(b["inputs"][0, 0]) for b in val]
  rows = evaluate(fake, None, val, [2, 5], None, sharding)
  assert [r["state_norm"] for r in rows] == pytest.approx([np.mean(firsts) * t for t in (2, 5)], rel=1e-12)


def test_tokens_per_s_counts_training_only(data, tmp_path, monkeypatch):
  """An evaluation (here made to last 1 s) and a checkpoint save between two steps do not enter the next
  step's tokens_per_s: the rates logged after them are of the same order as the others."""
  import parcae.train.loop as loop_mod
  real = loop_mod.evaluate

  def slow(*a, **k):
    time.sleep(1.0)
    return real(*a, **k)
  monkeypatch.setattr(loop_mod, "evaluate", slow)
  cfg = tiny_config(data, steps=6, eval_every=3)
  cfg.checkpoint.every_steps = 4
  train(cfg, str(tmp_path / "run"), progress=False, devices=one_device())
  rows = train_rows(tmp_path / "run")
  rates = {s: rows[s]["tokens_per_s"] for s in range(2, 7)}
  typical = float(np.median(list(rates.values())))
  # without the exclusion, the row of the evaluated step (3) is ~100x lower
  assert all(r > typical / 5 for r in rates.values()), rates


def test_compile_cache_dir_is_used_unless_jax_already_has_one(tmp_path):
  """train.compile_cache_dir: compiled programs land there; a directory set through JAX's own variable wins."""
  prog = ("import sys, jax, jax.numpy as jnp; from parcae.train.loop import use_compile_cache; "
          "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0); "
          "print(use_compile_cache(sys.argv[1])); jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64)))")
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  mine, theirs = tmp_path / "mine", tmp_path / "theirs"
  out = subprocess.run([sys.executable, "-c", prog, str(mine)], env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == str(mine) and os.listdir(mine)  # entries written
  env["JAX_COMPILATION_CACHE_DIR"] = str(theirs)
  out = subprocess.run([sys.executable, "-c", prog, str(tmp_path / "unused")], env=env, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == str(theirs) and os.listdir(theirs)
  assert not (tmp_path / "unused").exists()
  del env["JAX_COMPILATION_CACHE_DIR"]  # a directory that cannot be made: a warning naming the field, no cache
  (tmp_path / "file").write_text("")
  out = subprocess.run([sys.executable, "-c", prog, str(tmp_path / "file" / "cache")], env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "None" and "train.compile_cache_dir" in out.stderr


def single_device_reference(data):
  """The workdir of a 3-step run on one device with Muon's orthogonalization in float32, the reference of the
  sharded and the multi-process runs below; trained once per session (whichever test asks first)."""
  def build(path):
    cfg = tiny_config(data, steps=3)
    cfg.mesh.data = 1
    cfg.optim.muon_ortho_dtype = "float32"
    train(cfg, path, progress=False, devices=one_device())
  return shared_once("train_loop_single_device_reference", build)


@pytest.mark.slow
def test_sharded_run_matches_single_device(data, tmp_path):
  # Muon's orthogonalization runs in float32 here: in bf16 (the default) a reduction-order difference of
  # one float32 ulp in a gradient can flip a bf16 rounding and move an update by 2^-8 relative.
  cfg = tiny_config(data, steps=3)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg.optim.muon_ortho_dtype = "float32"
  train(cfg, str(tmp_path / "mesh"), progress=False)
  a, b = train_rows(tmp_path / "mesh"), train_rows(single_device_reference(data))
  np.testing.assert_allclose([a[s]["loss"] for s in (1, 2, 3)], [b[s]["loss"] for s in (1, 2, 3)], rtol=2e-5)
  # The parameters really are sharded as the table says.
  from parcae.eval.loss import load_params, load_run_config
  _, params, mesh, _ = load_params(load_run_config(str(tmp_path / "mesh")), str(tmp_path / "mesh"))
  q = params["core"][0]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (32, 32)


def test_grad_accumulation_matches_one_big_batch(data, tmp_path):
  big = tiny_config(data, steps=2, micro_batch_size=8, grad_accum=1)
  small = tiny_config(data, steps=2, micro_batch_size=2, grad_accum=4)
  for c in (big, small):
    c.model.state_init = "zero"  # the loop-state draw depends on the micro-batch split; depths do not
    c.mesh.data = 1
  train(big, str(tmp_path / "big"), progress=False, devices=one_device())
  train(small, str(tmp_path / "small"), progress=False, devices=one_device())
  a, b = train_rows(tmp_path / "big"), train_rows(tmp_path / "small")
  np.testing.assert_allclose([a[1]["loss"], a[2]["loss"]], [b[1]["loss"], b[2]["loss"]], rtol=1e-5)
  assert a[1]["n_mean"] == b[1]["n_mean"]  # same depths per sequence
  assert b[1]["n_exec_mean"] <= a[1]["n_exec_mean"]  # depth grouping: micro-batches stop at their own max


@pytest.mark.slow
def test_unrolled_grad_phase_trains_like_the_scan(data, tmp_path):
  """The reference recipes' grad phase (unrolled, no remat) and the rematerialized scan are the same
  computation through the whole trainer (accumulation, depths, optimizer): the same losses step after step,
  here with the split no-grad loop (`model.no_grad_split=2`) data-parallel on 2 devices (halves per shard),
  and split in quarters (4) on one device; both execute fewer no-grad iterations than the scan's one loop.
  Unrolled without a split was a fourth trainer run until 2026-12-07; the model-level float64 test
  (test_model_looped.py, test_truncated_backprop_matches_float64_unrolled) covers that path."""
  rows = []
  for name, unroll, remat, split, devices in (("scan", False, "full", 1, 1), ("split", True, "none", 2, 2),
                                               ("split4", True, "none", 4, 1)):
    c = tiny_config(data, steps=4, grad_accum=2, micro_batch_size=4)
    c.model.grad_unroll, c.model.remat, c.model.no_grad_split, c.mesh.data = unroll, remat, split, devices
    c.optim.muon_ortho_dtype = "float32"  # as in test_sharded_run_matches_single_device: 2 devices sum the
    # gradient in another order, and in bf16 one float32 ulp can flip a rounding of Muon's update (seen: 4e-5)
    train(c, str(tmp_path / name), progress=False, devices=jax.devices()[:devices])
    rows.append(train_rows(tmp_path / name))
  losses = [[r[s]["loss"] for s in (1, 2, 3, 4)] for r in rows]
  np.testing.assert_allclose(losses[1], losses[0], rtol=2e-5)
  np.testing.assert_allclose(losses[2], losses[0], rtol=2e-5)
  assert losses[0][3] != losses[0][0]  # the steps did train
  executed = [sum(r[s]["n_exec_mean"] for s in (1, 2, 3, 4)) for r in rows]
  assert executed[1] < executed[0] and executed[2] < executed[0], executed


@pytest.mark.slow
def test_sigkill_resumes_from_last_complete_checkpoint(data, tmp_path):
  import json
  cfg = tiny_config(data, steps=40)
  cfg.checkpoint.every_steps = 3
  workdir = tmp_path / "run"
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text("import ml_collections, json\n"
                      f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
  cmd = [sys.executable, "-m", "parcae.cli", "train", "--config", str(cfg_file), "--workdir", str(workdir),
         "--no-progress", "--config.mesh.data=1"]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckdir = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline:
    steps = [int(p.name) for p in ckdir.glob("*") if p.name.isdigit()] if ckdir.exists() else []
    if steps and max(steps) >= 6:
      break
    time.sleep(0.5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(int(p.name) for p in ckdir.glob("*") if p.name.isdigit())
  assert killed_at < 40
  before = train_rows(workdir)
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  after = train_rows(workdir)
  assert max(after) == 40
  # Steps up to the checkpoint were not redone differently: the resumed run reproduces later logged steps.
  for s in range(1, killed_at + 1):
    assert after[s]["loss"] == before[s]["loss"]
  evals = json.loads((workdir / "eval.json").read_text())
  assert [r["loops"] for r in evals] == [1, 3]


def test_bad_input_gives_one_clear_message(data, tmp_path, capsys):
  cfg_file = tmp_path / "cfg.py"
  cfg = tiny_config(data)
  cfg_file.write_text("import ml_collections, json\n"
                      f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
  base = ["train", "--config", str(cfg_file), "--workdir", str(tmp_path / "w"), "--no-progress"]
  assert cli_main(base + ["--config.train.stpes=3"]) == 2
  assert "did you mean 'train.steps'" in capsys.readouterr().err
  assert cli_main(base + ["--config.mesh.data=3"]) == 2
  assert "do not match the 8 devices" in capsys.readouterr().err
  assert cli_main(base + [f"--config.data.path={tmp_path / 'missing'}"]) == 2
  assert "missing" in capsys.readouterr().err
  assert cli_main(base + ["--config.model.n_heads=3"]) == 2
  assert "model.n_heads=3 does not divide model.d_model=64" in capsys.readouterr().err
  assert cli_main(base + ["--config.model.injection=concat"]) == 2
  assert "model.injection='concat'" in capsys.readouterr().err
  assert cli_main(base + ["--config.model.mean_backprop_depth=0"]) == 2
  assert "model.mean_backprop_depth=0" in capsys.readouterr().err
  # a loss chunk that splits neither batch evenly fails before training, not at the first evaluation
  assert cli_main(base + ["--config.train.loss_chunk=48"]) == 2
  assert "train.loss_chunk=48 does not divide the 128 tokens" in capsys.readouterr().err
  assert cli_main(base + ["--config.train.loss_chunk=64", "--config.train.eval_batch_size=6"]) == 2
  assert "train.eval_batch_size=6" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one_process(data, tmp_path):
  """launch/local_multiprocess.sh: 2 processes x 2 CPU devices (a data-parallel mesh of 4) equal one process
  on one device (the run test_sharded_run_matches_single_device compares its (2, 2, 2) mesh with, trained
  once per session)."""
  cfg = tiny_config(data, steps=3)
  cfg.optim.muon_ortho_dtype = "float32"  # see test_sharded_run_matches_single_device
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text("import ml_collections, json\n"
                      f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "CPU_DEVICES_PER_PROCESS": "2", "PARCAE": f"{sys.executable} -m parcae.cli",
         "PORT": str(20000 + os.getpid() % 20000)}
  subprocess.run(["bash", os.path.join(root, "launch", "local_multiprocess.sh"), "2", str(cfg_file),
                  str(tmp_path / "multi"), "--no-progress"], env=env, check=True, timeout=600,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  a, b = train_rows(tmp_path / "multi"), train_rows(single_device_reference(data))
  np.testing.assert_allclose([a[s]["loss"] for s in (1, 2, 3)], [b[s]["loss"] for s in (1, 2, 3)], rtol=2e-5)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
  cfg = tiny_config(data, steps=10_000)
  cfg.checkpoint.every_steps = 10_000
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text("import ml_collections, json\n"
                      f"def get_config():\n  return ml_collections.ConfigDict(json.loads({cfg.to_json()!r}))\n")
  workdir = tmp_path / "run"
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
  proc = subprocess.Popen([sys.executable, "-m", "parcae.cli", "train", "--config", str(cfg_file), "--workdir",
                           str(workdir), "--no-progress", "--config.mesh.data=1"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and (not (workdir / "metrics.jsonl").exists() or len(train_rows(workdir)) < 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  saved = max(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
  assert saved >= max(train_rows(workdir))  # nothing logged is lost
  assert '"stopped": "signal' in out
