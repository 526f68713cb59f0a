"""Decoder-only LM on the embedded synthetic task (or any `config.data.source`).

Presets: `--config=configs/lm.py:tiny` (CPU, ~2 min), `:small` (one accelerator), `:base`,
`:layerdrop` (tiny with LayerDrop p_max=0.2 on LayerSkip's exponential schedule), `:early_exit` (tiny
trained with LayerSkip's early-exit loss, rotational curriculum, LayerDrop p_max=0.2 linear).
Every field can be overridden: `--config.model.num_layers=8 --config.data.source=tfds:lm1b`.
"""
import ml_collections

from skipjax import data


def model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      model_type="decoder",
      vocab_size=0,            # 0: the data's vocabulary, rounded up to a multiple of 64
      d_model=128, num_heads=4, head_dim=0, num_layers=4, d_ff=512,
      activation="gelu", max_len=256, position="learned", position_offset=0,
      norm="pre", final_norm=True, tie_embeddings=True, use_bias=True,
      layer_norm_eps=1e-5, layer_norm_affine=True, embed_proj_dim=0, causal=True, oracle_threshold=0.0,
      dropout_rate=0.0, dtype="float32", scan_layers=False, remat=False,
      plan="",                 # execution plan, e.g. '0:3,5:8' (README "Execution plans"); '': identity
      skip=ml_collections.ConfigDict(dict(
          router="none", dispatch="masked", target_density=1.0, granularity="layer",
          gsize=64, group_size=0, capacity_factor=1.25, aux_weight=0.1, temperature=1.0, density_warmup_steps=0,
          # Mixture-of-Depths (router='mod', README "Mixture-of-Depths"): route every k-th layer,
          # causal rule aux_loss | predictor and its BCE weight, deterministic eval causal | topk,
          # the factor of the routed output: linear r (MoD Eq. 1) | sigmoid σ(r) (ours).
          mod_every=1, mod_causal="aux_loss", mod_aux_weight=0.1, mod_eval="causal", mod_weight="linear",
          # Gate semantics (README "SkipLayer"): gate_form paper | residual (layer granularity),
          # router_bias_init warmup | target, router_input stream | norm (the block's pre-norm LN(x)).
          gate_form="paper", router_bias_init="warmup", router_input="stream")),
      # LayerDrop (README "LayerDrop"): rate p, schedule constant | linear | exponential, explicit
      # per-position `rates` ('0,0.1,...'), unit example | batch, at_inference (sample in eval too).
      layerdrop=ml_collections.ConfigDict(dict(
          rate=0.0, schedule="constant", rates="", unit="example", at_inference=False)),
      # Structured FF sparsity (Dong et al. 2023; README): expansion F (d_ff = F·d_model when > 0), FF
      # kernels tied across layers, block-sparsity regulariser λ over blocks of B neurons, first E exempt.
      ffn=ml_collections.ConfigDict(dict(
          expansion=0, tied=False, block_sparsity_weight=0.0, block_size=64, exempt=0)),
  ))


def data_config() -> ml_collections.ConfigDict:
  return data.default_config()  # source, batch_size, seq_len, tokenizer, ... (skipjax/data)


def train_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      num_steps=400,
      optimizer="adamw",        # adamw (warmup-cosine) | adafactor (LtS §3: constant then rsqrt)
      learning_rate=3e-3, warmup_steps=40, weight_decay=0.01, b1=0.9, b2=0.95,
      grad_clip=1.0, min_lr_ratio=0.1,
      adafactor_decay=0.99,     # LtS §3: beta2 = 0.99, beta1 = 0
      log_every_steps=20, eval_every_steps=100, eval_batches=4,
      checkpoint_every_steps=100, keep_checkpoints=2,
      progress_bar=True,
      trainable="",             # regex over '/'-joined param paths (e.g. '.*router.*'); '' = all trainable
      router_lr_multiplier=1.0,  # router params ('router' in their path) learn at this × learning_rate
      # Early-exit training (README "Early-exit training"; LayerSkip §4.2): loss Σ_l ẽ(t,l)·CE_l through
      # the shared head. weights layerskip | uniform | last | '0.1,0.2,...'; curriculum none | rotational
      # (rotation R) | gradual; every: an exit loss after every k-th position (the last always).
      early_exit=ml_collections.ConfigDict(dict(
          enabled=False, weights="layerskip", e_scale=1.0, curriculum="none", rotation=2, every=1)),
  ))


def get_config(arg=None) -> ml_collections.ConfigDict:
  preset = arg or "tiny"
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = ""  # convert export / training workdir / HF folder / .gguf: new run from its weights
  config.model = model_config()
  config.data = data_config()
  config.train = train_config()
  config.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "model")))
  if preset == "tiny":
    pass
  elif preset == "layerdrop":
    config.model.layerdrop.update(rate=0.2, schedule="exponential")
  elif preset == "early_exit":
    config.model.layerdrop.update(rate=0.2, schedule="linear")
    config.train.early_exit.update(enabled=True, weights="layerskip", e_scale=1.0, curriculum="rotational",
                                   rotation=2)
  elif preset == "small":
    config.model.update(d_model=512, num_heads=8, num_layers=8, d_ff=2048, max_len=1024, dtype="bfloat16")
    config.data.update(batch_size=64, seq_len=512)
    config.train.update(num_steps=20_000, learning_rate=1e-3, warmup_steps=1000,
                        checkpoint_every_steps=1000, eval_every_steps=1000, log_every_steps=100)
  elif preset == "base":
    config.model.update(d_model=1536, num_heads=24, num_layers=12, d_ff=12288, max_len=1024,
                        dtype="bfloat16", scan_layers=True, remat=True)
    config.data.update(batch_size=256, seq_len=1024, source="tfds:lm1b", tokenizer="bpe", bpe_vocab_size=32768)
    config.train.update(num_steps=100_000, optimizer="adafactor", learning_rate=0.1, warmup_steps=10_000,
                        checkpoint_every_steps=2000, eval_every_steps=2000, log_every_steps=100)
  else:
    raise ValueError(f"unknown preset {preset!r} for configs/lm.py; known: tiny, small, base, layerdrop, "
                     "early_exit")
  return config
