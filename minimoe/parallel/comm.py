"""The one place for torch.distributed in minimoe: joining a process group, and every collective
(all-to-all, all-gather, all-reduce), each with a named phase and a clear error.

A collective that fails (a backend timeout because a peer stopped or called something else, a
peer that crashed) is re-raised as `ExpertParallelError` naming this rank and the phase, so a
stuck job says where it stopped instead of hanging or dying with a bare backend message. The
timeout itself is the process group's: `init_process_group(..., timeout=timedelta(seconds=60))`.
With gloo a collective blocks, so its timeout raises right here. NCCL collectives return before
they finish: a stuck one is caught by NCCL's watchdog, which by default aborts the process and
logs the collective (TORCH_NCCL_ASYNC_ERROR_HANDLING), so the phase name is not in that message.
"""

import hashlib
import os
import sys
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist


class ExpertParallelError(RuntimeError):
    """A collective of an expert-parallel layer failed on this rank (message: rank and phase)."""


def rank_and_world(group=None) -> tuple[int, int]:
    """(this process's rank in group, the group's size); clear errors when there is no group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs an initialised process group: call "
                           "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets "
                           "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for it)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group must contain this process: dist.get_rank(group) returned -1")
    return rank, dist.get_world_size(group)


def init_process_group(backend: str, timeout: float) -> torch.device:
    """Join the process group torchrun describes (or a one-process group without torchrun), for
    the command lines; -> this rank's device. gloo: CPU, one thread per rank; nccl: GPU LOCAL_RANK."""
    if backend == "nccl":
        if not torch.cuda.is_available():
            sys.exit("--backend nccl needs CUDA GPUs; use --backend gloo on CPU")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # ranks share the machine's cores
    if "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    else:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout))
    return device


def collective_device(group) -> torch.device:
    """Where the group's collectives take their tensors: this rank's GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_collective(phase: str, group, collective, *args) -> None:
    """collective(*args, group=group), with a failure re-raised naming this rank and `phase`."""
    try:
        collective(*args, group=group)
    except RuntimeError as error:  # gloo and NCCL timeouts, lost peers (DistError is a RuntimeError)
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise ExpertParallelError(
            f"rank {rank} of {world}: collective '{phase}' failed ({type(error).__name__}: {error}). Another "
            "rank may have crashed, stopped calling the layer, or called it a different number of times") from error


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, phase: str) -> torch.Tensor:
    """All-to-all of rows: x [sum(in_splits), ...] -> [sum(out_splits), ...]. The in_splits[j]
    rows of block j go to rank j; block i of the result came from rank i. No autograd."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    run_collective(phase, group, dist.all_to_all_single, out, x.contiguous(), out_splits, in_splits)
    return out


class _AllToAll(torch.autograd.Function):
    """exchange() whose backward sends the gradient rows back where they came from: the same
    all-to-all with the splits swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, phase):
        ctx.splits, ctx.group, ctx.phase = (out_splits, in_splits), group, phase
        return exchange(x, out_splits, in_splits, group, phase)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return exchange(grad, in_splits, out_splits, ctx.group, f"{ctx.phase} (backward)"), None, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group, phase: str) -> torch.Tensor:
    """exchange() with autograd: x [sum(in_splits), d] -> [sum(out_splits), d]."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group, phase)


def all_gather(x: torch.Tensor, group, phase: str) -> list[torch.Tensor]:
    """x on every rank of group -> [x of rank 0, x of rank 1, ...] (same shape everywhere)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    run_collective(phase, group, dist.all_gather, parts, x.contiguous())
    return parts


def all_reduce(x: torch.Tensor, group, phase: str) -> torch.Tensor:
    """The sum of x over the ranks of group, in place; returns x."""
    run_collective(phase, group, dist.all_reduce, x)
    return x


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little", signed=True)


def check_same_on_all_ranks(config: str, tensors: list[torch.Tensor], device, group) -> None:
    """Raise ValueError on every rank unless all ranks have the same `config` string and the
    same `tensors` (bit for bit): one all_gather of two 64-bit hashes."""
    weights = b"".join(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors)
    mine = torch.tensor([_digest(config.encode()), _digest(weights)], dtype=torch.int64, device=device)
    rank, world = rank_and_world(group)
    gathered = all_gather(mine, group, "config check")
    for column, what in ((0, "configs"), (1, "replicated weights (everything but the experts)")):
        differ = [r for r, g in enumerate(gathered) if int(g[column]) != int(mine[column])]
        if differ:
            raise ValueError(f"rank {rank} of {world}: ranks were built with different {what}; ranks {differ} "
                             f"differ from this rank, whose config is: {config}. Build the model with the same "
                             "arguments and the same torch seed on every rank")
