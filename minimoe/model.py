"""A small GPT whose feed-forward layers are MoE layers (chapter 07).

    config = MoETransformerConfig(num_experts=8, k=2)
    model = MoETransformer(config)
    logits, loss = model(idx, targets)        # idx, targets [B, L] int64; loss includes aux and z terms

Pre-norm blocks (x + attn(ln(x)), x + ffn(ln(x))), causal self-attention through
`F.scaled_dot_product_attention`, learned positions, and an output head tied to the token
embedding. With num_experts == 1 every FFN is dense: the baseline with the same active FLOPs
as an MoE config is `config.dense_equivalent()`.

Nothing here is distributed: expert parallelism is applied from outside
(`minimoe.parallel.parallelize(model)`, chapter 12), by swapping each MoE block's experts.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from minimoe import _checks
from minimoe.experts import ACTIVATIONS, FeedForward
from minimoe.layer import MoELayer, moe_layers
from minimoe.metrics import MoEStats
from minimoe.routing import check_groups, make_router

MODEL_ROUTERS = ("topk", "noisy_topk", "sigmoid_bias")  # of minimoe.routing.ROUTERS, the causal ones with a k


@dataclass(frozen=True)
class MoETransformerConfig:
    """Shapes and routing of an MoETransformer.

    d_hidden: each expert's hidden width. Every FFN, dense or MoE, has the same active width
        (k + num_shared_experts) * d_hidden per token, so blocks cost the same FLOPs.
    num_experts: routed experts per MoE block; 1 makes the model dense (then k must be 1 and
        num_shared_experts 0).
    moe_every: block i has an MoE FFN when (i + 1) % moe_every == 0 (GShard: 2, every other block);
        the other blocks get a dense FFN of the active width.
    router: one of MODEL_ROUTERS, built by `minimoe.routing.make_router`: "topk" (softmax;
        renormalised top-k as in Mixtral, or Switch top-1 when k == 1), "noisy_topk" (Shazeer
        et al. 2017), "sigmoid_bias" (DeepSeek-V3: sigmoid scores and an aux-loss-free selection
        bias, moved by bias_update_rate per `update_router_biases()`).
    routed_scaling_factor: multiplies every MoE block's routed combine weights (DeepSeek-V2/V3,
        HF's name; > 0), never the shared experts' output. None (default) means k: a token's k
        renormalised weights then sum to k, as the dense twin sums its k slices of width
        d_hidden, instead of averaging k experts (which shrinks the FFN's output, and under Adam
        its effective step, by k; chapter 07 measures what that costs). `routed_scale` is the
        value in use.
    n_group, topk_group: DeepSeek-V3's group-limited selection in every MoE block (HF's names;
        default 1, 1: plain top-k): k experts from the topk_group best of n_group contiguous
        groups of experts (`minimoe.routing.check_groups` says what is allowed); router
        "topk" with k >= 2 or "sigmoid_bias" only.
    aux_loss_coef, z_loss_coef: weights of the Switch load-balancing loss and the router z-loss,
        each summed over the MoE blocks, in the training loss.
    """

    vocab_size: int = 96
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_hidden: int = 128
    num_experts: int = 8
    k: int = 2
    moe_every: int = 1
    num_shared_experts: int = 0
    capacity_factor: float | None = None
    router: str = "topk"
    bias_update_rate: float = 1e-3
    routed_scaling_factor: float | None = None
    n_group: int = 1
    topk_group: int = 1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    activation: str = "swiglu"

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "d_hidden", "num_experts", "k",
                     "moe_every"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("num_shared_experts", self.num_shared_experts, minimum=0)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads must divide d_model={self.d_model}, got n_heads={self.n_heads}")
        if self.k > self.num_experts:
            raise ValueError(f"k must be <= num_experts={self.num_experts}, got k={self.k}")
        if self.num_experts == 1 and self.num_shared_experts:
            raise ValueError("num_shared_experts must be 0 in a dense model (num_experts=1), "
                             f"got {self.num_shared_experts}")
        _checks.positive("capacity_factor", self.capacity_factor, none_means="dropless")
        _checks.choice("router", self.router, MODEL_ROUTERS)
        _checks.choice("activation", self.activation, ACTIVATIONS)
        for name in ("bias_update_rate", "aux_loss_coef", "z_loss_coef"):
            _checks.non_negative(name, getattr(self, name))
        _checks.positive("routed_scaling_factor", self.routed_scaling_factor, none_means="k")
        check_groups(self.num_experts, self.k, self.n_group, self.topk_group, router=self.router)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def routed_scale(self) -> float:
        """The routed_scaling_factor in use: k when the field is None."""
        return float(self.k) if self.routed_scaling_factor is None else self.routed_scaling_factor

    @property
    def active_hidden(self) -> int:
        """The FFN width each token passes through: (k + num_shared_experts) * d_hidden."""
        return (self.k + self.num_shared_experts) * self.d_hidden

    def is_moe_block(self, index: int) -> bool:
        return self.is_moe and (index + 1) % self.moe_every == 0

    def dense_equivalent(self) -> "MoETransformerConfig":
        """The dense config whose FFNs have this config's active width: the same FLOPs per token
        (up to the router's d * E per MoE block)."""
        return replace(self, d_hidden=self.active_hidden, num_experts=1, k=1, num_shared_experts=0,
                       capacity_factor=None, n_group=1, topk_group=1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention over earlier positions. forward(x [B, L, d]) -> [B, L, d]."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = (t.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for t in self.qkv(x).split(d, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, L, d))


class Block(nn.Module):
    """x + attn(ln1(x)), then + ffn(ln2(x)); ffn is an MoELayer or a dense FeedForward."""

    def __init__(self, config: MoETransformerConfig, moe: bool):
        super().__init__()
        d = config.d_model
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, config.n_heads)
        if moe:
            router = make_router(config.router, d, config.num_experts, config.k,
                                 bias_update_rate=config.bias_update_rate,
                                 routed_scaling_factor=config.routed_scale, n_group=config.n_group,
                                 topk_group=config.topk_group)
            self.ffn = MoELayer(d, config.d_hidden, config.num_experts, router=router,
                                capacity_factor=config.capacity_factor,
                                num_shared_experts=config.num_shared_experts, activation=config.activation)
        else:
            self.ffn = FeedForward(d, config.active_hidden, config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class MoETransformer(nn.Module):
    """forward(idx [B, L] int64, targets [B, L] | None) -> (logits [B, L, vocab], loss | None).

    loss = cross-entropy + aux_loss_coef * sum of aux losses + z_loss_coef * sum of z-losses
    (over the MoE blocks); `last_losses` keeps the three parts (detached) of the last call.
    """

    def __init__(self, config: MoETransformerConfig):
        super().__init__()
        if not isinstance(config, MoETransformerConfig):
            raise TypeError(f"config must be a MoETransformerConfig, got {type(config).__name__}")
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config, config.is_moe_block(i)) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self._init_weights()
        self.last_losses: dict | None = None

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2's scheme for every matrix (embeddings, attention, routers, experts, dense and
        shared FFNs): N(0, 0.02), and N(0, 0.02 / sqrt(2 n_layers)) for the projections that write
        into the residual stream (attention's `out`, every `w_down`), so that the stream's variance
        does not grow with depth. Norms keep weight 1 and bias 0."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, weight in self.named_parameters():
            if weight.dim() >= 2:
                writes_residual = name.endswith(("attn.out.weight", "w_down"))
                nn.init.normal_(weight, std=residual_std if writes_residual else 0.02)

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFNs, first block first ([] for a dense model): `minimoe.layer.moe_layers(self)`."""
        return moe_layers(self)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        self._check_ids("idx", idx)
        B, L = idx.shape
        x = self.token_embedding(idx) + self.position_embedding(torch.arange(L, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.token_embedding.weight)  # tied output head
        if targets is None:
            return logits, None
        self._check_ids("targets", targets)
        _checks.same_shape("targets", targets, idx.shape, "idx")
        task = F.cross_entropy(logits.reshape(B * L, -1), targets.reshape(-1))
        aux = sum((layer.aux_loss for layer in self.moe_layers), logits.new_zeros(()))
        z = sum((layer.z_loss for layer in self.moe_layers), logits.new_zeros(()))
        self.last_losses = {"task": task.detach(), "aux": aux.detach(), "z": z.detach()}
        return logits, task + self.config.aux_loss_coef * aux + self.config.z_loss_coef * z

    def _check_ids(self, name: str, ids: torch.Tensor) -> None:
        _checks.tensor(name, ids, ndim=2)
        if ids.dtype != torch.int64:
            raise TypeError(f"{name} must be int64 token ids, got {ids.dtype}")
        if not 0 < ids.shape[1] <= self.config.seq_len:
            raise ValueError(f"{name} must have 1..seq_len={self.config.seq_len} positions, got shape "
                             f"{tuple(ids.shape)}")
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < self.config.vocab_size:
            raise ValueError(f"{name} must hold ids in [0, vocab_size={self.config.vocab_size}), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def routing_stats(self) -> list[MoEStats]:
        """The last forward call's MoEStats of each MoE block, first block first."""
        return [layer.stats for layer in self.moe_layers]

    @torch.no_grad()
    def update_router_biases(self, loads: list[torch.Tensor] | None = None) -> None:
        """One aux-loss-free bias step in every MoE block whose router keeps a bias (router
        "sigmoid_bias"). loads: [E] assignments per expert, one per MoE block, default the last
        forward call's (`stats.load`); a data-parallel run passes the loads of all its ranks,
        so that the replicated biases stay identical. Call once per training step."""
        layers = self.moe_layers
        loads = [layer.stats.load for layer in layers] if loads is None else list(loads)
        if len(loads) != len(layers):
            raise ValueError(f"loads must hold one [E] tensor per MoE block ({len(layers)}), got {len(loads)}")
        for layer, load in zip(layers, loads, strict=True):
            if getattr(layer.router, "expert_bias", None) is not None:
                layer.router.update_bias(load)

    @torch.no_grad()
    def expert_choices(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Run idx [B, L] and return each MoE block's chosen experts [B, L, k], best first."""
        self(idx)
        return [layer.last_routing.expert_idx.view(*idx.shape, -1) for layer in self.moe_layers]

    def num_params(self, active: bool = False) -> int:
        """All parameters (the tied head counted once); active=True counts only the k routed
        experts a token uses in each MoE block, not all E. The count is the model's, whatever
        share of the experts this process holds (all E of every block, also when expert-parallel)."""
        expert_params = {id(p) for layer in self.moe_layers for p in layer.experts.parameters()}
        total = sum(p.numel() for p in self.parameters() if id(p) not in expert_params)
        for layer in self.moe_layers:
            per_expert = sum(w[0].numel() for w in layer.experts.parameters())
            total += (layer.k if active else layer.num_experts) * per_expert
        return total

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0) -> torch.Tensor:
        """Sample max_new_tokens after idx [B, L0]; -> [B, L0 + max_new_tokens]. The same seed
        gives the same text. The context is cropped to the last seq_len tokens."""
        _checks.positive_int("max_new_tokens", max_new_tokens, minimum=0)
        _checks.positive("temperature", temperature)
        if top_k is not None:
            top_k = min(_checks.positive_int("top_k", top_k), self.config.vocab_size)
        generator = torch.Generator(device=idx.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.seq_len:])
            logits = logits[:, -1] / temperature
            if top_k is not None:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
        self.train(was_training)
        return idx


@torch.no_grad()
def upcycle(dense: MoETransformer, num_experts: int, k: int = 2, seed: int = 0, **changes) -> MoETransformer:
    """Sparse upcycling (Komatsuzaki et al., 2022): an MoE transformer started from a trained
    dense one. Embeddings, attention and norms are copied; every block's FFN becomes an MoE
    layer whose num_experts experts are copies of that dense FFN (so d_hidden stays the dense
    width, and k experts cost k dense FFNs per token: every block is MoE, since a dense block
    of an MoETransformer has the active width k * d_hidden); the routers start from their usual
    init under torch.manual_seed(seed).

    changes: other MoETransformerConfig fields (router, aux_loss_coef, capacity_factor, ...);
    routed_scaling_factor is 1 unless given, so that k copies are averaged, not summed. Right
    after upcycling the MoE computes the dense model's logits (up to float rounding) whenever
    each token's combine weights sum to 1: renormalised top-k with k >= 2, dropless. A Switch
    router (k=1) scales the copy by its probability, a capacity factor drops tokens, and another
    routed_scaling_factor or shared experts add to it: then the start is not the dense model.
    """
    if not isinstance(dense, MoETransformer) or dense.config.is_moe:
        raise TypeError(f"dense must be a dense MoETransformer (num_experts=1), got "
                        f"{type(dense).__name__}" + (f" with num_experts={dense.config.num_experts}"
                                                     if isinstance(dense, MoETransformer) else ""))
    _checks.positive_int("num_experts", num_experts, minimum=2)
    for name in ("num_experts", "k", "d_hidden", "moe_every", "vocab_size", "seq_len", "d_model", "n_layers",
                 "n_heads", "activation"):
        if name in changes:
            raise ValueError(f"changes must not set {name!r}: it is taken from dense or given as an argument")
    changes = {"routed_scaling_factor": 1.0, **changes}
    config = replace(dense.config, num_experts=num_experts, k=k, moe_every=1, **changes)
    torch.manual_seed(seed)
    moe = MoETransformer(config)
    moe.load_state_dict({name: value for name, value in dense.state_dict().items() if ".ffn." not in name},
                        strict=False)  # everything but the FFNs
    for block, dense_block in zip(moe.blocks, dense.blocks, strict=True):
        for name in ("w_gate", "w_up", "w_down"):
            weight = getattr(dense_block.ffn, name)
            if weight is not None:
                getattr(block.ffn.experts, name).copy_(weight.expand_as(getattr(block.ffn.experts, name)))
    return moe
