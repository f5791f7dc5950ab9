"""Small seeded experiments behind the course's routing chapters: expert collapse and its cures
(05), capacity and token dropping (06), a comparison of routers (04).

Each one trains a tiny MoE classifier (`train_classifier`, `evaluate_classifier`) on a synthetic
clustered task for a few seconds on one CPU core and returns plain NumPy data for the plots.
The task (`minimoe.data.make_task`) is a toy "multi-domain corpus": tokens come from K clusters
(domains), each with its own label rule, so experts have something to specialise on, and each
token has an id from a small vocabulary (for hash routing).
"""

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minimoe import _checks
from minimoe.data import ClusterTask, make_task
from minimoe.dispatch import DROP_POLICIES
from minimoe.layer import MoELayer
from minimoe.metrics import mutual_information
from minimoe.routing import ROUTERS, Router, TopKRouter, make_router

__all__ = [
    "BALANCING", "DISTRIBUTIONS", "DROP_POLICIES", "EVAL_SEED", "NUM_EXPERTS", "ROUTER_K", "CapacitySweep",
    "ClusterTask", "CollapseResult", "Evaluation", "MoEClassifier", "RouterComparison", "TrainingTrace",
    "capacity_sweep", "collapse_experiment", "compare_routers", "evaluate_classifier", "make_task",
    "train_classifier",
]

NUM_EXPERTS, D_HIDDEN = 8, 32  # every experiment's MoE layer: E experts of hidden width h
EVAL_SEED = 10**6  # the held-out batch's sample seed; training batches use seed * 1_000_003 + step


class MoEClassifier(nn.Module):
    """x [T, d] -> class logits [T, C]: one residual MoE block, h = x + moe(x), then a linear head.
    With routes_on_ids=True the token ids are passed on to the layer (hash routing)."""

    def __init__(self, moe: MoELayer, num_classes: int, routes_on_ids: bool = False):
        super().__init__()
        if not isinstance(moe, MoELayer):
            raise TypeError(f"moe must be a minimoe.layer.MoELayer, got {type(moe).__name__}")
        self.moe = moe
        self.head = nn.Linear(moe.d_model, _checks.positive_int("num_classes", num_classes))
        self.routes_on_ids = bool(routes_on_ids)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.routes_on_ids and token_ids is None:
            raise ValueError("token_ids must be given: this model's router routes on token ids")
        h = self.moe(x, token_ids=token_ids) if self.routes_on_ids else self.moe(x)
        return self.head(x + h)


def _mean_logsumexp(moe: MoELayer) -> float:
    """Mean over the last call's tokens of logsumexp(logits): z-loss is the mean of its square."""
    return float(torch.logsumexp(moe.last_routing.logits, -1).mean())


@dataclass
class TrainingTrace:
    """One row per training step of `train` (S steps, E experts).

    load           [S, E] int, assignments the router sent to each expert (a row sums to the
                          batch's assignments, T * k for top-k routers)
    load_entropy   [S]    normalised entropy of the load, in [0, 1]
    dead_experts   [S]    int, experts that got no assignment
    logit_rms      [S]    root mean square of the router logits (`MoEStats`, as all but logsumexp)
    logit_max      [S]    largest router logit (what z-loss keeps from blowing up exp())
    logsumexp      [S]    mean over tokens of logsumexp(logits); z-loss is the mean of its square
    loss           [S]    task cross-entropy
    """

    load: np.ndarray
    load_entropy: np.ndarray
    dead_experts: np.ndarray
    logit_rms: np.ndarray
    logit_max: np.ndarray
    logsumexp: np.ndarray
    loss: np.ndarray


def train_classifier(model: MoEClassifier, task: ClusterTask, steps: int = 300, *, batch_size: int = 256,
                     lr: float = 1e-2, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                     seed: int = 0) -> TrainingTrace:
    """Adam on fresh batches from `task`, loss = cross-entropy + aux_loss_coef * aux_loss +
    z_loss_coef * z_loss. A router with an `expert_bias` (aux-loss-free balancing) gets its
    bias update after every step. Returns the per-step `TrainingTrace`."""
    steps = _checks.positive_int("steps", steps)
    batch_size = _checks.positive_int("batch_size", batch_size)
    aux_loss_coef = _checks.non_negative("aux_loss_coef", aux_loss_coef)
    z_loss_coef = _checks.non_negative("z_loss_coef", z_loss_coef)
    moe = model.moe
    optimizer = torch.optim.Adam(model.parameters(), lr=_checks.non_negative("lr", lr))
    rows = []
    model.train()
    for step in range(steps):
        batch = task.sample(batch_size, seed=seed * 1_000_003 + step)
        loss = F.cross_entropy(model(batch["x"], batch["token_ids"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_loss_coef * moe.aux_loss + z_loss_coef * moe.z_loss).backward()
        optimizer.step()
        stats = moe.stats
        if getattr(moe.router, "expert_bias", None) is not None:
            moe.router.update_bias(stats.load)
        rows.append((stats.load.numpy().copy(), stats.load_entropy, stats.dead_experts, stats.logit_rms,
                     stats.logit_max, _mean_logsumexp(moe), loss.item()))
    return TrainingTrace(*(np.array(column) for column in zip(*rows, strict=True)))


@dataclass
class Evaluation:
    """An eval-mode pass of a `MoEClassifier` over one batch of T tokens (E experts, K clusters).

    loss, accuracy     task cross-entropy and accuracy
    load               [E] int, assignments the router sent to each expert, before capacity
    load_entropy       normalised entropy of `load`; dead_experts: experts with load 0
    max_violation, cv  MaxVio and coefficient of variation of `load`
    dropped_fraction   share of assignments dropped by capacity
    experts_per_token  [T] int, experts that processed each token (after capacity)
    kept_weight        mean combine weight of the assignments that were kept
    cluster_expert     [K, E] int, kept assignments per (cluster, expert)
    logit_rms, logit_max, logsumexp   router logit statistics, as in `TrainingTrace`
    cluster_accuracy   [K] accuracy on the tokens of each cluster (NaN for a cluster absent
                       from the batch)
    """

    loss: float
    accuracy: float
    load: np.ndarray
    load_entropy: float
    dead_experts: int
    max_violation: float
    cv: float
    dropped_fraction: float
    experts_per_token: np.ndarray
    kept_weight: float
    cluster_expert: np.ndarray
    logit_rms: float
    logit_max: float
    logsumexp: float
    cluster_accuracy: np.ndarray


@torch.no_grad()
def evaluate_classifier(model: MoEClassifier, task: ClusterTask, num_tokens: int = 4096,
                        cluster_probs=None) -> Evaluation:
    """Evaluate `model` in eval mode on num_tokens held-out tokens of `task` (sample seed EVAL_SEED,
    which no training step uses), with the cluster mix cluster_probs (default: uniform)."""
    batch = task.sample(num_tokens, seed=EVAL_SEED, cluster_probs=cluster_probs)
    moe = model.moe
    model.eval()
    logits = model(batch["x"], batch["token_ids"])
    routing, kept, stats = moe.last_routing, moe.last_plan.kept, moe.stats
    clusters = batch["clusters"][:, None].expand_as(kept)[kept]
    cluster_expert = torch.bincount(clusters * moe.num_experts + routing.expert_idx[kept],
                                    minlength=task.num_clusters * moe.num_experts)
    correct = (logits.argmax(-1) == batch["labels"]).double()
    per_cluster = torch.bincount(batch["clusters"], minlength=task.num_clusters).double()
    cluster_accuracy = torch.bincount(batch["clusters"], correct, minlength=task.num_clusters) / per_cluster
    return Evaluation(float(F.cross_entropy(logits, batch["labels"])),
                      float((logits.argmax(-1) == batch["labels"]).float().mean()),
                      stats.load.numpy().copy(), stats.load_entropy, stats.dead_experts, stats.max_violation,
                      stats.cv, stats.dropped_fraction,
                      kept.sum(-1).numpy(), float(routing.weights[kept].mean()),
                      cluster_expert.view(-1, moe.num_experts).numpy(), stats.logit_rms, stats.logit_max,
                      _mean_logsumexp(moe), cluster_accuracy.numpy())


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG (model init, router noise) and use one thread, restoring both."""
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def _model(task: ClusterTask, router: Router | None = None, routes_on_ids: bool = False) -> MoEClassifier:
    """The MoE classifier of every experiment: E = NUM_EXPERTS experts of width D_HIDDEN, with
    `router` (default top-2)."""
    return MoEClassifier(MoELayer(task.d_model, D_HIDDEN, NUM_EXPERTS, router=router),
                         task.num_classes, routes_on_ids)


# ---------------------------------------------------------------------------------------------
# 1. expert collapse, and what each balancing method does about it (chapter 05)
# ---------------------------------------------------------------------------------------------

BALANCING = ("none", "aux_loss", "aux_free_bias", "z_loss")


@dataclass
class CollapseResult:
    """trace: per training step; final: on a held-out batch of 4096 tokens."""

    balancing: str
    trace: TrainingTrace
    final: Evaluation


def collapse_experiment(balancing: str = "none", steps: int = 300, seed: int = 0, *,
                        aux_loss_coef: float = 0.1, z_loss_coef: float = 1e-3,
                        bias_update_rate: float = 0.01, lr: float = 1e-2,
                        batch_size: int = 256, k: int = 1, score: str = "softmax",
                        normalize: bool = False, routed_scaling_factor: float = 1.0,
                        noise_std: float = 0.0) -> CollapseResult:
    """Train an MoE (E=8; by default top-1, Switch-style: weight = the chosen softmax probability)
    on `make_task()` with one balancing method (seed sets the initialisation and the batches).
    k, score, normalize, routed_scaling_factor and noise_std (training-mode logit noise) go to
    the `TopKRouter`; DeepSeek-V3's setting, scaled down from 8 of 256 experts, is k=2,
    score="sigmoid", normalize=True (the chosen scores renormalised), routed_scaling_factor=2.5.
    Balancing:
      "none"           cross-entropy only;
      "aux_loss"       + aux_loss_coef * Switch load-balancing loss;
      "aux_free_bias"  DeepSeek-V3 bias (rate bias_update_rate), updated once per step;
      "z_loss"         + z_loss_coef * router z-loss, and nothing else.

    Why "none" collapses: the task's inputs share a common direction (`make_task`'s shift), so
    the bias-free linear router acts as if it had a per-expert bias, and at initialisation it
    already favours a few experts. Then the rich get richer: an expert trains only on the tokens
    it receives, so the favoured ones become useful first; the gradient through the combine
    weight then raises their logit on those tokens, and through the shared direction on all
    tokens, so they receive still more. Experts that receive nothing never improve, and while
    the chosen experts help, the softmax pushes every other logit down: they die. The aux loss and the bias counteract
    this. The aux loss needs aux_loss_coef=0.1 here, not Switch's 0.01: at 0.01 this tiny top-1
    model with a strong shared direction still ends with a dead expert.
    z-loss only pulls logsumexp(logits) towards 0: the largest logit and logsumexp shrink, so
    exp() stays in range, but it says nothing about which expert wins, so the experts collapse
    as without it. The logits' RMS even grows: softmax ignores a common offset, and the router
    lowers every logit together along the shared direction.
    """
    _checks.choice("balancing", balancing, BALANCING)
    task = make_task()
    with _seeded(seed):
        rate = bias_update_rate if balancing == "aux_free_bias" else 0.0
        router = TopKRouter(task.d_model, NUM_EXPERTS, k=k, score=score, normalize=normalize,
                            bias_update_rate=rate, routed_scaling_factor=routed_scaling_factor, noise_std=noise_std)
        model = _model(task, router)
        trace = train_classifier(model, task, steps, batch_size=batch_size, lr=lr, seed=seed,
                                 aux_loss_coef=aux_loss_coef if balancing == "aux_loss" else 0.0,
                                 z_loss_coef=z_loss_coef if balancing == "z_loss" else 0.0)
        final = evaluate_classifier(model, task)
    return CollapseResult(balancing, trace, final)


# ---------------------------------------------------------------------------------------------
# 2. capacity factor and drop policy (chapter 06)
# ---------------------------------------------------------------------------------------------

DISTRIBUTIONS = ("balanced", "skewed")


@dataclass
class CapacitySweep:
    """One trained top-2 model evaluated at every capacity factor, policy and input distribution.
    Axes: R = DISTRIBUTIONS ("balanced", "skewed"), P = DROP_POLICIES ("position", "score"),
    F = capacity_factors.

    dropped_fraction   [R, P, F] share of assignments dropped (the same for both policies: each
                       expert keeps min(load, capacity); the policy only picks which)
    loss, accuracy     [R, P, F] task quality
    kept_weight        [R, P, F] mean combine weight of the kept assignments
    tokens_dropped     [R, P, F] share of tokens that lost all their experts
    dropless_loss, dropless_accuracy  [R] the same model without capacity
    dropless_cluster_accuracy  [R, K] its accuracy on each cluster's tokens
    cluster_probs      [R, K] each distribution's cluster mix (rows sum to 1)
    load               [R, E] dropless assignments per expert
    """

    capacity_factors: np.ndarray
    dropped_fraction: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    kept_weight: np.ndarray
    tokens_dropped: np.ndarray
    dropless_loss: np.ndarray
    dropless_accuracy: np.ndarray
    dropless_cluster_accuracy: np.ndarray
    cluster_probs: np.ndarray
    load: np.ndarray


def capacity_sweep(capacity_factors=(0.5, 0.75, 1.0, 1.25, 1.5, 2.0), steps: int = 300, seed: int = 0, *,
                   skew: float = 0.6, aux_loss_coef: float = 0.1, lr: float = 1e-2,
                   batch_size: int = 256) -> CapacitySweep:
    """Train a top-2 MoE (E=8) once, dropless with the aux loss, on `make_task()`; then evaluate
    it on 4096 held-out tokens with capacity ceil(2 * T * factor / 8) per expert.

    "balanced": clusters as often as in training, so the load is close to even.
    "skewed":   cluster j drawn with probability proportional to skew**j (a shift in the input
                mix, as when one domain dominates a batch); the experts that specialised on the
                frequent clusters overflow.
    """
    factors = np.array([_checks.non_negative("capacity_factors", f) for f in capacity_factors])
    if factors.size == 0 or (factors <= 0).any():
        raise ValueError(f"capacity_factors must be a non-empty sequence of numbers > 0, got {capacity_factors}")
    if not 0 < _checks.non_negative("skew", skew) <= 1:
        raise ValueError(f"skew must be in (0, 1], got {skew}")
    task = make_task()
    cluster_probs = {"balanced": None, "skewed": skew ** np.arange(task.num_clusters)}
    with _seeded(seed):
        model = _model(task)
        train_classifier(model, task, steps, batch_size=batch_size, lr=lr, aux_loss_coef=aux_loss_coef, seed=seed)
        dropless = [evaluate_classifier(model, task, cluster_probs=cluster_probs[r]) for r in DISTRIBUTIONS]
        runs = []
        for distribution in DISTRIBUTIONS:
            for policy in DROP_POLICIES:
                model.moe.drop_policy = policy
                for factor in factors:
                    model.moe.capacity_factor = float(factor)
                    runs.append(evaluate_classifier(model, task, cluster_probs=cluster_probs[distribution]))
    mixes = [np.ones(task.num_clusters) if cluster_probs[r] is None else cluster_probs[r] for r in DISTRIBUTIONS]
    shape = (len(DISTRIBUTIONS), len(DROP_POLICIES), len(factors))
    table = {name: np.array([getattr(run, name) for run in runs]).reshape(shape)
             for name in ("dropped_fraction", "loss", "accuracy", "kept_weight")}
    tokens_dropped = np.array([(run.experts_per_token == 0).mean() for run in runs]).reshape(shape)
    return CapacitySweep(factors, tokens_dropped=tokens_dropped, **table,
                         dropless_loss=np.array([run.loss for run in dropless]),
                         dropless_accuracy=np.array([run.accuracy for run in dropless]),
                         dropless_cluster_accuracy=np.stack([run.cluster_accuracy for run in dropless]),
                         cluster_probs=np.stack([mix / mix.sum() for mix in mixes]),
                         load=np.stack([run.load for run in dropless]))


# ---------------------------------------------------------------------------------------------
# 3. a zoo of routers on the same task and budget (chapter 04)
# ---------------------------------------------------------------------------------------------

ROUTER_K = {"topk": 2, "noisy_topk": 2, "switch": 1, "expert_choice": None, "sigmoid_bias": 2, "hash": 1, "gshard": 2}
"""k of each router of minimoe.routing.ROUTERS: two experts per token for the top-k routers
(GShard's second only sometimes, in training), one for Switch and hashing; expert choice has
none (on average capacity_factor)."""
ZOO = ("topk", "noisy_topk", "switch", "expert_choice", "sigmoid_bias", "hash")
"""compare_routers' default: chapter 04's six routers (GShard is run on its own there)."""


@dataclass
class RouterComparison:
    """Per router r in `routers` (R of them), on a held-out batch of 4096 tokens.

    load                       [R, E] assignments per expert
    load_entropy               [R] normalised entropy of the load (1 = even)
    max_violation              [R] (max load - mean load) / mean load (0 = even)
    cv                         [R] coefficient of variation, std / mean of the load
    coverage                   [R, 3] share of tokens processed by 0, 1, and more than 1 experts
    experts_per_token          [R] mean experts per token (the active compute)
    mutual_information         [R] bits the expert tells about the token's cluster
    loss, accuracy             [R] task quality
    """

    routers: tuple
    load: np.ndarray
    load_entropy: np.ndarray
    max_violation: np.ndarray
    cv: np.ndarray
    coverage: np.ndarray
    experts_per_token: np.ndarray
    mutual_information: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray


def compare_routers(routers=ZOO, steps: int = 300, seed: int = 0, *, aux_loss_coef: float = 0.1,
                    bias_update_rate: float = 0.01, expert_choice_capacity: float = 1.0, lr: float = 1e-2,
                    batch_size: int = 256) -> RouterComparison:
    """Train one MoE (E=8, dropless) per router on `make_task()` with the same batches, steps and
    optimiser, and measure load balance, coverage and quality on the same held-out batch.
    Each router is `minimoe.routing.make_router(name)` with the k of ROUTER_K; the default is
    ZOO. topk, noisy_topk, switch and gshard train with aux_loss_coef * the Switch aux loss
    (default 0.1, ten times Switch's alpha of 0.01): one loss for all, for comparability
    (Shazeer et al. 2017 trained with their importance and load losses instead). Expert choice
    and hash routing are balanced by construction, sigmoid_bias by its bias.
    """
    if isinstance(routers, str):
        raise TypeError(f"routers must be a sequence of names from {ROUTERS}, got the string {routers!r}")
    routers = tuple(_checks.choice("routers", name, ROUTERS) for name in routers)
    if not routers:
        raise ValueError("routers must name at least one router, got none")
    task = make_task()
    results = []
    for name in routers:
        with _seeded(seed):
            router = make_router(name, task.d_model, NUM_EXPERTS, ROUTER_K[name], bias_update_rate=bias_update_rate,
                                 capacity_factor=expert_choice_capacity, vocab_size=task.vocab_size, seed=seed)
            model = _model(task, router, routes_on_ids=name == "hash")
            uses_aux = name in ("topk", "noisy_topk", "switch", "gshard")
            train_classifier(model, task, steps, batch_size=batch_size, lr=lr, seed=seed,
                             aux_loss_coef=aux_loss_coef if uses_aux else 0.0)
            results.append(evaluate_classifier(model, task))
    counts = np.stack([run.experts_per_token for run in results])
    return RouterComparison(
        routers, np.stack([run.load for run in results]),
        np.array([run.load_entropy for run in results]),
        np.array([run.max_violation for run in results]),
        np.array([run.cv for run in results]),
        np.stack([(counts == 0).mean(1), (counts == 1).mean(1), (counts > 1).mean(1)], axis=1),
        counts.mean(1), np.array([mutual_information(run.cluster_expert) for run in results]),
        np.array([run.loss for run in results]), np.array([run.accuracy for run in results]))
