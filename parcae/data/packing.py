"""Packing a split's token stream into rows, and the order rows are served in.

Rows. The stream of N tokens (documents, each followed by EOS) is read as an endless circular stream:
stream position p holds token p mod N. Row r is positions [r*S, r*S + S] (S = seq_len, S+1 tokens), so
consecutive rows share one token; inputs = row[:-1], targets = row[1:]. Row r's targets are positions
r*S+1 ... r*S+S: the rows tile the stream with no gap and no overlap, nothing is padded or dropped.

Epochs (the tail carries over). Row r belongs to epoch k = floor(r*S / N), i.e. to the corpus pass that
holds its first input token; epoch k is rows [start(k), start(k+1)) with start(k) = ceil(k*N / S). The row
that crosses the end of a pass finishes pass k and starts pass k+1, so the tail of each pass is carried into
the next instead of being dropped: after the rows of epochs 0..k-1 every token has been a target exactly k
times, except the few (< S) tokens at the start of the corpus that the crossing row already delivered once
more. When S divides N every epoch delivers every token exactly once.

Order. Delivery slot d (the d-th row served, d = step * global_batch + i) lies in epoch k = floor(d*S / N)
and serves row start(k) + perm_k(d - start(k)), where perm_k is a seeded permutation of the epoch's rows
(a cycle-walking Feistel network keyed by (seed, k)); with shuffle off, slot d serves row d. The batch of a
step is therefore a pure function of (seed, step), needs O(batch) work and memory at any step, and does not
depend on library versions (the permutation is plain integer arithmetic here).
"""
from __future__ import annotations

import numpy as np

_M64 = (1 << 64) - 1
_ROUNDS = 6


def epoch_of_row(r, seq_len: int, num_tokens: int):
  return (np.asarray(r, np.int64) * seq_len) // num_tokens


def epoch_start(k, seq_len: int, num_tokens: int):
  """First row of epoch k: ceil(k * N / S)."""
  return -((-np.asarray(k, np.int64) * num_tokens) // seq_len)


def _splitmix64(x: int) -> int:
  x = (x + 0x9E3779B97F4A7C15) & _M64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
  return x ^ (x >> 31)


def _mix_u64(x: np.ndarray, key: int) -> np.ndarray:
  """A keyed 64-bit mixer on uint64 arrays (wrapping arithmetic)."""
  x = x ^ np.uint64(key)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def permute(j, n: int, seed: int, epoch: int) -> np.ndarray:
  """perm(j) for a permutation of range(n) keyed by (seed, epoch); j: int array with 0 <= j < n."""
  j = np.asarray(j, np.int64)
  if n <= 1:
    return j.copy()
  half = max(1, ((n - 1).bit_length() + 1) // 2)  # the Feistel domain 4**half >= n
  mask = np.uint64((1 << half) - 1)
  base = _splitmix64((_splitmix64(seed & _M64) ^ (epoch & _M64)) & _M64)
  keys = [_splitmix64((base + i) & _M64) for i in range(_ROUNDS)]

  def feistel(x):
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
      left, right = right, left ^ (_mix_u64(right, key) & mask)
    return (left << np.uint64(half)) | right

  with np.errstate(over="ignore"):
    y = feistel(j.astype(np.uint64))
    out = y >= np.uint64(n)
    while out.any():  # cycle walking: apply again until the value lands in [0, n)
      y[out] = feistel(y[out])
      out = y >= np.uint64(n)
  return y.astype(np.int64)


def rows_for_slots(d, *, seq_len: int, num_tokens: int, seed: int, shuffle: bool) -> np.ndarray:
  """Row index served at each delivery slot d (int array)."""
  d = np.asarray(d, np.int64)
  if not shuffle:
    return d.copy()
  rows = np.empty_like(d)
  k_all = epoch_of_row(d, seq_len, num_tokens)
  for k in np.unique(k_all):
    sel = k_all == k
    start, stop = (int(epoch_start(k + i, seq_len, num_tokens)) for i in (0, 1))
    rows[sel] = start + permute(d[sel] - start, stop - start, seed, int(k))
  return rows
