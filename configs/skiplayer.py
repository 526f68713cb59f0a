"""SkipLayer LMs (LtS §2–3) and their baselines, as config options of the one decoder.

Presets (`--config=configs/skiplayer.py:<preset>`):
  tiny                     CPU demo: 8 layers, P = 0.5, ST-Gumbel routers, synthetic task, untied
                           head, 200-step dense-to-sparse density warm-up (all tiny_* presets)
  tiny_random              same shape, random gating (LtS "Rand" baseline)
  tiny_dense               Standard dense model of the same width with L·P layers
  tiny_wideffn             WideFFN: 2× FFN, routing only the FFN block
  tiny_highway             HighwayNet baseline on the FFN block, y = T·R(x) + (1 − T)·x (no skipping)
  lts_L<L>_P<P>            LtS Table 1 family: d = 1536, FFN 8×, head dim 64, L ∈ {6,12,24,48,96},
                           P ∈ {1, .5, .25, .125} (e.g. lts_L24_P0.25); P = 1 is the dense model.
                           `grouped` dispatch, Gsize 1024 within routing groups of 32 rows
                           (LtS §2.2 pools a data shard's tokens; 8 groups per batch of 256, so
                           up to 8 data shards): compute fraction ≈ P + 1/32 (0.156 at P = .125)
  cpu_L<L>_P<P>            the same shapes scaled to CPU (d = 128, FFN 8×, head dim 32)
"""
import re

import ml_collections

from configs import lm

LTS_LAYERS = (6, 12, 24, 48, 96)
LTS_DENSITIES = (1.0, 0.5, 0.25, 0.125)
# LtS §2.2: Gsize ∝ P·B·T over the tokens of a data shard. One group per row (the old setting,
# gsize = seq_len = 1024) made every row a single chunk that always ran: compute fraction 1.
LTS_GROUP_ROWS = 32


def _skip(config, **kw):
  config.model.skip.update(kw)
  return config


def _lts_shape(config, num_layers: int, density: float, d_model: int, head_dim: int):
  """LtS §3: d_model 1536, FFN 8×d, head dim 64, P, L (Table 1)."""
  config.model.update(d_model=d_model, d_ff=8 * d_model, num_heads=d_model // head_dim, num_layers=num_layers)
  if density < 1.0:
    _skip(config, router="gumbel", target_density=density)
  return config


def get_config(arg=None) -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  config = lm.get_config("tiny")
  config.model.update(num_layers=8)
  config.train.update(num_steps=600, eval_every_steps=100)
  _skip(config, router="gumbel", dispatch="masked", target_density=0.5, granularity="layer",
        aux_weight=0.1, temperature=1.0, gsize=32, capacity_factor=1.25)
  match = re.fullmatch(r"(lts|cpu)_L(\d+)_P([0-9.]+)", preset)
  if preset.startswith("tiny"):
    # Untied head: count continuations and noise then need no layer, so the depth a router can
    # save is the easy and noise tokens'. Dense-to-sparse warm-up (routing.scheduled_density):
    # without it, at P = 0.125 the routers drop the hard tokens before any layer has learned them.
    config.model.update(tie_embeddings=False)
    _skip(config, density_warmup_steps=200)
  if preset == "tiny":
    pass
  elif preset == "tiny_random":
    _skip(config, router="random")
  elif preset == "tiny_dense":
    config.model.update(num_layers=4)
    _skip(config, router="none", target_density=1.0)
  elif preset == "tiny_wideffn":
    config.model.update(num_layers=4, d_ff=2 * config.model.d_ff)
    _skip(config, granularity="ffn")
  elif preset == "tiny_highway":
    config.model.update(num_layers=4)
    # Highway y = T·R(x) + (1 − T)·x; the bias init logit(P) starts T at σ(−2) ≈ 0.12, biased
    # towards carrying x (Srivastava et al. 2015 start the transform-gate bias negative, −1 … −3).
    _skip(config, router="highway", granularity="ffn", target_density=0.12)
  elif match:
    family, num_layers, density = match.group(1), int(match.group(2)), float(match.group(3))
    if num_layers not in LTS_LAYERS or density not in LTS_DENSITIES:
      raise ValueError(f"preset {preset!r}: L must be one of {LTS_LAYERS} and P one of {LTS_DENSITIES}")
    _skip(config, router="none", target_density=1.0)
    if family == "lts":
      _lts_shape(config, num_layers, density, 1536, 64)
      config.model.update(max_len=1024, dtype="bfloat16", scan_layers=num_layers >= 24, remat=num_layers >= 24)
      config.data.update(seq_len=1024, batch_size=256, source="tfds:lm1b", tokenizer="bpe", bpe_vocab_size=32768)
      config.train.update(optimizer="adafactor", learning_rate=0.1, warmup_steps=10_000, num_steps=100_000,
                          checkpoint_every_steps=2000, eval_every_steps=2000, log_every_steps=100)
      _skip(config, gsize=1024, group_size=LTS_GROUP_ROWS * 1024, dispatch="grouped" if density < 1.0 else "masked")
    else:
      _lts_shape(config, num_layers, density, 128, 32)
  else:
    raise ValueError(f"unknown preset {preset!r} for configs/skiplayer.py; see its docstring")
  return config
