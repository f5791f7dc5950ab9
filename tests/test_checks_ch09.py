"""minimoe.checks.ch09: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import math
from collections import OrderedDict, deque

import numpy as np
import pytest
import torch
from check_contract import contract_tests

from minimoe.checks import CheckFailure, ch09

# ---- correct answers, written as a learner would ----


def masked_topk(logits, available, k):
    probs = logits.masked_fill(~available, float("-inf")).softmax(-1)
    top = probs.topk(k, dim=-1)
    return probs, top.indices, top.values / top.values.sum(-1, keepdim=True)


def masked_topk_by_columns(logits, available, k):
    """Also correct: softmax over the available columns only, then map the ids back."""
    cols = torch.nonzero(available).squeeze(1)
    sub = logits[:, cols].softmax(-1)
    probs = torch.zeros_like(logits)
    probs[:, cols] = sub
    top = sub.topk(k, dim=-1)
    return probs, cols[top.indices], top.values / top.values.sum(-1, keepdim=True)


def quantize_int8(w):
    amax = w.abs().amax(dim=-2, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w / scale).to(torch.int8), scale


def quantize_int8_numpy(w):
    """Also correct: in NumPy (round half to even, like torch.round)."""
    a = w.numpy()
    amax = np.abs(a).max(axis=-2, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    return torch.from_numpy(np.round(a / scale).astype(np.int8)), torch.from_numpy(scale)


def lru_hit_rate(trace, cache_size):
    cache, hits, requests = OrderedDict(), 0, trace.reshape(-1).tolist()
    for expert in requests:
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)
        else:
            if len(cache) == cache_size:
                cache.popitem(last=False)
            cache[expert] = True
    return hits / len(requests)


def lru_hit_rate_with_timestamps(trace, cache_size):
    """Also correct: remember when each cached expert was last used, evict the oldest."""
    last_used, hits = {}, 0
    for time, expert in enumerate(trace.reshape(-1).tolist()):
        if expert in last_used:
            hits += 1
        elif len(last_used) == cache_size:
            del last_used[min(last_used, key=last_used.get)]
        last_used[expert] = time
    return hits / trace.numel()


def routing_entropy(probs):
    return -torch.xlogy(probs, probs).sum(-1) / math.log(probs.shape[1])


def routing_entropy_masked_log(probs):
    """Also correct: log only where p > 0."""
    logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
    return -(probs * logs).sum(-1) / math.log(probs.shape[1])


# ---- wrong answers ----


def masked_topk_no_mask(logits, available, k):
    return masked_topk(logits, torch.ones_like(available), k)


def masked_topk_probs_not_renormalised(logits, available, k):
    """Softmax over all experts, then zero the masked ones: probs no longer sum to 1."""
    probs = logits.softmax(-1) * available
    top = probs.topk(k, dim=-1)
    return probs, top.indices, top.values / top.values.sum(-1, keepdim=True)


def masked_topk_weights_not_renormalised(logits, available, k):
    probs, expert_idx, _ = masked_topk(logits, available, k)
    return probs, expert_idx, probs.gather(-1, expert_idx)


def masked_topk_zero_logit(logits, available, k):
    """Sets masked logits to 0 instead of -inf: they still take probability."""
    return masked_topk(logits.masked_fill(~available, 0.0), torch.ones_like(available), k)


def quantize_truncating(w):
    """.to(int8) without rounding truncates toward zero."""
    q, scale = quantize_int8(w)
    return (w / scale).to(torch.int8), scale


def quantize_per_tensor(w):
    amax = w.abs().amax(dim=(-2, -1), keepdim=True)
    scale = (amax / 127).expand(*w.shape[:-2], 1, w.shape[-1])
    return torch.round(w / scale).to(torch.int8), scale.contiguous()


def quantize_per_input_row(w):
    amax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(w / scale).to(torch.int8), scale.transpose(-1, -2)[..., :1, :].expand(*w.shape[:-2], 1, -1)


def quantize_by_128(w):
    amax = w.abs().amax(dim=-2, keepdim=True)
    scale = torch.where(amax > 0, amax / 128, torch.ones_like(amax))
    return torch.round(w / scale).to(torch.int8), scale


def quantize_zero_column_nan(w):
    scale = w.abs().amax(dim=-2, keepdim=True) / 127
    return torch.round(w / scale).nan_to_num(0).to(torch.int8), scale


def quantize_float_q(w):
    q, scale = quantize_int8(w)
    return q.float(), scale


def quantize_float_array_q(w):
    """The rounded values as a float32 NumPy array: right values, wrong dtype."""
    q, scale = quantize_int8(w)
    return q.float().numpy(), scale


def fifo_hit_rate(trace, cache_size):
    cache, hits = deque(), 0
    for expert in trace.reshape(-1).tolist():
        if expert in cache:
            hits += 1
        else:
            if len(cache) == cache_size:
                cache.popleft()
            cache.append(expert)
    return hits / trace.numel()


def lru_evicts_most_recent(trace, cache_size):
    cache, hits = OrderedDict(), 0
    for expert in trace.reshape(-1).tolist():
        if expert in cache:
            hits += 1
            cache.move_to_end(expert)
        else:
            if len(cache) == cache_size:
                cache.popitem(last=True)
            cache[expert] = True
    return hits / trace.numel()


def lru_counts_steps(trace, cache_size):
    """A step (row) counts as a hit only when all its experts were cached."""
    cache, hits = OrderedDict(), 0
    for row in trace.tolist():
        all_cached = all(e in cache for e in row)
        for expert in row:
            if expert in cache:
                cache.move_to_end(expert)
            else:
                if len(cache) == cache_size:
                    cache.popitem(last=False)
                cache[expert] = True
        hits += all_cached
    return hits / trace.shape[0]


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch09.check_masked_topk, "9.1", [masked_topk, masked_topk_by_columns], [
        masked_topk_no_mask, masked_topk_probs_not_renormalised, masked_topk_weights_not_renormalised,
        masked_topk_zero_logit,
        lambda logits, available, k: masked_topk(logits, ~available, k),         # True read as "failed"
        lambda logits, available, k: masked_topk(logits, available, 1),          # k ignored
    ]),
    (ch09.check_quantize_int8, "9.2", [quantize_int8, quantize_int8_numpy], [
        quantize_truncating, quantize_per_tensor, quantize_per_input_row, quantize_by_128, quantize_zero_column_nan,
        quantize_float_q, quantize_float_array_q,
        lambda w: (quantize_int8(w)[0], quantize_int8(w)[1].squeeze(-2)),        # scale without the kept dim
    ]),
    (ch09.check_lru_hit_rate, "9.3", [lru_hit_rate, lru_hit_rate_with_timestamps], [
        fifo_hit_rate, lru_evicts_most_recent, lru_counts_steps,
        lambda trace, size: lru_hit_rate(trace, size + 1),                       # one slot too many
        lambda trace, size: lru_hit_rate(trace, max(size - 1, 1)),               # one slot too few
    ]),
    (ch09.check_routing_entropy, "9.4", [routing_entropy, routing_entropy_masked_log], [
        lambda p: -(p * p.log()).sum(-1) / math.log(p.shape[1]),                 # 0 * log 0 = nan
        lambda p: -torch.xlogy(p, p).sum(-1),                                    # not normalised
        lambda p: -torch.xlogy(p, p).sum(-1) / math.log(2),                      # bits, not normalised
        lambda p: -torch.xlogy(p, p).sum(-1) / math.log(p.shape[1] - 1),         # log(E - 1)
        lambda p: 1 - p.max(-1).values,                                          # another score
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_float_q_is_reported_as_a_dtype_problem():
    with pytest.raises(CheckFailure, match="task 9.2: q must be an int8 tensor, got dtype torch.float32"):
        ch09.check_quantize_int8(quantize_float_q)
    with pytest.raises(CheckFailure, match="task 9.2: q must be an int8 tensor, got dtype float32"):
        ch09.check_quantize_int8(quantize_float_array_q)


def case_inputs(make_inputs):
    return [make_inputs(np.random.default_rng(1000 * case + 7)) for case in range(3)]


def test_inputs_cover_the_edge_cases():
    """9.1 masks several experts and k varies; 9.2 has 2-D and 3-D weights and a zero column;
    9.3's traces repeat rows; 9.4 has exact zeros and a one-hot row."""
    masks = case_inputs(ch09.masked_topk_inputs)
    assert {k for _, _, k in masks} >= {1, 2} and all((~a).sum() >= 1 for _, a, _ in masks)
    weights = [w for (w,) in case_inputs(ch09.quantize_inputs)]
    assert {w.dim() for w in weights} == {2, 3}
    assert any((w.abs().amax(dim=-2) == 0).any() for w in weights)
    for trace, size in case_inputs(ch09.trace_inputs):
        assert trace.shape[1] <= size < trace.unique().numel()  # evictions happen
        assert (trace[1:] == trace[:-1]).all(-1).any()
    for (probs,) in case_inputs(ch09.entropy_inputs):
        assert (probs == 0).any() and (probs == 1).any()
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))


def test_hard_coded_answer_fails():
    remembered = lru_hit_rate(*ch09.trace_inputs(np.random.default_rng(7)))
    with pytest.raises(CheckFailure, match="task 9.3"):
        ch09.check_lru_hit_rate(lambda trace, cache_size: remembered)
