"""Residual-ratio profiling (RR) of converted HF checkpoints: `python -m skipjax.profile`.

Presets:
  tiny     offline smoke run: a random 2-layer OPT written to `<workdir>/tiny_opt` (HF layout)
           when `config.model` is '' or 'tiny', random tokens, every oracle; a few seconds on CPU.
  default  real checkpoints: `--config.model=DIR_OR_HUB_ID[,DIR2,...] --config.data=text:GLOB`
           (or `images:FOLDER` / `images:builtin` for ViT), 32 packed sequences of 256 tokens.
Every field can be overridden: `--config.thresholds='(0.02,0.05,0.1)' --config.sensitivity=False`.
"""
import os

import ml_collections

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2",
                        "valid.txt")


def get_config(arg=None) -> ml_collections.ConfigDict:
  preset = arg or "default"
  c = ml_collections.ConfigDict()
  c.model = ""                 # HF folder or hub id; several comma-separated (by-size figure)
  c.data = f"text:{os.path.normpath(WIKITEXT)}"  # text:<glob> | file | random | images:<dir|builtin>
  c.seq_len = 256              # RR §4: packed, no padding
  c.num_sequences = 32         # sequences (images) profiled per model
  c.batch_size = 8             # sequences per profiler forward
  c.max_records = 0            # cap on text lines read (0 = all)
  c.tokenizer = "auto"         # auto: the model folder's tokenizer (error if none) | bytes: UTF-8 bytes mod vocab
  c.post_ln_skip = "ln"        # skipped post-LN block (BERT): ln → y = LN(x) (RR §3: only the skip
                               # connection enters the addition, the LN after it stays) | identity → y = x
  c.dtype = "float32"
  c.exclude_first = True       # drop each sequence's first token from summaries (RR §4.2 outliers)
  c.threshold = 0.05           # RR §4.3: 5 %, for the routing trace / breakdown / imitation
  c.thresholds = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)  # dynamic depth and applied-oracle curve
  c.applied = True             # applied-mode oracle curve (RR §4.4, future work)
  c.sensitivity = True         # token-level layer-sensitivity oracle (2L extra forwards)
  c.imitation = True           # learned oracle imitation (linear routers)
  c.imitation_steps = 300
  c.trace_sequences = 4        # sequences shown in the routing-trace figure
  c.violin_log = False         # ratio violins on a log axis (density of log10 r)
  c.oracle_sequences = 8       # sequences used by the applied / sensitivity / imitation oracles
  c.seed = 0
  c.tiny = ml_collections.ConfigDict(dict(num_layers=2, d_model=32, num_heads=4, ffn_dim=64, vocab_size=64))
  # `--mode=sparsity` (skipjax/profile/sparsity.py): FF activation sparsity (SS) and CATS thresholds.
  c.sparsity = ml_collections.ConfigDict(dict(
      block_size=64,      # SS §3.2: B contiguous neurons per block
      exempt=0,           # SS §3.2: the first E neurons form one always-active block
      cats=(),            # CATS target fractions of zeroed activations, e.g. (0.5, 0.7, 0.9); () = none
      site="hidden",      # hidden: a entering FF2 (gated: act(W_g x) ⊙ W_i x) | gate: act(W_g x) (CATS's site)
      calib_tokens=1024,  # random profiled tokens whose |a| set the per-layer CATS thresholds
      map_tokens=8,       # random tokens shown in the block-activation maps (SS Fig. 4)
      figure_layers=6))   # layers shown in the frequency / block-map figures (evenly spaced)
  if preset == "tiny":
    c.update(model="tiny", data="random", seq_len=32, num_sequences=8, batch_size=8, oracle_sequences=8,
             imitation_steps=150, thresholds=(0.1, 0.2, 0.3, 0.5, 0.8))
    c.threshold = 0.3
    c.sparsity.update(block_size=8, cats=(0.5,))
  elif preset != "default":
    raise ValueError(f"unknown preset {preset!r} for configs/profile.py; known: tiny, default")
  return c
