"""minimoe.checks.ch07: every check passes a correct answer, fails common wrong answers with a
message naming the task, and says "not implemented" for the exercise's stub."""

import numpy as np
import torch
from check_contract import contract_tests

from minimoe.checks import ch07
from minimoe.layer import MoELayer
from minimoe.model import MoETransformer

# ---- correct answers, written as a learner would ----


def block_forward(block, x):
    h = x + block.attn(block.ln1(x))
    return h + block.ffn(block.ln2(h))


def ffn_params(config, width):
    return (3 if config.activation == "swiglu" else 2) * config.d_model * width


def active_params(config, routed="k", router=True, head_separate=False, positions=True, every_block=False,
                  shared=True):
    """The formula; the keyword arguments switch on the mistakes the tests expect to fail."""
    d = config.d_model
    total = config.vocab_size * d * (2 if head_separate else 1) + (config.seq_len * d if positions else 0) + 2 * d
    for i in range(config.n_layers):
        total += 4 * d + 4 * d * d
        if config.is_moe_block(i) or (every_block and config.is_moe):
            experts = config.k if routed == "k" else config.num_experts
            total += d * config.num_experts * router
            total += ffn_params(config, config.d_hidden) * (experts + config.num_shared_experts * shared)
        else:
            total += ffn_params(config, config.active_hidden)
    return total


def active_params_by_building(config):
    """Also correct: count the idle experts of a built model and subtract them."""
    model = MoETransformer(config)
    idle = sum((layer.num_experts - layer.k) * sum(p[0].numel() for p in layer.experts.parameters())
               for layer in model.moe_layers)
    return sum(p.numel() for p in model.parameters()) - idle


def specialization_counts(domains, expert_idx, num_domains, num_experts):
    pairs = domains[..., None] * num_experts + expert_idx
    return torch.bincount(pairs.reshape(-1), minlength=num_domains * num_experts).view(num_domains, num_experts)


def specialization_counts_loop(domains, expert_idx, num_domains, num_experts):
    counts = torch.zeros(num_domains, num_experts, dtype=torch.int64)
    for d, experts in zip(domains.reshape(-1).tolist(), expert_idx.reshape(domains.numel(), -1).tolist(), strict=True):
        for e in experts:
            counts[d, e] += 1
    return counts


def mutual_information(counts, log=np.log2):
    p = counts.double().numpy() / counts.sum().item()
    independent = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * log(p[nz] / independent[nz])).sum())


def entropy(p):
    p = p[p > 0]
    return -(p * np.log2(p)).sum()


def mutual_information_by_entropies(counts):
    """Also correct: H(expert) - H(expert | domain)."""
    p = counts.double().numpy() / counts.sum().item()
    rows = p.sum(1)
    conditional = sum(rows[d] * entropy(p[d] / rows[d]) for d in range(len(rows)) if rows[d] > 0)
    return float(entropy(p.sum(0)) - conditional)


def mutual_information_nan_on_zeros(counts):
    p = counts.double() / counts.sum()
    independent = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    return float((p * (p / independent).log2()).sum())


def moe_from_dense(ffn, k, scale=None, zero_router=True, copies=False, shift_down=0):
    h = ffn.d_hidden if copies else ffn.d_hidden // k
    layer = MoELayer(ffn.d_model, h, k, k=k, activation=ffn.activation,
                     routed_scaling_factor=float(k) if scale is None else scale).to(ffn.w_up.dtype)
    def blocks(i):
        return slice(0, h) if copies else slice(i % k * h, (i % k + 1) * h)

    with torch.no_grad():
        if zero_router:
            layer.router.proj.weight.zero_()
        for i in range(k):
            if ffn.w_gate is not None:
                layer.experts.w_gate[i].copy_(ffn.w_gate[:, blocks(i)])
            layer.experts.w_up[i].copy_(ffn.w_up[:, blocks(i)])
            layer.experts.w_down[i].copy_(ffn.w_down[blocks(i + shift_down), :])
    return layer


def moe_from_dense_by_state_dict(ffn, k):
    """Another path: the experts' tensors built by chunking and stacking, loaded as a state dict."""
    layer = MoELayer(ffn.d_model, ffn.d_hidden // k, k, k=k, activation=ffn.activation,
                     routed_scaling_factor=float(k)).to(ffn.w_up.dtype)
    state = layer.state_dict()
    state["router.proj.weight"] = torch.zeros_like(state["router.proj.weight"])
    for name in ("w_gate", "w_up"):
        if getattr(ffn, name) is not None:
            state[f"experts.{name}"] = torch.stack(getattr(ffn, name).detach().chunk(k, dim=1))
    state["experts.w_down"] = torch.stack(ffn.w_down.detach().chunk(k, dim=0))
    layer.load_state_dict(state)
    return layer


CASES = [
    (ch07.check_block_forward, "7.1", [block_forward, lambda block, x: block(x)], [
        lambda block, x: block.ln1(x + block.attn(x)) + block.ffn(block.ln2(x)),            # post-norm
        lambda block, x: x + block.attn(block.ln1(x)),                                       # no FFN
        lambda block, x: x + block.attn(block.ln1(x)) + block.ffn(block.ln2(x)),             # parallel block
        lambda block, x: block_forward(block, x) - x,                                        # no residual
        lambda block, x: (h := x + block.attn(block.ln1(x))) + block.ffn(h),                 # no ln2
    ]),
    (ch07.check_active_params, "7.2", [active_params, active_params_by_building], [
        lambda config: active_params(config, routed="all"),
        lambda config: active_params(config, router=False),
        lambda config: active_params(config, head_separate=True),
        lambda config: active_params(config, positions=False),
        lambda config: active_params(config, every_block=True),
        lambda config: active_params(config, shared=False),
    ]),
    (ch07.check_specialization_counts, "7.3", [specialization_counts, specialization_counts_loop], [
        lambda d, idx, D, E: specialization_counts(d, idx[..., :1], D, E),                  # first choice only
        lambda d, idx, D, E: specialization_counts(d, idx, D, E).T,                          # [E, D]
        lambda d, idx, D, E: specialization_counts(d, idx, D, E) / d.numel(),               # fractions
        lambda d, idx, D, E: specialization_counts(d.roll(1, -1), idx, D, E),               # next token's domain
    ]),
    (ch07.check_mutual_information, "7.4", [mutual_information, mutual_information_by_entropies], [
        lambda counts: mutual_information(counts, log=np.log),                               # nats
        mutual_information_nan_on_zeros,
        lambda counts: float(entropy(counts.double().numpy().sum(0) / counts.sum().item())),  # H(expert)
        lambda counts: mutual_information(counts.T[:, :1].repeat(1, 2)),                    # wrong table
    ]),
    (ch07.check_moe_from_dense, "7.5", [moe_from_dense, moe_from_dense_by_state_dict], [
        lambda ffn, k: moe_from_dense(ffn, k, scale=1.0),                                   # averages the blocks
        lambda ffn, k: moe_from_dense(ffn, k, zero_router=False),                           # a trained-looking router
        lambda ffn, k: moe_from_dense(ffn, k, scale=1.0, copies=True),                      # k full copies
        lambda ffn, k: moe_from_dense(ffn, k, shift_down=1),                                # w_down of the next block
        lambda ffn, k: ffn,                                                                  # not an MoE layer
    ]),
]


(test_check_passes_correct_answers, test_check_fails_wrong_answers_naming_the_task,
 test_check_reports_a_stub_as_not_implemented,
 test_check_rejects_a_non_function) = contract_tests(CASES)


def test_cases_cover_what_the_wrong_answers_get_wrong():
    """Configs cover moe_every=2, shared experts, both activations and k=1, 2; some routing sample has k=2."""
    configs = [ch07._config(np.random.default_rng(1000 * case + 7)) for case in range(3)]
    assert any(c.moe_every == 2 and c.n_layers >= 2 for c in configs) and any(c.moe_every == 1 for c in configs)
    assert any(c.num_shared_experts for c in configs) and {c.activation for c in configs} == {"swiglu", "gelu"}
    assert {c.k for c in configs} == {1, 2}
    samples = [ch07._routing_sample(np.random.default_rng(1000 * case + 7)) for case in range(3)]
    assert any(s[1].shape[-1] == 2 for s in samples)
