"""minimoe.checks.ch08: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from check_contract import contract_tests

from minimoe.checks import CheckFailure, ch08

# ---- 8.1 imbalance ----

def imbalance(load):
    load = load.double()
    mean = load.mean()
    return float((load.max() - mean) / mean), float(load.std(correction=0) / mean)


def imbalance_numpy(load):
    a = np.asarray(load, dtype=float)
    return a.max() / a.mean() - 1, np.sqrt(((a - a.mean()) ** 2).mean()) / a.mean()


def imbalance_sample_std(load):
    load = load.double()
    return float((load.max() - load.mean()) / load.mean()), float(load.std() / load.mean())


def imbalance_max_minus_min(load):
    load = load.double()
    return float((load.max() - load.min()) / load.mean()), imbalance(load)[1]


def imbalance_max_over_mean(load):
    load = load.double()
    return float(load.max() / load.mean()), imbalance(load)[1]


def imbalance_ignoring_dead_experts(load):
    return imbalance(load[load > 0])


def imbalance_squared_cv(load):
    max_vio, cv = imbalance(load)
    return max_vio, cv**2


def imbalance_std_over_max(load):
    load = load.double()
    return imbalance(load)[0], float(load.std(correction=0) / load.max())


# ---- 8.2 diagnose ----

def diagnose(record):
    if record["logit_max"] > 10:
        return "logit blow-up"
    if record["load_entropy"] < 0.5:
        return "collapsed"
    if record["dead_experts"] > 0:
        return "dead experts"
    return "healthy"


def diagnose_by_table(record):
    rules = [("logit blow-up", lambda r: r["logit_max"] > 10.0), ("collapsed", lambda r: r["load_entropy"] < 0.5),
             ("dead experts", lambda r: r["dead_experts"] >= 1)]
    return next((label for label, trips in rules if trips(record)), "healthy")


def diagnose_collapse_first(record):
    if record["load_entropy"] < 0.5:
        return "collapsed"
    return diagnose(record)


def diagnose_with(logit_key="logit_max", blow_up=lambda m: m > 10, collapsed=lambda h: h < 0.5,
                  dead=lambda n: n > 0, dead_label="dead experts"):
    def answer(record):
        if blow_up(record[logit_key]):
            return "logit blow-up"
        if collapsed(record["load_entropy"]):
            return "collapsed"
        if dead(record["dead_experts"]):
            return dead_label
        return "healthy"
    return answer


# ---- 8.3 switch_gate ----

def switch_gate(x, router_weight):
    logits = x @ router_weight.T
    probs = logits.softmax(-1)
    weights, expert_idx = probs.max(-1)
    E = router_weight.shape[0]
    f = torch.bincount(expert_idx, minlength=E).to(probs.dtype) / len(expert_idx)
    aux_loss = E * (f * probs.mean(0)).sum()
    z_loss = torch.logsumexp(logits, -1).square().mean()
    return expert_idx, weights, aux_loss, z_loss


def switch_gate_one_hot(x, router_weight):
    """Also correct: one-hot counts, weights gathered, logsumexp written out with the max subtracted."""
    logits = F.linear(x, router_weight)
    probs = F.softmax(logits, dim=1)
    expert_idx = probs.argmax(1)
    weights = probs.gather(1, expert_idx[:, None]).squeeze(1)
    E = probs.shape[1]
    f = F.one_hot(expert_idx, E).to(probs.dtype).mean(0)
    top = logits.max(1, keepdim=True).values
    lse = top.squeeze(1) + (logits - top).exp().sum(1).log()
    return expert_idx, weights, E * torch.dot(f, probs.mean(0)), (lse**2).mean()


def buggy_switch_gate(x, router_weight):
    """The gate the exercise gives: three bugs."""
    logits = x @ router_weight.T
    probs = logits.softmax(-1)
    expert_idx = probs.argmax(-1)
    weights = torch.ones_like(probs[:, 0])                        # bug: a constant weight
    E = router_weight.shape[0]
    f = torch.bincount(expert_idx, minlength=E).float() / len(expert_idx)
    aux_loss = E * (f * probs.softmax(-1).mean(0)).sum()          # bug: softmax applied twice
    z_loss = torch.logsumexp(probs, -1).square().mean()           # bug: z-loss on probabilities
    return expert_idx, weights, aux_loss, z_loss


def gate_with(**changes):
    """switch_gate with one part replaced: weights, P (mean probability), f (load), z (z-loss)."""
    def answer(x, router_weight):
        logits = x @ router_weight.T
        probs = logits.softmax(-1)
        weights, expert_idx = probs.max(-1)
        E = router_weight.shape[0]
        f = torch.bincount(expert_idx, minlength=E).float() / len(expert_idx)
        parts = dict(weights=weights, P=probs.mean(0), f=f, z=torch.logsumexp(logits, -1).square().mean())
        parts.update({name: make(logits, probs, parts) for name, make in changes.items()})
        return expert_idx, parts["weights"], E * (parts["f"] * parts["P"]).sum(), parts["z"]
    return answer


CASES = [
    # (check, task, correct answers, wrong answers)
    (ch08.check_imbalance, "8.1", [imbalance, imbalance_numpy], [
        imbalance_sample_std, imbalance_max_minus_min, imbalance_max_over_mean, imbalance_ignoring_dead_experts,
        imbalance_squared_cv, imbalance_std_over_max,
    ]),
    (ch08.check_diagnose, "8.2", [diagnose, diagnose_by_table], [
        diagnose_collapse_first,
        diagnose_with(blow_up=lambda m: m >= 10),                  # threshold not strict
        diagnose_with(collapsed=lambda h: h <= 0.5),
        diagnose_with(logit_key="logit_rms"),                       # the RMS instead of the largest logit
        diagnose_with(blow_up=lambda m: abs(m) > 10),               # a very negative largest logit is no blow-up
        diagnose_with(dead=lambda n: n >= 0),                       # every record has "dead experts"
        diagnose_with(dead_label="dead"),                           # not one of the labels
        diagnose_with(blow_up=lambda m: m > 1),                     # a threshold of the wrong size
    ]),
    (ch08.check_switch_gate, "8.3", [switch_gate, switch_gate_one_hot], [
        buggy_switch_gate,
        gate_with(weights=lambda logits, probs, p: torch.ones_like(p["weights"])),
        gate_with(weights=lambda logits, probs, p: p["weights"].detach()),
        gate_with(P=lambda logits, probs, p: probs.softmax(-1).mean(0)),
        gate_with(P=lambda logits, probs, p: p["f"]),                                   # counts only: no gradient
        gate_with(z=lambda logits, probs, p: torch.logsumexp(probs, -1).square().mean()),
        gate_with(z=lambda logits, probs, p: torch.logsumexp(logits, -1).mean() ** 2),  # square of the mean
        gate_with(f=lambda logits, probs, p: p["f"] * len(probs) / probs.shape[1]),     # counts / E, not / T
    ]),
]

(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_imbalance_inputs_cover_even_dead_and_fraction_loads():
    kinds = set()
    for case in range(3):
        for load in ch08._loads(np.random.default_rng(1000 * case + 7)):
            kinds.add("fractions" if load.dtype.is_floating_point else "counts")
            kinds.add("even" if bool((load == load[0]).all()) else "uneven")
            kinds.add("dead" if bool((load == 0).any()) else "alive")
    assert kinds == {"fractions", "counts", "even", "uneven", "dead", "alive"}


def test_diagnose_records_cover_every_label_and_both_sides_of_each_threshold():
    rng = np.random.default_rng(7)
    records = [ch08._random_record(rng) for _ in range(30)] + ch08._edge_records(rng)
    assert {diagnose(r) for r in records} == set(ch08.LABELS)
    assert any(r["logit_max"] == 10 for r in records) and any(r["load_entropy"] == 0.5 for r in records)
    assert any(r["logit_rms"] <= 10 < r["logit_max"] for r in records)


def test_gate_inputs_make_the_load_uneven_and_sometimes_leave_an_expert_empty():
    empty = []
    for case in range(3):
        x, w = ch08._gate_inputs(np.random.default_rng(1000 * case + 7))
        counts = torch.bincount((x @ w.T).argmax(-1), minlength=w.shape[0])
        empty.append(bool((counts == 0).any()))
        assert counts.max() > counts.float().mean()  # uneven
    assert any(empty)


def test_a_gate_returning_something_else_fails_with_a_clear_message():
    with pytest.raises(CheckFailure, match=r"task 8.3: expected a tuple \(expert_idx, weights, aux_loss, z_loss\)"):
        ch08.check_switch_gate(lambda x, w: switch_gate(x, w)[:3])
    with pytest.raises(CheckFailure, match="task 8.3: aux_loss must be a torch tensor"):
        ch08.check_switch_gate(lambda x, w: (*switch_gate(x, w)[:2], 1.0, switch_gate(x, w)[3]))
