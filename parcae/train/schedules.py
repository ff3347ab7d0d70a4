"""Learning-rate schedules as pure functions of the optimizer step (jit-friendly).

Every schedule returns a *multiplier* in [min_ratio, 1]; the optimizer multiplies it into its base rates
(AdamW: ``lr * schedule(step)``, Muon: ``muon_lr * schedule(step)``), so both optimizers follow one shape,
as in the PyTorch reference (there the scheduler gives the AdamW lr and Muon uses ratio muon_lr / lr).

``step`` is the 0-based index of the optimizer update (an int or a traced int array). ``min_ratio`` is the
floor of the multiplier: ``cfg.min_lr / cfg.lr`` (the reference's ``min_lr`` is an absolute AdamW lr).

The run length (``run_length``: total, warm-up and cool-down steps) may be Python ints or traced int32
scalars: the trainer passes it to the jitted step as an argument, so runs that differ only in length (a
sweep over data budgets) compile to the same program and share a persistent compilation cache entry.
The step counts themselves are computed on the host, so traced and constant lengths give the same numbers.

Warm-up (all schedules): for ``step < warmup_steps`` the multiplier is ``(step + 1) / warmup_steps``, so the
first update is never wasted at lr 0 and the ramp reaches 1 exactly at ``step = warmup_steps - 1``.
"""
from typing import Callable

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def _warmup(step, warmup_steps):
  """Linear ramp (step + 1) / warmup_steps, 1 afterwards (1 everywhere when warmup_steps == 0)."""
  return jnp.minimum(1.0, (step + 1.0) / jnp.maximum(warmup_steps, 1))


def trapezoid(step, *, total_steps, warmup_steps, cooldown_steps, min_ratio=0.0):
  """Warm-up / stable / linear cool-down ("WSD"); the reference's ConstantLRScheduler.

  Multiplier 1 for ``step <= total_steps - cooldown_steps``, then ``(total_steps - step) / cooldown_steps``,
  clamped to ``>= min_ratio``.
  """
  step = jnp.asarray(step, jnp.float32)
  decay = (total_steps - step) / jnp.maximum(cooldown_steps, 1)
  stable = step <= total_steps - cooldown_steps
  mult = jnp.where(stable, 1.0, jnp.maximum(decay, min_ratio))
  return _warmup(step, warmup_steps) * mult


def cosine(step, *, total_steps, warmup_steps, cooldown_steps=0, min_ratio=0.0):
  """Linear warm-up, then half-cosine from 1 to ``min_ratio`` at ``total_steps`` (cooldown_steps unused)."""
  del cooldown_steps
  step = jnp.asarray(step, jnp.float32)
  frac = jnp.clip((step - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1), 0.0, 1.0)
  mult = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
  return jnp.where(step < warmup_steps, _warmup(step, warmup_steps), mult)


def linear(step, *, total_steps, warmup_steps, cooldown_steps=0, min_ratio=0.0):
  """Linear warm-up, then linear decay from 1 to ``min_ratio`` at ``total_steps`` (cooldown_steps unused)."""
  del cooldown_steps
  step = jnp.asarray(step, jnp.float32)
  frac = jnp.clip((step - warmup_steps) / jnp.maximum(total_steps - warmup_steps, 1), 0.0, 1.0)
  mult = 1.0 - (1.0 - min_ratio) * frac
  return jnp.where(step < warmup_steps, _warmup(step, warmup_steps), mult)


def constant(step, *, total_steps, warmup_steps, cooldown_steps=0, min_ratio=0.0):
  """Linear warm-up, then constant 1."""
  del total_steps, cooldown_steps, min_ratio
  return _warmup(jnp.asarray(step, jnp.float32), warmup_steps)


# The one name -> function table.
SCHEDULES = {
    "trapezoid": trapezoid,  # reference default (warmup 0, cooldown 0.5, min_lr 0)
    "wsd": trapezoid,        # common name for the same shape
    "cosine": cosine,
    "linear": linear,
    "constant": constant,
}


def run_length(cfg, total_steps: int) -> dict:
  """Total, warm-up and cool-down steps of a run, as the reference counts them:
  ``warmup_steps = int(warmup_fraction * total_steps)``, ``cooldown_steps = int(cooldown_fraction * total_steps)``.
  """
  if total_steps < 1:
    raise ValueError(f"total_steps={total_steps} must be >= 1 (set the run length: train.steps).")
  return dict(total_steps=int(total_steps), warmup_steps=int(cfg.warmup_fraction * total_steps),
              cooldown_steps=int(cfg.cooldown_fraction * total_steps))


def multiplier(cfg, step, run: dict):
  """The schedule's multiplier at ``step`` for a run of length ``run`` (``run_length``'s dict, its values
  ints or int32 scalars, traced or not)."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={cfg.schedule!r} is unknown; use one of {sorted(SCHEDULES)}.")
  min_ratio = float(cfg.min_lr) / float(cfg.lr) if cfg.lr > 0 else 0.0
  return SCHEDULES[cfg.schedule](step, **run, min_ratio=min_ratio)


def make_schedule(cfg, total_steps: int) -> Schedule:
  """``step -> multiplier`` for a run of ``total_steps`` (optim config fields schedule, warmup_fraction,
  cooldown_fraction, min_lr, lr)."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule={cfg.schedule!r} is unknown; use one of {sorted(SCHEDULES)}.")
  run = run_length(cfg, total_steps)
  return lambda step: multiplier(cfg, step, run)
