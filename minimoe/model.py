"""A small GPT whose feed-forward layers are MoE layers (chapter 07).

    config = MoETransformerConfig(num_experts=8, k=2)
    model = MoETransformer(config)
    logits, loss = model(idx, targets)        # idx, targets [B, L] int64; loss includes aux and z terms

Pre-norm blocks (x + attn(ln(x)), x + ffn(ln(x))), causal self-attention through
`F.scaled_dot_product_attention`, learned positions, and an output head tied to the token
embedding. With num_experts == 1 every FFN is dense: the baseline with the same active FLOPs
as an MoE config is `config.dense_equivalent()`.

Expert parallelism (chapter 12): `model.to_expert_parallel()` under torch.distributed shards
every MoE block's experts over the ranks (ExpertParallelMoE); everything else stays replicated.
`full_state_dict()` gathers the shards back into the single-process model's state dict.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minimoe import _checks
from minimoe.experts import ACTIVATIONS, FeedForward
from minimoe.layer import MoELayer, MoEStats
from minimoe.parallel.comm import run_collective
from minimoe.parallel.layer import ExpertParallelMoE
from minimoe.routing import NoisyTopKRouter, Router, SwitchRouter, TopKRouter

ROUTERS = ("topk", "noisy_topk", "sigmoid_bias")


@dataclass(frozen=True)
class MoETransformerConfig:
    """Shapes and routing of an MoETransformer.

    d_hidden: each expert's hidden width. Every FFN, dense or MoE, has the same active width
        (k + num_shared_experts) * d_hidden per token, so blocks cost the same FLOPs.
    num_experts: routed experts per MoE block; 1 makes the model dense (then k must be 1 and
        num_shared_experts 0).
    moe_every: block i has an MoE FFN when (i + 1) % moe_every == 0 (GShard: 2, every other block);
        the other blocks get a dense FFN of the active width.
    router: "topk" (softmax; renormalised top-k as in Mixtral, or Switch top-1 when k == 1),
        "noisy_topk" (Shazeer et al. 2017), "sigmoid_bias" (DeepSeek-V3: sigmoid scores and an
        aux-loss-free selection bias, moved by bias_update_rate per `update_router_biases()`).
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
        _checks.choice("router", self.router, ROUTERS)
        _checks.choice("activation", self.activation, ACTIVATIONS)
        for name in ("bias_update_rate", "aux_loss_coef", "z_loss_coef"):
            _checks.non_negative(name, getattr(self, name))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

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
                       capacity_factor=None)


def _router(config: MoETransformerConfig) -> Router:
    d, E, k = config.d_model, config.num_experts, config.k
    if config.router == "noisy_topk":
        return NoisyTopKRouter(d, E, k)
    if config.router == "sigmoid_bias":
        return TopKRouter(d, E, k, score="sigmoid", bias_update_rate=config.bias_update_rate)
    return SwitchRouter(d, E) if k == 1 else TopKRouter(d, E, k)


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
            self.ffn = MoELayer(d, config.d_hidden, config.num_experts, config.k, router=_router(config),
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
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:  # GPT-2: residual outputs scaled down with depth
            nn.init.normal_(block.attn.out.weight, std=0.02 / math.sqrt(2 * config.n_layers))
        self.last_losses: dict | None = None

    @property
    def moe_layers(self) -> list[MoELayer | ExpertParallelMoE]:
        """The MoE FFNs, first block first (ExpertParallelMoE after `to_expert_parallel`)."""
        return [block.ffn for block in self.blocks if isinstance(block.ffn, (MoELayer, ExpertParallelMoE))]

    @property
    def expert_parallel(self) -> bool:
        return any(isinstance(layer, ExpertParallelMoE) for layer in self.moe_layers)

    def to_expert_parallel(self, group=None) -> "MoETransformer":
        """Shard every MoE block's experts over `group` (None: the default process group), in
        place; returns self. Every rank must call it on a model with the same weights (the same
        seed). Embeddings, attention, norms, routers and dense FFNs stay replicated."""
        if self.expert_parallel:
            raise ValueError("the model is already expert-parallel")
        if not self.moe_layers:
            raise ValueError("a dense model (num_experts=1) has no experts to shard")
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                block.ffn = ExpertParallelMoE.from_layer(block.ffn, group)
        return self

    def sharded_parameters(self) -> dict[str, ExpertParallelMoE]:
        """name -> layer of every parameter this rank holds only a shard of: the experts of the
        ExpertParallelMoE blocks ([E / W, ...] here, [E, ...] in the single-process model)."""
        return {f"blocks.{i}.{name}": block.ffn for i, block in enumerate(self.blocks)
                if isinstance(block.ffn, ExpertParallelMoE)
                for name, _ in block.ffn.experts.named_parameters(prefix="ffn.experts")}

    @staticmethod
    def gather_shards(shard: torch.Tensor, layer: ExpertParallelMoE) -> torch.Tensor:
        """[E / W, ...] on every rank of layer's group -> [E, ...] (rank order). Collective."""
        parts = [torch.empty_like(shard) for _ in range(layer.world_size)]
        run_collective("gather expert shards", layer.group, dist.all_gather, parts, shard.contiguous())
        return torch.cat(parts)

    @torch.no_grad()
    def full_state_dict(self) -> dict:
        """The state dict of the equivalent single-process model, on the CPU: expert shards are
        gathered from every rank (collective when expert-parallel: call it on every rank)."""
        state = self.state_dict()
        for name, layer in self.sharded_parameters().items():
            state[name] = self.gather_shards(state[name], layer)
        return {name: tensor.cpu() for name, tensor in state.items()}

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
    def update_router_biases(self, tokens_per_expert: list[torch.Tensor] | None = None) -> None:
        """One aux-loss-free bias step in every MoE block whose router keeps a bias (router
        "sigmoid_bias"). tokens_per_expert: [E] per MoE block, default the last forward call's.
        Expert-parallel blocks first sum the loads over the ranks (collective), so the
        replicated biases stay identical. Call once per training step."""
        layers = self.moe_layers
        loads = [layer.stats.tokens_per_expert for layer in layers] if tokens_per_expert is None \
            else list(tokens_per_expert)
        if len(loads) != len(layers):
            raise ValueError(f"tokens_per_expert must hold one [E] tensor per MoE block ({len(layers)}), "
                             f"got {len(loads)}")
        for layer, load in zip(layers, loads, strict=True):
            if getattr(layer.router, "expert_bias", None) is None:
                continue
            if isinstance(layer, ExpertParallelMoE):
                load = load.clone()
                run_collective("router bias loads", layer.group, dist.all_reduce, load)
            layer.router.update_bias(load)

    @torch.no_grad()
    def expert_choices(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Run idx [B, L] and return each MoE block's chosen experts [B, L, k], best first."""
        chosen = []
        hooks = [layer.router.register_forward_hook(lambda _m, _i, routing: chosen.append(routing.expert_idx))
                 for layer in self.moe_layers]
        try:
            self(idx)
        finally:
            for hook in hooks:
                hook.remove()
        return [c.view(*idx.shape, -1) for c in chosen]

    def num_params(self, active: bool = False) -> int:
        """All parameters (the tied head counted once); active=True counts only the k routed
        experts a token uses in each MoE block, not all E. An expert-parallel model counts the
        whole model, all E experts of every block, on every rank (not this rank's shard)."""
        def per_expert(layer) -> int:
            return layer.experts.w_up[0].numel() * (3 if layer.experts.w_gate is not None else 2)

        held = sum(p.numel() for p in self.parameters())
        total = held + sum((layer.num_experts - layer.experts.num_experts) * per_expert(layer)
                           for layer in self.moe_layers)  # the shards other ranks hold (0 on one process)
        if not active:
            return total
        return total - sum((layer.num_experts - layer.k) * per_expert(layer) for layer in self.moe_layers)

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
