"""minimoe: Mixture-of-Experts, small, readable and tested against the papers."""

from minimoe.dispatch import DispatchPlan, expert_capacity, make_plan, permute, unpermute
from minimoe.experts import Experts, FeedForward
from minimoe.layer import MoELayer, MoEStats
from minimoe.losses import load_balancing_loss, router_z_loss
from minimoe.routing import ExpertChoiceRouter, HashRouter, NoisyTopKRouter, Router, Routing, SwitchRouter, TopKRouter

__version__ = "0.1.0"

__all__ = [
    "DispatchPlan", "ExpertChoiceRouter", "Experts", "FeedForward", "HashRouter", "MoELayer", "MoEStats",
    "NoisyTopKRouter", "Router", "Routing", "SwitchRouter", "TopKRouter", "expert_capacity",
    "load_balancing_loss", "make_plan", "permute", "router_z_loss", "unpermute",
]
