"""Small seeded experiments behind the course's routing chapters: expert collapse and its cures
(05), capacity and token dropping (06), a comparison of routers (04).

Each one trains a tiny MoE classifier on a synthetic clustered task for a few seconds on one CPU
core and returns plain NumPy data for the plots. The task (`make_task`) is a toy "multi-domain
corpus": tokens come from K clusters (domains), each with its own label rule, so experts have
something to specialise on, and each token has an id from a small vocabulary (for hash routing).
"""

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minimoe import _checks
from minimoe.dispatch import expert_capacity, make_plan
from minimoe.layer import MoELayer
from minimoe.metrics import coefficient_of_variation, max_violation, mutual_information
from minimoe.routing import ExpertChoiceRouter, HashRouter, NoisyTopKRouter, SwitchRouter, TopKRouter

NUM_EXPERTS, D_HIDDEN = 8, 32  # every experiment's MoE layer: E experts of hidden width h
EVAL_SEED = 10**6  # the held-out batch's sample seed; training batches use seed * 1_000_003 + step


@dataclass
class ClusterTask:
    """Tokens from K clusters in d dims with C classes.

    Token id v (vocabulary of V = K * M ids) belongs to cluster v % K and sits at
    centres[v % K] + offsets[v]; a token is x = that point + N(0, I) noise. Its label is cluster
    k's own linear rule, argmax_c ((x - centres[k]) @ rules[k])_c, so no single linear map solves
    the task but one small expert per cluster can. All centres share a common `shift`: real hidden
    states are not centred either, and a bias-free router sees the shift as a per-expert bias.

    centres [K, d], offsets [V, d], rules [K, d, C]
    """

    centres: torch.Tensor
    offsets: torch.Tensor
    rules: torch.Tensor

    @property
    def num_clusters(self) -> int:
        return self.centres.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.offsets.shape[0]

    @property
    def d_model(self) -> int:
        return self.centres.shape[1]

    @property
    def num_classes(self) -> int:
        return self.rules.shape[2]

    def sample(self, num_tokens: int, seed: int = 0, cluster_probs=None) -> dict:
        """num_tokens tokens -> dict of x [T, d], token_ids [T], clusters [T], labels [T].
        cluster_probs [K] skews the mix of clusters (default: uniform)."""
        num_tokens = _checks.positive_int("num_tokens", num_tokens)
        gen = torch.Generator().manual_seed(seed)
        K = self.num_clusters
        probs = torch.full((K,), 1.0 / K) if cluster_probs is None else _probabilities(cluster_probs, K)
        clusters = torch.multinomial(probs, num_tokens, replacement=True, generator=gen)
        token_ids = clusters + K * torch.randint(self.vocab_size // K, (num_tokens,), generator=gen)
        local = self.offsets[token_ids] + torch.randn(num_tokens, self.d_model, generator=gen)
        labels = torch.einsum("td,tdc->tc", local, self.rules[clusters]).argmax(-1)
        return dict(x=self.centres[clusters] + local, token_ids=token_ids, clusters=clusters, labels=labels)


def _probabilities(p, size: int) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float32)
    if p.shape != (size,) or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"cluster_probs must be {size} non-negative numbers with a positive sum, got {p.tolist()}")
    return p / p.sum()


def make_task(d_model: int = 16, num_clusters: int = 8, num_classes: int = 4, ids_per_cluster: int = 8,
              spread: float = 1.0, shift: float = 6.0, seed: int = 0) -> ClusterTask:
    """A `ClusterTask`: centres ~ N(0, spread^2 I) + a common shift of norm `shift`,
    offsets ~ N(0, 0.5^2 I), rules ~ N(0, 1)."""
    for name, value in (("d_model", d_model), ("num_clusters", num_clusters), ("num_classes", num_classes),
                        ("ids_per_cluster", ids_per_cluster)):
        _checks.positive_int(name, value)
    _checks.non_negative("spread", spread)
    _checks.non_negative("shift", shift)
    gen = torch.Generator().manual_seed(seed)
    direction = F.normalize(torch.randn(d_model, generator=gen), dim=0)
    centres = spread * torch.randn(num_clusters, d_model, generator=gen) + shift * direction
    offsets = 0.5 * torch.randn(num_clusters * ids_per_cluster, d_model, generator=gen)
    rules = torch.randn(num_clusters, d_model, num_classes, generator=gen)
    return ClusterTask(centres, offsets, rules)


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


@contextlib.contextmanager
def _last_routing(router: nn.Module):
    """Yield a dict whose "routing" is the `Routing` of the router's latest call."""
    seen = {}
    hook = router.register_forward_hook(lambda module, args, routing: seen.update(routing=routing))
    try:
        yield seen
    finally:
        hook.remove()


def _logit_stats(logits: torch.Tensor) -> tuple[float, float, float]:
    """logits [T, E] -> (root mean square, largest value, mean logsumexp). z-loss = mean lse^2."""
    logits = logits.detach()
    return (float(logits.square().mean().sqrt()), float(logits.max()),
            float(torch.logsumexp(logits, -1).mean()))


@dataclass
class TrainingTrace:
    """One row per training step of `train` (S steps, E experts).

    load           [S, E] int, assignments the router sent to each expert (a row sums to the
                          batch's assignments, T * k for top-k routers)
    load_entropy   [S]    normalised entropy of the load, in [0, 1]
    dead_experts   [S]    int, experts that got no assignment
    logit_rms      [S]    root mean square of the router logits
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


def train(model: MoEClassifier, task: ClusterTask, steps: int = 300, *, batch_size: int = 256,
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
    with _last_routing(moe.router) as seen:
        for step in range(steps):
            batch = task.sample(batch_size, seed=seed * 1_000_003 + step)
            loss = F.cross_entropy(model(batch["x"], batch["token_ids"]), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            (loss + aux_loss_coef * moe.aux_loss + z_loss_coef * moe.z_loss).backward()
            optimizer.step()
            if getattr(moe.router, "expert_bias", None) is not None:
                moe.router.update_bias(moe.stats.tokens_per_expert)
            load = moe.stats.tokens_per_expert.numpy().copy()
            rows.append((load, moe.stats.load_entropy, int((load == 0).sum()),
                         *_logit_stats(seen["routing"].logits), loss.item()))
    return TrainingTrace(*(np.array(column) for column in zip(*rows, strict=True)))


@dataclass
class Evaluation:
    """An eval-mode pass of a `MoEClassifier` over one batch of T tokens (E experts, K clusters).

    loss, accuracy     task cross-entropy and accuracy
    load               [E] int, assignments the router sent to each expert, before capacity
    load_entropy       normalised entropy of `load`; dead_experts: experts with load 0
    dropped_fraction   share of assignments dropped by capacity
    experts_per_token  [T] int, experts that processed each token (after capacity)
    kept_weight        mean combine weight of the assignments that were kept
    cluster_expert     [K, E] int, kept assignments per (cluster, expert)
    logit_rms, logit_max, logsumexp   router logit statistics, as in `TrainingTrace`
    """

    loss: float
    accuracy: float
    load: np.ndarray
    load_entropy: float
    dead_experts: int
    dropped_fraction: float
    experts_per_token: np.ndarray
    kept_weight: float
    cluster_expert: np.ndarray
    logit_rms: float
    logit_max: float
    logsumexp: float


@torch.no_grad()
def evaluate(model: MoEClassifier, task: ClusterTask, num_tokens: int = 4096, cluster_probs=None) -> Evaluation:
    """Evaluate `model` in eval mode on num_tokens held-out tokens of `task` (sample seed EVAL_SEED,
    which no training step uses), with the cluster mix cluster_probs (default: uniform)."""
    batch = task.sample(num_tokens, seed=EVAL_SEED, cluster_probs=cluster_probs)
    moe = model.moe
    model.eval()
    with _last_routing(moe.router) as seen:
        logits = model(batch["x"], batch["token_ids"])
    routing, stats = seen["routing"], moe.stats
    capacity = None
    if moe.capacity_factor is not None:
        capacity = expert_capacity(len(logits), moe.num_experts, moe.k, moe.capacity_factor)
    kept = make_plan(routing.expert_idx, moe.num_experts, capacity, moe.drop_policy,
                     routing.weights, routing.mask).kept
    clusters = batch["clusters"][:, None].expand_as(kept)[kept]
    cluster_expert = torch.bincount(clusters * moe.num_experts + routing.expert_idx[kept],
                                    minlength=task.num_clusters * moe.num_experts)
    load = stats.tokens_per_expert.numpy().copy()
    return Evaluation(float(F.cross_entropy(logits, batch["labels"])),
                      float((logits.argmax(-1) == batch["labels"]).float().mean()),
                      load, stats.load_entropy, int((load == 0).sum()), stats.dropped_fraction,
                      kept.sum(-1).numpy(), float(routing.weights[kept].mean()),
                      cluster_expert.view(-1, moe.num_experts).numpy(), *_logit_stats(routing.logits))


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


def _model(task: ClusterTask, k: int, router: nn.Module | None = None, routes_on_ids: bool = False):
    return MoEClassifier(MoELayer(task.d_model, D_HIDDEN, NUM_EXPERTS, k, router=router),
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
                        batch_size: int = 256) -> CollapseResult:
    """Train a top-1 MoE (E=8, Switch-style: weight = the chosen softmax probability) on
    `make_task()` with one balancing method (seed sets the initialisation and the batches):
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
        router = TopKRouter(task.d_model, NUM_EXPERTS, k=1, normalize=False, bias_update_rate=rate)
        model = _model(task, 1, router)
        trace = train(model, task, steps, batch_size=batch_size, lr=lr, seed=seed,
                      aux_loss_coef=aux_loss_coef if balancing == "aux_loss" else 0.0,
                      z_loss_coef=z_loss_coef if balancing == "z_loss" else 0.0)
        final = evaluate(model, task)
    return CollapseResult(balancing, trace, final)


# ---------------------------------------------------------------------------------------------
# 2. capacity factor and drop policy (chapter 06)
# ---------------------------------------------------------------------------------------------

DISTRIBUTIONS, POLICIES = ("balanced", "skewed"), ("position", "score")


@dataclass
class CapacitySweep:
    """One trained top-2 model evaluated at every capacity factor, policy and input distribution.
    Axes: R = DISTRIBUTIONS ("balanced", "skewed"), P = POLICIES ("position", "score"),
    F = capacity_factors.

    dropped_fraction   [R, P, F] share of assignments dropped (the same for both policies: each
                       expert keeps min(load, capacity); the policy only picks which)
    loss, accuracy     [R, P, F] task quality
    kept_weight        [R, P, F] mean combine weight of the kept assignments
    tokens_dropped     [R, P, F] share of tokens that lost all their experts
    dropless_loss, dropless_accuracy  [R] the same model without capacity
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
        model = _model(task, 2)
        train(model, task, steps, batch_size=batch_size, lr=lr, aux_loss_coef=aux_loss_coef, seed=seed)
        dropless = [evaluate(model, task, cluster_probs=cluster_probs[r]) for r in DISTRIBUTIONS]
        runs = []
        for distribution in DISTRIBUTIONS:
            for policy in POLICIES:
                model.moe.drop_policy = policy
                for factor in factors:
                    model.moe.capacity_factor = float(factor)
                    runs.append(evaluate(model, task, cluster_probs=cluster_probs[distribution]))
    shape = (len(DISTRIBUTIONS), len(POLICIES), len(factors))
    table = {name: np.array([getattr(run, name) for run in runs]).reshape(shape)
             for name in ("dropped_fraction", "loss", "accuracy", "kept_weight")}
    tokens_dropped = np.array([(run.experts_per_token == 0).mean() for run in runs]).reshape(shape)
    return CapacitySweep(factors, tokens_dropped=tokens_dropped, **table,
                         dropless_loss=np.array([run.loss for run in dropless]),
                         dropless_accuracy=np.array([run.accuracy for run in dropless]),
                         load=np.stack([run.load for run in dropless]))


# ---------------------------------------------------------------------------------------------
# 3. a zoo of routers on the same task and budget (chapter 04)
# ---------------------------------------------------------------------------------------------

ROUTERS = ("top2", "noisy_top2", "switch", "expert_choice", "sigmoid_bias", "hash")


def make_router(name: str, task: ClusterTask, *, bias_update_rate: float = 0.01,
                expert_choice_capacity: float = 1.0, seed: int = 0):
    """(router, k for its MoELayer) for one of ROUTERS on `task`, with E = NUM_EXPERTS:
    top2           TopKRouter, k=2, softmax, renormalised (GShard, Mixtral)
    noisy_top2     NoisyTopKRouter, k=2 (Shazeer et al. 2017)
    switch         SwitchRouter, top-1 (Fedus et al. 2021)
    expert_choice  ExpertChoiceRouter(capacity_factor=expert_choice_capacity): on average that many
                   experts per token; 1 matches Switch's compute (Zhou et al. 2022)
    sigmoid_bias   TopKRouter(score="sigmoid", k=2, bias_update_rate) (DeepSeek-V3)
    hash           HashRouter, k=1, a fixed random table from token id to expert (Roller et al. 2021)
    """
    _checks.choice("name", name, ROUTERS)
    d, E = task.d_model, NUM_EXPERTS
    if name == "hash":
        return HashRouter(d, E, task.vocab_size, k=1, seed=seed), 1
    return {"top2": lambda: (TopKRouter(d, E, 2), 2),
            "noisy_top2": lambda: (NoisyTopKRouter(d, E, 2), 2),
            "switch": lambda: (SwitchRouter(d, E), 1),
            "expert_choice": lambda: (ExpertChoiceRouter(d, E, capacity_factor=expert_choice_capacity), 1),
            "sigmoid_bias": lambda: (TopKRouter(d, E, 2, score="sigmoid", bias_update_rate=bias_update_rate), 2),
            }[name]()


@dataclass
class RouterComparison:
    """Per router r in `routers` (R of them), on a held-out batch of 4096 tokens.

    load                       [R, E] assignments per expert
    load_entropy               [R] normalised entropy of the load (1 = even)
    max_violation              [R] (max load - mean load) / mean load (0 = even)
    coefficient_of_variation   [R] std / mean of the load
    coverage                   [R, 3] share of tokens processed by 0, 1, and more than 1 experts
    experts_per_token          [R] mean experts per token (the active compute)
    mutual_information         [R] bits the expert tells about the token's cluster
    loss, accuracy             [R] task quality
    """

    routers: tuple
    load: np.ndarray
    load_entropy: np.ndarray
    max_violation: np.ndarray
    coefficient_of_variation: np.ndarray
    coverage: np.ndarray
    experts_per_token: np.ndarray
    mutual_information: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray


def compare_routers(routers=ROUTERS, steps: int = 300, seed: int = 0, *, aux_loss_coef: float = 0.1,
                    bias_update_rate: float = 0.01, expert_choice_capacity: float = 1.0, lr: float = 1e-2,
                    batch_size: int = 256) -> RouterComparison:
    """Train one MoE (E=8, dropless) per router on `make_task()` with the same batches, steps and
    optimiser, and measure load balance, coverage and quality on the same held-out batch.
    top2, noisy_top2 and switch train with aux_loss_coef * the Switch aux loss, as in their
    papers; expert choice and hash routing are balanced by construction, sigmoid_bias by its bias.
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
            router, k = make_router(name, task, bias_update_rate=bias_update_rate,
                                    expert_choice_capacity=expert_choice_capacity, seed=seed)
            model = _model(task, k, router, routes_on_ids=name == "hash")
            uses_aux = name in ("top2", "noisy_top2", "switch")
            train(model, task, steps, batch_size=batch_size, lr=lr, seed=seed,
                  aux_loss_coef=aux_loss_coef if uses_aux else 0.0)
            results.append(evaluate(model, task))
    counts = np.stack([run.experts_per_token for run in results])
    return RouterComparison(
        routers, np.stack([run.load for run in results]),
        np.array([run.load_entropy for run in results]),
        np.array([max_violation(run.load) for run in results]),
        np.array([coefficient_of_variation(run.load) for run in results]),
        np.stack([(counts == 0).mean(1), (counts == 1).mean(1), (counts > 1).mean(1)], axis=1),
        counts.mean(1), np.array([mutual_information(run.cluster_expert) for run in results]),
        np.array([run.loss for run in results]), np.array([run.accuracy for run in results]))
