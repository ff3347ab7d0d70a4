"""The platform code is traced for: what every "auto" choice of an implementation reads.

Normally jax's default backend. While `compiling_for("gpu")` is active (a compile for a GPU target on a
machine that has none, `parcae.train.targets`), the "auto" choices -- cuDNN attention, the Pallas kernels
compiled through Triton instead of interpreted -- are the ones a GPU run makes, so the compiled program and
its memory are the GPU run's.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax

_TARGET = contextvars.ContextVar("parcae_target_platform", default=None)
PLATFORMS = ("cpu", "gpu", "tpu")


def platform() -> str:
  """"cpu", "gpu" or "tpu": the compile target in force, else jax's default backend."""
  return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(target: str):
  """Within this block, `platform()` is `target` (one of PLATFORMS)."""
  if target not in PLATFORMS:
    raise ValueError(f"unknown platform {target!r}; use one of {PLATFORMS}")
  token = _TARGET.set(target)
  try:
    yield
  finally:
    _TARGET.reset(token)
