"""Checks for chapter 07 (an MoE transformer): one function per task.

7.1 block_forward(block, x)          [B, L, d]: a pre-norm block, x + attn(ln1 x), then + ffn(ln2 x)
7.2 active_params(config)            int: parameters one token uses (only k of the E routed experts)
7.3 specialization_counts(domains, expert_idx, num_domains, num_experts)
                                     [D, E] int64: how often a token of domain c is sent to expert e
7.4 mutual_information(counts)       float: I(domain; expert) in bits from a [D, E] count table
7.5 moe_from_dense(ffn, k)           MoELayer with E = k experts, the k column blocks of a dense FFN,
                                     computing exactly what the FFN computes (the scaling identity)

References: `minimoe.model.Block.forward`, `MoETransformer.num_params(active=True)` (itself tested
against the formula written out), `minimoe.metrics.specialization` and `mutual_information`, and
for 7.5 the dense `FeedForward` itself.
"""

import numpy as np
import torch

from minimoe.checks import CheckFailure, require_function, run_check
from minimoe.experts import FeedForward
from minimoe.metrics import mutual_information, specialization
from minimoe.model import Block, MoETransformer, MoETransformerConfig

__all__ = ["check_active_params", "check_block_forward", "check_moe_from_dense", "check_mutual_information",
           "check_specialization_counts"]


def _config(rng: np.random.Generator) -> MoETransformerConfig:
    """A random small config: MoE in every block or every other one, with or without shared
    experts, SwiGLU or GELU experts."""
    variant = int(rng.integers(16))  # bits: moe_every 2, a shared expert, GELU, k = 2
    n_heads = int(rng.integers(1, 4))
    num_experts = int(rng.integers(3, 9))
    return MoETransformerConfig(
        vocab_size=int(rng.integers(20, 100)), seq_len=int(rng.integers(8, 33)),
        d_model=4 * n_heads * int(rng.integers(1, 4)),
        n_layers=int(rng.integers(2, 5)), n_heads=n_heads, d_hidden=int(rng.integers(4, 17)), num_experts=num_experts,
        k=1 + (variant >> 3), moe_every=1 + (variant & 1), num_shared_experts=(variant >> 1) & 1,
        activation=("swiglu", "gelu")[(variant >> 2) & 1])


def check_block_forward(learner_block_forward):
    """Task 7.1: block_forward(block, x [B, L, d]) -> [B, L, d], equal to `block(x)`."""
    def make_inputs(rng):
        config = _config(rng)
        torch.manual_seed(int(rng.integers(2**31)))
        block = Block(config, moe=bool(rng.integers(2)))
        for p in block.parameters():  # LayerNorms away from the identity, so skipping one shows
            torch.nn.init.normal_(p, std=0.3)
        x = torch.from_numpy(rng.standard_normal((int(rng.integers(1, 4)), int(rng.integers(2, 9)),
                                                  config.d_model)).astype(np.float32))
        return block, x

    def reference(block, x):
        with torch.no_grad():
            return block(x)

    run_check("7.1", learner_block_forward, reference, make_inputs, atol=1e-5, rtol=1e-4)


def check_active_params(learner_active_params):
    """Task 7.2: active_params(config) -> int, the parameters one token passes through."""
    def reference(config):
        return MoETransformer(config).num_params(active=True)

    run_check("7.2", learner_active_params, reference, lambda rng: (_config(rng),), atol=0, rtol=0)


def _routing_sample(rng: np.random.Generator):
    """domains [B, L], expert_idx [B, L, k] with k distinct experts per token, D, E; domain d
    prefers expert d % E, so the table is far from uniform."""
    num_domains, num_experts = int(rng.integers(2, 6)), int(rng.integers(3, 9))
    k = int(rng.integers(1, 3))
    B, L = int(rng.integers(1, 5)), int(rng.integers(3, 17))
    domains = rng.integers(num_domains, size=(B, L))
    scores = rng.random((B, L, num_experts))
    np.put_along_axis(scores, (domains % num_experts)[..., None], 2.0, axis=-1)
    expert_idx = np.argsort(-scores, axis=-1)[..., :k]
    return (torch.from_numpy(domains), torch.from_numpy(np.ascontiguousarray(expert_idx)), num_domains, num_experts)


def check_specialization_counts(learner_specialization_counts):
    """Task 7.3: specialization_counts(domains [B, L], expert_idx [B, L, k], num_domains,
    num_experts) -> [num_domains, num_experts] counts of (domain, chosen expert) pairs."""
    def reference(domains, expert_idx, num_domains, num_experts):
        return specialization(domains.reshape(-1), expert_idx.reshape(domains.numel(), -1), num_domains,
                              num_experts)

    run_check("7.3", learner_specialization_counts, reference, _routing_sample, atol=0, rtol=0)


def check_mutual_information(learner_mutual_information):
    """Task 7.4: mutual_information(counts [D, E]) -> I(domain; expert) in bits. The tables lean
    towards a diagonal (domain d -> expert d % E) and have empty cells (0 log 0 = 0)."""
    def make_inputs(rng):
        D, E = int(rng.integers(2, 6)), int(rng.integers(2, 9))
        counts = rng.integers(0, 20, size=(D, E))
        counts[rng.random(counts.shape) < 0.3] = 0
        counts[np.arange(D), np.arange(D) % E] += 40
        return (torch.from_numpy(counts),)

    run_check("7.4", learner_mutual_information, mutual_information, make_inputs, atol=1e-9, rtol=1e-6)


def check_moe_from_dense(learner_moe_from_dense):
    """Task 7.5: moe_from_dense(ffn, k) -> an MoELayer whose k experts of width h / k are the
    column blocks of `ffn` (width h) and whose output equals ffn(x). Compared: the layer's output
    on x [B, L, d] and the shape of its experts' w_up, [k, d, h / k]."""
    require_function("7.5", learner_moe_from_dense)

    def make_inputs(rng):
        k = int(rng.integers(2, 5))
        d, h = int(rng.integers(3, 9)), k * int(rng.integers(2, 6))
        torch.manual_seed(int(rng.integers(2**31)))
        ffn = FeedForward(d, h, activation=("swiglu", "gelu")[int(rng.integers(2))])
        x = torch.from_numpy(rng.standard_normal((2, int(rng.integers(2, 7)), d)).astype(np.float32))
        return ffn, k, x

    def learner(ffn, k, x):
        layer = learner_moe_from_dense(ffn, k)
        if not isinstance(layer, torch.nn.Module) or not hasattr(layer, "experts"):
            raise CheckFailure(f"task 7.5: expected an MoELayer, got {type(layer).__name__}")
        dtype = next(layer.parameters()).dtype
        with torch.no_grad():
            return layer(x.to(dtype)).to(x.dtype), tuple(layer.experts.w_up.shape)

    def reference(ffn, k, x):
        with torch.no_grad():
            return ffn(x), (k, ffn.d_model, ffn.d_hidden // k)

    run_check("7.5", learner, reference, make_inputs, atol=1e-5, rtol=1e-4)
