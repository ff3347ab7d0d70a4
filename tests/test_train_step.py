"""The jitted train step's accumulation loop, as XLA compiles it on the CPU."""
import re

import jax
import jax.numpy as jnp
import pytest

from parcae.model.config import ve_layout
from conftest import CPU_DEFAULT_CODEGEN
from train_helpers import tiny_config


def compiled_step_text(kind):
  from parcae.train import mesh as pmesh
  from parcae.train.loop import init_state
  from parcae.train.step import make_train_step
  cfg = tiny_config("unused", grad_accum=2)
  cfg.model.kind = kind
  cfg.model.prelude_layers = cfg.model.core_layers = cfg.model.coda_layers = 2  # Parcae with 3 value-embedding tables
  cfg.mesh.data = 1
  mesh = pmesh.make_mesh(cfg.mesh, jax.devices()[:1])
  graphdef, optimizer, _, abstract, _ = init_state(cfg, mesh)
  tc = cfg.train
  batch = {k: jax.ShapeDtypeStruct((tc.grad_accum, tc.micro_batch_size, tc.seq_len), jnp.int32)
           for k in ("inputs", "targets")}
  run = {k: jax.ShapeDtypeStruct((), jnp.int32) for k in ("total_steps", "warmup_steps", "cooldown_steps")}
  with jax.set_mesh(mesh):
    text = jax.jit(make_train_step(graphdef, optimizer, tc)).trace(abstract, batch, run).lower().compile(
        CPU_DEFAULT_CODEGEN).as_text()  # the fusions a user's CPU run gets (conftest)
  return text, cfg.model


@pytest.mark.parametrize("kind", ["gpt", "parcae"])
def test_embedding_gradients_are_scattered_into_the_accumulator(kind):
  """Each embedding table's gradient (token embedding and value-embedding tables) is a scatter-add whose
  operand is the loop-carried accumulator (for the tied table: the accumulator plus the head's dense
  gradient), not a zero-filled [V, D] buffer added to the accumulator afterwards."""
  text, m = compiled_step_text(kind)
  table = f"f32[{m.vocab_size},{m.d_model}]"
  defs = {d.group(1): d.group(2) for d in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (.*)$", text, re.M)}
  operands = {}
  for name, rhs in defs.items():
    call = re.match(re.escape(table) + r"\{[\d,]*\} (fusion|scatter)\(%([^,)]+)", rhs)
    if call and (call.group(1) == "scatter" or "scatter" in name):
      operands[name] = defs[call.group(2)]
  into = {n: o for n, o in operands.items() if not o.startswith(table + "{1,0} parameter(")}  # outer calls
  n_ve = sum(sum(flags) for flags in ve_layout(m).values())
  assert n_ve == 3 and len(into) == 1 + n_ve, operands
  for name, operand in into.items():
    assert "get-tuple-element(" in operand or "add" in operand.split("calls=")[-1], (name, operand)
    assert "broadcast" not in operand, (name, operand)
