"""Execution plans (skipjax/depth/plan.py): the stack walks a static plan of (slot, branches).

References are independent of the plan machinery: a smaller model holding only the kept
layers' params, the full model with those branches masked by a zero `gate_override`, a full
identity model whose blocks hold repeated copies of the shared params (gradients: the explicit
sum over the copies), HF PyTorch with its layer list edited, and the full forward for decoding.
"""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _helpers
from skipjax import decode, models, validation
from skipjax.convert import export
from skipjax.depth import plan as P
from skipjax.depth.plan import PlanEntry

BASE = dict(vocab_size=37, d_model=16, num_heads=2, num_layers=4, d_ff=24, max_len=12)


def _cfg(**kw):
  return models.TransformerConfig(**{**BASE, **kw})


def _tokens(batch=2, length=10, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, BASE["vocab_size"])


def _init(cfg, tokens=None):
  model = models.build(cfg)
  tokens = _tokens() if tokens is None else tokens
  return model, nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])


def _apply(cfg, params, tokens):
  """Logits, jitted (tracing op by op is slower than compiling these tiny models)."""
  model = models.build(cfg)
  return jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)


# -- the plan value and its string form ------------------------------------------------------

def test_constructors_give_the_published_policies():
  slots = lambda plan: [e.slot for e in plan]
  assert P.identity(3) == (PlanEntry(0), PlanEntry(1), PlanEntry(2))
  assert slots(P.drop(6, [3, 4])) == [0, 1, 2, 5]
  assert slots(P.keep(6, [4, 1])) == [1, 4]
  assert slots(P.skip_range(8, 2, 5)) == [0, 1, 5, 6, 7]
  assert slots(P.every_k(7, 3, offset=1)) == [0, 2, 3, 5, 6]
  assert slots(P.repeat(P.identity(4), [1, 2], times=3)) == [0, 1, 1, 1, 2, 2, 2, 3]
  assert slots(P.reorder(P.identity(5), [0, 3, 2, 1, 4])) == [0, 3, 2, 1, 4]
  assert slots(P.share(P.identity(5), [1, 2, 3])) == [0, 1, 1, 1, 4]
  pruned = P.drop_branches(P.identity(3), attn=[1], ffn=[1, 2])
  assert [e.branches for e in pruned] == [(True, True), (False, False), (True, False)]
  assert P.occurrences(P.from_slots([0, 1, 1, 0, 1])) == (0, 0, 1, 1, 2)
  with pytest.raises(ValueError, match="config.model.plan"):
    P.drop(3, [0, 1, 2])  # nothing left (the empty plan would mean the identity)
  with pytest.raises(ValueError, match="config.model.plan"):
    P.drop(3, [3])


@pytest.mark.parametrize("plan", [
    P.identity(8), P.drop(8, [3, 4, 5]), P.repeat(P.identity(6), [2, 3]),
    P.drop_branches(P.identity(8), attn=[3, 4], ffn=[6]), P.from_slots([5, 4, 3, 0, 0, 1]),
    (PlanEntry(2, False, False), PlanEntry(0, True, False), PlanEntry(1, False, True))])
def test_string_form_round_trips(plan):
  text = P.to_string(plan)
  assert P.parse(text, 8) == plan
  assert "," not in text or all(part for part in text.split(","))


def test_string_form_examples_and_errors():
  assert P.parse("0,1,2,2,3") == P.from_slots([0, 1, 2, 2, 3])
  assert P.parse("0:3,3a,4f,5-") == P.identity(3) + (PlanEntry(3, True, False), PlanEntry(4, False, True),
                                                     PlanEntry(5, False, False))
  assert P.parse("", 3) == P.identity(3)
  assert P.to_string(P.drop(8, [3, 4])) == "0:3,5:8"
  for bad in ("0,x", "1:1", "0;1", "2b", "0,,1", "0,9"):
    with pytest.raises(ValueError, match=r"^config\.model\.plan") as err:
      P.parse(bad, 8)
    assert "\n" not in str(err.value)


def test_config_field_is_hashable_and_round_trips_through_config_json(tmp_path):
  cfg = _cfg(plan=P.repeat(P.drop_branches(P.identity(4), ffn=[3]), [1]))
  assert cfg.plan == "0,1,1,2,3a" and isinstance(hash(cfg), int)
  assert cfg == _cfg(plan="0,1,1,2,3a")
  back = export.config_from_dict(json.loads(json.dumps(export.config_to_dict(cfg))))
  assert back == cfg and back.execution_plan == cfg.execution_plan
  enc = models.EncoderConfig(transformer=models.TransformerConfig(**BASE, causal=False, norm="post",
                                                                  final_norm=False, plan="0,2,3"))
  assert models.EncoderConfig.from_dict(json.loads(json.dumps(enc.to_dict()))) == enc
  with pytest.raises(ValueError, match=r"^config\.model\.plan: position 1 runs slot 4"):
    _cfg(plan="0,4")
  with pytest.raises(ValueError, match=r"^config\.model\.plan='0,1a' needs scan_layers=False: position 1 runs only"):
    _cfg(plan="0,1a", scan_layers=True)
  assert _cfg(plan="0,1", scan_layers=True).plan == "0,1"  # whole-layer plans are served by the scan


def test_cli_config_validation_names_the_plan():
  from configs import lm
  config = lm.get_config("tiny")
  config.model.plan = "0:2,3a"
  validation.validate_model(config.model)
  config.model.plan = "0:2,7"
  with pytest.raises(ValueError, match=r"^config\.model\.plan"):
    validation.validate_model(config.model)


# -- models walk the plan --------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True])
def test_identity_plan_is_the_model(scan):
  tokens = _tokens()
  _, params = _init(_cfg(scan_layers=scan))
  plain = _apply(_cfg(scan_layers=scan), params, tokens)
  explicit = _apply(_cfg(scan_layers=scan, plan="0,1,2,3"), params, tokens)
  np.testing.assert_array_equal(np.asarray(explicit), np.asarray(plain))
  if scan:  # the same function as the loop layout
    loop = _apply(_cfg(plan="0:4"), models.layout.to_loop(params), tokens)
    np.testing.assert_allclose(loop, plain, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"norm": "post", "final_norm": False},
                                {"position": "rope", "num_kv_heads": 1, "norm_type": "rmsnorm", "mlp_gated": True,
                                 "activation": "silu", "use_bias": False, "layer_scale": True}])
def test_drop_plan_equals_the_smaller_model(kw):
  tokens = _tokens()
  _, params = _init(_cfg(**kw))
  got = _apply(_cfg(plan=P.drop(4, [1, 2]), **kw), params, tokens)
  small = {k: v for k, v in params.items() if not k.startswith("block_")}
  small.update(block_0=params["block_0"], block_1=params["block_3"])
  want = _apply(_cfg(num_layers=2, **kw), small, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert float(jnp.abs(got - _apply(_cfg(**kw), params, tokens)).max()) > 1e-3


@pytest.mark.parametrize("kw", [{}, {"norm": "post", "final_norm": False, "post_ln_skip": "ln"}])
def test_branch_plan_equals_zero_override_of_those_branches(kw):
  tokens = _tokens()
  model, params = _init(_cfg(**kw))
  plan = P.drop_branches(P.identity(4), attn=[1, 3], ffn=[2, 3])
  got = _apply(_cfg(plan=plan, **kw), params, tokens)
  ones = jnp.ones(tokens.shape, jnp.float32)
  masks = {f"block_{e.slot}": {"attn": ones * e.attn, "ffn": ones * e.ffn} for e in plan}
  want = model.apply({"params": params, "gate_override": masks}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_per_layer_behaviour_follows_the_slot():
  """FlipReLU's sign belongs to the weights: slot 2 run at position 1 keeps layer index 2."""
  tokens = _tokens()
  model, params = _init(_cfg(activation="fliprelu"))
  got = _apply(_cfg(activation="fliprelu", plan="0,2,3"), params, tokens)
  ones = jnp.ones(tokens.shape)
  masks = {f"block_{i}": {"attn": ones * (i != 1), "ffn": ones * (i != 1)} for i in range(4)}
  np.testing.assert_allclose(got, model.apply({"params": params, "gate_override": masks}, tokens), atol=1e-5)


def _dot_count(cfg, params, tokens):
  jaxpr = jax.make_jaxpr(lambda p: _apply(cfg, p, tokens))(params)
  return str(jaxpr).count("dot_general")


def test_pruned_branch_is_never_traced():
  tokens = _tokens()
  _, params = _init(_cfg())
  full = _dot_count(_cfg(), params, tokens)
  no_ffn = _dot_count(_cfg(plan="0,1f,2:4"), params, tokens)    # layer 1: attention off
  no_attn = _dot_count(_cfg(plan="0,1a,2:4"), params, tokens)   # layer 1: FFN off
  neither = _dot_count(_cfg(plan="0,1-,2:4"), params, tokens)
  assert full > no_ffn > neither and full > no_attn > neither
  assert full - no_attn == 2                                      # wi, wo
  assert neither == _dot_count(_cfg(plan="0,2,3"), params, tokens)
  assert full - neither == (full - no_attn) + (full - no_ffn)
  init = _init(_cfg(plan="0,1a,2:4"))[1]
  assert "mlp" not in init["block_1"] and "attn" in init["block_1"] and "mlp" in init["block_2"]


def test_repeat_and_share_run_the_slot_params_and_gradients_add_up():
  tokens = _tokens()
  targets = _tokens(seed=2)
  cfg = _cfg(plan="0,1,1,2")  # slot 1 at positions 1 and 2 (repeat = share of one slot)
  model, params = _init(cfg)
  assert sorted(k for k in params if k.startswith("block_")) == ["block_0", "block_1", "block_2"]

  seen = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, models.Block) and context.method_name == "__call__":
      seen.append((context.module.name, context.module.variables["params"]["mlp"]["wi"]["kernel"]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, tokens)
  assert [name for name, _ in seen] == ["block_0", "block_1", "block_1", "block_2"]
  assert all(k is params[name]["mlp"]["wi"]["kernel"] for name, k in seen)

  # Reference: the identity model of 4 blocks whose blocks 1 and 2 both hold slot 1's params.
  ref_cfg = _cfg()
  unrolled = lambda p: {**{k: v for k, v in p.items() if not k.startswith("block_")},
                        "block_0": p["block_0"], "block_1": p["block_1"], "block_2": p["block_1"],
                        "block_3": p["block_2"]}

  def loss(logits):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  np.testing.assert_allclose(model.apply({"params": params}, tokens),
                             _apply(ref_cfg, unrolled(params), tokens), atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: loss(model.apply({"params": p}, tokens))))(params)
  ref_model = models.build(ref_cfg)
  ref = jax.jit(jax.grad(lambda u: loss(ref_model.apply({"params": u}, tokens))))(unrolled(params))
  shared = jax.tree.map(lambda a, b: a + b, ref["block_1"], ref["block_2"])
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), grads["block_1"], shared)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), grads["block_2"], ref["block_3"])


@pytest.mark.parametrize("kw", [{}, {"position": "rope", "num_kv_heads": 1, "activation": "fliprelu", "norm": "post",
                                     "final_norm": False}])
def test_decoding_under_a_plan_equals_its_full_forward(kw):
  cfg = _cfg(plan="0,1,1,3a,0,2f", **kw)
  tokens = _tokens(length=BASE["max_len"])
  model, params = _init(cfg, tokens)
  full = model.apply({"params": params}, tokens)
  cache = decode.init_cache(model, tokens.shape[0])
  assert {"cached_key", "cached_key_1"} <= set(cache["block_1"]["attn"])  # one cache per position
  assert "cached_key_1" in cache["block_0"]["attn"] and "block_2" not in cache  # block 2: no attention
  np.testing.assert_allclose(_helpers.decode_step_by_step(model, params, cache, tokens), full, atol=3e-5)


def test_generate_reports_executed_positions_under_a_plan():
  cfg = _cfg(plan="0,1a,3")
  model, params = _init(cfg)
  result = decode.generate(model, params, np.asarray(_tokens(1, 3)), 4)
  assert result.executed.shape == (4, 3, 1)
  np.testing.assert_allclose(result.executed[:, :, 0], np.tile([1.0, 0.5, 1.0], (4, 1)))
  np.testing.assert_allclose(result.skipped_layers, 4 - 2.5)


def test_encoder_walks_the_plan():
  tcfg = models.TransformerConfig(**BASE, causal=False, norm="post", final_norm=False)
  enc = models.EncoderConfig(transformer=tcfg)
  model = models.build(enc)
  tokens = _tokens()
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
  got = models.build(dataclasses.replace(enc, transformer=dataclasses.replace(tcfg, plan="0,3"))).apply(
      {"params": params}, tokens)
  small = {k: v for k, v in params.items() if not k.startswith("block_")}
  small.update(block_0=params["block_0"], block_1=params["block_3"])
  want = models.build(dataclasses.replace(enc, transformer=dataclasses.replace(tcfg, num_layers=2))).apply(
      {"params": small}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)


# -- gate_override: per-token, addressed by layer, never silently ignored ---------------------

def test_overrides_that_match_no_gate_raise():
  tokens = _tokens()
  m = jnp.zeros(tokens.shape, jnp.float32)
  model, params = _init(_cfg())
  with pytest.raises(ValueError, match=r"gate_override \['layer'\] of block_0 matches no gate"):
    model.apply({"params": params, "gate_override": {"block_0": {"layer": m}}}, tokens)
  routed = _cfg(skip=models.SkipConfig(router="top1", granularity="layer"))
  rmodel, rparams = _init(routed)
  with pytest.raises(ValueError, match="matches no gate"):
    rmodel.apply({"params": rparams, "gate_override": {"block_1": {"attn": m, "ffn": m}}}, tokens)
  with pytest.raises(ValueError, match="block_7' matches no block"):
    model.apply({"params": params, "gate_override": {"block_7": {"attn": m}}}, tokens)
  with pytest.raises(ValueError, match="matches no block"):  # slot 1 is pruned by the plan
    models.build(_cfg(plan="0,2,3")).apply({"params": params, "gate_override": {"block_1": {"attn": m}}}, tokens)
  with pytest.raises(ValueError, match="never runs that branch"):
    models.build(_cfg(plan="0,1a,2,3")).apply({"params": params, "gate_override": {"block_1": {"ffn": m}}}, tokens)
  # A layer override on a layer-routed model acts (the layer leaves every token unchanged).
  zeros = {f"block_{i}": {"layer": m} for i in range(4)}
  skipped = rmodel.apply({"params": rparams, "gate_override": zeros}, tokens)
  np.testing.assert_allclose(skipped, _apply(_cfg(plan="0-"), rparams, tokens), atol=1e-5)


@pytest.mark.parametrize("plan", ["0,2,3", "3,2,1,0", "0,1,1,1,2,3", "0,0,0,0"])
def test_scan_and_loop_agree_under_plans(plan):
  """A scanned model gathers its stacked params by slot: outputs, gradients (summed on a shared
  slot, zero on a dropped one) and slot-addressed overrides equal the loop layout's."""
  tokens = _tokens()
  _, params = _init(_cfg())
  scan_params = models.layout.to_scan(params)
  loop_model, scan_model = models.build(_cfg(plan=plan)), models.build(_cfg(plan=plan, scan_layers=True))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(scan_model.init(jax.random.key(0), tokens))["params"])
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, scan_params)  # [L, ...]
  loss = lambda model: (lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, tokens))))
  want, grads = jax.value_and_grad(loss(loop_model))(params)
  got, scan_grads = jax.value_and_grad(loss(scan_model))(scan_params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  zeros = jax.tree.map(jnp.zeros_like, params)  # slots the plan never runs have no loop params
  full = {k: grads.get(k, zeros[k]) for k in params}
  for a, b in zip(jax.tree.leaves(models.layout.to_scan(full)), jax.tree.leaves(scan_grads)):
    np.testing.assert_allclose(b, a, atol=2e-5 * float(jnp.abs(a).max() + 1))
  ones = jnp.ones(tokens.shape, jnp.float32)
  slots = sorted({e.slot for e in P.parse(plan, 4)})
  masks = {f"block_{i}": {"attn": ones * (i != 1), "ffn": ones * (i != 0)} for i in slots}
  full_masks = {f"block_{i}": masks.get(f"block_{i}", {"attn": ones, "ffn": ones}) for i in range(4)}
  got = scan_model.apply({"params": scan_params, "gate_override": models.layout.to_scan(full_masks)}, tokens)
  want = loop_model.apply({"params": params, "gate_override": masks}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="KV-cache decoding of a scanned model serves only the identity plan"):
    decode.init_cache(scan_model, 1)


def test_overrides_under_scan_act_or_raise():
  tokens = _tokens()
  loop_model, params = _init(_cfg())
  scan_model = models.build(_cfg(scan_layers=True))
  scan_params = models.layout.to_scan(params)
  ones = jnp.ones(tokens.shape, jnp.float32)
  masks = {f"block_{i}": {"attn": ones, "ffn": ones * (i != 2)} for i in range(4)}
  with pytest.raises(ValueError, match="scan layout"):  # loop layout given to a scanned model
    scan_model.apply({"params": scan_params, "gate_override": masks}, tokens)
  got = scan_model.apply({"params": scan_params, "gate_override": models.layout.to_scan(masks)}, tokens)
  want = loop_model.apply({"params": params, "gate_override": masks}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert float(jnp.abs(want - loop_model.apply({"params": params}, tokens)).max()) > 1e-3
  with pytest.raises(ValueError, match="matches no gate"):
    scan_model.apply({"params": scan_params, "gate_override": {"layers": {"block": {"layer": ones[None]}}}}, tokens)


def test_layout_round_trip_and_per_layer_under_a_plan():
  _, params = _init(_cfg())
  back = models.layout.to_loop(models.layout.to_scan(params))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, params)
  cfg = _cfg(plan="2,0,0,1a")
  _, state = models.build(cfg).apply({"params": params}, _tokens(), mutable=["stats"])
  ffn = models.layout.per_layer(state["stats"], "ffn_input_norm", cfg.execution_plan, fill=-1.0)
  attn = models.layout.per_layer(state["stats"], "attn_input_norm", cfg.execution_plan)
  assert ffn.shape[0] == 4 and attn.shape[0] == 4 and bool(jnp.all(ffn[3] == -1.0))
  # Position 2 (second run of slot 0) reads the output of position 1, not the embeddings.
  assert float(jnp.abs(attn[1] - attn[2]).max()) > 1e-4


# -- a converted HF Llama -------------------------------------------------------------------

def test_plans_on_a_converted_llama_match_pytorch_with_edited_layers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from skipjax.convert import hf
  cfg = transformers.LlamaConfig(vocab_size=41, hidden_size=24, intermediate_size=40, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                 tie_word_embeddings=False)
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.add_(0.1 * torch.randn(p.shape))
  hf_model.save_pretrained(tmp_path)
  skip_cfg, params = hf.load(str(tmp_path))
  tokens = np.random.default_rng(0).integers(0, 41, (2, 9))
  layers = list(hf_model.model.layers)
  for plan, order in (("0,3", [0, 3]), ("0,1,1,2,3", [0, 1, 1, 2, 3]), ("0,2,1,3", [0, 2, 1, 3])):
    hf_model.model.layers = torch.nn.ModuleList([layers[i] for i in order])
    hf_model.config.num_hidden_layers = len(order)
    with torch.no_grad():
      want = hf_model(input_ids=torch.tensor(tokens), use_cache=False).logits.numpy()
    got = _apply(dataclasses.replace(skip_cfg, plan=plan), params, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, err_msg=plan)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_routed_generation_under_a_plan_equals_the_full_forward(granularity):
  cfg = _cfg(max_len=16, plan="0,1,1,3a", skip=models.SkipConfig(router="top1", granularity=granularity))
  model = models.build(cfg)
  params = nn.meta.unbox(model.init({"params": jax.random.key(0), "gate": jax.random.key(1)}, _tokens())["params"])
  # Router weights that give mixed decisions (zero bias, random kernel).
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: (jnp.zeros_like(x) if jax.tree_util.keystr(path).endswith("['bias']") else
                       jax.random.normal(jax.random.key(len(jax.tree_util.keystr(path))), x.shape))
      if "router" in jax.tree_util.keystr(path) else x, params)
  prompt, new = np.asarray(_tokens(2, 4)), 6
  result = decode.generate(model, params, prompt, new)
  forward = jax.jit(lambda t: model.apply({"params": params}, t, mutable=["gates"]))
  seq = np.zeros((2, cfg.max_len), np.int32)
  seq[:, :4] = prompt
  for t in range(4, 4 + new):
    seq[:, t] = np.argmax(np.asarray(forward(seq)[0])[:, t - 1], axis=-1)
  np.testing.assert_array_equal(result.tokens, seq[:, :4 + new])
  _, state = forward(seq)
  names = ("layer_mask",) if granularity == "layer" else ("attn_mask", "ffn_mask")
  masks = sum(models.layout.per_layer(state["gates"], n, cfg.execution_plan, 0.0) for n in names) / len(names)
  if granularity == "layer":  # position 3a runs one of its two residual blocks: half a layer (models.executed)
    masks = masks * np.asarray([1.0, 1.0, 1.0, 0.5])[:, None, None]
  np.testing.assert_array_equal(result.executed, np.asarray(masks)[:, :, 3:3 + new].transpose(2, 0, 1))
  assert 0.0 < float(np.mean(result.executed)) < 1.0


def test_remat_serves_plans():
  tokens, targets = _tokens(), _tokens(seed=3)
  _, params = _init(_cfg())
  loss = lambda cfg: lambda p: jnp.mean(jnp.take_along_axis(
      jax.nn.log_softmax(_apply(cfg, p, tokens)), targets[..., None], -1))
  plan = "0,1a,1f,3"
  for a, b in zip(jax.value_and_grad(loss(_cfg(plan=plan, remat=True)))(params),
                  jax.value_and_grad(loss(_cfg(plan=plan)))(params)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), a, b)


def test_layer_sensitivity_under_scan_equals_the_loop():
  from skipjax.profile import sensitivity
  tokens = _tokens()
  _, params = _init(_cfg())
  batch = {"inputs": tokens, "targets": _tokens(seed=4)}
  loop = sensitivity.layer_sensitivity(_cfg(), params, batch)
  scan = sensitivity.layer_sensitivity(_cfg(scan_layers=True), models.layout.to_scan(params), batch)
  np.testing.assert_allclose(scan, loop, atol=1e-5)
  assert float(np.abs(loop).max()) > 1e-3


def test_training_metrics_count_every_plan_position():
  from skipjax.train import step
  cfg = _cfg(plan="0,1,1,3a", skip=models.SkipConfig(router="top1", granularity="layer"))
  model, params = _init(cfg)
  tokens = _tokens()
  _, state = model.apply({"params": params}, tokens, mutable=["gates"])
  gates = state["gates"]
  assert len(gates["block_1"]["layer_mask"]) == 2  # slot 1 sowed once per position
  masks = [gates["block_0"]["layer_mask"][0], *gates["block_1"]["layer_mask"], gates["block_3"]["layer_mask"][0]]
  depth = sum(masks[:3]) + 0.5 * masks[3]  # 3a runs one of its two residual blocks: half a layer (models.executed)
  np.testing.assert_allclose(step.executed_depth(gates, cfg.execution_plan), depth)
  metrics = step.routing_metrics(gates, cfg.execution_plan)
  np.testing.assert_allclose(metrics["layer_density"], [float(jnp.mean(m)) for m in masks], rtol=1e-6)
  out = step.eval_step(params, {"inputs": tokens, "targets": tokens}, model=model)
  np.testing.assert_allclose(out["depth_sum"], float(jnp.sum(depth)), rtol=1e-6)
