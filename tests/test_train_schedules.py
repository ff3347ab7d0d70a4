"""LR schedules: the spec's §10 trapezoid test points, the other shapes against their formulas, jit use."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from parcae.train import schedules


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(schedule="trapezoid", lr=8e-3, min_lr=0.0, warmup_fraction=0.0,
                                     cooldown_fraction=0.5))
  c.update(kw)
  return c


def test_trapezoid_reference_test_points():
  # Spec §10: base 8e-3, max_steps 21,362: 8e-3 for step <= 10,681, then 8e-3 * (21,362 - step) / 10,681.
  sched = schedules.make_schedule(_cfg(), 21_362)
  lr = lambda s: 8e-3 * float(sched(s))
  assert lr(0) == pytest.approx(8e-3, rel=1e-6)
  assert lr(10_681) == pytest.approx(8e-3, rel=1e-6)
  assert lr(10_682) == pytest.approx(8e-3 * 10_680 / 10_681, rel=1e-6)
  assert lr(15_000) == pytest.approx(4.765e-3, abs=5e-7)  # spec quotes 4 significant digits
  assert lr(21_362) == pytest.approx(0.0, abs=1e-12)
  for s in range(0, 21_363, 997):
    want = 8e-3 if s <= 10_681 else 8e-3 * (21_362 - s) / 10_681
    assert lr(s) == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_trapezoid_min_lr_floor_and_warmup():
  sched = schedules.make_schedule(_cfg(min_lr=2e-3, warmup_fraction=0.1), 100)
  # Warm-up (step + 1) / 10 for the first 10 steps.
  np.testing.assert_allclose([float(sched(s)) for s in range(10)], [(s + 1) / 10 for s in range(10)], rtol=1e-6)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(50)) == pytest.approx(1.0)
  assert float(sched(60)) == pytest.approx(40 / 50, rel=1e-6)
  assert float(sched(99)) == pytest.approx(0.25, rel=1e-6)  # clamped at min_lr / lr = 2e-3 / 8e-3


def test_cosine_linear_constant_shapes():
  total, warm, mn = 200, 20, 0.1
  kw = dict(warmup_fraction=warm / total, min_lr=mn * 8e-3)
  cos = schedules.make_schedule(_cfg(schedule="cosine", **kw), total)
  lin = schedules.make_schedule(_cfg(schedule="linear", **kw), total)
  const = schedules.make_schedule(_cfg(schedule="constant", **kw), total)
  for s in [0, 5, 19]:
    for f in (cos, lin, const):
      assert float(f(s)) == pytest.approx((s + 1) / warm, rel=1e-6)
  for s in [20, 65, 110, 150, 200, 250]:
    frac = min(max((s - warm) / (total - warm), 0.0), 1.0)
    assert float(cos(s)) == pytest.approx(mn + (1 - mn) * 0.5 * (1 + np.cos(np.pi * frac)), rel=1e-5)
    assert float(lin(s)) == pytest.approx(1 - (1 - mn) * frac, rel=1e-5)
    assert float(const(s)) == pytest.approx(1.0)


def test_schedules_are_jittable_with_traced_step():
  for name in schedules.SCHEDULES:
    sched = schedules.make_schedule(_cfg(schedule=name, warmup_fraction=0.05), 1000)
    steps = jnp.arange(0, 1001, 37)
    got = jax.jit(jax.vmap(sched))(steps)
    want = np.array([float(sched(int(s))) for s in steps])
    # f32 arithmetic on O(1) terms (e.g. 1 + cos): absolute rounding ~ulp(1) = 6e-8 even near 0.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=2e-7)


def test_unknown_schedule_names_the_field():
  with pytest.raises(ValueError, match="optim.schedule"):
    schedules.make_schedule(_cfg(schedule="exp"), 100)


def test_zero_run_length_names_the_field():
  with pytest.raises(ValueError, match=r"train\.steps"):
    schedules.make_schedule(_cfg(), 0)


def test_traced_run_length_gives_the_same_multipliers():
  """The trainer passes the run length as traced int32 scalars into a jitted step; every schedule gives what
  the Python-int run length gives eagerly, at every step, for short and long runs. Not bit for bit: under jit
  XLA fuses the cosine's arithmetic (1-ulp differences, also with constant lengths); f32 rounding of O(1)
  terms bounds the rest."""
  for name in schedules.SCHEDULES:
    cfg = _cfg(schedule=name, warmup_fraction=0.07, cooldown_fraction=0.3, min_lr=4e-4)
    traced = jax.jit(lambda s, run, cfg=cfg: schedules.multiplier(cfg, s, run))
    for total in (1, 3, 10, 137):
      run = schedules.run_length(cfg, total)
      steps = np.arange(total + 2)
      run_i32 = {k: jnp.int32(v) for k, v in run.items()}
      got = np.array([float(traced(jnp.int32(s), run_i32)) for s in steps])
      want = np.array([float(schedules.multiplier(cfg, int(s), run)) for s in steps])
      np.testing.assert_allclose(got, want, rtol=2e-7, atol=1.2e-7, err_msg=f"{name} total={total}")
  assert schedules.run_length(_cfg(warmup_fraction=0.07, cooldown_fraction=0.3), 137) == dict(
      total_steps=137, warmup_steps=9, cooldown_steps=41)
