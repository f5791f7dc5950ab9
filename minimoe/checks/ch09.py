"""Checks for chapter 09 (inference): one function per task.

9.1 masked_topk(logits, available, k)
                        (probs [T, E], expert_idx [T, k] int64, weights [T, k]): softmax over the
                        available experts only (0 for the others), their k largest, best first,
                        weights renormalised to sum 1
9.2 quantize_int8(w)    (q int8 [..., n_in, n_out], scale [..., 1, n_out]): symmetric per-output-
                        channel int8, scale = max |column| / 127 (1 for an all-zero column),
                        q = round(w / scale)
9.3 lru_hit_rate(trace, cache_size)
                        float: share of the requests in trace [N, k] (row by row) that find their
                        expert in an LRU cache of cache_size experts
9.4 routing_entropy(probs)
                        [T]: entropy of each row of probs [T, E] divided by log E, with 0 log 0 = 0

The references are minimoe's own: `TopKRouter` with `available_experts` (its linear map set to
the identity, so its logits are the given ones), and `minimoe.inference`'s `quantize_int8`,
`simulate_cache(..., policy="lru")` and `routing_entropy`. Random inputs are continuous, so
"best first" has one answer; traces have popular experts and runs of repeats, so that LRU,
FIFO and a cache one slot too large or too small all give different hit rates.
"""

import numpy as np
import torch

from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.checks._inputs import random_floats
from minimoe.inference import quantize_int8, routing_entropy, simulate_cache
from minimoe.routing import TopKRouter

__all__ = ["check_lru_hit_rate", "check_masked_topk", "check_quantize_int8", "check_routing_entropy"]


def masked_topk_inputs(rng: np.random.Generator) -> tuple:
    """Task 9.1's arguments: logits [T, E], available [E] bool with 1 to E - k experts masked, k."""
    num_tokens, num_experts = int(rng.integers(10, 41)), int(rng.integers(4, 13))
    k = int(rng.integers(1, min(3, num_experts - 2) + 1))
    masked = rng.choice(num_experts, size=int(rng.integers(1, num_experts - k + 1)), replace=False)
    available = torch.ones(num_experts, dtype=torch.bool)
    available[torch.from_numpy(masked)] = False
    return random_floats(rng, num_tokens, num_experts, scale=1.5), available, k


def check_masked_topk(learner_masked_topk):
    """Task 9.1: masked_topk(logits [T, E], available [E] bool, k) -> (probs [T, E],
    expert_idx [T, k] int64, weights [T, k]), equal to TopKRouter with available_experts."""
    def reference(logits, available, k):
        router = TopKRouter(logits.shape[1], logits.shape[1], k)
        with torch.no_grad():
            router.proj.weight.copy_(torch.eye(logits.shape[1]))
            routing = router(logits, available_experts=available)
        return routing.probs, routing.expert_idx, routing.weights

    run_check("9.1", learner_masked_topk, reference, masked_topk_inputs)


def quantize_inputs(rng: np.random.Generator) -> tuple:
    """Task 9.2's argument: w [n_in, n_out] or [E, n_in, n_out], columns of different scales,
    one all-zero column in the 3-D cases."""
    n_in, n_out = int(rng.integers(4, 33)), int(rng.integers(3, 25))
    shape = (n_in, n_out) if rng.random() < 0.5 else (int(rng.integers(2, 5)), n_in, n_out)
    w = random_floats(rng, *shape) * torch.from_numpy(rng.uniform(0.01, 2.0, n_out).astype(np.float32))
    if len(shape) == 3:
        w[0, :, int(rng.integers(n_out))] = 0.0
    return (w,)


def check_quantize_int8(learner_quantize_int8):
    """Task 9.2: quantize_int8(w [..., n_in, n_out]) -> (q int8 like w, scale [..., 1, n_out])."""
    require_function("9.2", learner_quantize_int8)

    def with_dtype_checked(w):
        out = learner_quantize_int8(w)
        dtype = getattr(out[0], "dtype", None) if isinstance(out, (tuple, list)) and len(out) == 2 else torch.int8
        if dtype not in (torch.int8, np.int8):  # a float tensor or array of rounded values is not int8
            raise CheckFailure(f"task 9.2: q must be an int8 tensor, got dtype {dtype} "
                               "(hint: .to(torch.int8) after rounding)")
        return out

    run_check("9.2", with_dtype_checked, quantize_int8, quantize_inputs, atol=0, rtol=1e-6)


def trace_inputs(rng: np.random.Generator) -> tuple:
    """Task 9.3's arguments: trace [N, k] int64 (k distinct experts per row, popular experts,
    and rows that repeat the previous one) and a cache size from k to one less than the number of
    experts the trace uses, so that experts get evicted."""
    num_experts = int(rng.integers(6, 17))
    k = int(rng.integers(1, 4))
    popularity = rng.dirichlet(np.ones(num_experts))
    rows = [rng.choice(num_experts, size=k, replace=False, p=popularity)]
    for _ in range(int(rng.integers(60, 200))):
        repeat = rng.random() < 0.3
        rows.append(rows[-1] if repeat else rng.choice(num_experts, size=k, replace=False, p=popularity))
    trace = torch.from_numpy(np.array(rows, dtype=np.int64))
    return trace, int(rng.integers(k, trace.unique().numel()))


def check_lru_hit_rate(learner_lru_hit_rate):
    """Task 9.3: lru_hit_rate(trace [N, k] int64, cache_size) -> float hit rate."""
    def reference(trace, cache_size):
        return simulate_cache(trace, cache_size, "lru").hit_rate

    run_check("9.3", learner_lru_hit_rate, reference, trace_inputs, atol=1e-9, rtol=0)


def entropy_inputs(rng: np.random.Generator) -> tuple:
    """Task 9.4's argument: probs [T, E], softmax rows with some exact zeros (masked experts),
    and one one-hot row."""
    num_tokens, num_experts = int(rng.integers(8, 33)), int(rng.integers(3, 13))
    logits = random_floats(rng, num_tokens, num_experts, scale=2.0)
    logits[torch.from_numpy(rng.random((num_tokens, num_experts)) < 0.2)] = -torch.inf
    logits[:, 0] = logits[:, 0].clamp(min=0.0)  # every row keeps an expert
    logits[int(rng.integers(num_tokens)), 1:] = -torch.inf
    return (logits.softmax(-1),)


def check_routing_entropy(learner_routing_entropy):
    """Task 9.4: routing_entropy(probs [T, E]) -> [T] entropy / log E."""
    run_check("9.4", learner_routing_entropy, routing_entropy, entropy_inputs, atol=1e-5, rtol=1e-5)
