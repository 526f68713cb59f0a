"""Routing: gates/routers, routing groups, dispatch (masked | capacity | grouped), capacity loss.

Pure functions on arrays (plus the tiny `Router` linen module); no model knowledge.
"""
from skipjax.routing.capacity import (WARMUP_INIT_DENSITY, capacity_loss, effective_depth, flops_per_token,
                                      layer_flops_per_token, routed_fraction, routed_fractions,
                                      scheduled_density)
from skipjax.routing.dispatch import (METHODS, Dispatched, capacity_limit, capacity_slots, default_gsize, dispatch,
                                      dispatch_layer, from_routing_groups, gated_layer_output, gated_residual,
                                      to_routing_groups)
from skipjax.routing.groups import (RoutingGroups, check_group_size, effective_groups, expected_grouped_fraction,
                                    fit_group_size, row_gsize)
from skipjax.routing.routers import (KINDS, Gate, Router, always_on_gate, fixed_gate,
                                     gate_from_logits, gumbel_gate, highway_gate, needs_rng, random_gate,
                                     sigmoid_gate, straight_through, top1_gate)
from skipjax.routing.dispatch import GATE_FORMS, gated_highway
from skipjax.routing.dispatch import topk_dispatch, topk_indices
from skipjax.routing import mod
from skipjax.routing.mod import MoDPredictor, MoDRouter
