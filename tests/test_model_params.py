"""Parameter counts equal the PyTorch reference exactly for all 8 published sizes (spec 4 and 10)."""
import pytest

from parcae.model.config import size_config
from parcae.scaling.flops import param_counts, reference_flops_per_token

# name: (params_total, value-embedding params, core-stage params) from the reference (spec 10)
REFERENCE = {
    ("parcae", "small"): (144_323_136, 75_497_472, 14_159_040),
    ("parcae", "medium"): (388_003_328, 201_326_592, 50_340_352),
    ("parcae", "large"): (776_655_680, 377_487_360, 117_981_120),
    ("parcae", "xlarge"): (1_338_591_744, 603_979_776, 226_518_528),
    ("gpt", "small"): (143_141_184, 75_497_472, None),
    ("gpt", "medium"): (385_903_104, 201_326_592, None),
    ("gpt", "large"): (773_375_040, 377_487_360, None),
    ("gpt", "xlarge"): (1_333_868_544, 603_979_776, None),
}
REFERENCE_FLOPS = {
    ("parcae", "small"): 1.359902976e9, ("parcae", "medium"): 4.173740032e9,
    ("parcae", "large"): 8.859905280e9, ("parcae", "xlarge"): 1.5833634816e10,
    ("gpt", "small"): 8.21098368e8, ("gpt", "medium"): 2.41608192e9,
    ("gpt", "large"): 4.95482304e9, ("gpt", "xlarge"): 8.60719104e9,
}


@pytest.mark.parametrize("kind,size", sorted(REFERENCE))
def test_params_total_matches_reference(kind, size):
  total, ve, core = REFERENCE[(kind, size)]
  counts = param_counts(size_config(kind, size))
  assert counts["params_total"] == total
  assert counts["value_embeds"] == ve
  if core is not None:
    assert counts["stage_core"] == core
    d = size_config(kind, size).d_model
    assert counts["stage_injection"] == d * d + 2 * d  # diagonal adapter: B, A_log, dt_bias
    assert counts["stage_C"] == d * d


@pytest.mark.parametrize("kind,size", sorted(REFERENCE_FLOPS))
def test_reference_flops_convention(kind, size):
  got = reference_flops_per_token(size_config(kind, size))
  assert got == pytest.approx(REFERENCE_FLOPS[(kind, size)], rel=1e-12)


def test_sweep_flops_points():
  # spec 5.7: parcae-small at (mu, s) = (1,1) ... (12,6)
  expected = {(1, 1): 8.28190e8, (2, 1): 8.69091e8, (4, 2): 1.03270e9, (6, 3): 1.19630e9,
              (10, 5): 1.52351e9, (12, 6): 1.68711e9}
  for (mu, s), flops in expected.items():
    cfg = size_config("parcae", "small")
    cfg.mean_recurrence, cfg.mean_backprop_depth = mu, s
    assert reference_flops_per_token(cfg) == pytest.approx(flops, rel=1e-5)
