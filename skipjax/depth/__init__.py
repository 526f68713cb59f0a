"""Static depth methods: execution plans (`skipjax.depth.plan`)."""
from skipjax.depth.plan import Plan, PlanEntry
