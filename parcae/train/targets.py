"""GPU targets to compile for on a machine without those GPUs (`parcae info --compile --target h100x8`).

XLA compiles for a described GPU without one present (a "compile-only" client from jax's CUDA plugin): the
train step for a mesh of N H100s compiles on a laptop CPU, with cuDNN attention and the Triton kernels a GPU
run uses (`parcae.compile_target`), and XLA's memory analysis tells whether a config fits before any GPU time
is spent. Against real runs (bench/RESULTS.md, 2026-12-05 session 17): the peak estimate 0.1-0.3 GiB under
the peak measured on an H100 for the same configs.

A target is "[HOSTSx]KIND[xDEVICES]": "h100" (one GPU), "h100x8" (8 on one host), "2xh100x8" (2 hosts of 8).
"""
from __future__ import annotations

import importlib.util
import re

import jax

# Per-GPU descriptions (XLA's GpuTargetConfig text format): SM count, clocks, caches and memory from the
# vendor's specifications of the SXM parts; the H100's as a real H100 80GB HBM3 reports them.
_COMMON = """  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536"""
GPUS = {  # kind: (device description, memory bytes, memory bandwidth bytes/s)
    "h100": ("NVIDIA H100 80GB HBM3", 84_929_347_584, 3_352_320_000_000),
    "h200": ("NVIDIA H200", 150_754_820_096, 4_800_000_000_000),
}
_TARGET_RE = re.compile(r"^(?:(\d+)x)?([a-z0-9]+?)(?:x(\d+))?$")


def parse_target(target: str):
  """(kind, hosts, devices per host) of "[HOSTSx]KIND[xDEVICES]"; a clear error for anything else."""
  m = _TARGET_RE.match(target.strip().lower())
  if not m or m.group(2) not in GPUS:
    raise ValueError(f"unknown compile target {target!r}: use [HOSTSx]KIND[xDEVICES] with KIND one of "
                     f"{sorted(GPUS)}, e.g. h100, h100x8, 2xh100x8")
  hosts, per_host = int(m.group(1) or 1), int(m.group(3) or 1)
  if hosts < 1 or per_host < 1:
    raise ValueError(f"compile target {target!r}: hosts and devices per host must be >= 1")
  return m.group(2), hosts, per_host


def target_config(kind: str) -> str:
  """XLA's GpuTargetConfig (text format) for one GPU of `kind`."""
  name, memory, bandwidth = GPUS[kind]
  return (f"gpu_device_info {{\n{_COMMON}\n  device_memory_size: {memory}\n  memory_bandwidth: {bandwidth}\n}}\n"
          f'platform_name: "CUDA"\ndnn_version_info {{ major: 9 minor: 10 }}\n'
          f'runtime_version {{ major: 13 minor: 0 }}\ndevice_description_str: "{name}"\n')


def cuda_plugin() -> str | None:
  """The name of jax's installed CUDA plugin module, or None."""
  for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      if importlib.util.find_spec(name) is not None:
        return name
    except ModuleNotFoundError:
      return None
  return None


def target_devices(target: str):
  """Compile-only devices of `target` (no GPU needed): a mesh over them compiles as on those GPUs."""
  kind, hosts, per_host = parse_target(target)
  if cuda_plugin() is None:
    raise ImportError(
        f"compiling for {target!r} without its GPUs needs jax's CUDA plugin, which is not installed: "
        f"pip install 'jax-cuda13-plugin[with-cuda]=={jax.__version__}' (about 4 GB with the CUDA libraries), "
        "or run `parcae info --compile` without --target on the GPU machine itself")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topology = topologies.get_topology_desc(platform="cuda", target_config=target_config(kind),
                                          topology=f"1x{hosts}x{per_host}")
  return list(topology.devices)
