"""Train iterator, eval batches, dataset_info and the embedded corpus's prepared shards."""
import json
import time

import numpy as np
import pytest

import parcae.data as D
from parcae.data import corpus, shards
from parcae.data import tokenizer as tk

SEQ = 8


def _one_doc_shards(path, n_tokens, shard_tokens=37, vocab=4096):
  """One document of distinct ids (and its EOS): every stream position holds a different token."""
  rng = np.random.default_rng(0)
  ids = rng.permutation(np.arange(3, vocab))[:n_tokens - 1]
  w = shards.ShardWriter(str(path), "train", vocab_size=vocab, eos_id=1, shard_tokens=shard_tokens)
  w.add(ids, num_bytes=123)
  w.close()
  return np.concatenate([ids, [1]])


def _cfg(path, **kw):
  cfg = D.default_data_config()
  cfg.kind, cfg.path = "shards", str(path)
  cfg.update(kw)
  return cfg


def _targets(it, steps):
  return np.concatenate([next(it)["targets"].reshape(-1) for _ in range(steps)])


def test_every_token_is_a_target_once_per_epoch_when_seq_divides(tmp_path):
  stream = _one_doc_shards(tmp_path, 240)  # 30 rows of 8 targets per epoch
  it = D.make_train_iterator(_cfg(tmp_path), seq_len=SEQ, global_batch=6, seed=1)
  e0, e1 = _targets(it, 5), _targets(it, 5)
  for e in (e0, e1):
    assert np.array_equal(np.sort(e), np.sort(stream))
  assert not np.array_equal(e0, e1)  # each epoch has its own order


def test_no_token_dropped_or_repeated_across_epochs(tmp_path):
  n = 250  # not a multiple of SEQ: the row crossing each pass end carries the tail into the next
  stream = _one_doc_shards(tmp_path, n)
  it = D.make_train_iterator(_cfg(tmp_path), seq_len=SEQ, global_batch=1, seed=2)
  tiled = np.tile(stream, 10)
  got = _targets(it, 200)
  for k in range(1, 6):
    rows = -(-k * n // SEQ)  # rows of epochs 0..k-1
    # Served targets so far == stream positions 1..rows*SEQ, as a multiset: nothing dropped or repeated.
    assert np.array_equal(np.sort(got[:rows * SEQ]), np.sort(tiled[1:rows * SEQ + 1]))
    counts = np.unique(got[:rows * SEQ], return_counts=True)[1]
    assert counts.size == n and counts.min() == k and counts.max() <= k + 1
  # 1000 = lcm(250, 8) tokens = 125 rows = exactly 4 passes: every token exactly 4 times.
  assert np.all(np.unique(got[:1000], return_counts=True)[1] == 4)


def test_unshuffled_rows_follow_the_stream_with_one_token_overlap(tmp_path):
  stream = _one_doc_shards(tmp_path, 101)
  it = D.make_train_iterator(_cfg(tmp_path, shuffle=False), seq_len=SEQ, global_batch=2, seed=0)
  tiled = np.tile(stream, 5)
  for s in range(30):
    b = next(it)
    for i in range(2):
      r = 2 * s + i
      assert np.array_equal(b["inputs"][i], tiled[r * SEQ:(r + 1) * SEQ])
      assert np.array_equal(b["targets"][i], tiled[r * SEQ + 1:(r + 1) * SEQ + 1])
      assert b["inputs"].dtype == np.int32 and b["inputs"].shape == (2, SEQ)


def test_hosts_are_disjoint_and_union_is_the_global_batch(tmp_path):
  _one_doc_shards(tmp_path, 500)
  cfg = _cfg(tmp_path)
  single = D.make_train_iterator(cfg, seq_len=SEQ, global_batch=8, seed=5)
  hosts = [D.make_train_iterator(cfg, seq_len=SEQ, global_batch=8, seed=5, process_index=p, process_count=4)
           for p in range(4)]
  for _ in range(12):
    full = next(single)
    parts = [next(h) for h in hosts]
    assert all(p["inputs"].shape == (2, SEQ) for p in parts)
    assert np.array_equal(np.concatenate([p["inputs"] for p in parts]), full["inputs"])
    assert np.array_equal(np.concatenate([p["targets"] for p in parts]), full["targets"])
    firsts = [tuple(r) for p in parts for r in p["inputs"]]
    assert len(set(firsts)) == 8  # distinct rows (the stream has distinct tokens)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_at_the_exact_next_batch(tmp_path, num_workers):
  _one_doc_shards(tmp_path, 300)
  cfg = _cfg(tmp_path, num_workers=num_workers)
  a = D.make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=9)
  for _ in range(13):
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  expected = [next(a) for _ in range(20)]  # crosses epoch boundaries (~9 steps per epoch)
  b = D.make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=9)
  next(b)
  b.set_state(state)
  for e in expected:
    g = next(b)
    assert np.array_equal(g["inputs"], e["inputs"]) and np.array_equal(g["targets"], e["targets"])
  c = D.make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=10)
  with pytest.raises(ValueError, match="seed"):
    c.set_state(state)


def test_resume_with_another_batch_size_or_host_count_serves_the_next_rows(tmp_path):
  _one_doc_shards(tmp_path, 300)
  cfg = _cfg(tmp_path)
  a = D.make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=9)
  for _ in range(3):
    next(a)
  state = a.get_state()
  nxt = np.concatenate([next(a)["inputs"] for _ in range(2)])  # slots 12..19
  halves = []
  for p in range(2):  # resume on 2 hosts with global batch 8
    h = D.make_train_iterator(cfg, seq_len=SEQ, global_batch=8, seed=9, process_index=p, process_count=2)
    h.set_state(state)
    halves.append(next(h)["inputs"])
  assert np.array_equal(np.concatenate(halves), nxt)


def test_batches_are_a_pure_function_of_seed_and_step(tmp_path):
  _one_doc_shards(tmp_path, 400)
  cfg = _cfg(tmp_path)
  runs = [[next(it)["inputs"] for _ in range(15)]
          for it in (D.make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=s) for s in (3, 3, 4))]
  assert all(np.array_equal(x, y) for x, y in zip(runs[0], runs[1]))
  assert not all(np.array_equal(x, y) for x, y in zip(runs[0], runs[2]))
  fresh = D.make_train_iterator(cfg, seq_len=SEQ, global_batch=4, seed=3)
  assert np.array_equal(fresh.batch_at(11 * 4)["inputs"], runs[0][11])


def test_eval_batches_are_the_first_rows_in_order(tmp_path):
  stream = _one_doc_shards(tmp_path, 203)  # 25 full rows of 8 targets inside one pass
  cfg = _cfg(tmp_path, val_split="train")
  ev = D.eval_batches(cfg, split="train", seq_len=SEQ, batch_size=4, num_batches=None)
  assert len(ev) == 6  # 25 rows -> 6 full batches of 4, the 25th row dropped
  rows = np.concatenate([b["inputs"] for b in ev])
  for r in range(24):
    assert np.array_equal(rows[r], stream[r * SEQ:(r + 1) * SEQ])
  halves = [D.eval_batches(cfg, split="train", seq_len=SEQ, batch_size=4, num_batches=2, process_index=p,
                           process_count=2) for p in (0, 1)]
  for b in range(2):
    assert np.array_equal(np.concatenate([halves[0][b]["targets"], halves[1][b]["targets"]]),
                          ev[b]["targets"])
  with pytest.raises(ValueError, match="only 6 full eval batches"):
    D.eval_batches(cfg, split="train", seq_len=SEQ, batch_size=4, num_batches=7)


def test_dataset_info_of_a_shard_directory(tmp_path):
  _one_doc_shards(tmp_path, 240)
  info = D.dataset_info(_cfg(tmp_path))
  assert info["num_tokens"] == {"train": 240} and info["vocab_size"] == 4096 and info["eos_id"] == 1
  assert info["bytes_per_token"]["train"] == pytest.approx(123 / 240, rel=1e-12)
  assert info["tokenizer_path"] is None


def test_bad_settings_raise_clear_errors(tmp_path):
  _one_doc_shards(tmp_path, 50)
  cfg = _cfg(tmp_path)
  with pytest.raises(ValueError, match="larger than the dataset"):
    D.make_train_iterator(cfg, seq_len=50, global_batch=2, seed=0)
  with pytest.raises(ValueError, match="multiple of process_count"):
    D.make_train_iterator(cfg, seq_len=SEQ, global_batch=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="split 'val' is not in"):
    D.eval_batches(cfg, split="val", seq_len=SEQ, batch_size=2, num_batches=1)
  with pytest.raises(ValueError, match="data.kind"):
    D.dataset_info(_cfg(tmp_path, kind="hf"))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
  root = tmp_path_factory.mktemp("embedded")
  return root, D.prepare_embedded(str(root), vocab_size=512)


def test_prepare_embedded_is_cached_and_matches_the_tokenizer(embedded):
  root, path = embedded
  t0 = time.perf_counter()
  assert D.prepare_embedded(str(root), vocab_size=512) == path
  assert time.perf_counter() - t0 < 2.0  # cached: no retraining / re-tokenizing (which takes seconds)
  cfg = D.default_data_config()
  cfg.path, cfg.vocab_size = str(root), 512
  info = D.dataset_info(cfg)
  assert info["vocab_size"] == 512 and info["eos_id"] == tk.EOS_ID
  tok = tk.load_tokenizer(info["tokenizer_path"])
  val_docs = corpus.embedded_documents("val")
  ids = np.concatenate([np.r_[e, tk.EOS_ID] for e in tk.encode_batch(tok, val_docs)])
  stream = shards.TokenStream(info["data_dir"], "val", verify_checksums=True).tokens()
  assert np.array_equal(stream, ids)  # documents in order, each followed by EOS, nothing else
  assert info["num_tokens"]["val"] == ids.size
  n_bytes = sum(len(d.encode("utf-8")) for d in val_docs)
  assert info["bytes_per_token"]["val"] == pytest.approx(n_bytes / ids.size, rel=1e-12)
  assert 1.5 < info["bytes_per_token"]["train"] < 6  # a BPE of 512 tokens compresses code 2-4x
  it = D.make_train_iterator(cfg, seq_len=128, global_batch=4, seed=0)
  assert next(it)["inputs"].shape == (4, 128)
