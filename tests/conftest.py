"""Test-wide setup: 8 fake CPU devices (sharding tests need them) and no network/wandb."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture
def cuda_lowering(monkeypatch):
  """Lets a test lower jitted code for CUDA on this CPU machine with the real Triton kernels: the
  quantization kernels stop interpreting, and jax >= 0.11 (which asks the device for its compute
  capability) is told it is an sm_90 (H100 / H200); jax 0.10 falls back to sm_90 by itself."""
  from parcae.quant.kernels import qdq, rotq, unrot
  try:
    from jax._src.pallas.triton import gpu_info
    monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info.GpuInfo(
        gpu_version=None, arch_name="9.0", compute_capability=90))
  except ImportError:
    pass
  monkeypatch.setattr(rotq, "backend", lambda interpret, num_warps=4: qdq.backend(False, num_warps))
  monkeypatch.setattr(unrot, "backend", lambda interpret, num_warps=4: qdq.backend(False, num_warps))


def triton_calls(stablehlo_text):
  """[(rows of the first operand, line)] of every Triton kernel call in lowered StableHLO text."""
  import re
  return [(int(re.search(r"\(tensor<(\d+)x", ln).group(1)), ln) for ln in stablehlo_text.splitlines()
          if "xla.gpu.triton" in ln]
