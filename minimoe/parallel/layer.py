"""ExpertParallelMoE: an MoE layer whose experts are spread over the ranks of a process group.

Rank r of W owns the R = E / W experts r*R .. (r+1)*R - 1; the router and the shared experts are
replicated (the same weights on every rank). forward(x) on each rank's own tokens:

  1. route the local tokens and plan the dispatch (sorted by expert, hence by destination rank)
  2. exchange counts: all_to_all_single of tokens_per_expert [E] = [W, R], so every rank learns
     how many rows it will receive from each rank for each of its experts
  3. dispatch: all_to_all_single of the sorted rows with uneven splits
  4. regroup the received rows by local expert (they arrive grouped by source rank) and run the
     local experts as one grouped product
  5. combine: put the rows back in arrival order and send them home (the reverse all-to-all)
  6. unpermute with the combine weights and add the shared experts (computed locally)

Autograd goes through both exchanges, so the gradient of an expert's weights on its owner rank
sums the contributions of every rank's tokens. Equivalence (what the tests check): the output
on rank r for its tokens x_r equals `MoELayer` applied to x_r alone, with the same weights.
With a capacity factor the capacity is computed from the local token count, per rank, like
GShard's groups: routing is local, so that is the natural single-process counterpart.
"""

import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from minimoe import _checks
from minimoe.dispatch import permute, unpermute
from minimoe.experts import Experts
from minimoe.layer import MoELayer, MoEStats, route_and_plan
from minimoe.losses import load_balancing_loss, router_z_loss
from minimoe.metrics import load_entropy
from minimoe.parallel.comm import all_to_all, check_same_on_all_ranks, exchange, rank_and_world, run_collective


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


class ExpertParallelMoE(nn.Module):
    """An MoELayer with its experts sharded over a process group. forward(x [..., d_model],
    token_ids=None) -> same shape as x; every rank of the group must call it (collective).

    Takes MoELayer's arguments plus `group` (None: the default group). num_experts must be
    divisible by the group's size W. With the same torch seed on every rank, the layer holds
    exactly the shards of `MoELayer(same arguments)` built with that seed; `from_layer` shards an
    existing MoELayer. The first forward call checks (one all_gather of two hashes) that every
    rank has the same config and the same replicated weights.

    After each call: `aux_loss`, `z_loss` and `stats` as MoELayer's for the local tokens, and
    `exchange` (ExchangeStats). `available_experts` works as MoELayer's (set it on every rank).

    Training: each rank's backward gives its experts the gradient of the sum of all ranks'
    losses, and the replicated parameters the gradient of its own loss; `average_gradients(model)`
    turns both into the gradient of the mean loss. For aux-loss-free bias updates, all-reduce
    `stats.tokens_per_expert` first, so that the router copies stay equal.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, k: int = 2, *, router=None,
                 capacity_factor: float | None = None, drop_policy: str = "position", num_shared_experts: int = 0,
                 activation: str = "swiglu", group=None):
        super().__init__()
        self.rank, self.world_size = rank_and_world(group)
        num_experts = _checks.positive_int("num_experts", num_experts)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts must be divisible by the world size {self.world_size} (each rank owns "
                             f"num_experts / world experts), got num_experts={num_experts}")
        self.group = group
        self.num_local_experts = num_experts // self.world_size
        full = MoELayer(d_model, d_hidden, num_experts, k, router=router, capacity_factor=capacity_factor,
                        drop_policy=drop_policy, num_shared_experts=num_shared_experts, activation=activation)
        self.d_model, self.num_experts, self.k = full.d_model, full.num_experts, full.k
        self.capacity_factor, self.drop_policy = full.capacity_factor, full.drop_policy
        self.num_shared_experts = num_shared_experts
        self.router, self.shared = full.router, full.shared
        self.experts = self._local_experts(full.experts)
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.stats: MoEStats | None = None
        self.exchange: ExchangeStats | None = None
        self.available_experts: torch.Tensor | None = None  # as MoELayer's: bool [E] or None
        self._checked = False

    @classmethod
    def from_layer(cls, layer: MoELayer, group=None) -> "ExpertParallelMoE":
        """This rank's shard of `layer`: copies of its router, its shared experts and this
        rank's experts. Every rank must pass an MoELayer with the same weights."""
        if not isinstance(layer, MoELayer):
            raise TypeError(f"layer must be a minimoe.layer.MoELayer, got {type(layer).__name__}")
        shared = 0 if layer.shared is None else layer.shared.d_hidden // layer.experts.d_hidden
        with torch.device("meta"):  # shapes only (no memory, no random draws): the weights come from layer
            ep = cls(layer.d_model, layer.experts.d_hidden, layer.num_experts, layer.k,
                     capacity_factor=layer.capacity_factor, drop_policy=layer.drop_policy,
                     num_shared_experts=shared, activation=layer.experts.activation, group=group)
        ep.router, ep.shared = copy.deepcopy(layer.router), copy.deepcopy(layer.shared)
        ep.experts = ep._local_experts(layer.experts)
        ep.available_experts = layer.available_experts
        return ep

    def _local_experts(self, experts: Experts) -> Experts:
        """A copy of this rank's R experts of `experts` (all E of them)."""
        with torch.device("meta"):
            local = Experts(self.num_local_experts, experts.d_model, experts.d_hidden, experts.activation)
        local = local.to_empty(device=experts.w_up.device).to(experts.w_up.dtype)
        first = self.rank * self.num_local_experts
        with torch.no_grad():
            for name, param in local.named_parameters():
                param.copy_(getattr(experts, name)[first:first + self.num_local_experts])
        return local

    def _config(self) -> str:
        router = self.router
        router_args = {name: getattr(router, name) for name in
                       ("k", "score", "normalize", "noise_std", "bias_update_rate", "capacity_factor", "vocab_size")
                       if hasattr(router, name)}
        return (f"d_model={self.d_model} d_hidden={self.experts.d_hidden} num_experts={self.num_experts} k={self.k} "
                f"capacity_factor={self.capacity_factor} drop_policy={self.drop_policy} "
                f"num_shared_experts={self.num_shared_experts} activation={self.experts.activation} "
                f"router={type(router).__name__}{router_args} world_size={self.world_size}")

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        tokens, routing, plan = route_and_plan(self, x, token_ids)
        if not self._checked:
            replicated = [*self.router.parameters(), *self.router.buffers()]
            replicated += [] if self.shared is None else list(self.shared.parameters())
            check_same_on_all_ranks(f"{self._config()} dtype={x.dtype}", replicated, x.device, self.group)
            self._checked = True
        W, R, group = self.world_size, self.num_local_experts, self.group

        # counts [W, R]: recv_counts[s, j] = rows rank s sends me for my expert j
        recv_counts = exchange(plan.tokens_per_expert, [R] * W, [R] * W, group, "dispatch: token counts").view(W, R)
        sent, received = split_by_rank(plan.tokens_per_expert, W), recv_counts.sum(1)
        send_splits, recv_splits = sent.tolist(), received.tolist()
        arrived = all_to_all(permute(tokens, plan), recv_splits, send_splits, group, "dispatch: tokens")
        order = expert_major_order(recv_counts)
        expert_out = self.experts(arrived.index_select(0, order), recv_counts.sum(0))
        back = torch.zeros_like(expert_out).index_copy(0, order, expert_out)  # arrival order again
        returned = all_to_all(back, send_splits, recv_splits, group, "combine: tokens")
        out = unpermute(returned, plan, routing.weights)
        if self.shared is not None:
            out = out + self.shared(tokens)

        self._record(routing, plan.order.numel(), sent, received, x.element_size())
        return out.view_as(x)

    def _record(self, routing, num_kept: int, sent: torch.Tensor, received: torch.Tensor, element_size: int) -> None:
        """The losses and statistics of the local tokens, as MoELayer keeps them."""
        if routing.logits.shape[0]:
            self.aux_loss = load_balancing_loss(routing.probs, routing.expert_idx, routing.mask)
            self.z_loss = router_z_loss(routing.logits)
        else:  # no local tokens: zero losses (a mean over no token would be NaN) that still backpropagate
            self.aux_loss = self.z_loss = routing.logits.sum()
        ids = routing.expert_idx if routing.mask is None else routing.expert_idx[routing.mask]
        routed = torch.bincount(ids.reshape(-1), minlength=self.num_experts)
        total = int(routed.sum())
        self.stats = MoEStats(routed, routed.double() / max(total, 1), 1.0 - num_kept / total if total else 0.0,
                              load_entropy(routed) if total else 1.0)
        self.exchange = ExchangeStats(self.rank, sent.cpu(), received.cpu(), self.d_model * element_size)

    def extra_repr(self) -> str:
        first, last = self.rank * self.num_local_experts, (self.rank + 1) * self.num_local_experts - 1
        return (f"rank={self.rank}, world_size={self.world_size}, experts {first}..{last} of {self.num_experts}, "
                f"k={self.k}, capacity_factor={self.capacity_factor}")


@torch.no_grad()
def average_gradients(model: nn.Module, group=None) -> None:
    """After backward on every rank: make every gradient that of the mean of the ranks' losses.
    Replicated parameters (everything outside the experts of ExpertParallelMoE layers): all-reduce
    and divide by W. Sharded experts already hold the sum over ranks: divide by W. Collective."""
    _, world = rank_and_world(group)
    sharded = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}
    replicated = [p for p in model.parameters() if id(p) not in sharded and p.requires_grad]
    for p in model.parameters():
        if p.requires_grad and p.grad is None:  # every rank must all-reduce the same tensors
            p.grad = torch.zeros_like(p)
    if replicated:
        flat = torch.cat([p.grad.reshape(-1) for p in replicated])
        run_collective("average gradients", group, dist.all_reduce, flat)
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated]), strict=True):
            p.grad.copy_(g.view_as(p))
    for p in model.parameters():
        if p.requires_grad:
            p.grad /= world
