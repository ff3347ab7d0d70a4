"""Row order: the seeded per-epoch permutation and the epoch boundaries of the circular stream."""
import numpy as np
import pytest

from parcae.data import packing


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_permute_is_a_bijection(n):
  p = packing.permute(np.arange(n), n, seed=3, epoch=5)
  assert sorted(p.tolist()) == list(range(n))


def test_permute_depends_on_seed_and_epoch_only():
  n = 1000
  a = packing.permute(np.arange(n), n, seed=0, epoch=0)
  assert np.array_equal(a, packing.permute(np.arange(n), n, seed=0, epoch=0))
  assert not np.array_equal(a, packing.permute(np.arange(n), n, seed=1, epoch=0))
  assert not np.array_equal(a, packing.permute(np.arange(n), n, seed=0, epoch=1))
  # Random access: any subset of positions gives the same values as the full permutation.
  idx = np.array([999, 0, 500, 17])
  assert np.array_equal(packing.permute(idx, n, seed=0, epoch=0), a[idx])
  # A shuffle, not a near-identity: few fixed points, low rank correlation with the identity.
  assert (a == np.arange(n)).sum() < 10
  assert abs(np.corrcoef(a, np.arange(n))[0, 1]) < 0.15


@pytest.mark.parametrize("n_tokens,seq_len", [(100, 10), (103, 10), (37, 50), (5000, 7)])
def test_epochs_partition_rows_by_first_target_pass(n_tokens, seq_len):
  # Epoch k holds exactly the rows whose first input token lies in pass k of the stream.
  rows = np.arange(0, 6 * n_tokens // seq_len + 3)
  k = packing.epoch_of_row(rows, seq_len, n_tokens)
  assert np.array_equal(k, [(r * seq_len) // n_tokens for r in rows])
  for e in range(int(k.max())):
    assert int(packing.epoch_start(e, seq_len, n_tokens)) == rows[k >= e].min()


def test_rows_for_slots_permutes_within_each_epoch():
  n_tokens, seq_len = 1003, 10
  slots = np.arange(int(packing.epoch_start(5, seq_len, n_tokens)))
  rows = packing.rows_for_slots(slots, seq_len=seq_len, num_tokens=n_tokens, seed=7, shuffle=True)
  assert sorted(rows.tolist()) == slots.tolist()  # every row exactly once
  # Slots of an epoch serve rows of that same epoch.
  assert np.array_equal(packing.epoch_of_row(rows, seq_len, n_tokens),
                        packing.epoch_of_row(slots, seq_len, n_tokens))
  assert not np.array_equal(rows, slots)
  unshuffled = packing.rows_for_slots(slots, seq_len=seq_len, num_tokens=n_tokens, seed=7, shuffle=False)
  assert np.array_equal(unshuffled, slots)
