"""bench/train_throughput.py: every variant's overrides apply to its recipe, and the loss-gradient kernel choice
("_lse") reaches parcae.model.lse (restored after each test)."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_bench

from parcae.model import lse

ARGS = argparse.Namespace(micro=4, accum=2, seq=32, smoke=False)


@pytest.fixture
def tt(monkeypatch):
  for name in ("GRAD_EVICT", "GRAD_REVERSE", "row_lse_grad"):
    monkeypatch.setattr(lse, name, getattr(lse, name))
  return load_bench("train_throughput")


def test_every_variant_builds_its_config(tt):
  for name, (kind, size, overrides) in tt.VARIANTS.items():
    cfg = tt.build_config(kind, size, overrides, ARGS)
    assert cfg.train.grad_accum == overrides.get("_accum", ARGS.accum), name
    for k, v in overrides.items():
      if not k.startswith("_"):
        section, field = k.split(".", 1)
        assert str(cfg[section][field]) == str(v), (name, k)


@pytest.mark.parametrize("choice,evict,reverse", [("evict", True, False), ("reverse", False, True),
                                                  ("evict+reverse", True, True), ("none", False, False)])
def test_lse_hint_choices_set_the_kernel_constants(tt, choice, evict, reverse):
  tt.set_lse_grad(choice)
  assert (lse.GRAD_EVICT, lse.GRAD_REVERSE) == (evict, reverse)


def test_lse_smem_choice_replaces_the_kernel_and_falls_back_off_a_gpu(tt):
  """"smem" puts a wrapper in lse.row_lse_grad's place; on this CPU it gives the Triton kernel's results."""
  triton = lse.row_lse_grad
  tt.set_lse_grad("smem_alias")
  assert lse.row_lse_grad is not triton
  x = (4.0 * jax.random.normal(jax.random.key(0), (16, 512))).astype(jnp.bfloat16)
  t = jax.random.randint(jax.random.key(1), (16,), 0, 512)
  for a, b in zip(lse.row_lse_grad(x, t, 0.5, jnp.bfloat16), triton(x, t, 0.5, jnp.bfloat16)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
