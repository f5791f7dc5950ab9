"""Total and active parameters of MoE transformers, counted from their published architecture numbers.

An `Architecture` holds the numbers a config.json or a paper's hyper-parameter table gives:
vocabulary, width, layers, the attention (multi-head / grouped-query, or DeepSeek's multi-head
latent attention), the dense and MoE feed-forward layers, tied embeddings, norms.
`parameter_counts(arch)` adds up every weight matrix and norm from those numbers; `breakdown(arch)`
gives the same sum per component. `MODELS` holds real models and `PUBLISHED` what their authors
report, so chapter 02 can compare the two.

How we count (the conventions behind every number here):
- total: every parameter of the model once. Tied embeddings count once.
- active: the parameters one token is multiplied with in a forward pass: everything except the
  routed experts the router did not pick (k of E are used; shared experts always are). The
  router counts as active (every token computes all E logits).
- the input embedding table is a lookup, not a matmul: a token reads one row of it.
  `embedding_active=True` (default) counts the whole table as active anyway, as Mistral does for
  Mixtral (12.9B; without the table it would be 12.75B); `embedding_active=False` leaves it out,
  as DeepSeek does (V3: 36.6B activated in its weights README, "37B" in the paper; with the
  table it would be 37.55B). With tied embeddings the table is also the output head, so it is
  always active.
- no linear biases (none of these models has any); relative-position biases of T5 / GLaM
  (a few thousand numbers) and DeepSeek-V3's per-expert selection bias (E numbers per layer,
  not a weight any token is multiplied with) are left out: under 1e-6 of any total here.
- DeepSeek-V3's multi-token-prediction (MTP) module is not part of the 671B (the paper reports
  685B on the hub = 671B main model + 14B MTP). `include_mtp=True` adds its own weights
  (11.6B here, "11.5B" in DeepSeek's weights README: a projection, norms and one more MoE
  transformer block); the checkpoint also stores copies of the embedding and output head for it
  (2 x 0.93B), which we do not count again: 671.0 + 11.6 + 1.9 = 684.5B, the hub's 685B.
"""

from dataclasses import dataclass

from minimoe import _checks

__all__ = [
    "Architecture", "MODELS", "PUBLISHED", "Published", "attention_params", "breakdown",
    "dense_ffn_params", "embedding_params", "expert_params", "ffn_params", "lm_head_params",
    "moe_ffn_counts", "mtp_module_params", "norm_params", "num_moe_layers", "parameter_counts", "parse_count",
    "router_params",
]

NORM_SIZES = {"rmsnorm": 1, "layernorm": 2}  # vectors of length d per norm: scale (and bias)
_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


@dataclass(frozen=True)
class Architecture:
    """A decoder-only (or, with cross-attention layers, encoder-decoder) MoE transformer.

    num_layers        transformer blocks (encoder + decoder blocks for an encoder-decoder)
    num_dense_layers  how many of them have a dense FFN of width dense_hidden; the other
                      num_layers - num_dense_layers blocks have an MoE FFN
    num_experts, k    routed experts per MoE layer and how many each token uses
    num_shared_experts  experts every token uses (DeepSeekMoE), each of width expert_hidden
    gated_experts     SwiGLU/GeGLU experts (3 matrices: gate, up, down) or not (2: up, down)
    gated_dense       the same for dense FFN layers; None means "like the experts"
    attention="mha"   multi-head attention; n_kv_heads < n_heads is grouped-query attention
                      (None: n_heads), head_dim None: d_model // n_heads
    attention="mla"   DeepSeek's multi-head latent attention: q_lora_rank (None: the query is
                      not compressed), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    num_cross_attention_layers  decoder blocks of an encoder-decoder, which have a cross-attention
    norm              "rmsnorm" (scale only) or "layernorm" (scale and bias)
    num_mtp_modules   DeepSeek-V3 multi-token-prediction modules (counted only with include_mtp)
    """

    name: str
    vocab_size: int
    d_model: int
    num_layers: int
    n_heads: int
    num_experts: int
    k: int
    expert_hidden: int
    attention: str = "mha"
    n_kv_heads: int | None = None
    head_dim: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    num_cross_attention_layers: int = 0
    num_dense_layers: int = 0
    dense_hidden: int | None = None
    num_shared_experts: int = 0
    gated_experts: bool = True
    gated_dense: bool | None = None
    tied_embeddings: bool = False
    norm: str = "rmsnorm"
    num_mtp_modules: int = 0

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {self.name!r}")
        for field in ("vocab_size", "d_model", "num_layers", "n_heads", "num_experts", "k", "expert_hidden"):
            _checks.positive_int(field, getattr(self, field))
        for field in ("num_cross_attention_layers", "num_dense_layers", "num_shared_experts", "num_mtp_modules"):
            _checks.positive_int(field, getattr(self, field), minimum=0)
        if self.k > self.num_experts:
            raise ValueError(f"k must be <= num_experts={self.num_experts}, got k={self.k}")
        for field in ("num_dense_layers", "num_cross_attention_layers"):
            if getattr(self, field) > self.num_layers:
                raise ValueError(f"{field} must be <= num_layers={self.num_layers}, got {getattr(self, field)}")
        for field in ("gated_experts", "tied_embeddings"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if self.gated_dense is not None and not isinstance(self.gated_dense, bool):
            raise TypeError(f"gated_dense must be a bool or None, got {self.gated_dense!r}")
        _checks.choice("norm", self.norm, tuple(NORM_SIZES))
        _checks.choice("attention", self.attention, ("mha", "mla"))
        if self.num_dense_layers > 0:
            if self.dense_hidden is None:
                raise ValueError(f"dense_hidden must be given when num_dense_layers={self.num_dense_layers} > 0")
            _checks.positive_int("dense_hidden", self.dense_hidden)
        elif self.dense_hidden is not None:
            raise ValueError(f"dense_hidden={self.dense_hidden} is given but num_dense_layers=0: set one or neither")
        if self.attention == "mha":
            self._check_mha()
        else:
            self._check_mla()

    def _check_mha(self):
        for field in _MLA_FIELDS:
            if getattr(self, field) is not None:
                raise ValueError(f"{field} is an attention='mla' setting, got {field}={getattr(self, field)} "
                                 "with attention='mha'")
        if self.n_kv_heads is not None:
            _checks.positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(f"n_kv_heads must divide n_heads={self.n_heads}, got n_kv_heads={self.n_kv_heads}")
        if self.head_dim is not None:
            _checks.positive_int("head_dim", self.head_dim)
        elif self.d_model % self.n_heads:
            raise ValueError(f"head_dim must be given when n_heads={self.n_heads} does not divide "
                             f"d_model={self.d_model}")

    def _check_mla(self):
        for field in ("n_kv_heads", "head_dim"):
            if getattr(self, field) is not None:
                raise ValueError(f"{field} is an attention='mha' setting, got {field}={getattr(self, field)} "
                                 "with attention='mla' (use qk_nope_head_dim, qk_rope_head_dim, v_head_dim)")
        for field in _MLA_FIELDS[1:]:
            if getattr(self, field) is None:
                raise ValueError(f"{field} must be given when attention='mla'")
            _checks.positive_int(field, getattr(self, field))
        if self.q_lora_rank is not None:
            _checks.positive_int("q_lora_rank", self.q_lora_rank)
        if self.num_cross_attention_layers:
            raise ValueError("num_cross_attention_layers must be 0 with attention='mla', "
                             f"got {self.num_cross_attention_layers}")


# ----- one component at a time -----------------------------------------------------------------

def num_moe_layers(arch: Architecture) -> int:
    """Blocks whose FFN is an MoE layer."""
    return arch.num_layers - arch.num_dense_layers


def embedding_params(arch: Architecture) -> int:
    """The input embedding table [vocab_size, d_model] (also the output head when tied)."""
    return arch.vocab_size * arch.d_model


def lm_head_params(arch: Architecture) -> int:
    """The output projection d_model -> vocab_size; 0 when tied to the embedding."""
    return 0 if arch.tied_embeddings else arch.vocab_size * arch.d_model


def attention_params(arch: Architecture) -> int:
    """One attention block (self- or cross-attention; they have the same shapes).

    mha: W_q [d, h*hd], W_k and W_v [d, kv*hd], W_o [h*hd, d].
    mla: the query goes d -> q_lora_rank (+ its norm) -> h*(nope+rope) (or d -> h*(nope+rope)
    directly); keys and values share a latent: d -> kv_lora_rank + rope (the rope part is one
    key shared by all heads), a norm, then kv_lora_rank -> h*(nope + v); W_o [h*v, d].
    """
    d, h = arch.d_model, arch.n_heads
    if arch.attention == "mha":
        kv = arch.n_kv_heads or h
        hd = arch.head_dim or d // h
        return d * h * hd + 2 * d * kv * hd + h * hd * d
    qk_head = arch.qk_nope_head_dim + arch.qk_rope_head_dim
    if arch.q_lora_rank is None:
        query = d * h * qk_head
    else:
        query = d * arch.q_lora_rank + arch.q_lora_rank + arch.q_lora_rank * h * qk_head
    latent = d * (arch.kv_lora_rank + arch.qk_rope_head_dim) + arch.kv_lora_rank
    key_value = arch.kv_lora_rank * h * (arch.qk_nope_head_dim + arch.v_head_dim)
    return query + latent + key_value + h * arch.v_head_dim * d


def ffn_params(d_model: int, d_hidden: int, gated: bool) -> int:
    """One feed-forward network d -> h -> d: 3 matrices if gated (SwiGLU), else 2."""
    return (3 if gated else 2) * d_model * d_hidden


def expert_params(arch: Architecture) -> int:
    """One expert (routed or shared)."""
    return ffn_params(arch.d_model, arch.expert_hidden, arch.gated_experts)


def dense_ffn_params(arch: Architecture) -> int:
    """One dense FFN layer (0 if the model has none)."""
    if arch.num_dense_layers == 0:
        return 0
    gated = arch.gated_experts if arch.gated_dense is None else arch.gated_dense
    return ffn_params(arch.d_model, arch.dense_hidden, gated)


def router_params(arch: Architecture) -> int:
    """One MoE layer's router: a linear map d_model -> num_experts, no bias."""
    return arch.d_model * arch.num_experts


def norm_params(arch: Architecture) -> int:
    """All block norms: one before attention, one before the FFN, one before each cross-attention,
    and a final norm per stack (two for an encoder-decoder). MLA's inner norms are in attention."""
    stacks = 2 if arch.num_cross_attention_layers else 1
    count = 2 * arch.num_layers + arch.num_cross_attention_layers + stacks
    return count * NORM_SIZES[arch.norm] * arch.d_model


def mtp_module_params(arch: Architecture) -> tuple[int, int]:
    """(total, active) of one DeepSeek-V3 MTP module, without the embedding and head it shares:
    two norms on its inputs, a projection [2d, d], one MoE transformer block, a final norm."""
    d, norm = arch.d_model, NORM_SIZES[arch.norm] * arch.d_model
    always_used = 3 * norm + 2 * d * d + attention_params(arch) + 2 * norm + router_params(arch)
    experts = arch.num_experts + arch.num_shared_experts
    used = arch.k + arch.num_shared_experts
    return always_used + experts * expert_params(arch), always_used + used * expert_params(arch)


def moe_ffn_counts(d_model: int, d_hidden: int, num_experts: int, k: int, num_layers: int,
                   num_shared_experts: int = 0, gated: bool = True) -> tuple[int, int]:
    """(total, active) parameters of num_layers MoE FFN layers, no attention or embeddings.

    Per layer: num_experts routed experts and num_shared_experts shared ones, each
    ffn_params(d_model, d_hidden, gated), plus a router d_model x num_experts. A token uses
    k routed experts, all shared experts and the router.
    """
    for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts),
                        ("k", k), ("num_layers", num_layers)):
        _checks.positive_int(name, value)
    _checks.positive_int("num_shared_experts", num_shared_experts, minimum=0)
    if k > num_experts:
        raise ValueError(f"k must be <= num_experts={num_experts}, got k={k}")
    if not isinstance(gated, bool):
        raise TypeError(f"gated must be a bool, got {gated!r}")
    expert = ffn_params(d_model, d_hidden, gated)
    router = d_model * num_experts
    total = num_layers * ((num_experts + num_shared_experts) * expert + router)
    active = num_layers * ((k + num_shared_experts) * expert + router)
    return total, active


# ----- the sums ------------------------------------------------------------------------------------

def breakdown(arch: Architecture, *, embedding_active: bool = True,
              include_mtp: bool = False) -> dict[str, tuple[int, int]]:
    """{component: (total, active)} for embedding, lm_head, attention, dense_ffn, routed_experts,
    shared_experts, router, norms (and mtp if include_mtp). The values add up to
    parameter_counts(arch)."""
    if not isinstance(arch, Architecture):
        raise TypeError(f"arch must be an Architecture, got {type(arch).__name__}")
    for flag, value in (("embedding_active", embedding_active), ("include_mtp", include_mtp)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    moe = num_moe_layers(arch)
    emb = embedding_params(arch)
    attention = (arch.num_layers + arch.num_cross_attention_layers) * attention_params(arch)
    dense = arch.num_dense_layers * dense_ffn_params(arch)
    parts = {
        "embedding": (emb, emb if (embedding_active or arch.tied_embeddings) else 0),
        "lm_head": (lm_head_params(arch), lm_head_params(arch)),
        "attention": (attention, attention),
        "dense_ffn": (dense, dense),
        "routed_experts": (moe * arch.num_experts * expert_params(arch), moe * arch.k * expert_params(arch)),
        "shared_experts": (moe * arch.num_shared_experts * expert_params(arch),) * 2,
        "router": (moe * router_params(arch),) * 2,
        "norms": (norm_params(arch),) * 2,
    }
    if include_mtp:
        total, active = mtp_module_params(arch)
        parts["mtp"] = (arch.num_mtp_modules * total, arch.num_mtp_modules * active)
    return parts


def parameter_counts(arch: Architecture, *, embedding_active: bool = True,
                     include_mtp: bool = False) -> tuple[int, int]:
    """(total, active) parameters as plain ints; see the module docstring for the conventions."""
    parts = breakdown(arch, embedding_active=embedding_active, include_mtp=include_mtp).values()
    return sum(t for t, _ in parts), sum(a for _, a in parts)


# ----- real models -----------------------------------------------------------------------------

MODELS: dict[str, Architecture] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json; Jiang et al. 2024, "Mixtral of Experts", table 1
    "Mixtral 8x7B": Architecture(
        name="Mixtral 8x7B", vocab_size=32000, d_model=4096, num_layers=32,
        n_heads=32, n_kv_heads=8, head_dim=128,
        num_experts=8, k=2, expert_hidden=14336),
    # mistralai/Mixtral-8x22B-Instruct-v0.1 config.json (vocab 32768; the first base release had 32000)
    "Mixtral 8x22B": Architecture(
        name="Mixtral 8x22B", vocab_size=32768, d_model=6144, num_layers=56,
        n_heads=48, n_kv_heads=8, head_dim=128,
        num_experts=8, k=2, expert_hidden=16384),
    # deepseek-ai/DeepSeek-V2 config.json; DeepSeek-AI 2024, "DeepSeek-V2", section 3.1
    "DeepSeek-V2": Architecture(
        name="DeepSeek-V2", vocab_size=102400, d_model=5120, num_layers=60,
        attention="mla", n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        num_dense_layers=1, dense_hidden=12288,
        num_experts=160, num_shared_experts=2, k=6, expert_hidden=1536),
    # deepseek-ai/DeepSeek-V3 config.json; DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", 4.2
    "DeepSeek-V3": Architecture(
        name="DeepSeek-V3", vocab_size=129280, d_model=7168, num_layers=61,
        attention="mla", n_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        num_dense_layers=3, dense_hidden=18432,
        num_experts=256, num_shared_experts=1, k=8, expert_hidden=2048,
        num_mtp_modules=1),
    # Du et al. 2021, "GLaM", table 4 (GLaM 64B/64E) and section 4: an MoE layer every other block,
    # top-2 of 64 experts, gated GELU only in the dense FFNs (experts have 2 matrices),
    # 256K SentencePiece vocabulary, embedding shared with the softmax, RMSNorm.
    "GLaM 64B/64E": Architecture(
        name="GLaM 64B/64E", vocab_size=256000, d_model=8192, num_layers=64,
        n_heads=128, head_dim=128,
        num_dense_layers=32, dense_hidden=32768, gated_dense=True,
        num_experts=64, k=2, expert_hidden=32768, gated_experts=False,
        tied_embeddings=True),
    # Fedus et al. 2021, "Switch Transformers", table 9 (Switch-C): encoder-decoder, 15 + 15 blocks,
    # every FFN an MoE of 2048 ReLU experts, top-1; T5 vocabulary (google/switch-c-2048 config.json:
    # 32128), shared embedding, RMS-style T5 layer norm.
    "Switch-C": Architecture(
        name="Switch-C", vocab_size=32128, d_model=2080, num_layers=30, num_cross_attention_layers=15,
        n_heads=32, head_dim=64,
        num_experts=2048, k=1, expert_hidden=6144, gated_experts=False,
        tied_embeddings=True),
}


@dataclass(frozen=True)
class Published:
    """What the authors report, as printed ("46.7B", "1.2T"); active None if never published.
    embedding_active: whether the publisher's active count includes the input embedding table."""

    total: str
    active: str | None
    source: str
    embedding_active: bool = True


PUBLISHED: dict[str, Published] = {
    "Mixtral 8x7B": Published("46.7B", "12.9B", "Mixtral of Experts (Jiang et al. 2024); Mistral AI announcement"),
    "Mixtral 8x22B": Published("141B", "39B", "Mistral AI, Cheaper, Better, Faster, Stronger (2024)"),
    # DeepSeek's convention (stated for V3 in its weights README) leaves the input embedding out
    "DeepSeek-V2": Published("236B", "21B", "DeepSeek-V2 (DeepSeek-AI 2024), abstract", embedding_active=False),
    "DeepSeek-V3": Published("671B", "37B", "DeepSeek-V3 Technical Report (DeepSeek-AI 2024), abstract; "
                             "README_WEIGHTS: 36.6B activated, embedding excluded", embedding_active=False),
    "GLaM 64B/64E": Published("1.2T", "96.6B", "GLaM (Du et al. 2021), table 4"),
    "Switch-C": Published("1571B", None, "Switch Transformers (Fedus et al. 2021), table 9"),
}

_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'46.7B' -> 46.7e9, '1.2T' -> 1.2e12."""
    if not isinstance(text, str) or len(text) < 2 or text[-1] not in _UNITS:
        raise ValueError(f"text must be a number followed by one of {sorted(_UNITS)}, got {text!r}")
    try:
        return float(text[:-1]) * _UNITS[text[-1]]
    except ValueError:
        raise ValueError(f"text must be a number followed by one of {sorted(_UNITS)}, got {text!r}") from None
