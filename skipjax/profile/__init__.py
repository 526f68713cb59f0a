"""Profiling depth sparsity: residual ratios (RR Eq. 1), summaries and simulated oracles."""
from skipjax.profile.oracle import (dynamic_depth, dynamic_depth_histogram, oracle_keep, routing_trace,
                                    skip_breakdown)
from skipjax.profile.ratios import (BRANCHES, interleave, per_block, quantiles, ratios_from_stats,
                                    residual_ratios, summary, token_mask)
