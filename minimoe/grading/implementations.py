"""minimoe's own implementations of each exercise task: an answer that uses one fails the task.

Names are qualified (module path, then attributes). A class stands for all of its methods; a
method for itself (and where a subclass inherits it). The check modules' reference helpers are
listed too. `minimoe.grading.scan` follows the learner's code to these objects, and the harness
guards them while the learner's function runs.
"""

import importlib

IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "1.1": ("minimoe.numpy_ref.softmax",),
    "1.2": ("minimoe.numpy_ref.mixture_backward", "minimoe.checks.ch01._input_grad_reference"),
    "1.3": ("minimoe.numpy_ref.softmax_backward", "minimoe.numpy_ref.gate_backward",
            "minimoe.numpy_ref.mixture_backward", "minimoe.checks.ch01._backward_reference"),
    "1.4": ("minimoe.numpy_ref.gate",),
    "2.1": ("minimoe.numpy_ref.top_k",),
    "2.2": ("minimoe.numpy_ref.gate",),
    "2.3": ("minimoe.numpy_ref.gate_backward", "minimoe.numpy_ref.softmax_backward",
            "minimoe.checks.ch02._reference_backward"),
    "2.4": ("minimoe.checks.ch02.expected_touched",),
    "3.1": ("minimoe.dispatch.make_plan",),
    "3.2": ("minimoe.dispatch.permute",),
    "3.3": ("minimoe.dispatch.unpermute",),
    "3.4": ("minimoe.layer.MoELayer", "minimoe.reference.moe_loop", "minimoe.routing.TopKRouter",
            "minimoe.experts.Experts", "minimoe.experts.feed_forward", "minimoe.dispatch.make_plan",
            "minimoe.dispatch.permute", "minimoe.dispatch.unpermute"),
    "4.1": ("minimoe.routing.NoisyTopKRouter",),
    "4.2": ("minimoe.routing.ExpertChoiceRouter",),
    "4.3": ("minimoe.routing.TopKRouter",),
    "4.4": ("minimoe.routing.TopKRouter.update_bias", "minimoe.checks.ch05.updated_bias"),
    "5.1": ("minimoe.losses.load_balancing_loss",),
    "5.2": ("minimoe.losses.router_z_loss",),
    "5.3": ("minimoe.losses.load_balancing_loss", "minimoe.losses.gshard_aux_loss", "minimoe.losses.router_z_loss"),
    "5.4": (),  # no minimoe function builds a balanced table (HashRouter deals ids at random)
    "6.1": ("minimoe.dispatch.expert_capacity",),
    "6.2": ("minimoe.dispatch.make_plan", "minimoe.reference.kept_assignments"),
    "6.3": ("minimoe.dispatch.make_plan", "minimoe.reference.kept_assignments"),
    "6.4": ("minimoe.dispatch.make_plan", "minimoe.reference.kept_assignments",
            "minimoe.checks.ch06._what_the_plan_does"),
    "7.1": ("minimoe.model.Block",),
    "7.2": ("minimoe.model.MoETransformer",),
    "7.3": ("minimoe.metrics.specialization",),
    "7.4": ("minimoe.metrics.mutual_information",),
    "7.5": (),  # building the MoELayer is the task; no minimoe function splits a dense FFN
    "8.1": ("minimoe.metrics.max_violation", "minimoe.metrics.coefficient_of_variation"),
    "8.2": ("minimoe.monitor.diagnose",),
    "8.3": ("minimoe.routing.TopKRouter", "minimoe.losses.load_balancing_loss", "minimoe.losses.router_z_loss",
            "minimoe.checks.ch08._switch_gate"),
    "9.1": ("minimoe.routing.TopKRouter", "minimoe.inference.restrict_experts", "minimoe.inference.LostExpertsRouter"),
    "9.2": ("minimoe.inference.quantize_int8",),
    "9.3": ("minimoe.inference.simulate_cache",),
    "9.4": ("minimoe.inference.routing_entropy",),
    "10.1": ("minimoe.parallel.split_by_rank",),
    "10.2": ("minimoe.parallel.expert_major_order",),
    "10.3": ("minimoe.parallel.traffic_bytes",),
    "10.4": ("minimoe.parallel.all_to_all_cost",),
    "11.1": ("minimoe.kernels.permute_rows", "minimoe.kernels.unpermute_rows"),
    "11.2": ("minimoe.kernels.destinations",),
    "11.3": ("minimoe.grouped_gemm.tile_schedule",),
    "11.4": ("minimoe.grouped_gemm.expert_weight_grad", "minimoe.grouped_gemm._expert_weight_grad",
             "minimoe.grouped_gemm.gather_matmul", "minimoe.grouped_gemm.grouped_experts"),
    # the capstone assembles the course's parts (configs, metrics, int8 experts, masks are
    # allowed); only the checks' own references are off limits
    "12.1": ("minimoe.checks.ch12._config_reference",),
    "12.2": ("minimoe.checks.ch12._merged", "minimoe.parallel.full_state_dict"),
    "12.3": ("minimoe.checks.ch12._summary",),
    "12.4": ("minimoe.checks.ch12._serving",),
}


def objects_along(path: str) -> list:
    """The objects that the dotted minimoe path names, prefix by prefix ("minimoe", then
    "minimoe.x", ...), as far as it resolves: [] for a path outside minimoe. Imports minimoe's
    submodules on the way, never a `__main__`."""
    parts = path.split(".")
    if parts[0] != "minimoe":
        return []
    found = [importlib.import_module("minimoe")]
    for i, part in enumerate(parts[1:], start=2):
        try:
            found.append(getattr(found[-1], part))
        except AttributeError:
            if part.startswith("__"):
                break
            try:
                found.append(importlib.import_module(".".join(parts[:i])))
            except ImportError:
                break
    return found


def resolve(path: str):
    """The object at a qualified name of IMPLEMENTATIONS; LookupError if it names none."""
    found = objects_along(path)
    if len(found) != path.count(".") + 1:
        raise LookupError(f"{path} does not name an object of minimoe")
    return found[-1]
