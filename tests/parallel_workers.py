"""What each rank runs in tests/test_parallel.py: spawned processes import this module (not the
test module, to keep pytest out of them), run the named scenarios on a gloo group and write
their results as JSON, one file per rank, for the test process to assert on.

Every equality scenario builds the same seeded MoELayer on every rank, gives rank s its own
tokens x_s, and compares the expert-parallel layer (`parallelize` on a copy) on x_r with the
single-process layer:
output, input gradient, router and shared-expert gradients against MoELayer(x_r) alone, and
the gradients of this rank's experts against the sum over all ranks s of MoELayer(x_s)'s.
"""

import copy
import functools
from datetime import timedelta

import torch
import torch.distributed as dist
from gloo_ranks import run_jobs

from minimoe.layer import MoELayer
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.parallel import ExpertParallelError, average_gradients, parallelize

D_MODEL, D_HIDDEN = 8, 16

# name: (k, capacity_factor, num_shared_experts, router skewed onto rank 0's experts, tokens per rank,
#        an expert marked unavailable (MoELayer.available_experts) or None)
EQUALITY = {
    "k1": (1, None, 0, False, (24, 17, 30, 9), None),
    "k2": (2, None, 0, False, (24, 17, 30, 9), None),
    "k1_capacity": (1, 1.0, 0, False, (24, 17, 30, 9), None),
    "k2_capacity": (2, 1.0, 0, False, (24, 17, 30, 9), None),
    "k2_shared": (2, None, 1, False, (20, 20, 20, 20), None),
    "k2_unavailable_expert": (2, None, 0, False, (20, 20, 20, 20), 1),
    "skewed_k1": (1, None, 0, True, (16, 16, 16, 16), None),
    "skewed_k2": (2, None, 0, True, (16, 16, 16, 16), None),
    "skewed_k2_capacity": (2, 1.25, 0, True, (16, 16, 16, 16), None),
    "empty_rank": (2, None, 0, False, (12, 0, 12, 0), None),
}


def _layer(world: int, k: int, capacity_factor, shared: int, skewed: bool, seed: int) -> MoELayer:
    num_experts = 2 * world
    torch.manual_seed(seed)
    layer = MoELayer(D_MODEL, D_HIDDEN, num_experts, k, capacity_factor=capacity_factor,  # k=1: Switch
                     num_shared_experts=shared)
    if skewed:  # feature 0 is a constant 3 (see _tokens): rank 0's experts win every token by ~24 logits
        with torch.no_grad():
            layer.router.proj.weight[:, 0] = -4.0
            layer.router.proj.weight[: num_experts // world, 0] = 4.0
    return layer


def _tokens(num_tokens: int, seed: int, skewed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [T, d], cotangent [T, d]) for one rank."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, D_MODEL, generator=gen)
    if skewed:
        x[:, 0] = 3.0
    return x, torch.randn(num_tokens, D_MODEL, generator=gen)


def _grads(layer, x, cotangent):
    """Output and gradients of (layer(x) * cotangent).sum() w.r.t. x and every parameter."""
    x = x.clone().requires_grad_()
    params = dict(layer.named_parameters())
    out = layer(x)
    grads = torch.autograd.grad((out * cotangent).sum(), [x, *params.values()], allow_unused=True)
    named = {name: torch.zeros_like(p) if g is None else g
             for (name, p), g in zip(params.items(), grads[1:], strict=True)}
    return out.detach(), grads[0], named


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max()) if a.numel() else 0.0


def equality(rank: int, world: int, name: str) -> dict:
    k, capacity_factor, shared, skewed, sizes, unavailable = EQUALITY[name]
    seed = sum(map(ord, name))
    layer = _layer(world, k, capacity_factor, shared, skewed, seed)
    if unavailable is not None:
        layer.available_experts = torch.arange(layer.num_experts) != unavailable
    ep = parallelize(copy.deepcopy(layer))  # before the layer runs: it then holds graph tensors (aux_loss)
    data = [_tokens(sizes[s], 1000 * seed + s, skewed) for s in range(world)]
    ref_out, ref_dx, ref_local = _grads(layer, *data[rank])
    dropped, ref_aux = layer.stats.dropped_fraction, float(layer.aux_loss)
    expert_sum = {}
    for s in range(world):
        named = ref_local if s == rank else _grads(layer, *data[s])[2]
        for p, g in named.items():
            if p.startswith("experts."):
                expert_sum[p] = expert_sum.get(p, 0) + g

    x = data[rank][0].clone().requires_grad_()
    out = ep(x)
    (out * data[rank][1]).sum().backward()
    R, first = ep.experts.num_local_experts, rank * ep.experts.num_local_experts
    diffs = {"output": _max_diff(out.detach(), ref_out), "input grad": _max_diff(x.grad, ref_dx)}
    for p, param in ep.named_parameters():
        expected = expert_sum[p][first:first + R] if p.startswith("experts.") else ref_local[p]
        diffs[f"{p} grad"] = _max_diff(param.grad, expected)
    return dict(diffs=diffs, sent=ep.experts.last_exchange.sent.tolist(),
                received=ep.experts.last_exchange.received.tolist(),
                dropped_fraction=dropped, ep_dropped_fraction=ep.stats.dropped_fraction,
                expert_load=ep.stats.load.tolist(),
                aux_loss_diff=abs(float(ep.aux_loss) - ref_aux))


def shards(rank: int, world: int) -> dict:
    """parallelize(layer) holds this rank's shards of layer, with the same parameter names, and
    leaves the caller's random state alone."""
    torch.manual_seed(5)
    layer = MoELayer(D_MODEL, D_HIDDEN, 2 * world, 2, num_shared_experts=1)
    full = {n: p.detach().clone() for n, p in layer.named_parameters()}
    state = torch.get_rng_state()
    ep = parallelize(layer)
    R = ep.experts.num_local_experts
    first = rank * R
    same = [n for n, _ in ep.named_parameters()] == list(full) and all(
        torch.equal(p, full[n][first:first + R] if n.startswith("experts.") else full[n])
        for n, p in ep.named_parameters())
    return dict(same_weights=same, rng_untouched=torch.equal(state, torch.get_rng_state()),
                local_experts=R, repr=repr(ep),
                indivisible=_error(lambda: parallelize(MoELayer(D_MODEL, D_HIDDEN, 2 * world + 1, 2))))


def average(rank: int, world: int) -> dict:
    """After average_gradients, every gradient is that of the mean of the ranks' losses."""
    layer = _layer(world, 2, None, 1, False, seed=11)
    ep = parallelize(copy.deepcopy(layer))
    data = [_tokens(10 + s, 77 + s, False) for s in range(world)]
    per_rank = [_grads(layer, *data[s])[2] for s in range(world)]
    (ep(data[rank][0]) * data[rank][1]).sum().backward()
    average_gradients(ep)
    first, R = rank * ep.experts.num_local_experts, ep.experts.num_local_experts
    diffs = {}
    for p, param in ep.named_parameters():
        mean = sum(g[p] for g in per_rank) / world
        diffs[p] = _max_diff(param.grad, mean[first:first + R] if p.startswith("experts.") else mean)
    return diffs


def transformer(rank: int, world: int) -> dict:
    """parallelize(MoETransformer): rank r's logits and loss on its batch equal the single-process
    model's; after average_gradients every gradient is the mean over the ranks' batches."""
    config = MoETransformerConfig(vocab_size=20, seq_len=8, d_model=16, n_layers=2, n_heads=2, d_hidden=8,
                                  num_experts=2 * world, k=2, capacity_factor=1.5, num_shared_experts=1)
    torch.manual_seed(3)
    model = MoETransformer(config)
    ep = parallelize(copy.deepcopy(model))
    data = [tuple(torch.randint(20, (2 + s, 8), generator=torch.Generator().manual_seed(seed + s)) for seed in (40, 90))
            for s in range(world)]  # (idx, targets) of rank s: 2 + s rows
    per_rank = []
    for idx, targets in data:
        model.zero_grad()
        logits, loss = model(idx, targets)
        loss.backward()
        per_rank.append((logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    logits, loss = ep(*data[rank])
    loss.backward()
    average_gradients(ep)
    R = ep.moe_layers[0].experts.num_local_experts
    diffs = {"logits": _max_diff(logits.detach(), per_rank[rank][0]), "loss": abs(loss.item() - per_rank[rank][1])}
    for n, p in ep.named_parameters():
        mean = sum(grads[n] for _, _, grads in per_rank) / world
        diffs[f"{n} grad"] = _max_diff(p.grad, mean[rank * R:(rank + 1) * R] if ".experts." in n else mean)
    return dict(diffs=diffs, params=ep.num_params(), single_params=model.num_params(),
                active=ep.num_params(active=True), single_active=model.num_params(active=True),
                expert_shapes=[list(layer.experts.w_up.shape) for layer in ep.moe_layers])


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, ExpertParallelError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def mismatch(rank: int, world: int) -> dict:
    """A rank built with another k, then ranks seeded differently: parallelize raises on every rank."""
    torch.manual_seed(0)
    config = MoELayer(D_MODEL, D_HIDDEN, 2 * world, 2 if rank == 0 else 1)
    torch.manual_seed(rank)
    weights = MoELayer(D_MODEL, D_HIDDEN, 2 * world, 2)
    return dict(config=_error(lambda: parallelize(config)), weights=_error(lambda: parallelize(weights)))


def timeout(rank: int, world: int) -> dict:
    """Rank 0 calls the layer once more than the others: it gets an error naming its rank and
    the phase after the group's 2 s timeout, instead of hanging."""
    group = dist.new_group(timeout=timedelta(seconds=2))
    torch.manual_seed(0)
    ep = parallelize(MoELayer(D_MODEL, D_HIDDEN, 2 * world, 2), group=group)
    x = torch.randn(6, D_MODEL)
    ep(x)
    message = _error(lambda: ep(x)) if rank == 0 else "skipped the call"
    dist.barrier()
    return dict(message=message)


SCENARIOS = {**{name: functools.partial(equality, name=name) for name in EQUALITY},
             "shards": shards, "average": average, "transformer": transformer, "mismatch": mismatch,
             "timeout": timeout}


def run(rank: int, world: int, store: str, scenarios: list[str], out_dir: str) -> None:
    """The named scenarios, one after the other; a failed one does not stop the next."""
    run_jobs(rank, world, store, out_dir, {name: functools.partial(SCENARIOS[name], rank, world) for name in scenarios})
