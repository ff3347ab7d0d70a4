"""Test-wide setup: 8 fake CPU devices (sharding tests need them), no network/wandb, and a compilation cache.

The compilation cache: many tests compile the same program more than once (each `train()` call builds its
step anew, so a resumed run, the same config on another path, or the same config in the other xdist worker
recompiles an identical tiny train step: ~10 of its ~15 s on a 2-core CPU). JAX's persistent cache keyed on
the HLO, compile options and devices serves those repeats. One fresh directory per pytest session, made by
the first process that imports this file (the xdist controller) and removed when that process exits, so no
test reads an entry written by another session. It is passed on through JAX's own environment variables, so
the workers and the trainers the tests start as subprocesses (a SIGKILLed run and its resumption share one
compiled step) use it too. A size limit turns on JAX's file lock around every read and write of the cache.
An entry torn by a killed writer is harmless: JAX warns that it cannot decompress it and compiles afresh
(checked by hand: a halved entry is recompiled, same result). PARCAE_TEST_NO_COMPILE_CACHE=1 turns it off.

LLVM optimization level 0 for the CPU backend (`--xla_backend_optimization_level=0`; XLA's HLO passes still
run): the tests' programs are tiny and their time goes to compilation, which this cuts by about a quarter
(4 test files, 2 cores, 3 workers: 454 s -> 338 s wall, 864 -> 640 CPU s). It changes the generated code's
instruction order, not the HLO: results move by float32 rounding (a tiny trainer's loss by ~4e-5 relative), so
every process of a test, subprocesses included, must run with the same flags: tests that start processes
with their own device count take the flags from `xla_flags(n)`. PARCAE_TEST_XLA_OPT=1 keeps XLA's default
level and CPU emitters (for checking a result that might depend on them).

XLA's older CPU emitters (`--xla_cpu_use_fusion_emitters=false`): they compile a tiny train step in about half
the time of the MLIR fusion emitters (2.7-3.1 s vs 5.1 s on this 2-core machine; the whole suite 865 s -> 642 s
wall, 2026-12-07). Like level 0, they move results by float32 rounding, and at level 0 they can round one value
two ways when XLA computes it in two fusions (seen: a Pallas kernel's bf16 output of a float32 value it also
returns, off by one bf16 ulp at a tie). The few tests that assert such a bit identity between two outputs, or
the structure of XLA's compiled CPU program, compile with `CPU_DEFAULT_CODEGEN` (the emitters a user's CPU run
gets), passed as jit's `compiler_options`."""
import atexit
import os
import shutil
import tempfile


def _jaxlib_before(major, minor):
  from importlib.metadata import PackageNotFoundError, version
  try:
    return tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (major, minor)
  except (PackageNotFoundError, ValueError):
    return False


# jaxlib 0.11 knows no `xla_cpu_use_fusion_emitters` (an unknown XLA flag is fatal): there the suite runs with
# its CPU emitters (checked on the GPU image's jax 0.11.2, 2026-12-07)
_OLD_EMITTERS = _jaxlib_before(0, 11)
XLA_TEST_FLAGS = "" if os.environ.get("PARCAE_TEST_XLA_OPT") else "--xla_backend_optimization_level=0"
if _OLD_EMITTERS and not os.environ.get("PARCAE_TEST_XLA_OPT"):
  XLA_TEST_FLAGS += " --xla_cpu_use_fusion_emitters=false"
CPU_DEFAULT_CODEGEN = {"xla_cpu_use_fusion_emitters": True} if _OLD_EMITTERS else {}


def xla_flags(devices):
  """XLA_FLAGS for a test process (or a subprocess a test starts) with `devices` CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}".strip()


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

# A directory shared by every process of this pytest session (the xdist workers included), for fixtures that
# are built once per session whichever worker asks first (see `shared_once`); removed when the session ends.
if not os.environ.get("PARCAE_TEST_SHARED_DIR"):
  os.environ["PARCAE_TEST_SHARED_DIR"] = tempfile.mkdtemp(prefix="parcae-test-shared-")
  atexit.register(shutil.rmtree, os.environ["PARCAE_TEST_SHARED_DIR"], ignore_errors=True)


def shared_once(name, build):
  """build(path) once per pytest session across xdist workers; returns path. A file lock makes the other
  workers wait for the first build; a build that raised is retried by the next caller."""
  from filelock import FileLock
  path = os.path.join(os.environ["PARCAE_TEST_SHARED_DIR"], name)
  with FileLock(path + ".lock"):
    if not os.path.exists(path + ".done"):
      shutil.rmtree(path, ignore_errors=True)
      os.makedirs(path)
      build(path)
      open(path + ".done", "w").close()
  return path

if not os.environ.get("PARCAE_TEST_NO_COMPILE_CACHE"):
  if not os.environ.get("PARCAE_TEST_CACHE_DIR"):  # the first process of this session
    os.environ["PARCAE_TEST_CACHE_DIR"] = tempfile.mkdtemp(prefix="parcae-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["PARCAE_TEST_CACHE_DIR"], ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["PARCAE_TEST_CACHE_DIR"]
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2**30)  # != -1: reads and writes take a file lock
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_compilation_cache_max_size", 8 * 2**30)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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


def load_bench(name):
  """The module of bench/<name>.py (with bench/ on sys.path while it loads: the scripts import neighbours)."""
  import importlib.util
  import sys
  bench = os.path.join(os.path.dirname(__file__), "..", "bench")
  sys.path.insert(0, bench)
  try:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(bench, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
  finally:
    sys.path.remove(bench)
  return mod
