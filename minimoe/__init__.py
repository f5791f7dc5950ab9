"""minimoe: Mixture-of-Experts, small, readable and tested against the papers."""

from minimoe.dispatch import DispatchPlan, expert_capacity, make_plan, permute, unpermute
from minimoe.experts import Experts, FeedForward
from minimoe.layer import MoELayer
from minimoe.losses import load_balancing_loss, router_z_loss
from minimoe.metrics import MoEStats, routing_stats
from minimoe.routing import (
    ROUTERS,
    ExpertChoiceRouter,
    GShardRouter,
    HashRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SwitchRouter,
    TopKRouter,
    make_router,
)

__version__ = "0.1.0"

__all__ = [
    "ROUTERS", "DispatchPlan", "ExpertChoiceRouter", "Experts", "FeedForward", "GShardRouter", "HashRouter", "MoELayer",
    "MoEStats", "NoisyTopKRouter", "Router", "Routing", "SwitchRouter", "TopKRouter", "expert_capacity",
    "load_balancing_loss", "make_plan", "make_router", "permute", "router_z_loss", "routing_stats", "unpermute",
]
