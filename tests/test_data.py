"""Tests of skipjax.data: sources, tokenizers, packing, deterministic order."""

import math
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from skipjax import data
from skipjax.data import pipeline
from skipjax.data import tfds_source

EOS = 256  # ByteTokenizer separator.


def make_config(**overrides):
  config = data.default_config()
  config.batch_size = 4
  config.seq_len = 16
  config.update(overrides)
  return config


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def write_docs(tmp_path, docs, name="doc"):
  """Writes each text as its own file; returns the glob matching them."""
  for i, doc in enumerate(docs):
    (tmp_path / f"{name}{i:03d}.txt").write_bytes(doc.encode("utf-8"))
  return str(tmp_path / f"{name}*.txt")


def byte_stream(docs):
  """The expected byte-tokenizer stream: each document's bytes, then EOS."""
  ids = []
  for doc in docs:
    ids.extend(doc.encode("utf-8"))
    ids.append(EOS)
  return np.asarray(ids, np.int32)


@pytest.fixture
def text_docs():
  rng = np.random.default_rng(0)
  words = ["depth", "skip", "router", "token", "gate", "héllo", "日本"]
  return [" ".join(rng.choice(words, size=int(rng.integers(5, 40)))) + "\n"
          for _ in range(40)]


# --------------------------------------------------------------- synthetic --


def test_synthetic_shapes_dtypes_and_shift():
  config = make_config(batch_size=8, seq_len=40)
  ds = data.get_dataset(config, split="train", seed=0)
  assert ds.vocab_size == config.synthetic_vocab_size
  assert ds.num_batches is None
  batch = ds.batch(3)
  assert set(batch) == {"inputs", "targets", "difficulty"}
  for value in batch.values():
    assert value.shape == (8, 40) and value.dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])
  assert batch["inputs"].max() < ds.vocab_size and batch["inputs"].min() >= 0
  assert set(np.unique(batch["difficulty"])) <= {0, 1, 2}
  assert data.DIFFICULTY_CLASSES == ("easy", "hard", "noise")


def _full_tokens(batch):
  return np.concatenate([batch["inputs"][:, :1], batch["targets"]], axis=1)


def test_synthetic_difficulty_labels_are_right():
  """Recomputes every label from the tokens alone."""
  config = make_config(batch_size=64, seq_len=128)
  ds = data.get_dataset(config, split="train", seed=3)
  batch = ds.batch(0)
  tokens, cls = _full_tokens(batch), batch["difficulty"]
  equals = 3
  m = (config.synthetic_vocab_size - 4) // 3
  q = (m + 2) // 3
  count_lo, sum_lo = 4, 4 + m

  def in_alphabet(x, lo):
    return (x >= lo) & (x < lo + m)

  prev3, prev2, prev, cur = tokens[:, :-3], tokens[:, 1:-2], tokens[:, 2:-1], tokens[:, 3:]
  label = cls[:, 2:]  # Classes of targets that have three predecessors.
  plus_one = (in_alphabet(cur, count_lo) & in_alphabet(prev, count_lo)
              & ((cur - prev) % m == 1))
  cued_sum = (in_alphabet(cur, sum_lo) & (prev == equals) & in_alphabet(prev2, sum_lo)
              & in_alphabet(prev3, sum_lo) & (prev2 - sum_lo + prev3 - sum_lo == cur - sum_lo))
  easy, hard, noise = label == 0, label == 1, label == 2
  assert (plus_one | (cur == equals))[easy].all(), "an 'easy' target is neither previous + 1 nor '='"
  assert cued_sum[hard].all(), "a 'hard' target is not '=' after the sum of two tokens"
  assert (prev == equals)[hard].all() and (prev != equals)[~hard].all(), "'=' must cue exactly the sums"
  # A noise target follows the count rule only by chance (a count start, 1/m of the time).
  assert plus_one[noise].mean() < 2.0 / m
  assert not (cur == equals)[noise].any()
  # Operands stay in [0, q) and no sum wraps around m.
  sums_alphabet = in_alphabet(batch["targets"], sum_lo)
  assert (batch["targets"][sums_alphabet & (cls == 2)] - sum_lo < q).all()
  assert (batch["targets"][cls == 1] - sum_lo <= 3 * (q - 1)).all()
  # Every marker target (ids 0..2) is noise in the mixed task.
  assert (cls[batch["targets"] < 3] == 2).all()
  # Class shares match the module docstring (33.3% / 8.3% / 58.3%).
  shares = np.bincount(cls.ravel(), minlength=3) / cls.size
  np.testing.assert_allclose(shares, [8 / 24, 2 / 24, 14 / 24], atol=0.03)
  # Ideal losses: 0 for easy/hard, log 3 for markers, log q for operands,
  # log m for the rest.
  ideal = data.ideal_token_loss(batch["targets"], cls, ds.vocab_size)
  assert (ideal[cls < 2] == 0).all()
  is_marker = batch["targets"] < 3
  is_operand = sums_alphabet & (cls == 2)
  np.testing.assert_allclose(ideal[is_marker], math.log(3), rtol=1e-6)
  np.testing.assert_allclose(ideal[is_operand], math.log(q), rtol=1e-6)
  np.testing.assert_allclose(ideal[(cls == 2) & ~is_marker & ~is_operand],
                             math.log(m), rtol=1e-6)


def test_synthetic_noise_tokens_are_uniform():
  config = make_config(batch_size=64, seq_len=128)
  batch = data.get_dataset(config, seed=1).batch(0)
  m = (config.synthetic_vocab_size - 4) // 3
  targets = batch["targets"]
  operands = (targets >= 4 + m) & (targets < 4 + 2 * m)  # uniform in [0, q)
  noise = targets[(batch["difficulty"] == 2) & (targets >= 4) & ~operands]
  counts = np.bincount((noise - 4) % m, minlength=m)
  assert counts.min() > 0.6 * counts.mean()  # Roughly uniform over m.


@pytest.mark.parametrize("task", ["counting", "sums"])
def test_single_type_tasks(task):
  config = make_config(source=f"synthetic:{task}", batch_size=8, seq_len=64)
  batch = data.get_dataset(config).batch(0)
  cls = batch["difficulty"]
  markers_or_equals = batch["targets"] < 4
  assert (cls[markers_or_equals] == 0).all()  # Predictable markers and '=' are easy.
  if task == "counting":
    assert not (cls == 1).any()
  else:
    assert not (cls[~markers_or_equals] == 0).any()


def test_synthetic_eval_split_is_held_out_and_finite():
  config = make_config(synthetic_eval_batches=3)
  train = data.get_dataset(config, split="train", seed=0)
  ev = data.get_dataset(config, split="eval", seed=0)
  ev_other_seed = data.get_dataset(config, split="eval", seed=7)
  assert ev.num_batches == 3
  assert not np.array_equal(train.batch(0)["inputs"], ev.batch(0)["inputs"])
  assert_batches_equal(ev.batch(2), ev_other_seed.batch(2))
  with pytest.raises(IndexError):
    ev.batch(3)


# ----------------------------------------------------- determinism / order --


@pytest.fixture(params=["synthetic", "text"])
def train_config(request, tmp_path, text_docs):
  if request.param == "synthetic":
    return make_config()
  return make_config(source="text:" + write_docs(tmp_path, text_docs))


def test_same_batches_across_objects_and_call_orders(train_config):
  a = data.get_dataset(train_config, split="train", seed=5)
  b = data.get_dataset(train_config, split="train", seed=5)
  forward = [a.batch(s) for s in range(12)]
  backward = {s: b.batch(s) for s in reversed(range(12))}
  for s in (3, 11, 0, 7, 3):
    assert_batches_equal(forward[s], backward[s])
    assert_batches_equal(forward[s], a.batch(s))


def test_resume_sees_the_same_batches(train_config):
  full = data.get_dataset(train_config, split="train", seed=2)
  first_run = [full.batch(s) for s in range(10)]
  resumed = data.get_dataset(train_config, split="train", seed=2)
  for s in range(5, 10):
    assert_batches_equal(first_run[s], resumed.batch(s))


def test_different_seeds_differ(train_config):
  a = data.get_dataset(train_config, split="train", seed=0).batch(0)
  b = data.get_dataset(train_config, split="train", seed=1).batch(0)
  assert not np.array_equal(a["inputs"], b["inputs"])


def test_epochs_reshuffle(tmp_path, text_docs):
  config = make_config(source="text:" + write_docs(tmp_path, text_docs),
                       eval_fraction=0.0)
  ds = data.get_dataset(config, split="train", seed=0)
  n = ds.num_examples
  steps = math.ceil(3 * n / ds.batch_size)
  order = np.concatenate([ds.rows(s) for s in range(steps)])[:3 * n]
  epochs = order.reshape(3, n)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(n))


# ------------------------------------------------------------- text source --


def test_text_byte_packing(tmp_path, text_docs):
  config = make_config(source="text:" + write_docs(tmp_path, text_docs),
                       eval_fraction=0.1)
  train = data.get_dataset(config, split="train", seed=0)
  ev = data.get_dataset(config, split="eval", seed=0)
  expected = byte_stream(text_docs)
  width = config.seq_len + 1
  n_chunks = len(expected) // width
  n_eval = math.floor(0.1 * n_chunks + 0.5)
  assert train.vocab_size == 257
  assert train.num_tokens == ev.num_tokens == len(expected)
  assert train.num_examples == n_chunks - n_eval
  assert ev.num_examples == n_eval
  assert ev.num_batches == n_eval // config.batch_size
  chunks = expected[:n_chunks * width].reshape(n_chunks, width)
  # Train rows are whole chunks of the stream, from the first part only.
  batch = train.batch(0)
  np.testing.assert_array_equal(batch["inputs"], chunks[train.rows(0), :-1])
  np.testing.assert_array_equal(batch["targets"], chunks[train.rows(0), 1:])
  assert train.rows(0).max() < n_chunks - n_eval
  # Eval is the held-out tail, in order.
  for step in range(ev.num_batches):
    rows = n_chunks - n_eval + step * config.batch_size + np.arange(4)
    np.testing.assert_array_equal(ev.batch(step)["inputs"], chunks[rows, :-1])
  with pytest.raises(IndexError):
    ev.batch(ev.num_batches)


def test_text_max_records_caps_lines(tmp_path):
  docs = ["".join(f"line {d}.{i}\n" for i in range(30)) for d in range(3)]
  config = make_config(source="text:" + write_docs(tmp_path, docs),
                       max_records=40, eval_fraction=0.0)
  ds = data.get_dataset(config, seed=0)
  kept = [docs[0], "".join(f"line 1.{i}\n" for i in range(10))]
  assert ds.num_tokens == len(byte_stream(kept))


def test_text_eval_source(tmp_path, text_docs):
  train_glob = write_docs(tmp_path, text_docs[:30], name="train")
  eval_glob = write_docs(tmp_path, text_docs[30:], name="valid")
  config = make_config(source="text:" + train_glob,
                       eval_source="text:" + eval_glob)
  ev = data.get_dataset(config, split="eval")
  train = data.get_dataset(config, split="train")
  width = config.seq_len + 1
  # Nothing of the train stream is held out when eval_source is set.
  assert train.num_examples == len(byte_stream(text_docs[:30])) // width
  assert ev.num_tokens == len(byte_stream(text_docs[30:]))
  np.testing.assert_array_equal(ev.batch(0)["inputs"][0],
                                byte_stream(text_docs[30:])[:width - 1])


def test_text_bpe_saved_and_reloaded(tmp_path, text_docs):
  config = make_config(source="text:" + write_docs(tmp_path, text_docs),
                       tokenizer="bpe", bpe_vocab_size=300)
  workdir = tmp_path / "work"
  first = data.get_dataset(config, split="train", seed=0, workdir=str(workdir))
  saved = workdir / "tokenizer.json"
  assert saved.exists()
  assert first.vocab_size <= 300
  text = "".join(text_docs)
  assert first.tokenizer.decode(first.tokenizer.encode_batch([text])[0]) == text
  packed = np.concatenate([first.batch(s)["inputs"] for s in range(3)])
  assert packed.max() < first.vocab_size
  # A fresh process: no in-memory caches; the tokenizer comes from the file.
  pipeline._streams.clear()  # pylint: disable=protected-access
  pipeline._tokenizers.clear()  # pylint: disable=protected-access
  before = saved.read_text()
  again = data.get_dataset(config, split="train", seed=0, workdir=str(workdir))
  assert saved.read_text() == before
  assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
  for s in range(3):
    assert_batches_equal(first.batch(s), again.batch(s))
  # Without a workdir the same tokenizer is trained in memory.
  pipeline._tokenizers.clear()  # pylint: disable=protected-access
  memory = data.get_dataset(config, split="train", seed=0)
  assert memory.tokenizer.fingerprint == first.tokenizer.fingerprint


def test_bpe_packing_appends_eos_per_document(tmp_path):
  docs = ["alpha beta\n", "gamma\n", "delta epsilon zeta\n"] * 10
  config = make_config(source="text:" + write_docs(tmp_path, docs),
                       tokenizer="bpe", bpe_vocab_size=270, eval_fraction=0.0)
  ds = data.get_dataset(config, seed=0)
  eos = ds.tokenizer.eos_id
  stream = np.concatenate([ds.batch(s)["inputs"].ravel()
                           for s in range(ds.num_batches)])
  assert eos == 0 and (stream == eos).any()
  encoded = [ds.tokenizer.encode_batch([d])[0] for d in docs]
  assert ds.num_tokens == sum(len(e) + 1 for e in encoded)


# ------------------------------------------------------------- tfds source --


def test_tfds_source_with_mock_data():
  config = make_config(source="tfds:lm1b", eval_source="tfds:lm1b",
                       max_records=150)
  with tfds.testing.mock_data(num_examples=200,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    train = data.get_dataset(config, split="train", seed=0)
    ev = data.get_dataset(config, split="eval", seed=0)
  assert "tensorflow" not in sys.modules
  assert train.vocab_size == 257
  batch = train.batch(0)
  assert batch["inputs"].shape == (4, 16) and batch["inputs"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])
  assert (np.concatenate([train.batch(s)["inputs"].ravel()
                          for s in range(train.num_batches)]) == EOS).any()
  assert ev.num_batches >= 1


def test_tfds_bytes_records_and_split_names():
  seen_splits = []

  def fake_source(self, split, **kwargs):
    del self, kwargs
    seen_splits.append(split)
    return [{"text": f"record {i} of {split} ü".encode("utf-8")}
            for i in range(30)]

  config = make_config(source="tfds:lm1b", eval_source="tfds:lm1b",
                       tfds_split="train", tfds_eval_split="validation")
  with tfds.testing.mock_data(as_data_source_fn=fake_source):
    train = data.get_dataset(config, split="train")
    ev = data.get_dataset(config, split="eval")
  assert seen_splits == ["train", "validation"]
  docs = [f"record {i} of train ü" for i in range(30)]
  assert train.num_tokens == len(byte_stream(docs))
  batch = ev.batch(0)  # Eval rows are consecutive chunks.
  chunks = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
  text = train.tokenizer.decode(chunks.ravel())
  assert text.startswith("record 0 of validation ü")


def test_tfds_validation_falls_back_to_test(monkeypatch):

  class FakeInfo:
    splits = {"train": None, "test": None}

  class FakeBuilder:
    info = FakeInfo()

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: FakeBuilder)
  assert tfds_source.resolve_split("x", "validation", None) == "test"
  assert tfds_source.resolve_split("x", "train", None) == "train"
  with pytest.raises(ValueError, match="has no split 'dev'"):
    tfds_source.resolve_split("x", "dev", None)


def test_tfds_missing_text_key():
  config = make_config(source="tfds:lm1b", tfds_text_key="body")
  with tfds.testing.mock_data(num_examples=5):
    with pytest.raises(ValueError, match=r"config.data.tfds_text_key='body'"):
      data.get_dataset(config)


# ------------------------------------------------------------------ errors --


def test_error_unknown_source_prefix():
  with pytest.raises(ValueError) as info:
    data.get_dataset(make_config(source="foo:x"))
  assert str(info.value) == (
      "config.data.source='foo:x' must start with synthetic:, text: or tfds:")


def test_error_unknown_synthetic_task():
  with pytest.raises(ValueError, match=r"source='synthetic:nope'.*unknown"):
    data.get_dataset(make_config(source="synthetic:nope"))


def test_error_glob_matches_nothing(tmp_path):
  pattern = str(tmp_path / "missing" / "*.txt")
  with pytest.raises(ValueError) as info:
    data.get_dataset(make_config(source="text:" + pattern))
  assert pattern in str(info.value) and "matches no files" in str(info.value)


def test_error_file_not_utf8(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"fine line\nbroken \xff\xfe line\n")
  with pytest.raises(ValueError) as info:
    data.get_dataset(make_config(source=f"text:{bad}"))
  message = str(info.value)
  assert str(bad) in message and "UTF-8" in message and "\n" not in message


def test_error_too_small_for_one_batch(tmp_path):
  glob = write_docs(tmp_path, ["x" * 50])  # 51 tokens = 3 chunks of 17.
  with pytest.raises(ValueError) as info:
    data.get_dataset(make_config(source="text:" + glob, eval_fraction=0.0))
  message = str(info.value)
  assert "too small for one batch" in message
  assert "51 packed tokens" in message and "3 chunks" in message
  assert "batch_size=4" in message and "\n" not in message


def test_error_eval_holdout_too_small(tmp_path):
  glob = write_docs(tmp_path, ["x" * 300])  # 17 chunks; 1 held out.
  config = make_config(source="text:" + glob, eval_fraction=0.05)
  assert data.get_dataset(config, split="train").num_examples == 16
  with pytest.raises(ValueError, match=r"1 .*eval split.*batch_size=4"):
    data.get_dataset(config, split="eval")


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("seq_len", -1), ("tokenizer", "sentencepiece"),
    ("eval_fraction", 1.5), ("max_records", -2), ("synthetic_vocab_size", 4),
])
def test_error_bad_fields(field, value):
  with pytest.raises(ValueError, match=rf"^config\.data\.{field}="):
    data.get_dataset(make_config(**{field: value}))


def test_error_bad_split_and_seed():
  with pytest.raises(ValueError, match="split='test'"):
    data.get_dataset(make_config(), split="test")
  with pytest.raises(ValueError, match="seed=-1"):
    data.get_dataset(make_config(), seed=-1)


# ---------------------------------------------------------------- WikiText --


def test_wikitext_valid_byte_count(wikitext_dir):
  path = pathlib.Path(wikitext_dir) / "valid.txt"
  raw = path.read_bytes()
  config = make_config(source=f"text:{path}", batch_size=8, seq_len=128,
                       eval_fraction=0.05)
  train = data.get_dataset(config, split="train", seed=0)
  ev = data.get_dataset(config, split="eval", seed=0)
  width = config.seq_len + 1
  n_tokens = len(raw) + 1  # One document (the file) + its separator.
  n_chunks = n_tokens // width
  n_eval = math.floor(0.05 * n_chunks + 0.5)
  assert train.num_tokens == n_tokens
  assert train.num_examples + ev.num_examples == n_chunks
  assert ev.num_examples == n_eval
  assert train.num_batches == (n_chunks - n_eval) // 8
  # The eval split is the file's bytes from chunk n_chunks - n_eval on.
  start = (n_chunks - n_eval) * width
  row0 = ev.batch(0)["inputs"][0]
  assert bytes(row0.astype(np.uint8)) == raw[start:start + config.seq_len]
  # A train example is some chunk of the file, targets shifted by one.
  batch = train.batch(0)
  row = int(train.rows(0)[0])
  chunk = raw[row * width:(row + 1) * width]
  assert bytes(batch["inputs"][0].astype(np.uint8)) == chunk[:-1]
  assert bytes(batch["targets"][0].astype(np.uint8)) == chunk[1:]
