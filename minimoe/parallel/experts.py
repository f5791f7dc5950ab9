"""Expert parallelism applied from outside: `parallelize(model)` gives every MoELayer of a
single-process model an `ExpertParallelExperts`, this rank's E / W experts and the all-to-alls
that bring every rank's token copies to them (as torchtitan parallelises its grouped experts).

Rank r of W owns the R = E / W experts r*R .. (r+1)*R - 1; everything else (router, shared
experts, attention, ...) stays replicated. Each layer still routes and plans its own tokens; its
experts then, on every rank at once:

  1. exchange counts: all_to_all_single of tokens_per_expert [E] = [W, R], so every rank learns
     how many rows it will receive from each rank for each of its experts
  2. dispatch: all_to_all_single of the sorted rows (grouped by expert, hence by destination rank)
  3. regroup the received rows by local expert (they arrive grouped by source rank) and run the
     local experts as one grouped product
  4. combine: put the rows back in arrival order and send them home (the reverse all-to-all)
  5. scale each returned row by its combine weight; the layer unpermutes as on one process

Autograd goes through both exchanges, so the gradient of an expert's weights on its owner rank
sums the contributions of every rank's tokens. Equivalence (what the tests check): the output
on rank r for its tokens x_r equals the single-process layer applied to x_r alone, with the same
weights. With a capacity factor the capacity is computed from the local token count, per rank,
like GShard's groups: routing is local, so that is the natural single-process counterpart.
"""

from dataclasses import dataclass

import torch
from torch import nn

from minimoe import _checks
from minimoe.experts import WEIGHTS, Experts, GroupedExperts, feed_forward
from minimoe.layer import moe_layers
from minimoe.parallel.comm import all_to_all, check_same_on_all_ranks, collective_device, exchange, rank_and_world


def split_by_rank(tokens_per_expert: torch.Tensor, world_size: int) -> torch.Tensor:
    """tokens_per_expert [E] -> [W] rows for each rank, rank r owning E / W consecutive experts."""
    _checks.tensor("tokens_per_expert", tokens_per_expert, ndim=1)
    world_size = _checks.positive_int("world_size", world_size)
    if tokens_per_expert.numel() % world_size:
        raise ValueError(f"world_size must divide num_experts={tokens_per_expert.numel()}, got {world_size}")
    return tokens_per_expert.view(world_size, -1).sum(1)


def expert_major_order(counts: torch.Tensor) -> torch.Tensor:
    """counts [W, R]: rows that source rank s sends for local expert j. The rows arrive
    source-major (all of rank 0's, expert by expert, then rank 1's ...). Returns order [N] such
    that rows[order] is expert-major: expert 0's rows from every source in rank order, then
    expert 1's ... (a stable sort of the arrival positions by local expert)."""
    _checks.tensor("counts", counts, ndim=2)
    world, local = counts.shape
    local_expert = torch.arange(local, device=counts.device).repeat(world)
    return torch.argsort(local_expert.repeat_interleave(counts.reshape(-1)), stable=True)


@dataclass
class ExchangeStats:
    """What the last forward call moved between ranks (the backward pass moves it again).

    sent      [W] int64 token copies this rank dispatched to each rank (itself included)
    received  [W] int64 token copies each rank dispatched to this rank
    bytes_per_row  d_model * element size of one token copy
    """

    rank: int
    sent: torch.Tensor
    received: torch.Tensor
    bytes_per_row: int

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sent to other ranks, dispatch (its copies out) + combine (the results
        of the copies it received, back). It also received exactly as many."""
        remote = int(self.sent.sum() - self.sent[self.rank] + self.received.sum() - self.received[self.rank])
        return remote * self.bytes_per_row


class ExpertParallelExperts(GroupedExperts):
    """This rank's E / W experts of `experts` (a float `Experts`, copied: w_gate, w_up, w_down
    [E / W, ...]) and the exchanges with the other ranks of `group` (None: the default group).

    forward(x_sorted [S, d], tokens_per_expert [E], row_weights [S] or None) -> [S, d], as
    Experts.forward on one process: rows of this rank's tokens sorted by (global) expert go out
    to their experts' ranks, and come back computed. Collective: every rank of the group calls
    it, as often as the others. num_experts is E, num_local_experts E / W. After each call,
    `last_exchange` (ExchangeStats) holds what moved.
    """

    def __init__(self, experts: Experts, group=None):
        super().__init__()
        if type(experts) is not Experts:
            raise TypeError(f"experts must be a minimoe.experts.Experts, got {type(experts).__name__}")
        self.rank, self.world_size = rank_and_world(group)
        if experts.num_experts % self.world_size:
            raise ValueError(f"num_experts must be divisible by the world size {self.world_size} (each rank owns "
                             f"num_experts / world experts), got num_experts={experts.num_experts}")
        self.group = group
        self.d_model, self.d_hidden, self.activation = experts.d_model, experts.d_hidden, experts.activation
        self.num_experts = experts.num_experts
        self.num_local_experts = R = experts.num_experts // self.world_size
        first = self.rank * R
        for name in WEIGHTS:
            w = getattr(experts, name)
            shard = None if w is None else nn.Parameter(w.detach()[first:first + R].clone(), w.requires_grad)
            setattr(self, name, shard)
        self.last_exchange: ExchangeStats | None = None

    def _forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor,
                 row_weights: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        tokens = x_sorted
        if rows is not None:  # tokens and the token of each sorted row (GroupedExperts._forward)
            x_sorted = tokens.index_select(0, rows)
        W, R, group = self.world_size, self.num_local_experts, self.group
        # recv_counts[s, j] = rows rank s sends me for my expert j
        recv_counts = exchange(tokens_per_expert, [R] * W, [R] * W, group, "dispatch: token counts").view(W, R)
        sent, received = split_by_rank(tokens_per_expert, W), recv_counts.sum(1)
        send_splits, recv_splits = sent.tolist(), received.tolist()  # host syncs: split sizes are ints
        arrived = all_to_all(x_sorted, recv_splits, send_splits, group, "dispatch: tokens")
        order = expert_major_order(recv_counts)
        out = feed_forward(arrived.index_select(0, order), self.w_up, self.w_down, self.w_gate, self.activation,
                           recv_counts.sum(0))
        back = torch.zeros_like(out).index_copy(0, order, out)  # arrival order again
        returned = all_to_all(back, send_splits, recv_splits, group, "combine: tokens")
        bytes_per_row = self.d_model * x_sorted.element_size()
        self.last_exchange = ExchangeStats(self.rank, sent.cpu(), received.cpu(), bytes_per_row)
        if row_weights is not None:
            returned = returned * row_weights.to(returned.dtype)[:, None]
        return returned if rows is None else torch.zeros_like(tokens).index_add_(0, rows, returned)

    def extra_repr(self) -> str:
        first, last = self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts - 1
        return (f"rank={self.rank}, world_size={self.world_size}, experts {first}..{last} of {self.num_experts}, "
                f"d_model={self.d_model}, d_hidden={self.d_hidden}, activation={self.activation}")


def _layer_config(layer) -> str:
    router = layer.router
    router_args = {name: getattr(router, name) for name in
                   ("k", "score", "normalize", "noise_std", "bias_update_rate", "capacity_factor", "vocab_size")
                   if hasattr(router, name)}
    experts = layer.experts
    return (f"d_model={layer.d_model} d_hidden={experts.d_hidden} num_experts={layer.num_experts} "
            f"capacity_factor={layer.capacity_factor} drop_policy={layer.drop_policy} "
            f"num_shared_experts={layer.num_shared_experts} activation={experts.activation} "
            f"dtype={experts.w_up.dtype} router={type(router).__name__}{router_args}")


def parallelize(model: nn.Module, group=None) -> nn.Module:
    """Make `model` (an MoELayer, or any module holding them, MoETransformer included)
    expert-parallel over `group` (None: the default process group), in place; returns model.

    Every MoELayer's experts become an `ExpertParallelExperts` holding this rank's E / W of them;
    everything else stays replicated. Every rank must call it on a model with the same weights
    (build it with the same seed): one all_gather of two hashes checks the layers' configs and
    the replicated weights, and raises ValueError on every rank if they differ. Data-parallel
    training of the replicated part: `average_gradients` after each backward.
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model must contain an MoELayer to parallelize, got a {type(model).__name__} without one")
    _, world = rank_and_world(group)
    for layer in layers:
        if type(layer.experts) is not Experts:
            raise TypeError(f"the layers' experts must be minimoe.experts.Experts (not yet parallel), got "
                            f"{type(layer.experts).__name__}")
        if layer.num_experts % world:
            raise ValueError(f"num_experts must be divisible by the world size {world} (each rank owns "
                             f"num_experts / world experts), got num_experts={layer.num_experts}")
    experts = {id(p) for layer in layers for p in layer.experts.parameters()}
    replicated = [p for p in model.parameters() if id(p) not in experts] + list(model.buffers())
    config = " | ".join(_layer_config(layer) for layer in layers) + f" | world_size={world}"
    check_same_on_all_ranks(config, replicated, collective_device(group), group)
    for layer in layers:
        layer.experts = ExpertParallelExperts(layer.experts, group)
    return model


def sharded_parameters(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """name -> experts module of every parameter of model that this rank holds only a shard of
    ([E / W, ...] here, [E, ...] in the single-process model): the one answer to "which
    parameters are sharded" that gradients, clipping and checkpoints use."""
    return {f"{prefix}.{name}" if prefix else name: module
            for prefix, module in model.named_modules() if isinstance(module, ExpertParallelExperts)
            for name, _ in module.named_parameters()}
