"""Routers: which experts each token visits, and with what combine weight.

Every router maps x [..., d] (leading dims are flattened to T tokens) to a `Routing`:
`router(x, token_ids=None, available_experts=None)`; a router that routes on token ids
(HashRouter) needs them [...], the others refuse them. At inference a router can be
told that some experts are unavailable (failed, offloaded, pruned): `available_experts`, a bool
[E] tensor, excludes the False ones from selection, and the weights renormalise over the rest
(see each router's docstring; HashRouter cannot, and says so). Router math runs in
at least float32 whatever the input dtype: softmax over low-precision logits is where MoE
training goes unstable (Switch Transformer, Fedus et al. 2021, section 2.4).
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimoe import _checks
from minimoe.dispatch import expert_capacity


@dataclass
class Routing:
    """The router's decision for T tokens, E experts, k slots per token.

    logits      [T, E] raw router logits (fp32 or wider, before any noise), what z-loss penalises
    probs       [T, E] router scores: softmax (or sigmoid) of the logits actually routed on
    expert_idx  [T, k] int64 chosen experts, best first
    weights     [T, k] combine weights, differentiable w.r.t. the router
    mask        [T, k] bool or None; False marks an empty slot (expert choice, where a token
                can be picked by 0..E experts). None means every slot is used.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    expert_idx: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor | None = None


def check_available_experts(available_experts: torch.Tensor | None, num_experts: int, k: int) -> torch.Tensor | None:
    """None, or a bool [num_experts] tensor with at least k True (a host sync: the count)."""
    if available_experts is None:
        return None
    _checks.tensor("available_experts", available_experts, ndim=1)
    _checks.same_shape("available_experts", available_experts, (num_experts,), "num_experts")
    if available_experts.dtype != torch.bool:
        raise TypeError(f"available_experts must be a bool tensor, got dtype {available_experts.dtype}")
    count = int(available_experts.sum())
    if count < k:
        what = "every expert is masked" if count == 0 else f"only {count} available"
        raise ValueError(f"available_experts must leave at least k={k} of the {num_experts} experts "
                         f"available, got {what}")
    return available_experts


ROUTERS = ("topk", "noisy_topk", "switch", "expert_choice", "sigmoid_bias", "hash", "gshard")  # make_router's names


GROUPED_ROUTERS = ("topk", "sigmoid_bias")  # make_router's names that take n_group / topk_group (topk: k >= 2)


def check_groups(num_experts: int, k: int, n_group: int, topk_group: int, router: str | None = None) -> tuple[int, int]:
    """Check DeepSeek-V3 group-limited selection (HF's names) -> (n_group, topk_group): n_group
    divides num_experts into groups of at least 2 (a group scores the sum of its top-2) when
    n_group > 1, 1 <= topk_group <= n_group, and k fits in the kept groups' experts. With
    `router` (a make_router name), anything but n_group = topk_group = 1 needs one of
    GROUPED_ROUTERS (topk with k >= 2: its k = 1 is the SwitchRouter)."""
    n_group = _checks.positive_int("n_group", n_group)
    topk_group = _checks.positive_int("topk_group", topk_group)
    if router is not None and (n_group, topk_group) != (1, 1) and (router not in GROUPED_ROUTERS or k == 1):
        raise ValueError(f"n_group and topk_group must be 1 for the {router!r} router with k={k} (only topk with "
                         f"k >= 2 and sigmoid_bias limit their groups), got n_group={n_group}, topk_group={topk_group}")
    if num_experts % n_group:
        raise ValueError(f"n_group must divide num_experts={num_experts}, got n_group={n_group}")
    group_size = num_experts // n_group
    if n_group > 1 and group_size < 2:
        raise ValueError(f"n_group must leave at least 2 experts per group (a group's score is the sum of its top-2 "
                         f"scores), got n_group={n_group} for num_experts={num_experts}: groups of {group_size}")
    if topk_group > n_group:
        raise ValueError(f"topk_group must be in [1, n_group={n_group}], got topk_group={topk_group}")
    if k > topk_group * group_size:
        raise ValueError(f"k must be <= topk_group * num_experts / n_group = {topk_group} * {group_size} = "
                         f"{topk_group * group_size} (the experts of the kept groups), got k={k}")
    return n_group, topk_group


class Router(nn.Module, ABC):
    """Base: a bias-free linear map `proj` d_model -> num_experts, evaluated in fp32, and `k`,
    the experts each token gets (None for expert choice, where a token gets 0..E of them).
    A router that learns nothing (HashRouter) passes learned=False and has proj = None, so it
    has no parameters to optimise, synchronise or count.

    forward(x [..., d], token_ids=None, available_experts=None) -> Routing over the T tokens:
    it checks its inputs (`flat_tokens`, `check_token_ids`, `check_available`) and calls
    `_route(tokens [T, d], token_ids [T] or None, available [E] or None)`, the routing itself,
    which each router implements and `MoELayer` calls after checking once at its own boundary.
    """

    def __init__(self, d_model: int, num_experts: int, k: int | None = None, *, learned: bool = True):
        super().__init__()
        self.d_model = _checks.positive_int("d_model", d_model)
        self.num_experts = _checks.positive_int("num_experts", num_experts)
        self.k = None if k is None else _checks.positive_int("k", k)
        if self.k is not None and self.k > num_experts:
            raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
        self.proj = nn.Linear(d_model, num_experts, bias=False) if learned else None

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None,
                available_experts: torch.Tensor | None = None) -> Routing:
        return self._route(self.flat_tokens(x), self.check_token_ids(token_ids, x),
                           self.check_available(available_experts))

    @abstractmethod
    def _route(self, tokens: torch.Tensor, token_ids: torch.Tensor | None,
               available: torch.Tensor | None) -> Routing:
        """tokens [T, d] (fp32 flat), token_ids [T] or None, available bool [E] or None -> Routing."""

    def flat_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Check x [..., d_model] -> [T, d_model]."""
        _checks.tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        return x.reshape(-1, self.d_model)

    def check_token_ids(self, token_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """None, as this router does not route on token ids: ids given anyway are an error, not
        silently ignored."""
        if token_ids is not None:
            raise ValueError(f"token_ids must be None: {type(self).__name__} does not route on token ids, got a "
                             f"{type(token_ids).__name__}")
        return None

    def check_available(self, available_experts: torch.Tensor | None) -> torch.Tensor | None:
        """Check available_experts: None, or a bool [E] tensor leaving at least k experts (one for
        expert choice). Costs a host sync (the count): MoELayer checks once, when it is set."""
        return check_available_experts(available_experts, self.num_experts, self.k or 1)

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [T, d] -> logits [T, E] in float32, or float64 for float64 input."""
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        return F.linear(tokens.to(dtype), self.proj.weight.to(dtype))


class TopKRouter(Router):
    """Each token picks its k highest-scoring experts.

    score="softmax": probs = softmax(logits) (GShard, Mixtral). score="sigmoid": independent
    per-expert scores sigmoid(logits) (DeepSeek-V3). normalize=True rescales the k chosen
    scores to sum to 1; for softmax that equals a softmax over the k chosen logits (Mixtral).
    noise_std adds N(0, noise_std^2) to the logits in training mode only.
    bias_update_rate > 0 keeps `expert_bias` [E] (DeepSeek-V3 auxiliary-loss-free balancing,
    Wang et al. 2024): the bias is added to the scores to *select* experts, never to the weights.
    available_experts (bool [E], at least k True): masked experts get logit -inf (probs 0, for
    softmax the rest renormalise) and are never selected, whatever their bias.

    DeepSeek-V2/V3 (DeepSeek-AI 2024), with Hugging Face's parameter names:
    routed_scaling_factor (> 0, default 1): multiplies the k combine weights [T, k], after
        the renormalisation; the shared experts' output is never scaled.
    n_group, topk_group (default 1, 1): group-limited selection (DeepSeek-V3, n_group=8,
        topk_group=4: a token's experts sit on at most 4 nodes; HF's DeepseekV3TopkRouter).
        The E experts form n_group contiguous groups of E / n_group >= 2; a group's score is
        the sum of its top-2 selection scores (probs, plus expert_bias when kept; masked
        experts at -inf, so a group with fewer than 2 available experts scores -inf); each
        token keeps its topk_group best groups [T, topk_group] and picks its k experts among
        their experts only. Weights come from the unbiased probs as above. topk_group ==
        n_group (n_group=1 among them) is plain top-k. `check_groups` says what is allowed.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, *, score: str = "softmax",
                 normalize: bool = True, noise_std: float = 0.0, bias_update_rate: float = 0.0,
                 routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1):
        super().__init__(d_model, num_experts, k)
        self.score = _checks.choice("score", score, ("softmax", "sigmoid"))
        self.normalize = bool(normalize)
        self.noise_std = _checks.non_negative("noise_std", noise_std)
        self.bias_update_rate = _checks.non_negative("bias_update_rate", bias_update_rate)
        self.routed_scaling_factor = _checks.positive("routed_scaling_factor", routed_scaling_factor)
        self.n_group, self.topk_group = check_groups(num_experts, self.k, n_group, topk_group)
        if self.bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        else:
            self.expert_bias = None

    @property
    def group_limited(self) -> bool:
        """Whether selection is limited to topk_group of the n_group groups (topk_group < n_group)."""
        return self.topk_group < self.n_group

    def check_available(self, available_experts: torch.Tensor | None) -> torch.Tensor | None:
        """As Router.check_available; with group-limited selection, the mask must also leave k
        experts in whichever topk_group groups a token may keep (groups scoring -inf, with fewer
        than 2 available experts, are kept only when too few others score higher)."""
        available = super().check_available(available_experts)
        if available is not None and self.group_limited:
            group_size = self.num_experts // self.n_group
            counts = available.reshape(self.n_group, group_size).sum(-1).tolist()
            worst = sorted(counts, key=lambda count: (count < 2, count))[:self.topk_group]
            if sum(worst) < self.k:
                raise ValueError(f"available_experts must leave at least k={self.k} experts in any "
                                 f"topk_group={self.topk_group} groups a token may keep (n_group={self.n_group}), "
                                 f"got available experts per group {counts}")
        return available

    def _keep_groups(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [T, E] (selection scores, masked experts at -inf) -> bool [T, E]: True for the
        experts of each token's topk_group best groups (group score: the sum of its top-2)."""
        group_size = self.num_experts // self.n_group
        grouped = scores.reshape(scores.shape[0], self.n_group, group_size)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        kept = group_scores.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        return keep.repeat_interleave(group_size, dim=1)

    def _route(self, tokens, token_ids, available) -> Routing:
        logits = self._logits(tokens)
        routed = logits
        if self.training and self.noise_std > 0:
            routed = logits + self.noise_std * torch.randn_like(logits)
        if available is not None:
            routed = routed.masked_fill(~available.to(routed.device), float("-inf"))
        probs = routed.softmax(-1) if self.score == "softmax" else routed.sigmoid()
        # softmax and sigmoid are monotonic: rank by the logits, which never tie the way probabilities
        # rounded to 0 or 1 do; the DeepSeek-V3 bias is added to the scores
        selection = routed if self.expert_bias is None else probs + self.expert_bias
        if available is not None:
            selection = selection.masked_fill(~available.to(routed.device), float("-inf"))
        if self.group_limited:
            # groups are scored on the scores (+ bias), not the logits: a sum is not rank-preserving
            scores = probs if self.expert_bias is None else selection
            if available is not None:
                scores = scores.masked_fill(~available.to(routed.device), float("-inf"))
            selection = selection.masked_fill(~self._keep_groups(scores), float("-inf"))
        expert_idx = selection.topk(self.k, dim=-1).indices
        weights = probs.gather(-1, expert_idx)
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return Routing(logits, probs, expert_idx, weights)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """One aux-loss-free step from load [E] (assignments routed to each expert):
        bias_i += rate * sign(mean load - load_i)."""
        if self.expert_bias is None:
            raise ValueError("update_bias needs a router built with bias_update_rate > 0, "
                             f"got bias_update_rate={self.bias_update_rate}")
        _checks.tensor("load", load, ndim=1)
        _checks.same_shape("load", load, (self.num_experts,), "num_experts")
        load = load.to(self.expert_bias)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)


class SwitchRouter(TopKRouter):
    """Switch Transformer (Fedus et al. 2021): top-1, the weight is the chosen softmax probability
    (not renormalised, or it would be 1 and the router would get no gradient), times
    routed_scaling_factor (1 by default)."""

    def __init__(self, d_model: int, num_experts: int, *, noise_std: float = 0.0, routed_scaling_factor: float = 1.0):
        super().__init__(d_model, num_experts, k=1, normalize=False, noise_std=noise_std,
                         routed_scaling_factor=routed_scaling_factor)


class GShardRouter(Router):
    """GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1), k = 2.

    probs = softmax(logits) [T, E]; e1, e2 the two best experts, g1 >= g2 their probs.
    weights [T, 2] = (g1, g2) / (g1 + g2), normalised *before* the random drop and never after:
        a token that loses its second expert keeps weight g1 / (g1 + g2) < 1 on the first.
    mask [T, 2]: the first slot always True. In training the second is kept where
        2 * weights[:, 1] > u, u ~ U(0, 1) [T] drawn by one torch.rand from torch's global
        RNG: kept with probability 2 g2 / (g1 + g2) (<= 1, the min(1, .) is never needed).
        A dropped second slot has mask False and weight 0. In eval mode both are kept (mask None).
    Capacity is MoELayer's: its default "position" policy seats every first choice before any
    second choice, as the algorithm does; a dropped second choice takes no seat.
    The paper's aux loss is `minimoe.losses.gshard_aux_loss(probs, expert_idx)`; MoELayer's
    `aux_loss` stays the Switch loss over the kept slots, as for every router.
    available_experts (bool [E], at least 2 True): masked experts get logit -inf (probs 0, the
    softmax over the rest) and are never chosen.
    """

    def __init__(self, d_model: int, num_experts: int):
        super().__init__(d_model, num_experts, 2)

    def _route(self, tokens, token_ids, available) -> Routing:
        logits = self._logits(tokens)
        routed = logits if available is None else logits.masked_fill(~available.to(logits.device), float("-inf"))
        probs = routed.softmax(-1)
        expert_idx = routed.topk(2, dim=-1).indices  # rank by the logits, as TopKRouter does
        top2 = probs.gather(-1, expert_idx)
        weights = top2 / top2.sum(-1, keepdim=True)
        mask = None
        if self.training:
            keep_second = 2 * weights[:, 1].detach() > torch.rand(weights.shape[0], dtype=weights.dtype,
                                                                   device=weights.device)
            mask = torch.stack([torch.ones_like(keep_second), keep_second], dim=1)
            weights = weights * mask
        return Routing(logits, probs, expert_idx, weights, mask)


class NoisyTopKRouter(Router):
    """Noisy top-k gating (Shazeer et al. 2017).

    H = x W_g + eps * softplus(x W_noise), eps ~ N(0, 1) in training only; the k largest H are
    kept and weights = softmax over them. `probs` is softmax(H) over all experts.
    W_noise starts at zero, so the initial noise std is softplus(0) = ln 2.
    available_experts (bool [E], at least k True): masked experts get H = -inf, so they are
    never kept and `probs` gives them 0. routed_scaling_factor (> 0, default 1) multiplies the
    k weights, as in TopKRouter.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, *, routed_scaling_factor: float = 1.0):
        super().__init__(d_model, num_experts, k)
        self.routed_scaling_factor = _checks.positive("routed_scaling_factor", routed_scaling_factor)
        self.noise_proj = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.noise_proj.weight)

    def _route(self, tokens, token_ids, available) -> Routing:
        logits = self._logits(tokens)
        routed = logits
        if self.training:
            noise_std = F.softplus(F.linear(tokens.to(logits.dtype), self.noise_proj.weight.to(logits.dtype)))
            routed = logits + torch.randn_like(logits) * noise_std
        if available is not None:
            routed = routed.masked_fill(~available.to(routed.device), float("-inf"))
        top = routed.topk(self.k, dim=-1)
        return Routing(logits, routed.softmax(-1), top.indices, top.values.softmax(-1) * self.routed_scaling_factor)


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert takes its C highest-scoring tokens,
    C = ceil(T * capacity_factor / E). Loads are perfectly even; a token may get 0..E experts,
    so the router has no k (k = None).

    Returns token-major slots: expert_idx [T, m] with m the most experts any token got, best
    first, and `mask` marking the filled slots. The choice looks at the whole batch, so it is
    not causal: fine for training and encoders, a leak for autoregressive decoding.
    available_experts (bool [E], at least one True): masked experts take no token and get
    probability 0 (softmax over the others); the others still take their C tokens each.
    """

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 1.0):
        super().__init__(d_model, num_experts)
        self.capacity_factor = _checks.positive("capacity_factor", capacity_factor)

    def _route(self, tokens, token_ids, available) -> Routing:
        logits = self._logits(tokens)
        routed = logits if available is None else logits.masked_fill(~available.to(logits.device), float("-inf"))
        probs = routed.softmax(-1)
        T = probs.shape[0]
        capacity = min(T, expert_capacity(T, self.num_experts, 1, self.capacity_factor))
        chosen_tokens = probs.topk(capacity, dim=0).indices  # [C, E]
        chosen = torch.zeros_like(probs, dtype=torch.bool)
        chosen.scatter_(0, chosen_tokens, True)
        if available is not None:
            chosen &= available.to(chosen.device)
        slots = int(chosen.sum(-1).max()) if T else 0  # a host sync: the number of slots is data-dependent
        ranked = torch.where(chosen, probs.detach(), -1.0).topk(slots, dim=-1).indices
        mask = chosen.gather(-1, ranked)
        weights = probs.gather(-1, ranked) * mask
        return Routing(logits, probs, ranked, weights, mask)


class HashRouter(Router):
    """Hash layers (Roller et al. 2021): a fixed, non-learned map token id -> k experts.

    `table` [vocab_size, k] is a seeded random balanced assignment: the vocab_size * k
    (id, slot) pairs are dealt out in rounds, each round a fresh random permutation of the
    experts, so every id gets k distinct experts and every expert gets floor or ceil of
    vocab_size * k / E ids (the paper's "random hash", balanced by construction). The same id
    always goes to the same experts, whatever its context.
    There is no gate to learn, so every chosen expert's output counts equally: weights = 1/k.
    logits are zeros and probs uniform 1/E: the z-loss is the constant log(E)^2 and the
    load-balancing loss exactly 1, neither with a gradient.
    It cannot route around a masked expert (the table is fixed, and a token hashed to it would
    silently lose that expert): an available_experts mask with any False is an error.
    """

    def __init__(self, d_model: int, num_experts: int, vocab_size: int, k: int = 1, seed: int = 0):
        super().__init__(d_model, num_experts, k, learned=False)
        self.vocab_size = _checks.positive_int("vocab_size", vocab_size)
        self.seed = _checks.positive_int("seed", seed, minimum=0)
        self.register_buffer("table", self._deal(vocab_size, num_experts, k, seed))

    @staticmethod
    def _deal(vocab_size: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
        """-> [vocab_size, k] int64: ids take k experts each from a stream of shuffled rounds."""
        gen = torch.Generator().manual_seed(seed)
        rows, pool = [], []  # pool: what is left of the current round, in random order
        for _ in range(vocab_size):
            row, pool = pool[:k], pool[k:]
            if len(row) < k:  # next round; the experts already in row go last, so no repeats
                fresh = torch.randperm(num_experts, generator=gen).tolist()
                fresh = [e for e in fresh if e not in row] + row
                need = k - len(row)
                row, pool = row + fresh[:need], fresh[need:]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.int64)

    def check_token_ids(self, token_ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Check token_ids [...] (x's leading shape), integers in [0, vocab_size) -> [T]. The
        range check costs a host sync."""
        if token_ids is None:
            raise ValueError(f"token_ids must be given: {type(self).__name__} routes on token ids, got None")
        _checks.tensor("token_ids", token_ids)
        _checks.same_shape("token_ids", token_ids, x.shape[:-1], "x's leading dimensions")
        _checks.expert_ids("token_ids", token_ids.reshape(-1, 1), self.vocab_size)
        return token_ids.reshape(-1)

    def check_available(self, available_experts: torch.Tensor | None) -> torch.Tensor | None:
        available = super().check_available(available_experts)
        if available is not None and not bool(available.all()):
            raise ValueError("available_experts must be all True for a HashRouter: its fixed table sends "
                             "token ids to masked experts; re-deal the table over the available experts instead")
        return available

    def _route(self, tokens, token_ids, available) -> Routing:
        T, E = tokens.shape[0], self.num_experts
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        logits = tokens.new_zeros(T, E, dtype=dtype)
        weights = tokens.new_full((T, self.k), 1 / self.k, dtype=dtype)
        expert_idx = self.table[token_ids.long()]
        return Routing(logits, torch.full_like(logits, 1 / E), expert_idx, weights)


def make_router(name: str, d_model: int, num_experts: int, k: int | None = 2, *, bias_update_rate: float = 1e-3,
                capacity_factor: float = 1.0, vocab_size: int | None = None, seed: int = 0,
                routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1) -> Router:
    """The router ROUTERS calls `name`:
    topk           TopKRouter(k): softmax, renormalised top-k (Mixtral); for k=1 the
                   SwitchRouter (a renormalised single weight is 1: the router would get no
                   gradient from the output)
    noisy_topk     NoisyTopKRouter(k) (Shazeer et al. 2017)
    switch         SwitchRouter (Fedus et al. 2021); k must be 1
    expert_choice  ExpertChoiceRouter(capacity_factor) (Zhou et al. 2022); k must be None
    sigmoid_bias   TopKRouter(k, score="sigmoid", bias_update_rate) (DeepSeek-V3)
    hash           HashRouter(vocab_size, k, seed) (Roller et al. 2021)
    gshard         GShardRouter (Lepikhin et al. 2020): top-2, random routing of the second
                   expert in training; k must be 2
    routed_scaling_factor (DeepSeek-V2/V3) goes to topk, noisy_topk, switch and sigmoid_bias;
    group-limited selection n_group / topk_group (DeepSeek-V3) to topk with k >= 2 and
    sigmoid_bias. The others take only the defaults (1; 1 and 1).
    """
    _checks.choice("name", name, ROUTERS)
    scale = _checks.positive("routed_scaling_factor", routed_scaling_factor)
    if scale != 1.0 and name not in ("topk", "noisy_topk", "switch", "sigmoid_bias"):
        raise ValueError(f"routed_scaling_factor must be 1 for the {name!r} router (only topk, noisy_topk, switch "
                         f"and sigmoid_bias scale their weights), got {routed_scaling_factor}")
    fixed_k = {"switch": 1, "gshard": 2}
    if (name == "expert_choice") != (k is None) or fixed_k.get(name, k) != k:
        expected = {"expert_choice": "None (a token gets 0..E experts)", **fixed_k}.get(name, "an int")
        raise ValueError(f"k must be {expected} for the {name!r} router, got k={k}")
    if (n_group, topk_group) != (1, 1):
        check_groups(num_experts, k, n_group, topk_group, router=name)
    groups = dict(n_group=n_group, topk_group=topk_group)
    if name == "topk":
        if k == 1:
            return SwitchRouter(d_model, num_experts, routed_scaling_factor=scale)
        return TopKRouter(d_model, num_experts, k, routed_scaling_factor=scale, **groups)
    if name == "noisy_topk":
        return NoisyTopKRouter(d_model, num_experts, k, routed_scaling_factor=scale)
    if name == "switch":
        return SwitchRouter(d_model, num_experts, routed_scaling_factor=scale)
    if name == "expert_choice":
        return ExpertChoiceRouter(d_model, num_experts, capacity_factor)
    if name == "sigmoid_bias":
        return TopKRouter(d_model, num_experts, k, score="sigmoid", bias_update_rate=bias_update_rate,
                          routed_scaling_factor=scale, **groups)
    if name == "gshard":
        return GShardRouter(d_model, num_experts)
    if vocab_size is None:
        raise ValueError("vocab_size must be given for the 'hash' router, got None")
    return HashRouter(d_model, num_experts, vocab_size, k, seed)
