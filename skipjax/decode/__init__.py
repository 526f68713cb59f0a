"""Decoding: KV-cache generation with per-step gating (LtS Alg. 2); `python -m skipjax.decode`.

    result = decode.generate(model, params, prompt_tokens, max_new_tokens=32)
    result.tokens, result.skipped_layers  # [B, Tp+N], [B, N] (LtS Fig. 7 data)
"""
from skipjax.decode.generation import (GenerationResult, decode_step, executed_layers, generate, init_cache,
                                       make_step_fn, sample_next)
from skipjax.decode.workdir import Restored, restore

__all__ = ["GenerationResult", "Restored", "decode_step", "executed_layers", "generate", "init_cache",
           "make_step_fn", "restore", "sample_next"]
