"""The pluggable FFN of structured FF sparsity (Dong et al. 2023, "SS"): activations (§2.1), FF
weights tied across layers (§3.1) and the block-sparsity regulariser (Eq. 3).

References: numpy evaluations of the paper's formulas, and an untied model whose per-layer
kernels are set equal to the tied one (its gradients summed over layers by hand).
"""
import dataclasses
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import _helpers
from skipjax import decode, models, validation
from skipjax.convert import export
from skipjax.layers import MLP, block_sparsity_penalty, get_activation, make_ffn
from skipjax.models import layout, stack
from skipjax.train import init_from, step, workdir

from configs import lm as lm_config

BASE = dict(vocab_size=32, d_model=16, num_heads=2, num_layers=2, d_ff=32, max_len=8, activation="relu")


def _cfg(ffn=None, **kw):
  return models.TransformerConfig(**{**BASE, **kw}, ffn=ffn or {})


TOKENS = jax.random.randint(jax.random.key(1), (2, BASE["max_len"]), 0, BASE["vocab_size"])
WEIGHTS = jax.random.normal(jax.random.key(7), TOKENS.shape + (BASE["vocab_size"],))


def _sown(tree, name):
  """Values the blocks' MLPs sowed as `name`, stacked [K, ...] in slot order (loop or scan layout)."""
  loop = layout.to_loop(jax.tree.map(np.asarray, tree))
  return np.stack([v for i in layout.slots(loop) for v in loop[f"block_{i}"]["mlp"][name]])


@functools.lru_cache(maxsize=None)
def _init(cfg):
  """(model, params): the param tree of `model.init`, filled with N(0, 0.1²) (norm scales 1 + that),
  so that biases are non-zero and visibly per layer. (No init compile: this CPU is shared.)"""
  model = models.build(cfg)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), TOKENS)["params"])
  rng = np.random.default_rng(0)

  def fill(path, s):
    value = 0.1 * rng.standard_normal(s.shape).astype(np.float32)
    return jnp.asarray(value + (jax.tree_util.keystr(path).endswith("['scale']")))
  return model, jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _loss_and_grads(cfg):
  """Compiled params -> ((Σ logits·W, logits), grads) of the model of `cfg` on TOKENS."""
  model = models.build(cfg)

  def loss(p):
    logits = model.apply({"params": p}, TOKENS)
    return jnp.sum(logits * WEIGHTS), logits
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _aux_and_grads(cfg, grads=True):
  """Compiled params -> ((Σ sown aux losses, sown state), grads or None) of `cfg`'s model on TOKENS."""
  model = models.build(cfg)

  def aux(p):
    _, state = model.apply({"params": p}, TOKENS, mutable=["aux_loss", "activations", "gates"])
    return step.sum_aux_losses(state), state
  return jax.jit(jax.value_and_grad(aux, has_aux=True) if grads else lambda p: (aux(p), None))


# -- activations (SS §2.1) ------------------------------------------------------------------------

def test_activations_follow_their_definitions():
  x = np.random.default_rng(0).normal(size=(2, 3, 7)).astype(np.float32)
  relu, neg = np.maximum(x, 0), -np.maximum(-x, 0)   # ReLU(x), −ReLU(−x)
  np.testing.assert_array_equal(get_activation("relu")(jnp.asarray(x)), relu)
  erf = np.vectorize(math.erf)
  np.testing.assert_allclose(get_activation("gelu")(jnp.asarray(x)), 0.5 * x * (1 + erf(x / np.sqrt(2))), atol=1e-6)
  # SplitReLU = [ReLU(x_{1:D/2}), −ReLU(−x_{D/2+1:D})]; D = 7 (odd): the first ⌊D/2⌋ = 3 get ReLU.
  np.testing.assert_array_equal(get_activation("splitrelu")(jnp.asarray(x)),
                                np.concatenate([relu[..., :3], neg[..., 3:]], -1))
  np.testing.assert_array_equal(get_activation("splitrelu")(jnp.asarray(x[..., :6])),
                                np.concatenate([relu[..., :3], neg[..., 3:6]], -1))
  # FlipReLU^k: ReLU on even k, −ReLU(−x) on odd k, layers numbered k = 1..K (index 0 is k = 1).
  flip = jax.jit(get_activation("fliprelu"))
  for index in range(4):
    np.testing.assert_array_equal(flip(jnp.asarray(x), jnp.int32(index)), relu if (index + 1) % 2 == 0 else neg)


# -- the FFN sub-config ---------------------------------------------------------------------------

def test_ffn_config_expansion_and_defaults():
  assert _cfg().ffn == models.config.FFNConfig() and _cfg().d_ff == 32
  cfg = _cfg({"expansion": 6})
  assert cfg.d_ff == 6 * 16 and make_ffn(cfg).hidden == 96
  # A config written before `ffn` existed (no key) loads with the defaults.
  old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "ffn"}
  assert models.TransformerConfig.from_dict({**old, "d_ff": 32}).ffn == models.config.FFNConfig()
  # ... and a config with one survives its config.json (converted / exported models).
  cfg = _cfg({"expansion": 6, "tied": True, "block_sparsity_weight": 1e-3, "block_size": 16, "exempt": 32})
  assert export.config_from_dict(json.loads(json.dumps(export.config_to_dict(cfg)))) == cfg


@pytest.mark.parametrize("ffn, needle", [
    ({"bogus": 1}, "config.model.ffn.bogus is not an ffn field"),
    ({"expansion": 2.5}, "config.model.ffn.expansion=2.5 must be a whole number >= 0"),
    ({"block_size": 0}, "config.model.ffn.block_size=0 must be a whole number >= 1"),
    ({"exempt": -1}, "config.model.ffn.exempt=-1 must be a whole number >= 0"),
    ({"tied": "yes"}, "config.model.ffn.tied='yes' must be True or False"),
    ({"block_sparsity_weight": -1e-3}, "config.model.ffn.block_sparsity_weight=-0.001 must be a finite number"),
    ({"block_sparsity_weight": 1e-3, "block_size": 64, "exempt": 8}, "config.model.ffn.block_size=64 must tile"),
    ({"block_sparsity_weight": 1e-3, "exempt": 512}, "config.model.ffn.block_size=64 must tile"),
])
def test_bad_ffn_fields_are_one_line_errors(ffn, needle):
  config = lm_config.get_config("tiny")
  config.model.vocab_size = 256
  config.model.ffn = ml_collections.ConfigDict({**config.model.ffn.to_dict(), **ffn})  # (bypasses type-safety)
  for check in (lambda: validation.validate(config, 1), lambda: models.build(config.model)):
    with pytest.raises(ValueError, match="^" + needle.replace("(", r"\(").replace(".", r"\.")) as err:
      check()
    assert "\n" not in str(err.value)


def test_regulariser_refuses_what_cannot_sow_it():
  config = lm_config.get_config("tiny")
  config.model.update(vocab_size=256)
  config.model.ffn.block_sparsity_weight = 1e-3
  validation.validate(config, 1)  # d_ff 512, B 64, E 0: fine
  config.model.skip.update(router="top1", dispatch="grouped", target_density=0.5)
  with pytest.raises(ValueError, match=r"^config\.model\.ffn\.block_sparsity_weight=0\.001 needs skip\.dispatch"):
    validation.validate(config, 1)
  config.model.skip.update(router="none", dispatch="masked")
  config.model.layerdrop.update(rate=0.2, unit="batch")
  with pytest.raises(ValueError, match=r"^config\.model\.ffn\.block_sparsity_weight=0\.001 needs layerdrop"):
    models.build(config.model)
  with pytest.raises(ValueError, match="ffn.tied=True"):
    make_ffn(_cfg({"tied": True}))


def test_old_workdir_config_resumes_unchanged():
  config = lm_config.get_config("tiny")
  stored = json.loads(config.to_json())
  del stored["model"]["ffn"]  # a config.json written before the ffn sub-config
  assert workdir.config_changes(stored, config) == []
  config.model.ffn.tied = True
  assert workdir.config_changes(stored, config) == [("model.ffn.tied", False, True)]


# -- FF weights tied across layers (SS §3.1) -------------------------------------------------------

TIED_GATED_PLAN = dict(plan="1,1", mlp_gated=True, activation="silu")  # skips slot 0, repeats slot 1


def _untied_params(tied_params, gated=False):
  """The untied model's params with every block's FFN kernels set to the shared ones."""
  out = {k: v for k, v in tied_params.items() if k != "ffn_tied"}
  for i in layout.slots(tied_params):
    block = dict(out[f"block_{i}"])
    block["mlp"] = {name: {**block["mlp"][name], "kernel": tied_params["ffn_tied"][name]["kernel"]}
                    for name in (("gate", "wi", "wo") if gated else ("wi", "wo"))}
    out[f"block_{i}"] = block
  return out


@pytest.mark.parametrize("kw", [{}, TIED_GATED_PLAN])
def test_tied_kernel_is_one_param_whose_gradient_sums_the_layers(kw):
  """One FF1 / FF2 kernel in the tree, per-layer biases; equal to an untied model holding copies of
  it, and its gradient is the sum of the copies' gradients (under a plan that skips slot 0 and
  repeats slot 1, the one kernel runs at each position)."""
  tied_cfg = _cfg({"tied": True, "expansion": 2}, **kw)
  _, params = _init(tied_cfg)
  names = ("gate", "wi", "wo") if kw else ("wi", "wo")
  assert set(params["ffn_tied"]) == set(names)
  assert params["ffn_tied"]["wi"]["kernel"].shape == (16, 32) and params["ffn_tied"]["wo"]["kernel"].shape == (32, 16)
  slots = layout.slots(params)
  assert slots == ([1] if kw else [0, 1])  # (a slot no position runs has no params)
  for i in slots:
    assert {n: set(v) for n, v in params[f"block_{i}"]["mlp"].items()} == {n: {"bias"} for n in names}
  untied_cfg = _cfg({"expansion": 2}, **kw)
  copies = _untied_params(params, gated=bool(kw))
  for i in slots:  # what tools that read one block's FFN get
    jax.tree.map(np.testing.assert_array_equal, stack.ffn_params(params, i), copies[f"block_{i}"]["mlp"])
  assert jax.tree.structure(copies) == jax.tree.structure(
      nn.meta.unbox(jax.eval_shape(models.build(untied_cfg).init, jax.random.key(0), TOKENS)["params"]))
  ((loss, _), grads), ((ref_loss, _), ref) = _loss_and_grads(tied_cfg)(params), _loss_and_grads(untied_cfg)(copies)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for name in names:
    per_slot = [ref[f"block_{i}"]["mlp"][name]["kernel"] for i in slots]  # (plan: slot 1 sums both positions)
    np.testing.assert_allclose(grads["ffn_tied"][name]["kernel"], sum(per_slot), rtol=1e-4, atol=1e-6)
    for i in slots:
      np.testing.assert_allclose(grads[f"block_{i}"]["mlp"][name]["bias"], ref[f"block_{i}"]["mlp"][name]["bias"],
                                 rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, TIED_GATED_PLAN])
def test_tied_scan_equals_loop(kw):
  """The scanned model reads the same one kernel (outside its stacked [L, ...] params)."""
  tied = {"tied": True, "expansion": 2}
  _, params = _init(_cfg(tied, **{**kw, "plan": ""}))  # identity-layout params: every slot
  scan_params = layout.to_scan(params)
  assert set(scan_params) == {"embed", "pos_embed", "ln_final", "ffn_tied", "layers"}
  loop_cfg = _cfg(tied, **kw)
  loop_params = {k: v for k, v in params.items() if k != "block_0" or not kw}  # the plan never runs slot 0
  ((loss, _), grads) = _loss_and_grads(loop_cfg)(loop_params)
  ((scan_loss, _), scan_grads) = _loss_and_grads(_cfg(tied, **kw, scan_layers=True))(scan_params)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  scan_grads = layout.to_loop(jax.tree.map(np.asarray, scan_grads))
  if kw:
    assert float(max(np.abs(g).max() for g in jax.tree.leaves(scan_grads.pop("block_0")))) == 0.0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), scan_grads, grads)


@pytest.mark.parametrize("scan", [False, True])
def test_tied_model_decodes_like_its_full_forward(scan):
  cfg = _cfg({"tied": True, "expansion": 2}, scan_layers=scan)
  _, params = _init(_cfg({"tied": True, "expansion": 2}))
  params = layout.to_layout(params, scan)
  model = models.build(cfg)
  cache = decode.init_cache(model, TOKENS.shape[0])
  (_, logits), _ = _loss_and_grads(cfg)(params)
  np.testing.assert_allclose(_helpers.decode_step_by_step(model, params, cache, TOKENS), logits, atol=3e-5)


def test_tied_parameter_count_counts_the_kernel_once():
  """What the trainer logs (init_from.parameter_counts), for SS's 6-layer GPT-2 (d = 768, tied
  embeddings): Table 2's 81.9M (F = 4), 58.3M (tied, F = 4) and 82.0M (tied, F = 24)."""
  gpt2 = dict(vocab_size=50257, d_model=768, num_heads=12, num_layers=6, max_len=1024)

  def count(**ffn):
    model = models.build(models.TransformerConfig(**gpt2, ffn=ffn))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return init_from.parameter_counts("", nn.meta.unbox(shapes))[0]
  d, layers = 768, 6
  base, tied4, tied24 = count(expansion=4), count(expansion=4, tied=True), count(expansion=24, tied=True)
  assert base - tied4 == (layers - 1) * 2 * d * 4 * d  # five of six FF1 + FF2 kernel pairs are gone
  assert tied24 - base == layers * (24 - 4) * d         # F = 24 tied: only the (untied) FF1 biases differ
  assert [round(n / 1e6, 1) for n in (base, tied4, tied24)] == [81.9, 58.3, 82.0]


# -- block-sparsity regulariser (SS Eq. 3) ---------------------------------------------------------

def _eq3(acts, block_size, exempt, masks=None):
  """SS Eq. 3 without λ, by loops: Σ_k mean_b Σ_{i,j} B/(F·D)·‖a_k[b, i, E+jB : E+(j+1)B]‖₂."""
  total = 0.0
  for k, a in enumerate(acts):
    width = a.shape[-1]
    for b in range(a.shape[0]):
      for i in range(a.shape[1]):
        if masks is not None and not masks[k][b, i]:
          continue
        for start in range(exempt, width, block_size):
          total += block_size / width * np.linalg.norm(a[b, i, start:start + block_size]) / a.shape[0]
  return total


def test_penalty_equals_eq3_on_a_hand_built_activation():
  a = np.zeros((2, 3, 12), np.float32)     # batch 2, S = 3 tokens, F·D = 12, B = 4, E = 4
  a[0, 0, :4] = 9.0                        # only exempt neurons: no penalty
  a[0, 1, 4:8] = [3.0, 4.0, 0.0, 0.0]      # one block, norm 5
  a[1, 2, 8:12] = [1.0, 2.0, 2.0, 0.0]     # one block, norm 3
  a[1, 0, 5] = -2.0                        # norm 2
  got = float(block_sparsity_penalty(jnp.asarray(a), 4, exempt=4))
  assert got == pytest.approx(4 / 12 * (5 + 3 + 2) / 2, rel=1e-6)
  assert got == pytest.approx(_eq3([a], 4, 4), rel=1e-6)
  mask = np.ones((2, 3), bool)
  mask[0, 1] = False
  assert float(block_sparsity_penalty(jnp.asarray(a), 4, 4, jnp.asarray(mask))) == pytest.approx(4 / 12 * 5 / 2)
  assert float(block_sparsity_penalty(jnp.asarray(a), 4)) == pytest.approx(_eq3([a], 4, 0), rel=1e-6)


def test_exempt_neurons_get_no_regulariser_gradient():
  a = jax.random.normal(jax.random.key(0), (2, 3, 12)).at[0, 0, 8:].set(0.0)  # one all-zero block
  g = np.asarray(jax.jit(jax.grad(lambda a: block_sparsity_penalty(a, 4, exempt=4)))(a))
  assert np.all(g[..., :4] == 0.0) and np.all(np.isfinite(g))
  assert np.all(g[0, 0, 8:] == 0.0)                 # ‖0‖₂: subgradient 0, not NaN
  assert np.count_nonzero(g[..., 4:]) == 2 * 3 * 8 - 4


@pytest.mark.parametrize("scan", [False, True])
def test_sown_regulariser_equals_eq3_over_all_layers(scan):
  """Σ_k of the sown terms is λ·Eq. 3 over the sown activations a_k; its gradient reaches no exempt
  FF1 column of the last layer (they feed only exempt neurons); with FlipReLU the activations show
  the parity the stack gives each layer (k = 1 odd: a ≤ 0; k = 2 even: a ≥ 0)."""
  lam = 5e-3
  cfg = _cfg({"block_sparsity_weight": lam, "block_size": 8, "exempt": 8}, activation="fliprelu", scan_layers=scan)
  _, params = _init(cfg)
  (aux, state), grads = _aux_and_grads(cfg, grads=not scan)(params)
  acts = np.asarray(_sown(state["activations"], "ffn_hidden"))  # [K, B, S, F·D]
  assert acts.shape == (2, 2, 8, 32) and _sown(state["aux_loss"], "ffn_block_sparsity").shape == (2,)
  np.testing.assert_allclose(float(aux), lam * _eq3(acts, 8, 8), rtol=1e-5)
  assert acts[0].max() == 0 and acts[0].min() < 0
  assert acts[1].min() == 0 and acts[1].max() > 0
  if scan:
    return
  wi = jax.tree.map(np.asarray, grads["block_1"]["mlp"]["wi"])
  assert float(np.abs(wi["kernel"][:, :8]).max()) == 0.0 and float(np.abs(wi["bias"][:8]).max()) == 0.0
  assert float(np.abs(wi["kernel"][:, 8:]).max()) > 0.0


@pytest.mark.parametrize("group_size", [0, 4])
def test_regulariser_composes_with_the_capacity_loss(group_size):
  """A routed FFN: the aux sum is capacity loss + λ·Eq. 3 over the tokens routed to each FFN (also
  when the FFN runs over routing groups of 4 tokens: Eq. 3 stays per sequence)."""
  lam = 5e-3
  cfg = _cfg({"block_sparsity_weight": lam, "block_size": 8}, skip=models.SkipConfig(
      router="top1", granularity="ffn", dispatch="masked", target_density=0.5, group_size=group_size))
  params = _helpers.perturb_routers(_init(cfg)[1])
  (aux, state), _ = _aux_and_grads(cfg, grads=False)(params)
  assert set(state["aux_loss"]["block_0"]) == {"mlp", "ffn_capacity_loss"}  # Eq. 3 sown by the FFN itself
  batch = (2, BASE["max_len"])
  masks = np.asarray(layout.per_layer(state["gates"], "ffn_mask")).reshape((2,) + batch) > 0  # [K, B, S]
  assert 0 < masks.mean() < 1
  acts = _sown(state["activations"], "ffn_hidden")
  assert acts.shape[1] == (2 * BASE["max_len"] // group_size if group_size else 2)  # rows: routing groups
  acts = acts.reshape((2,) + batch + (32,))                                          # [K, B, S, F·D]
  reg = float(np.sum(_sown(state["aux_loss"], "ffn_block_sparsity")))
  np.testing.assert_allclose(reg, lam * _eq3(acts, 8, 0, masks), rtol=1e-5)
  capacity = sum(float(state["aux_loss"][f"block_{i}"]["ffn_capacity_loss"][0]) for i in range(2))
  assert capacity > 0
  np.testing.assert_allclose(float(aux), capacity + reg, rtol=1e-6)


@pytest.mark.parametrize("mod_eval", ["causal", "topk"])
def test_regulariser_under_mod_counts_the_tokens_each_layer_runs(mod_eval):
  """Mixture-of-Depths: λ·Eq. 3 over the tokens each routed layer runs — the causal rule's per-token
  mask (masked dispatch: the FFN sees every token) or the top-k tokens (gathered: the FFN sees only them)."""
  lam = 5e-3
  cfg = _cfg({"block_sparsity_weight": lam, "block_size": 8}, skip=models.SkipConfig(
      router="mod", target_density=0.5, dispatch="masked", mod_eval=mod_eval))
  params = _helpers.perturb_routers(_init(cfg)[1])
  (_, state), _ = _aux_and_grads(cfg, grads=False)(params)
  masks = np.asarray(layout.per_layer(state["gates"], "layer_mask")) > 0  # [K, B, S]
  acts = _sown(state["activations"], "ffn_hidden")                          # [K, B, S or C, F·D]
  if mod_eval == "causal":
    assert 0 < masks.mean() < 1 and acts.shape[2] == BASE["max_len"]
  else:  # the gathered C = ⌊P·T⌋ tokens, every one of them runs
    assert acts.shape[2] == BASE["max_len"] // 2 and masks.mean() == 0.5
    masks = None
  reg = float(np.sum(_sown(state["aux_loss"], "ffn_block_sparsity")))
  np.testing.assert_allclose(reg, lam * _eq3(acts, 8, 0, masks), rtol=1e-5)


def test_mlp_sows_the_regulariser_only_when_on_and_keeps_its_tree():
  x = jnp.zeros((2, 3, 8))
  for lam in (0.0, 1e-3):
    mlp = MLP(features=8, hidden=16, activation="relu", block_sparsity_weight=lam, block_size=4)
    variables = jax.eval_shape(mlp.init, jax.random.key(1), x)
    assert set(variables["params"]) == {"wi", "wo"}
    _, state = jax.eval_shape(lambda v: mlp.apply(v, x, mutable=["aux_loss"]), variables)
    assert set(state.get("aux_loss", {})) == ({"ffn_block_sparsity"} if lam else set())
