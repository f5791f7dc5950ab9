"""Data + expert parallel training: gradients, clipping and checkpoints of a model that
`parallelize` made expert-parallel, and `Parallel`, the process group as `minimoe.train` sees it.

The replicated parameters (everything but the sharded experts, see `sharded_parameters`) are
data parallel: each rank's backward gives them the gradient of its own loss, and the sharded
experts the gradient of the sum of all ranks' losses; `average_gradients` turns both into the
gradient of the mean loss. Checkpoints are single-process: `full_state_dict` and
`gather_optimizer_state` gather the expert shards, `shard_optimizer_state` cuts them again.
"""

import torch
from torch import nn

from minimoe import _checks
from minimoe.parallel.comm import all_gather, all_reduce, rank_and_world
from minimoe.parallel.experts import ExpertParallelExperts, parallelize, sharded_parameters


def _sharded_ids(model: nn.Module) -> set[int]:
    names = sharded_parameters(model)
    return {id(p) for name, p in model.named_parameters() if name in names}


@torch.no_grad()
def average_gradients(model: nn.Module, group=None) -> None:
    """After backward on every rank: make every gradient that of the mean of the ranks' losses.
    Replicated parameters: all-reduce and divide by W. Sharded experts already hold the sum
    over ranks: divide by W. Collective."""
    _, world = rank_and_world(group)
    sharded = _sharded_ids(model)
    replicated = [p for p in model.parameters() if id(p) not in sharded and p.requires_grad]
    for p in model.parameters():
        if p.requires_grad and p.grad is None:  # every rank must all-reduce the same tensors
            p.grad = torch.zeros_like(p)
    if replicated:
        flat = all_reduce(torch.cat([p.grad.reshape(-1) for p in replicated]), group, "average gradients")
        for p, g in zip(replicated, flat.split([p.numel() for p in replicated]), strict=True):
            p.grad.copy_(g.view_as(p))
    for p in model.parameters():
        if p.requires_grad:
            p.grad /= world


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, group=None) -> float:
    """torch.nn.utils.clip_grad_norm_ over the whole expert-parallel model: the squared norms of
    the expert shards are summed over the ranks first (collective). -> the total norm."""
    _checks.non_negative("max_norm", max_norm)
    sharded = _sharded_ids(model)
    squares = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        if p.grad is not None:
            squares[int(id(p) in sharded)] += p.grad.detach().double().square().sum()
    norm = float((squares[0] + all_reduce(squares[1:].clone(), group, "clip gradients")[0]).sqrt())
    coef = min(max_norm / (norm + 1e-6), 1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm


def _gather(shard: torch.Tensor, experts: ExpertParallelExperts) -> torch.Tensor:
    """[E / W, ...] on every rank -> [E, ...] in rank order (collective)."""
    return torch.cat(all_gather(shard, experts.group, "gather expert shards"))


def _shard(full: torch.Tensor, experts: ExpertParallelExperts) -> torch.Tensor:
    """[E, ...] -> this rank's [E / W, ...]."""
    first = experts.rank * experts.num_local_experts
    return full[first:first + experts.num_local_experts]


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict:
    """The state dict of the equivalent single-process model, on the CPU: expert shards are
    gathered from every rank (collective: call it on every rank)."""
    state = model.state_dict()
    for name, experts in sharded_parameters(model).items():
        state[name] = _gather(state[name], experts)
    return {name: tensor.cpu() for name, tensor in state.items()}


def _move_moments(model: nn.Module, state: dict, names: list[str], move) -> dict:
    """state: an optimizer state dict whose parameter i is model's parameter names[i] (parallelize
    keeps the names and order of the single-process model); every moment of a sharded
    parameter goes through move(tensor, experts)."""
    sharded = sharded_parameters(model)
    moved = {i: {key: move(value, sharded[names[i]]) if names[i] in sharded and value.dim() else value
                 for key, value in moments.items()}
             for i, moments in state["state"].items()}
    return {"state": moved, "param_groups": state["param_groups"]}


def gather_optimizer_state(model: nn.Module, state: dict, names: list[str]) -> dict:
    """This rank's optimizer state -> the single-process model's (expert moments gathered;
    collective). names[i]: the name of the optimizer's parameter i."""
    return _move_moments(model, state, names, _gather)


def shard_optimizer_state(model: nn.Module, state: dict, names: list[str]) -> dict:
    """A single-process optimizer state -> this rank's (expert moments cut to its shard)."""
    return _move_moments(model, state, names, _shard)


class Parallel:
    """Data + expert parallelism over a process group (None: the default one), as `Trainer` and
    `evaluate` of minimoe.train use it: the interface of `minimoe.train.SingleProcess`, with
    collectives. Every rank builds the same model (same seed) and the same Trainer:

        trainer = Trainer(MoETransformer(config), corpus, train_config, parallel=Parallel())
    """

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world_size = rank_and_world(group)

    def parallelize(self, model: nn.Module) -> nn.Module:
        return parallelize(model, self.group)

    def all_gather(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        """x [...] on every rank -> [W, ...] in rank order."""
        return torch.stack(all_gather(x, self.group, phase))

    def all_reduce(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        """The sum of x over the ranks (a new tensor)."""
        return all_reduce(x.clone(), self.group, phase)

    def average_gradients(self, model: nn.Module) -> None:
        average_gradients(model, self.group)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        return clip_grad_norm(model, max_norm, self.group)

    def full_state_dict(self, model: nn.Module) -> dict:
        return full_state_dict(model)

    def gather_optimizer_state(self, model: nn.Module, state: dict, names: list[str]) -> dict:
        return gather_optimizer_state(model, state, names)

    def shard_optimizer_state(self, model: nn.Module, state: dict, names: list[str]) -> dict:
        return shard_optimizer_state(model, state, names)
