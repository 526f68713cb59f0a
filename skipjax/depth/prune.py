"""Static depth pruning into a new, smaller checkpoint (issue 13, item 2).

    python -m skipjax.depth.prune --from=DIR --measure=bi|angular|sleb|ppl|taylor|ratio --drop=K \
        [--granularity=layer|block] --calibration=text:GLOB|synthetic --out=DIR

Scores the source's layers (or attention / FFN blocks) with a measure of
`skipjax.depth.importance`, removes K of them and writes a `skipjax.convert` export
(`config.json` + `params/`, atomically) that every entry point reloads (`--config.init_from=OUT`,
the profiler, decode), with `prune.json` (measure, scores, removed units, plan, source) and the
source's tokenizer as `tokenizer.json` when it has one.

* Layer granularity: the removed layers' params are gone, the kept ones renumbered `block_0 …`,
  `num_layers` is smaller and the plan is the identity.
* Block granularity: a removed attention / FFN block's params are gone and the saved config
  carries a plan that keeps that branch off (e.g. '0:2,2a,3:6'); a layer with both blocks removed
  is removed as a layer. The kept params are exactly those a model initialised under that plan has.
* Choice: one-shot measures drop the K lowest scores (higher = more important); `angular` drops
  the K consecutive layers ℓ* … ℓ*+K−1 (Gromov et al.), `sleb` the first K of its greedy order.
  `--protect_first/--protect_last` keep the first/last layers out of the candidates (Shortened
  LLaMA's "+" heuristic: 4 and 2 for LLaMA-7B).
* FlipReLU's sign alternates with the layer index, which renumbering would change: pruning
  that changes the parity of a kept layer is refused with one line (parity-preserving choices,
  e.g. dropping two adjacent layers, go through).
"""
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skipjax import models
from skipjax.depth import importance
from skipjax.depth import plan as plan_lib
from skipjax.models import layout

CALIBRATION_HELP = "text:GLOB (the model's own tokenizer) or synthetic (the synthetic task of skipjax-trained models)"


@dataclasses.dataclass
class Source:
  cfg: Any
  params: Any
  kind: str                       # export | workdir | hf | gguf
  path: str
  tokenizer: Any = None           # a workdir's own tokenizer (None: read the model folder's)
  synthetic_task: Optional[str] = None
  synthetic_vocab: int = 0        # the workdir's synthetic vocabulary (0: the model's)


def load_source(path: str) -> Source:
  """(cfg, params) from a convert export, a training workdir, an HF folder or a .gguf file."""
  from skipjax.convert import export  # pylint: disable=import-outside-toplevel
  from skipjax.train import init_from  # pylint: disable=import-outside-toplevel
  try:
    kind = init_from.source_kind(path)
  except (ValueError, FileNotFoundError) as e:
    raise type(e)(str(e).replace("config.init_from", "--from")) from None
  if kind == "export":
    cfg, params = export.restore(path)
    return Source(cfg, params, kind, path)
  if kind == "workdir":
    from skipjax.decode import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
    restored = workdir_lib.restore(path)
    source = restored.config.data.get("source", "")
    task = source[len("synthetic:"):] if source.startswith("synthetic:") else None
    return Source(export.config_from_dict(restored.config.model.to_dict()), restored.params, kind, path,
                  restored.tokenizer, task, int(restored.config.data.get("synthetic_vocab_size", 0) or 0))
  from skipjax.convert import hf  # pylint: disable=import-outside-toplevel
  cfg, params = hf.load(path)
  return Source(cfg, nn.meta.unbox(params), kind, path)


def _tokenizer(source: Source, vocab_size: int, kind: str):
  from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
  if source.tokenizer is not None and kind == "auto":
    return source.tokenizer
  try:
    return inputs.tokenizer_for(source.path if source.kind != "workdir" else None, vocab_size, kind)
  except ValueError as e:
    raise ValueError(f"--calibration=text: {str(e).split(';')[0]}; pass --tokenizer=bytes for UTF-8 bytes modulo "
                     "the vocabulary") from None


def calibration(source: Source, spec: str, seq_len: int, num_sequences: int, batch_size: int,
                tokenizer: str = "auto", seed: int = 0) -> List[Dict[str, np.ndarray]]:
  """Calibration batches {'inputs', 'targets'} [B, T] (encoders: {'inputs', 'attention_mask'})."""
  if spec != "synthetic" and not spec.startswith("text:"):
    raise ValueError(f"--calibration={spec!r} is not {CALIBRATION_HELP}")
  cfg = importance.blocks_config(source.cfg)
  decoder = not isinstance(source.cfg, models.EncoderConfig)
  if seq_len > cfg.max_len:
    raise ValueError(f"--seq_len={seq_len} does not fit the model's {cfg.max_len} positions")
  if spec == "synthetic":
    if not decoder:
      raise ValueError("--calibration=synthetic needs a decoder LM; give text:GLOB for an encoder")
    from skipjax.data import synthetic  # pylint: disable=import-outside-toplevel
    task = source.synthetic_task or "mixed_difficulty"
    vocab = source.synthetic_vocab or cfg.vocab_size
    tokens, _ = synthetic.generate(task, vocab, seq_len + 1, seed, synthetic.EVAL_SPLIT_ID, np.arange(num_sequences))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  else:
    from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
    batch = inputs.text_batch(spec, _tokenizer(source, cfg.vocab_size, tokenizer), seq_len, num_sequences,
                              encoder=not decoder, seed=seed)
  n = len(batch["inputs"])
  return [{k: np.asarray(v[i:i + batch_size]) for k, v in batch.items()} for i in range(0, n, batch_size)]


# -- choosing ----------------------------------------------------------------------------------

def candidates(num_layers: int, granularity: str, protect_first: int = 0, protect_last: int = 0):
  keep = set(range(protect_first)) | set(range(num_layers - protect_last, num_layers))
  return [u for u in importance.units(num_layers, granularity)
          if (u if isinstance(u, int) else u[0]) not in keep]


def check_drop(num_layers: int, drop: int, granularity: str, pool: Sequence[importance.Unit]) -> None:
  most = min(len(pool), num_layers - 1 if granularity == "layer" else 2 * num_layers - 1)
  if not 1 <= drop <= most:
    raise ValueError(f"--drop={drop}: this {num_layers}-layer model can lose 1 … {most} {granularity}s "
                     "(at least one block must stay, protected layers excluded)")


def choose(scores: importance.Scores, drop: int, granularity: str,
           pool: Sequence[importance.Unit]) -> List[importance.Unit]:
  """The `drop` units the measure removes (see module doc)."""
  if scores.measure == "angular":
    if granularity != "layer":
      raise ValueError("--measure=angular removes n consecutive layers: use --granularity=layer")
    d = np.asarray(scores.raw["distances"])
    allowed = [s for s in range(len(d)) if all(i in pool for i in range(s, s + drop))]
    if not allowed:
      raise ValueError(f"--drop={drop}: no run of {drop} consecutive unprotected layers")
    start = min(allowed, key=lambda s: (d[s], s))
    return list(range(start, start + drop))
  if scores.measure == "sleb":
    return [u if isinstance(u, int) else (u[0], importance.BRANCHES.index(u[1])) for u in scores.raw["order"]][:drop]
  if granularity == "layer":
    value = {i: scores.layer[i] for i in pool}
  else:
    if scores.block is None:
      raise ValueError(f"--measure={scores.measure} has no per-block scores: use --granularity=layer")
    value = {u: scores.block[u] for u in pool}
  return sorted(pool, key=lambda u: (value[u], u))[:drop]


def score(measure: str, cfg, params, batches, drop: int, granularity: str, pool, taylor_form: str = "elementwise",
          jit: bool = True) -> importance.Scores:
  if measure == "sleb":
    return importance.sleb(cfg, params, batches, drop, granularity, candidates=pool, jit=jit)
  if measure == "ppl":
    return importance.ppl_drop_one(cfg, params, batches, granularity, jit=jit)
  if measure == "taylor":
    return importance.taylor(cfg, params, batches, taylor_form)
  return importance.measure(measure, cfg, params, batches, granularity, drop)


# -- the smaller model -------------------------------------------------------------------------

def _dummy_inputs(cfg):
  if isinstance(cfg, models.EncoderConfig) and cfg.model_type in ("vit", "dinov2"):
    return jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  return jnp.zeros((1, 4), jnp.int32)


def _check_fliprelu(cfg, kept: Sequence[int]) -> None:
  blocks = importance.blocks_config(cfg)
  if blocks.activation != "fliprelu":
    return
  moved = [(old, new) for new, old in enumerate(kept) if old % 2 != new % 2]
  if moved:
    raise ValueError(f"activation='fliprelu' alternates with the layer index: renumbering layer {moved[0][0]} to "
                     f"{moved[0][1]} would flip its sign; drop layers so that every kept layer keeps its parity")


def pruned_model(cfg, params, removed: Sequence[importance.Unit]) -> Tuple[Any, Dict[str, Any], plan_lib.Plan]:
  """(smaller cfg, its params, the plan of the source model it equals) without `removed`."""
  cfg = importance.measuring_config(cfg)
  num_layers = importance.blocks_config(cfg).num_layers
  source_plan = importance.removal_plan(num_layers, removed)
  kept = [e.slot for e in source_plan]
  _check_fliprelu(cfg, kept)
  plan = tuple(plan_lib.PlanEntry(new, e.attn, e.ffn) for new, e in enumerate(source_plan))
  plan_text = "" if all(e.attn and e.ffn for e in plan) else plan_lib.to_string(plan)
  new_cfg = importance._replace_blocks(cfg, num_layers=len(kept), plan=plan_text)  # pylint: disable=protected-access
  source = importance.loop_params(params)
  renamed = {k: v for k, v in source.items() if not k.startswith(layout.PREFIX)}
  renamed.update({layout.block_name(new): source[layout.block_name(old)] for new, old in enumerate(kept)})
  # Exactly the params a model initialised under the new plan has (off branches have none).
  abstract = jax.eval_shape(lambda: models.build(new_cfg).init(jax.random.key(0), _dummy_inputs(new_cfg)))
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  want = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
  have = traverse_util.flatten_dict(renamed)
  missing = sorted("/".join(k) for k in set(want) - set(have))
  if missing:
    raise ValueError(f"--from: parameter {missing[0]} of the pruned model is not in the source")
  new_params = traverse_util.unflatten_dict({k: have[k] for k in want})
  return new_cfg, new_params, source_plan


def _tokenizer_json(source: Source) -> Optional[Dict[str, Any]]:
  """The source's tokenizer as tokenizer.json content, when it has one."""
  if source.kind == "workdir":
    path = os.path.join(source.path, "tokenizer.json")
  else:
    from skipjax.profile import inputs  # pylint: disable=import-outside-toplevel
    try:
      tok = inputs.tokenizer_for(source.path, importance.blocks_config(source.cfg).vocab_size)
    except (ValueError, OSError):
      return None
    return json.loads(tok.tokenizer.to_str())
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return None


def prune(source_path: str, measure: str, drop: int, out: str, granularity: str = "layer",
          calibration_spec: str = "synthetic", seq_len: int = 64, num_sequences: int = 16, batch_size: int = 8,
          tokenizer: str = "auto", protect_first: int = 0, protect_last: int = 0,
          taylor_form: str = "elementwise", seed: int = 0, jit: bool = True) -> Dict[str, Any]:
  """Score, choose, write the smaller export to `out`; returns the prune.json content."""
  if measure not in importance.MEASURES:
    raise ValueError(f"--measure={measure!r} is not one of {importance.MEASURES}")
  if granularity not in importance.GRANULARITIES:
    raise ValueError(f"--granularity={granularity!r} is not one of {importance.GRANULARITIES}")
  if measure == "angular" and granularity != "layer":
    raise ValueError("--measure=angular removes n consecutive layers: use --granularity=layer")
  if calibration_spec != "synthetic" and not calibration_spec.startswith("text:"):
    raise ValueError(f"--calibration={calibration_spec!r} is not {CALIBRATION_HELP}")
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"--out={out} exists and is not empty")
  source = load_source(source_path)
  cfg = importance.measuring_config(source.cfg)
  num_layers = importance.blocks_config(cfg).num_layers
  pool = candidates(num_layers, granularity, protect_first, protect_last)
  check_drop(num_layers, drop, granularity, pool)
  batches = calibration(source, calibration_spec, seq_len, num_sequences, batch_size, tokenizer, seed)
  scores = score(measure, cfg, source.params, batches, drop, granularity, pool, taylor_form, jit)
  removed = choose(scores, drop, granularity, pool)
  new_cfg, new_params, source_plan = pruned_model(cfg, source.params, removed)
  if isinstance(source.cfg, models.TransformerConfig) and source.cfg.scan_layers and not new_cfg.plan:
    new_cfg, new_params = dataclasses.replace(new_cfg, scan_layers=True), layout.to_scan(new_params)
  record = {"measure": measure, "granularity": granularity, "drop": drop, "source": os.path.abspath(source_path),
            "source_kind": source.kind, "source_num_layers": num_layers,
            "num_layers": importance.blocks_config(new_cfg).num_layers,
            "removed": [importance._unit_key(u) for u in removed],  # pylint: disable=protected-access
            "source_plan": plan_lib.to_string(source_plan), "plan": importance.blocks_config(new_cfg).plan,
            "calibration": {"spec": calibration_spec, "seq_len": seq_len,
                            "num_sequences": int(sum(len(b["inputs"]) for b in batches)), "seed": seed},
            "protect_first": protect_first, "protect_last": protect_last, "scores": scores.to_json()}
  if not isinstance(cfg, models.EncoderConfig):
    record["calibration"]["nll_before"] = importance.calibration_nll(cfg, source.params, batches, jit=jit)
    record["calibration"]["nll_after"] = importance.calibration_nll(cfg, source.params, batches, source_plan, jit)
  extra = {"prune.json": record}
  tok = _tokenizer_json(source)
  if tok is not None:
    extra["tokenizer.json"] = tok
  from skipjax.convert import export  # pylint: disable=import-outside-toplevel
  export.save(out, new_cfg, jax.device_get(new_params), extra=extra)
  return record


# -- command line ------------------------------------------------------------------------------

def _define_flags():
  """Flags only when run as a program (importing the library defines none)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("from", None, "Source: skipjax.convert export, training workdir, HF folder or .gguf file.")
  flags.DEFINE_enum("measure", None, list(importance.MEASURES), "Importance measure.")
  flags.DEFINE_integer("drop", None, "Number of layers (or blocks) to remove.")
  flags.DEFINE_enum("granularity", "layer", list(importance.GRANULARITIES), "Remove layers or attention/FFN blocks.")
  flags.DEFINE_string("calibration", "synthetic", CALIBRATION_HELP)
  flags.DEFINE_string("out", None, "Output folder (must not exist or be empty).")
  flags.DEFINE_integer("seq_len", 64, "Calibration sequence length.")
  flags.DEFINE_integer("num_sequences", 16, "Calibration sequences.")
  flags.DEFINE_integer("batch_size", 8, "Sequences per forward.")
  flags.DEFINE_enum("tokenizer", "auto", ["auto", "bytes"], "auto: the model's own; bytes: UTF-8 modulo vocab.")
  flags.DEFINE_integer("protect_first", 0, "Never remove the first N layers (Taylor+ heuristic: 4).")
  flags.DEFINE_integer("protect_last", 0, "Never remove the last N layers (Taylor+ heuristic: 2).")
  flags.DEFINE_enum("taylor_form", "elementwise", ["elementwise", "sum"], "Taylor: Σ|w·g| or |Σ w·g|.")
  flags.DEFINE_integer("seed", 0, "Calibration seed (synthetic / random).")
  flags.mark_flags_as_required(["from", "measure", "drop", "out"])
  return flags.FLAGS


def main(argv, flag_values=None):
  from absl import app, logging  # pylint: disable=import-outside-toplevel
  from skipjax import cli  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_libraries()
  f = flag_values
  record = prune(f["from"].value, f.measure, f.drop, f.out, f.granularity, f.calibration, f.seq_len,
                 f.num_sequences, f.batch_size, f.tokenizer, f.protect_first, f.protect_last, f.taylor_form, f.seed)
  calib = record["calibration"]
  logging.info("removed %s (%s, %s) → %s: %d → %d layers, calibration NLL %s → %s", record["removed"],
               record["measure"], record["granularity"], f.out, record["source_num_layers"], record["num_layers"],
               calib.get("nll_before"), calib.get("nll_after"))
  print(json.dumps({k: record[k] for k in ("measure", "removed", "num_layers", "plan")}
                   | {"nll_before": calib.get("nll_before"), "nll_after": calib.get("nll_after")}))


if __name__ == "__main__":
  import functools  # pylint: disable=g-import-not-at-top
  from skipjax import cli  # pylint: disable=g-import-not-at-top
  cli.run(functools.partial(main, flag_values=_define_flags()))
