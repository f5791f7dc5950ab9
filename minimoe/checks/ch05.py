"""Checks for chapter 05 (load balancing and collapse): one function per task.

5.1 switch_aux_loss(probs, expert_idx)        scalar: E * sum_i f_i * P_i (Switch Transformer),
                                              f_i = assignments to i / (T * k), P_i = mean over
                                              tokens of the row-renormalised probs; differentiable
                                              w.r.t. probs
5.2 router_z_loss(logits)                     scalar: mean over tokens of logsumexp(logits)^2 (ST-MoE),
                                              finite for logits in the hundreds
5.3 balance_loss(router_logits, expert)       scalar added to the cross-entropy of lesson 05's
                                              collapsing model (`minimoe.checks.collapse`); trained
                                              from three random seeds, it must reach a held-out load
                                              entropy >= 0.95 and an accuracy at least 0.02 above the
                                              collapsed run's (cross-entropy alone, same seed)
5.4 balanced_hash_table(token_counts, num_experts)
                                              [V] int64: an expert for every token id such that the
                                              busiest expert's count is within 1% of the lower bound
                                              max(ceil(total / E), largest count) (Hash Layers,
                                              Roller et al. 2021, with a frequency-balanced table)

The references of 5.1 and 5.2 are minimoe's own, `minimoe.losses.load_balancing_loss` (value and
gradient) and `minimoe.losses.router_z_loss`, on seeded random tensors of varying T, E and k, with
experts that receive nothing, rows of scores that do not sum to 1 (sigmoid routers) and logits in
the hundreds. 5.3 and 5.4 have many right answers; their checks measure the result (load entropy
and accuracy after training; max load over Zipf-distributed counts) against fixed bounds.
`updated_bias` is task 4.4's reference.
"""

import numpy as np
import torch

from minimoe.checks import CheckFailure, collapse, require_function, run_check
from minimoe.losses import load_balancing_loss, router_z_loss
from minimoe.routing import TopKRouter

__all__ = ["check_balanced_hash_table", "check_cured_collapse", "check_router_z_loss", "check_switch_aux_loss",
           "updated_bias"]


def _router_scores(rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [T, E] float64, expert_idx [T, k] int64 = the top-k of probs). The scores are a
    softmax (rows sum to 1) or, about half the time, sigmoids (rows do not); per-expert offsets
    make the load uneven, and the last expert's offset of -8 keeps it from being chosen."""
    num_tokens, num_experts = int(rng.integers(16, 65)), int(rng.integers(3, 11))
    k = int(rng.integers(1, min(3, num_experts - 1) + 1))
    offsets = rng.normal(0.0, 1.0, num_experts)
    offsets[-1] = -8.0
    logits = torch.from_numpy(rng.normal(0.0, 1.5, (num_tokens, num_experts)) + offsets)
    probs = logits.sigmoid() if rng.random() < 0.5 else logits.softmax(-1)
    return probs, probs.topk(k, dim=-1).indices


def _value_and_gradient(loss_fn):
    """loss_fn(probs, expert_idx) -> a function returning {"loss", "gradient w.r.t. probs"}."""
    def run(probs, expert_idx):
        probs = probs.clone().requires_grad_(True)
        loss = loss_fn(probs, expert_idx)
        if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
            raise CheckFailure(f"task 5.1: the loss must be a torch tensor with a gradient w.r.t. probs "
                               f"(P carries it), got a {type(loss).__name__} without one: build it from "
                               "probs with torch operations, without .detach() or .item()")
        (grad,) = torch.autograd.grad(loss.sum(), probs, allow_unused=True)
        return {"loss": loss.detach(), "gradient w.r.t. probs": torch.zeros_like(probs) if grad is None else grad}
    return run


def check_switch_aux_loss(learner_switch_aux_loss):
    """Task 5.1: switch_aux_loss(probs [T, E], expert_idx [T, k]) -> scalar tensor
    E * sum_i f_i * P_i; compares the value and its gradient w.r.t. probs."""
    require_function("5.1", learner_switch_aux_loss)
    run_check("5.1", _value_and_gradient(learner_switch_aux_loss), _value_and_gradient(load_balancing_loss),
              _router_scores)


def check_router_z_loss(learner_router_z_loss):
    """Task 5.2: router_z_loss(logits [T, E] float32) -> scalar mean_t logsumexp(logits_t)^2.
    A few rows of every case sit near +-100 to +-300, where exp() overflows or underflows float32."""
    def make_inputs(rng):
        num_tokens, num_experts = int(rng.integers(8, 49)), int(rng.integers(2, 17))
        logits = rng.normal(0.0, rng.uniform(0.5, 4.0), (num_tokens, num_experts))
        hot = rng.choice(num_tokens, size=4, replace=False)
        logits[hot] += rng.uniform(100.0, 300.0, (4, 1)) * np.array([[1.0], [1.0], [-1.0], [-1.0]])
        return (torch.from_numpy(logits.astype(np.float32)),)

    run_check("5.2", learner_router_z_loss, router_z_loss, make_inputs)


def updated_bias(bias: torch.Tensor, tokens_per_expert: torch.Tensor, rate: float) -> torch.Tensor:
    """bias after one TopKRouter.update_bias step (the reference of task 4.4)."""
    router = TopKRouter(1, bias.shape[0], k=1, bias_update_rate=rate)
    router.expert_bias.copy_(bias)
    router.update_bias(tokens_per_expert)
    return router.expert_bias


MIN_LOAD_ENTROPY, MIN_ACCURACY_GAIN = 0.95, 0.02


def collapse_inputs(rng: np.random.Generator) -> tuple[int]:
    """Task 5.3's argument: the init seed of one training run (the data is the lesson's)."""
    return (int(rng.integers(0, 1000)),)


def _cure(balance_loss):
    """seed -> {"load entropy >= 0.95": bool, "accuracy >= collapsed + 0.02": bool} after training
    lesson 05's model with balance_loss; raises CheckFailure with the numbers when one fails."""
    def run(seed):
        result = collapse.train(seed, balance_loss)
        baseline = collapse.collapsed(seed)
        verdict = {f"load entropy >= {MIN_LOAD_ENTROPY}": result["load entropy"] >= MIN_LOAD_ENTROPY,
                   f"accuracy >= collapsed + {MIN_ACCURACY_GAIN}":
                       result["accuracy"] >= baseline["accuracy"] + MIN_ACCURACY_GAIN}
        if not all(verdict.values()):
            raise CheckFailure(
                f"task 5.3: init seed {seed}: held-out load entropy {result['load entropy']:.3f} (needs >= "
                f"{MIN_LOAD_ENTROPY}; cross-entropy alone: {baseline['load entropy']:.3f}), accuracy "
                f"{result['accuracy']:.3f} (needs >= {baseline['accuracy'] + MIN_ACCURACY_GAIN:.3f}: cross-entropy "
                f"alone reaches {baseline['accuracy']:.3f})")
        return verdict
    return run


def check_cured_collapse(learner_balance_loss):
    """Task 5.3: balance_loss(router_logits [T, E], expert [T] int64) -> scalar tensor, added to the
    cross-entropy of lesson 05's collapsing model; three training runs from random init seeds must
    each end with held-out load entropy >= 0.95 and accuracy >= the collapsed run's + 0.02."""
    require_function("5.3", learner_balance_loss)
    run_check("5.3", _cure(learner_balance_loss), lambda seed: {
        f"load entropy >= {MIN_LOAD_ENTROPY}": True, f"accuracy >= collapsed + {MIN_ACCURACY_GAIN}": True},
        collapse_inputs)


MAX_LOAD_SLACK = 0.01


def hash_inputs(rng: np.random.Generator) -> tuple[torch.Tensor, int]:
    """Task 5.4's arguments: token_counts [V] int64, 200 <= V <= 3000, Zipf-like (exponent 0.7 to
    1.1, ids in shuffled order, 10^5 to 10^6 tokens), and num_experts in {4, 8, 16, 32}."""
    vocab_size, num_experts = int(rng.integers(200, 3001)), int(rng.choice([4, 8, 16, 32]))
    zipf = 1.0 / np.arange(1, vocab_size + 1) ** rng.uniform(0.7, 1.1)
    counts = rng.multinomial(int(rng.integers(10**5, 10**6)), rng.permutation(zipf / zipf.sum()))
    return torch.from_numpy(counts.astype(np.int64)), num_experts


def _max_load_bound(token_counts: torch.Tensor, num_experts: int) -> int:
    """No table does better than max(ceil(total / E), the largest count)."""
    total = int(token_counts.sum())
    return max(-(-total // num_experts), int(token_counts.max()))


def _balanced_enough(balanced_hash_table):
    def run(token_counts, num_experts):
        table = balanced_hash_table(token_counts, num_experts)
        if not isinstance(table, torch.Tensor) or table.dtype not in (torch.int32, torch.int64):
            raise CheckFailure(f"task 5.4: expected an int64 tensor, got {type(table).__name__} "
                               f"{getattr(table, 'dtype', '')}")
        if tuple(table.shape) != tuple(token_counts.shape):
            raise CheckFailure(f"task 5.4: expected shape [V] = {list(token_counts.shape)}, got {list(table.shape)}")
        if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_experts):
            raise CheckFailure(f"task 5.4: experts must lie in [0, {num_experts}), got {int(table.min())} to "
                               f"{int(table.max())}")
        load = torch.zeros(num_experts, dtype=torch.int64).index_add_(0, table.long(), token_counts)
        bound = _max_load_bound(token_counts, num_experts)
        if int(load.max()) > (1 + MAX_LOAD_SLACK) * bound:
            raise CheckFailure(
                f"task 5.4: V = {len(token_counts)}, E = {num_experts}: the busiest expert gets {int(load.max())} "
                f"tokens, {int(load.max()) / bound:.3f} times the lower bound {bound} (max(ceil(total / E), "
                f"largest count)); needs at most {1 + MAX_LOAD_SLACK:.2f} times")
        return {"busiest expert within 1% of the lower bound": True}
    return run


def check_balanced_hash_table(learner_balanced_hash_table):
    """Task 5.4: balanced_hash_table(token_counts [V] int64, num_experts) -> expert of each id
    [V] int64 in [0, E): the busiest expert's token count at most 1.01 times
    max(ceil(total / E), the largest count)."""
    require_function("5.4", learner_balanced_hash_table)
    run_check("5.4", _balanced_enough(learner_balanced_hash_table),
              lambda token_counts, num_experts: {"busiest expert within 1% of the lower bound": True}, hash_inputs)
