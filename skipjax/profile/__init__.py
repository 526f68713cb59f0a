"""Profiling depth sparsity: residual ratios (RR Eq. 1), summaries, simulated and applied oracles,
the token-level sensitivity oracle and learned oracle imitation (RR §4–5); CLI: `python -m skipjax.profile`."""
from skipjax.profile.oracle import (dynamic_depth, dynamic_depth_histogram, oracle_keep, routing_trace,
                                    skip_breakdown)
from skipjax.profile.ratios import (BRANCHES, interleave, per_block, quantiles, ratios_from_stats,
                                    residual_ratios, summary, token_mask)
from skipjax.profile.applied import applied_oracle
from skipjax.profile import imitation  # the module: imitation.imitation(...), train_routers, ...
from skipjax.profile.sensitivity import layer_sensitivity, sensitivity_correlation, spearman
