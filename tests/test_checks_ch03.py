"""minimoe.checks.ch03: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_contract import contract_tests

from minimoe import MoELayer
from minimoe.checks import CheckFailure, ch03
from minimoe.reference import moe_loop

# ---- correct answers, written as a learner would ----

def sort_by_expert(expert_idx, num_experts):
    flat = expert_idx.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


def permute(x, order, k):
    return x[order // k]


def unpermute(y, order, weights):
    w_sorted = weights.reshape(-1)[order]
    return y.new_zeros(weights.shape[0], y.shape[1]).index_add(0, order // weights.shape[1], y * w_sorted[:, None])


def unpermute_by_inverse(y, order, weights):
    """Another correct route: undo the sort, then a weighted sum over the k slots."""
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return (unsorted.view(*weights.shape, -1) * weights[..., None]).sum(1)


def moe_forward(x, router_weight, w_gate, w_up, w_down, k, renormalize=True, activation="swiglu"):
    probs = (x @ router_weight.T).softmax(-1)
    top = probs.topk(k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True) if renormalize else top.values
    order, counts = sort_by_expert(top.indices, router_weight.shape[0])
    blocks = permute(x, order, k).split(counts.tolist())
    outs = []
    for e, rows in enumerate(blocks):
        hidden = F.silu(rows @ w_gate[e]) * (rows @ w_up[e]) if activation == "swiglu" else F.gelu(rows @ w_up[e])
        outs.append(hidden @ w_down[e])
    return unpermute(torch.cat(outs), order, weights)


def moe_loop_forward(x, router_weight, w_gate, w_up, w_down, k):
    """Also correct: minimoe's per-token reference loop on a layer holding these weights."""
    with torch.no_grad():
        return moe_loop(ch03._layer_with(router_weight, w_gate, w_up, w_down, k), x)


# ---- wrong answers ----

def sort_reversed_ties(expert_idx, num_experts):
    """Grouped by expert, but each group in reverse order: what an unstable sort may give."""
    flat = expert_idx.reshape(-1)
    n = flat.numel()
    return n - 1 - torch.argsort(flat.flip(0), stable=True), torch.bincount(flat, minlength=num_experts)


def sort_descending(expert_idx, num_experts):
    flat = expert_idx.reshape(-1)
    return torch.argsort(flat, descending=True, stable=True), torch.bincount(flat, minlength=num_experts)


def sort_without_minlength(expert_idx, num_experts):
    flat = expert_idx.reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat)


def sort_returns_sorted_experts(expert_idx, num_experts):
    """The sorted expert ids instead of the assignment ids."""
    flat = expert_idx.reshape(-1)
    return torch.sort(flat, stable=True).values, torch.bincount(flat, minlength=num_experts)


def sort_slot_major(expert_idx, num_experts):
    """Flattens column by column (a = j * T + t) instead of token by token."""
    flat = expert_idx.t().reshape(-1)
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=num_experts)


def unpermute_without_weights(y, order, weights):
    return y.new_zeros(weights.shape[0], y.shape[1]).index_add(0, order // weights.shape[1], y)


def unpermute_unsorted_weights(y, order, weights):
    """Weights taken in assignment order, not in the sorted rows' order."""
    w = weights.reshape(-1)
    return y.new_zeros(weights.shape[0], y.shape[1]).index_add(0, order // weights.shape[1], y * w[:, None])


def unpermute_token_mod_k(y, order, weights):
    w_sorted = weights.reshape(-1)[order]
    return y.new_zeros(weights.shape[0], y.shape[1]).index_add(0, order % weights.shape[1], y * w_sorted[:, None])


def unpermute_applies_the_sort_again(y, order, weights):
    """y[order] applies the permutation instead of undoing it."""
    return (y[order].view(*weights.shape, -1) * weights[..., None]).sum(1)


def moe_forward_weights_inside(x, router_weight, w_gate, w_up, w_down, k):
    """Scales the token by its weight before the (nonlinear) expert instead of after."""
    probs = (x @ router_weight.T).softmax(-1)
    top = probs.topk(k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    order, counts = sort_by_expert(top.indices, router_weight.shape[0])
    rows = permute(x, order, k) * weights.reshape(-1)[order][:, None]
    outs = [(F.silu(r @ w_gate[e]) * (r @ w_up[e])) @ w_down[e] for e, r in enumerate(rows.split(counts.tolist()))]
    return unpermute(torch.cat(outs), order, torch.ones_like(weights))


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch03.check_sort_by_expert, "3.1", [sort_by_expert], [
        sort_reversed_ties, sort_descending, sort_without_minlength, sort_returns_sorted_experts, sort_slot_major,
    ]),
    (ch03.check_permute, "3.2", [permute, lambda x, order, k: x.repeat_interleave(k, 0)[order]], [
        lambda x, order, k: x[order % k],                           # slot instead of token
        lambda x, order, k: x.repeat(k, 1)[order],                  # tiled copies: row a is token a % T
        lambda x, order, k: x.repeat_interleave(k, 0),              # copies, but not sorted by expert
    ]),
    (ch03.check_unpermute, "3.3", [unpermute, unpermute_by_inverse], [
        unpermute_without_weights, unpermute_unsorted_weights, unpermute_token_mod_k,
        unpermute_applies_the_sort_again,
    ]),
    (ch03.check_moe_forward, "3.4", [moe_forward, moe_loop_forward], [
        lambda *args: moe_forward(*args, renormalize=False),        # raw top-k probabilities
        lambda *args: moe_forward(*args, activation="gelu"),        # no gate matrix
        moe_forward_weights_inside,
        lambda x, r, g, u, dn, k: moe_forward(x, r, g, u, dn, 1),   # k ignored
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_inputs_cover_unused_experts_and_ties():
    """Some case leaves the last expert empty (bincount needs minlength), and every case has
    several assignments per expert (a sort that is not stable can reorder them)."""
    last_unused = []
    for case in range(3):
        rng = np.random.default_rng(1000 * case + 7)
        num_tokens, num_experts, k = ch03._sizes(rng)
        expert_idx = ch03._expert_idx(rng, num_tokens, num_experts, k)
        counts = torch.bincount(expert_idx.reshape(-1), minlength=num_experts)
        assert all(len(set(row.tolist())) == k for row in expert_idx)  # k distinct experts per token
        assert int(counts.max()) > 1
        last_unused.append(int(counts[-1]) == 0)
    assert any(last_unused) and not all(last_unused)


def test_moe_forward_reference_is_the_layer():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, k=2)
    x = torch.randn(10, 8)
    ex = layer.experts
    got = moe_forward(x, layer.router.proj.weight, ex.w_gate, ex.w_up, ex.w_down, 2)
    torch.testing.assert_close(got, layer(x), atol=1e-6, rtol=1e-5)


def test_hard_coded_answer_fails():
    rng = np.random.default_rng(7)
    num_tokens, num_experts, k = ch03._sizes(rng)
    remembered = sort_by_expert(ch03._expert_idx(rng, num_tokens, num_experts, k), num_experts)
    with pytest.raises(CheckFailure, match="task 3.1"):
        ch03.check_sort_by_expert(lambda expert_idx, num_experts: remembered)
