"""Lesson 05's collapse from scratch (`course/05_load_balancing.ipynb`, section 1), as task 5.3's
check trains it: one top-1 MoE block (8 ReLU experts, a bias-free softmax router whose weight is
the chosen probability, Switch-style) with a residual and a linear head, on
`minimoe.experiments.make_task()`, 200 Adam steps of 256 fresh tokens on the cross-entropy plus
an extra loss of the router's logits and choices."""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from minimoe.experiments import make_task
from minimoe.metrics import load_entropy

NUM_EXPERTS, HIDDEN, STEPS, BATCH, LR = 8, 32, 200, 256, 1e-2
HELD_OUT_TOKENS, HELD_OUT_SEED = 4096, 10**6


def init_params(seed: int, task) -> dict[str, torch.Tensor]:
    """The lesson's init_params: router [d, E], w_in [E, d, h], w_out [E, h, d], head [d, C]."""
    g = torch.Generator().manual_seed(seed)
    d, num_classes = task.d_model, task.num_classes
    params = dict(router=torch.randn(d, NUM_EXPERTS, generator=g) * d**-0.5,
                  w_in=torch.randn(NUM_EXPERTS, d, HIDDEN, generator=g) * d**-0.5,
                  w_out=torch.randn(NUM_EXPERTS, HIDDEN, d, generator=g) * HIDDEN**-0.5,
                  head=torch.randn(d, num_classes, generator=g) * d**-0.5)
    return {name: p.requires_grad_() for name, p in params.items()}


def forward(params: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, d] -> class logits [T, C], router logits [T, E], chosen expert [T] (int64)."""
    router_logits = x @ params["router"]
    weight, expert = router_logits.softmax(-1).max(-1)
    hidden = torch.relu(torch.einsum("td,tdh->th", x, params["w_in"][expert]))
    y = torch.einsum("th,thd->td", hidden, params["w_out"][expert])
    return (x + weight[:, None] * y) @ params["head"], router_logits, expert


def train(seed: int, extra_loss: Callable | None) -> dict[str, float]:
    """Train from init seed `seed` on cross-entropy + extra_loss(router_logits [T, E], expert [T])
    (None: cross-entropy alone); -> {"load entropy", "accuracy"} on 4096 held-out tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; one thread also keeps the sums' order fixed
    try:
        return _train(seed, extra_loss)
    finally:
        torch.set_num_threads(threads)


def _train(seed: int, extra_loss: Callable | None) -> dict[str, float]:
    task = make_task()
    params = init_params(seed, task)
    optimizer = torch.optim.Adam(params.values(), lr=LR)
    for step in range(STEPS):
        batch = task.sample(BATCH, seed=step)
        class_logits, router_logits, expert = forward(params, batch["x"])
        loss = F.cross_entropy(class_logits, batch["labels"])
        if extra_loss is not None:
            loss = loss + extra_loss(router_logits, expert)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        held_out = task.sample(HELD_OUT_TOKENS, seed=HELD_OUT_SEED)
        class_logits, _, expert = forward(params, held_out["x"])
        accuracy = (class_logits.argmax(-1) == held_out["labels"]).double().mean().item()
        entropy = load_entropy(torch.bincount(expert, minlength=NUM_EXPERTS))
    return {"load entropy": float(entropy), "accuracy": accuracy}


@functools.cache
def collapsed(seed: int) -> dict[str, float]:
    """train(seed, None), computed once per process: the collapse to cure."""
    return train(seed, None)
