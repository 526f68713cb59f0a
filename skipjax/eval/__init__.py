"""Evaluation: perplexity and the LtS §3 1-shot protocol (option scoring, exact match)."""
from skipjax.eval.exact_match import ExactMatchResult, GenerationExample, exact_match, greedy_continuations
from skipjax.eval.perplexity import perplexity
from skipjax.eval.scoring import (MultipleChoiceExample, MultipleChoiceResult, OptionScore, continuation_logprobs,
                                  one_shot_context, option_logprob, pick_demonstration, score_multiple_choice)

__all__ = ["ExactMatchResult", "GenerationExample", "MultipleChoiceExample", "MultipleChoiceResult", "OptionScore",
           "continuation_logprobs", "exact_match", "greedy_continuations", "one_shot_context", "option_logprob",
           "perplexity", "pick_demonstration", "score_multiple_choice"]
