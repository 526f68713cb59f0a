"""Structured FF activation sparsity (SS = Dong et al. 2023, "Towards Structured Sparsity in
Transformers"): a small GPT-2-like LM and the SS ablation cells (Tables 1–3).

Presets (`--config=configs/sparsity.py:PRESET[,CELL]`):
  tiny      CPU-feasible GPT-2-like decoder (pre-LN, learned positions, tied embeddings, biases;
            6 layers as SS §2, d = 96, 4 heads, ReLU, F = 4 → d_ff = 384) on the embedded synthetic task.
  wikitext  the same model on WikiText-2 (train: valid.txt, held out: test.txt, byte tokens).
CELL (optional) is one SS ablation cell of `CELLS`, applied by `apply_cell`, e.g.
  python -m skipjax.train --config=configs/sparsity.py:tiny,lam5e-4_ex128 --workdir=/tmp/ss_cell

Scaling to the model width (SS: d = 768, F = 4 → F·D = 3072 neurons, B = 64, E ∈ {0, 128, 256}):
the block size keeps SS's number of blocks per layer, B = F·D/48 (`scaled_block_size`), and the
exempt neurons keep SS's fraction of the layer, E = E_SS/3072·F·D rounded to whole blocks
(`scaled_exempt`; at d = 96: B = 8, E ∈ {0, 16, 32}). λ keeps SS's values: Eq. 3 sums block norms
over the S tokens of a sequence, so its weight per token is λ·S (SS: S = 1024; here S = 128).
"""
import os

import ml_collections

from configs import lm

WIKITEXT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                         "wikitext-2"))

# SS's model: d = 768, F = 4, B = 64 (§3.2), exempt neurons E (Table 3).
SS_D_FF = 3072
SS_BLOCK_SIZE = 64
SS_EXEMPT = (0, 128, 256)
SS_LAMBDAS = (5e-4, 1e-3)
ACTIVATIONS = ("relu", "gelu", "fliprelu", "splitrelu")


def _lam_cell(lam: float, exempt: int) -> str:
  return f"lam{lam:g}_ex{exempt}"


# Cell → overrides. `relu` is SS's baseline (ReLU, F = 4, untied, λ = 0): Table 1's ReLU row,
# Table 2's first row and Table 3's λ = 0 row are the same model. `ex` is SS's exempt count E_SS
# (scaled to the model's width by `apply_cell`).
CELLS = {
    **{act: dict(activation=act) for act in ACTIVATIONS},
    "tied_f4": dict(activation="relu", tied=True, expansion=4),
    "tied_f24": dict(activation="relu", tied=True, expansion=24),
    **{_lam_cell(lam, ex): dict(activation="relu", lam=lam, ex=ex) for lam in SS_LAMBDAS for ex in SS_EXEMPT},
}
TABLES = {
    1: ACTIVATIONS,
    2: ("relu", "tied_f4", "tied_f24"),
    3: ("relu",) + tuple(_lam_cell(lam, ex) for lam in SS_LAMBDAS for ex in SS_EXEMPT),
}


def lam_cell(lam: float, exempt: int) -> str:
  """The CELLS name of Table 3's row (λ, E_SS)."""
  return _lam_cell(lam, exempt)


def scaled_block_size(d_ff: int) -> int:
  """SS's 48 blocks per layer (B = 64 of 3072 neurons) at this width: B = d_ff/48."""
  blocks = SS_D_FF // SS_BLOCK_SIZE
  if d_ff % blocks:
    raise ValueError(f"config.model.d_ff={d_ff}: SS's B = 64 of 3072 neurons scales to d_ff/{blocks}, which needs "
                     f"d_ff divisible by {blocks} (d_model divisible by 12 at F = 4)")
  return d_ff // blocks


def scaled_exempt(exempt_ss: int, d_ff: int, block_size: int) -> int:
  """SS's E_SS of 3072 neurons at this width: E = E_SS/3072·d_ff, rounded to whole blocks of B."""
  return int(round(exempt_ss / SS_D_FF * d_ff / block_size)) * block_size


def set_width(config: ml_collections.ConfigDict, d_model: int, num_heads: int = 0, block_size: int = 0) -> None:
  """d_model (F = 4: d_ff = 4·d_model) and B (0: `scaled_block_size`); heads keep the preset's
  head count unless `num_heads` is given."""
  m = config.model
  m.d_model = d_model
  if num_heads:
    m.num_heads = num_heads
  m.d_ff = 4 * d_model
  m.ffn.expansion = 4
  m.ffn.block_size = block_size or scaled_block_size(m.d_ff)


def apply_cell(config: ml_collections.ConfigDict, cell: str) -> None:
  """The SS ablation `cell` on a preset (in place): activation, tying + F, λ and scaled E."""
  if cell not in CELLS:
    raise ValueError(f"unknown SS cell {cell!r} for configs/sparsity.py; known: {', '.join(CELLS)}")
  o = CELLS[cell]
  m = config.model
  m.activation = o["activation"]
  m.ffn.tied = o.get("tied", False)
  m.ffn.expansion = o.get("expansion", 4)
  m.ffn.block_sparsity_weight = o.get("lam", 0.0)
  m.ffn.exempt = scaled_exempt(o.get("ex", 0), m.ffn.expansion * m.d_model, m.ffn.block_size)


def get_config(arg=None) -> ml_collections.ConfigDict:
  preset, _, cell = (arg or "tiny").partition(",")
  config = lm.get_config("tiny")
  # SS §2: a 6-layer GPT-2 (pre-LN, learned positions, tied embedding/head, biases), ReLU, F = 4,
  # cosine schedule warming up for the first 5 % of steps. No dropout at this short CPU schedule.
  config.model.update(num_layers=6, num_heads=4, activation="relu", dropout_rate=0.0, max_len=256)
  set_width(config, 96)
  config.data.update(batch_size=16, seq_len=128)
  config.train.update(num_steps=600, learning_rate=3e-3, warmup_steps=30, eval_every_steps=150,
                      checkpoint_every_steps=300, log_every_steps=50, eval_batches=4)
  if preset == "wikitext":
    config.data.update(source=f"text:{WIKITEXT}/valid.txt", eval_source=f"text:{WIKITEXT}/test.txt", tokenizer="byte")
  elif preset != "tiny":
    raise ValueError(f"unknown preset {preset!r} for configs/sparsity.py; known: tiny, wikitext")
  if cell:
    apply_cell(config, cell)
  return config
