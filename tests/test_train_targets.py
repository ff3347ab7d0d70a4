"""Compiling for GPUs this machine does not have: target parsing, the "auto" choices under a GPU compile
target, clear errors, and (where jax's CUDA plugin is installed) a real compile for two H100s."""
import json

import jax
import jax.numpy as jnp
import pytest

from parcae import compile_target
from parcae.cli import main as cli_main
from parcae.train import targets
from train_helpers import tiny_config


def test_parse_target():
  assert targets.parse_target("h100") == ("h100", 1, 1)
  assert targets.parse_target("H100x8") == ("h100", 1, 8)
  assert targets.parse_target("2xh200x4") == ("h200", 2, 4)
  for bad in ("a100", "h100x", "x8", "h100x0", "0xh100x8", "h100 x8"):
    with pytest.raises(ValueError, match="compile target"):
      targets.parse_target(bad)


def test_target_config_describes_the_gpu():
  text = targets.target_config("h100")
  assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text and "major: 9" in text
  assert f"device_memory_size: {targets.GPUS['h100'][1]}" in text and "core_count: 132" in text
  assert text.count("{") == text.count("}")


def test_auto_choices_follow_the_compile_target():
  """Under compiling_for("gpu") on this CPU: cuDNN attention, the Triton kernels compiled (not interpreted),
  the Pallas quantizers and the log-sum-exp kernel; outside it, the CPU's choices."""
  from parcae.model import loss
  from parcae.model.config import default_model_config
  from parcae.model.layers import Attention
  from parcae.quant.dense import resolve_impl
  from parcae.quant.kernels import qdq
  cfg = default_model_config()
  cfg.d_model, cfg.n_heads = 64, 2
  attn = Attention(cfg, jax.random.key(0), with_ve=False, cd=jnp.bfloat16, quant="bf16")
  choices = lambda: (attn._impl(), qdq.backend(None)[0], resolve_impl("auto"), loss._use_kernel("auto", 64, 1024),
                     attn._fused_rope((1, 64, 1, 3, 64), True))
  assert compile_target.platform() == "cpu"
  assert choices() == (None, True, "jnp", False, False)
  with compile_target.compiling_for("gpu"):
    assert compile_target.platform() == "gpu"
    assert choices() == ("cudnn", False, "pallas", True, True)
  assert choices() == (None, True, "jnp", False, False)
  with pytest.raises(ValueError, match="unknown platform"):
    with compile_target.compiling_for("cuda"):
      pass


def test_missing_plugin_and_bad_target_are_clear_errors(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(targets, "cuda_plugin", lambda: None)
  with pytest.raises(ImportError, match=r"pip install 'jax-cuda13-plugin\[with-cuda\]=="):
    targets.target_devices("h100x8")
  assert cli_main(["info", "--config", "configs/demo_cpu.py", "--target", "v100"]) == 2
  assert "unknown compile target 'v100'" in capsys.readouterr().err


@pytest.mark.skipif(targets.cuda_plugin() is None, reason="jax's CUDA plugin is not installed")
def test_compiles_for_two_h100s_without_a_gpu(tmp_path):
  """The tiny model's sharded train step compiled for "h100x2" on this CPU: two compile-only H100s, the
  GPU run's kernels (cuDNN attention, Triton RoPE + QK-norm, the MLP's Mosaic GPU GEMMs: each device's 256
  rows and F = 256 are whole tiles) in the program, and XLA's memory analysis."""
  from parcae.train.loop import aot_compile, compile_train_step
  cfg = tiny_config(str(tmp_path))
  cfg.model.compute_dtype, cfg.model.max_seq_len, cfg.train.seq_len = "bfloat16", 64, 64
  cfg.mesh.data = 2
  compiled, mesh, _ = compile_train_step(cfg, target="h100x2")
  assert mesh.devices.size == 2 and {d.device_kind for d in mesh.devices.flat} == {"NVIDIA H100 80GB HBM3"}
  hlo = compiled.as_text()
  assert "__cudnn$fmha" in hlo and "__gpu$xla.gpu.triton" in hlo and "mosaic_gpu" in hlo
  assert "all-reduce" in hlo  # data-parallel gradients
  row = aot_compile(cfg, target="h100x2")
  assert row["devices"] == 2 and row["device_memory_gib"] == pytest.approx(79.1, abs=0.1)
  assert 0 < row["argument_gib"] < row["peak_estimate_gib"] < 1
  json.dumps(row)  # the CLI prints it
