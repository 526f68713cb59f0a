"""Analytic FLOPs per token under execution plans (skipjax/train/loop.py `flops_per_token`).

A plan's FLOPs are compared with those of the equivalent plain model (fewer layers for a drop,
more for a repeat) and, for a position that runs one branch, with a hand count of that branch.
"""
import pytest

from configs import lm
from skipjax.train import loop

D, F, H, T, V = 32, 64, 2, 16, 64


def _config(num_layers=4, plan="", router="none", gated=False):
  config = lm.get_config("tiny")
  config.model.update(d_model=D, d_ff=F, num_heads=H, num_layers=num_layers, vocab_size=V, plan=plan)
  config.model.skip.router = router
  with config.unlocked():
    config.model.mlp_gated = gated
  config.data.seq_len = T
  return config


def _flops(record=None, **kw):
  return loop.flops_per_token(_config(**kw), record or {})


def test_drop_plan_equals_the_smaller_model_and_repeat_the_deeper():
  assert _flops(plan="0,2,3") == pytest.approx(_flops(num_layers=3))
  assert _flops(plan="0,1,1,2,3") == pytest.approx(_flops(num_layers=5))
  assert _flops(plan="3,2,1,0") == pytest.approx(_flops())  # reordering costs the same
  assert _flops(plan="0,2,3") < _flops()


def test_single_branch_positions_count_only_that_branch():
  """Hand count (2 FLOPs per weight entry per token; causal keys (T+1)/2 on average)."""
  keys = (T + 1) / 2
  attention = 4 * 2 * D * D + 2 * 2 * keys * D   # Q, K, V, O projections + scores + weighted values
  ffn = 2 * 2 * D * F                            # wi, wo
  dropped = _flops(plan="0,2,3")
  assert _flops(plan="0,1a,2,3") - dropped == pytest.approx(attention)
  assert _flops(plan="0,1f,2,3") - dropped == pytest.approx(ffn)
  assert _flops(plan="0,1-,2,3") == pytest.approx(dropped)
  assert _flops(plan="0,1f,2,3", gated=True) - _flops(plan="0,2,3", gated=True) == pytest.approx(3 * 2 * D * F)
  # Layer 0 of the full model is one attention plus one FFN position, and the head 2·d·V is counted once.
  assert _flops(num_layers=1) == pytest.approx(attention + ffn + 2 * D * V)


def test_logged_densities_are_read_per_plan_position():
  """Under a plan the step logs one density per position that ran the gate (step.routing_metrics)."""
  record = {"layer_density": [0.5, 0.25, 1.0]}
  got = _flops(record, plan="0,2-,2,3", router="random")
  assert got == pytest.approx(_flops(record, num_layers=3, router="random"))
  fewer = _flops({"layer_density": [0.5, 0.25, 0.5]}, plan="0,2-,2,3", router="random")
  assert fewer < got
  # block routing: the FFN's density where the FFN runs, the attention's at an attention-only position
  block = {"attn_density": [0.5, 0.3, 0.5], "ffn_density": [0.2, 0.4]}
  assert _flops(block, plan="0,1a,2", router="random") == pytest.approx(
      _flops({"layer_density": [0.2, 0.3, 0.4]}, plan="0,1a,2", router="random"))
