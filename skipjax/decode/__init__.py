"""Decoding: KV-cache generation with per-step gating (LtS Alg. 2); `python -m skipjax.decode`.

    result = decode.generate(model, params, prompt_tokens, max_new_tokens=32)
    result.tokens, result.skipped_layers  # [B, Tp+N], [B, N] (LtS Fig. 7 data)
    decode.generate(model, params, prompt_tokens, 32, decode_plan="0:6")  # shallow decoder
    restored = decode.load(path)  # a training workdir or a skipjax.convert / prune export
    decode.self_speculative_generate(model, params, prompt_tokens, 32, exit_layer=4, num_draft=3)  # LayerSkip §5
    rule = decode.ExitRule("softmax_max", threshold=0.9)  # CALM §3 per-token early exit
    decode.early_exit_generate(model, params, prompt_tokens, 32, rule=rule, policy="propagate")
"""
from skipjax.decode.early_exit import EarlyExitResult, ExitRule, exit_forward
from skipjax.decode.early_exit import generate as early_exit_generate
from skipjax.decode.generation import (GenerationResult, check_params, decode_model, decode_step, executed_layers,
                                       generate, init_cache, make_step_fn, plan_rows, sample_next)
from skipjax.decode.speculative import SpeculativeResult, self_speculative_generate
from skipjax.decode.workdir import Restored, load, restore, restore_export, with_plan

__all__ = ["GenerationResult", "Restored", "check_params", "decode_model", "decode_step", "executed_layers",
           "generate", "init_cache", "load", "make_step_fn", "plan_rows", "restore", "restore_export",
           "sample_next", "with_plan"]
__all__ += ["SpeculativeResult", "self_speculative_generate"]
__all__ += ["EarlyExitResult", "ExitRule", "early_exit_generate", "exit_forward"]
