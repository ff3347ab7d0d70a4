"""Byte-level BPE: special-token ids, exact round trip of any text, deterministic training."""
import pytest

from parcae.data import tokenizer as tk

TRAIN = ["The quick brown fox jumps over the lazy dog. " * 20,
         "def f(x):\n    return x * 12345 + 678\n" * 20,
         "Grüße aus Köln — naïve café; 東京 and emoji 🙂🚀. " * 10]
HARD = ["", " ", "\n\n\t  x", "never seen: ζ∂ƒ ☃ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200b\x00\x7f", "12345678901234567890",
        "mixed  spaces\r\nand\rreturns"]


@pytest.fixture(scope="module")
def tok():
  return tk.train_tokenizer(TRAIN, 300)


def test_special_ids_and_vocab_size(tok):
  assert [tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")] == [0, 1, 2]
  assert tok.get_vocab_size() <= 300
  assert tok.get_vocab_size() > tk.MIN_VOCAB_SIZE  # some merges were learned


@pytest.mark.parametrize("text", TRAIN + HARD)
def test_any_text_round_trips(tok, text):
  ids = tk.encode_batch(tok, [text])[0]
  assert tk.decode(tok, ids) == text
  assert all(i >= 3 for i in ids)  # plain text never yields special ids


def test_literal_special_token_text_maps_to_its_id(tok):
  # Documented behaviour of HF tokenizers: a special token's literal text is matched in the input.
  ids = tk.encode_batch(tok, ["a<|eos|>b"])[0]
  assert ids.count(tk.EOS_ID) == 1 and tk.decode(tok, ids) == "a<|eos|>b"


def test_numbers_split_in_groups_of_at_most_two_digits(tok):
  ids = tk.encode_batch(tok, ["1234567"])[0]
  pieces = [tk.decode(tok, [i]) for i in ids]
  assert "".join(pieces) == "1234567" and max(len(p) for p in pieces) <= 2


def test_training_is_deterministic_and_saves_loads(tok, tmp_path):
  again = tk.train_tokenizer(TRAIN, 300)
  assert again.to_str() == tok.to_str()
  path = tk.save_tokenizer(tok, str(tmp_path / "t" / "tokenizer.json"))
  loaded = tk.load_tokenizer(path)
  assert tk.encode_batch(loaded, TRAIN) == tk.encode_batch(tok, TRAIN)


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="vocab_size=100 is too small"):
    tk.train_tokenizer(TRAIN, 100)
  with pytest.raises(ValueError, match="does not exist"):
    tk.load_tokenizer(str(tmp_path / "none.json"))
  from tokenizers import Tokenizer, models
  other = Tokenizer(models.BPE())
  other.add_special_tokens(["<|pad|>", "<|bos|>", "<|eos|>"])
  other.save(str(tmp_path / "other.json"))
  with pytest.raises(ValueError, match=r"expected \(0, 1, 2\)"):
    tk.load_tokenizer(str(tmp_path / "other.json"))
