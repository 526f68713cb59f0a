"""Every config error is caught before compiling, with a one-line message naming the field."""
import pytest

from configs import lm
from skipjax import validation


def _bad(mutate, match, num_devices=8):
  config = lm.get_config("tiny")
  with config.unlocked():
    mutate(config)
  with pytest.raises(ValueError, match=match) as err:
    validation.validate(config, num_devices)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.model.update(num_heads=5, d_model=64),
     r"config.model.num_heads=5 does not divide d_model=64"),
    (lambda c: c.model.update(activation="swishh"), r"config.model.activation='swishh' is not one of"),
    (lambda c: c.model.update(norm="sandwich"), r"config.model.norm='sandwich'"),
    (lambda c: c.model.update(dtype="float8"), r"config.model.dtype='float8'"),
    (lambda c: c.model.update(num_layers=0), r"config.model.num_layers=0 must be >= 1"),
    (lambda c: c.model.skip.update(router="gumble"), r"config.model.skip.router='gumble'"),
    (lambda c: c.model.skip.update(dispatch="dense"), r"config.model.skip.dispatch='dense'"),
    (lambda c: c.model.skip.update(target_density=0.0), r"config.model.skip.target_density=0.0"),
    (lambda c: c.data.update(source="hf:wikitext"), r"config.data.source='hf:wikitext' must start with"),
    (lambda c: c.data.update(seq_len=1024), r"config.data.seq_len=1024 exceeds config.model.max_len=256"),
    (lambda c: c.data.update(tokenizer="sentencepiece"), r"config.data.tokenizer='sentencepiece'"),
    (lambda c: c.train.update(optimizer="sgd"), r"config.train.optimizer='sgd'"),
    (lambda c: c.train.update(num_steps=0), r"config.train.num_steps=0 must be >= 1"),
    (lambda c: c.mesh.update(shape=(3, 2)), r"config.mesh.shape=\(3, 2\) does not fit the 8 available devices"),
    (lambda c: c.mesh.update(shape=(-1, 3)), r"config.mesh.shape=\(-1, 3\) does not fit the 8 available devices"),
    (lambda c: c.data.update(batch_size=12), r"config.data.batch_size=12 is not divisible by the mesh data axis \(8\)"),
    (lambda c: (c.mesh.update(shape=(4, 2)), c.model.update(num_heads=3, d_model=96)),
     r"config.model.num_heads=3 is not divisible by the mesh model axis \(2\)"),
    (lambda c: (c.mesh.update(shape=(4, 2)), c.model.update(vocab_size=257)),
     r"config.model.vocab_size=257 is not divisible by the mesh model axis \(2\)"),
    (lambda c: c.model.update(d_model=0), r"config.model.d_model=0 must be >= 1"),
    (lambda c: c.train.update(grad_clip=-1.0), r"config.train.grad_clip=-1.0 must be in \[0.0, inf\)"),
    (lambda c: c.train.update(learning_rate=float("nan")), r"config.train.learning_rate=nan must be a finite number"),
    (lambda c: c.train.update(learning_rate=float("inf")), r"config.train.learning_rate=inf must be a finite number"),
    (lambda c: c.train.update(learning_rate=1e6), r"config.train.learning_rate=1000000.0 must be in \(0.0, 10.0\]"),
    (lambda c: c.train.update(learning_rate=1e39), r"config.train.learning_rate=1e\+39 must be in \(0.0, 10.0\]"),
    (lambda c: c.train.update(learning_rate=0.0), r"config.train.learning_rate=0.0 must be in \(0.0, 10.0\]"),
    (lambda c: c.train.update(b1=1.0), r"config.train.b1=1.0 must be in \[0.0, 1.0\)"),
    (lambda c: c.train.update(b2=-0.1), r"config.train.b2=-0.1 must be in \[0.0, 1.0\)"),
    (lambda c: c.train.update(min_lr_ratio=2.0), r"config.train.min_lr_ratio=2.0 must be in \[0.0, 1.0\]"),
    (lambda c: c.train.update(weight_decay=-0.1), r"config.train.weight_decay=-0.1 must be in \[0.0, inf\)"),
    (lambda c: c.train.update(adafactor_decay=1.0), r"config.train.adafactor_decay=1.0 must be in \(0.0, 1.0\)"),
    (lambda c: c.train.update(eval_batches=0), r"config.train.eval_batches=0 must be >= 1"),
    (lambda c: c.train.update(warmup_steps=-1), r"config.train.warmup_steps=-1 must be >= 0"),
    (lambda c: c.train.update(trainable="(router"), r"config.train.trainable='\(router' is not a valid regex"),
    (lambda c: c.model.skip.update(aux_weight=-0.1), r"config.model.skip.aux_weight=-0.1 must be in \[0.0, inf\)"),
])
def test_config_errors_name_the_field(mutate, match):
  _bad(mutate, match)


def test_presets_are_valid():
  for preset in ("tiny", "small", "base", "layerdrop", "early_exit"):
    config = lm.get_config(preset)
    with config.unlocked():
      config.model.vocab_size = 256
    validation.validate(config, 8 if preset in ("small", "base") else 1)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    lm.get_config("huge")
