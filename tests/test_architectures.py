"""minimoe.architectures: real models against their published counts, tiny models counted matrix
by matrix by hand, the dense limit, what one more expert adds, and input validation."""

import dataclasses

import pytest

from minimoe.architectures import (
    MODELS,
    PUBLISHED,
    Architecture,
    attention_params,
    breakdown,
    expert_params,
    moe_ffn_counts,
    mtp_module_params,
    parameter_counts,
    parse_count,
)

# Counts whose printed precision is coarser than 2%: "1.2T" stands for [1.15T, 1.25T). GLaM's
# weights add up to 1.162T (its 96.6B active count matches to 0.01%), printed as 1.2T.
ROUNDED_ONLY = {("GLaM 64B/64E", "total")}


def rounds_to(count: int, printed: str) -> bool:
    """Does `count`, rounded like `printed` ('1.2T': one decimal, in T), print the same?"""
    unit = parse_count("1" + printed[-1])
    decimals = len(printed[:-1].partition(".")[2])
    return round(count / unit, decimals) == float(printed[:-1])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_real_models_match_published_counts(name):
    published = PUBLISHED[name]
    total, active = parameter_counts(MODELS[name], embedding_active=published.embedding_active)
    for what, count, printed in (("total", total, published.total), ("active", active, published.active)):
        if printed is None:  # Switch-C: no active count was published
            continue
        error = count / parse_count(printed) - 1
        if (name, what) in ROUNDED_ONLY:
            assert rounds_to(count, printed), f"{name} {what}: {count:,} does not print as {printed}"
        else:
            assert abs(error) <= 0.02, f"{name} {what}: {count:,} vs published {printed} ({100 * error:+.2f}%)"


def test_every_model_has_a_published_entry_and_a_total():
    assert set(MODELS) == set(PUBLISHED)
    assert {"Mixtral 8x7B", "Mixtral 8x22B", "DeepSeek-V2", "DeepSeek-V3"} <= set(MODELS)
    assert all(PUBLISHED[name].total for name in MODELS)


def test_the_embedding_convention_moves_active_by_exactly_the_table():
    for arch in MODELS.values():
        with_table = parameter_counts(arch, embedding_active=True)
        without = parameter_counts(arch, embedding_active=False)
        assert with_table[0] == without[0]
        expected = 0 if arch.tied_embeddings else arch.vocab_size * arch.d_model
        assert with_table[1] - without[1] == expected


def test_deepseek_v3_with_its_mtp_module_is_the_hub_checkpoint():
    arch = MODELS["DeepSeek-V3"]
    total, _ = parameter_counts(arch)
    with_mtp, _ = parameter_counts(arch, include_mtp=True)
    assert with_mtp - total == mtp_module_params(arch)[0]
    assert abs(mtp_module_params(arch)[0] / 11.5e9 - 1) < 0.02  # README_WEIGHTS: 11.5B unique
    copies = 2 * arch.vocab_size * arch.d_model  # the checkpoint stores its own embedding and head
    assert abs((with_mtp + copies) / 685e9 - 1) < 0.005


def test_tiny_architecture_counted_by_hand():
    arch = Architecture(name="tiny", vocab_size=10, d_model=4, num_layers=2, n_heads=2, n_kv_heads=1,
                        head_dim=2, num_dense_layers=1, dense_hidden=6, num_experts=3, k=2,
                        num_shared_experts=1, expert_hidden=5)
    embedding = 10 * 4                    # [V, d]
    lm_head = 4 * 10                      # [d, V], untied
    w_q, w_k, w_v, w_o = 4 * 2 * 2, 4 * 1 * 2, 4 * 1 * 2, 2 * 2 * 4
    attention = 2 * (w_q + w_k + w_v + w_o)   # 2 layers x 48
    dense = 3 * 4 * 6                     # layer 0: gate, up [d, 6] and down [6, d]
    expert = 3 * 4 * 5                    # SwiGLU expert: gate, up [d, 5] and down [5, d]
    routed = 3 * expert                   # layer 1: 3 routed experts
    shared = 1 * expert                   # and 1 shared expert
    router = 4 * 3                        # [d, E]
    norms = (2 * 2 + 1) * 4               # 2 per block + the final one, RMSNorm: d each
    total = embedding + lm_head + attention + dense + routed + shared + router + norms
    active = total - (3 - 2) * expert     # one routed expert idle per token
    assert (total, active) == (520, 460)
    assert parameter_counts(arch) == (520, 460)
    parts = breakdown(arch)
    assert parts["attention"] == (96, 96)
    assert parts["routed_experts"] == (180, 120)
    assert parts["shared_experts"] == (60, 60)
    assert parts["norms"] == (20, 20)
    assert parameter_counts(arch, embedding_active=False) == (520, 420)


def test_tiny_mla_attention_counted_by_hand():
    arch = Architecture(name="tiny-mla", vocab_size=10, d_model=8, num_layers=1, attention="mla", n_heads=2,
                        q_lora_rank=3, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=1, v_head_dim=3,
                        num_experts=2, k=1, expert_hidden=4)
    query = 8 * 3 + 3 + 3 * 2 * (2 + 1)    # d -> q_lora, its norm, q_lora -> heads x (nope + rope)
    latent = 8 * (4 + 1) + 4               # d -> kv_lora + one shared rope key, the latent's norm
    key_value = 4 * 2 * (2 + 3)            # kv_lora -> heads x (nope key + value)
    out = 2 * 3 * 8                        # heads x v -> d
    assert attention_params(arch) == query + latent + key_value + out == 177
    no_q_lora = dataclasses.replace(arch, q_lora_rank=None)
    assert attention_params(no_q_lora) == 8 * 2 * 3 + latent + key_value + out


def test_tiny_encoder_decoder_with_layernorm_and_tied_embeddings():
    arch = Architecture(name="tiny-t5", vocab_size=10, d_model=4, num_layers=4, num_cross_attention_layers=2,
                        n_heads=2, head_dim=3, num_experts=2, k=1, expert_hidden=5, gated_experts=False,
                        tied_embeddings=True, norm="layernorm")
    attention = (4 + 2) * (4 * 2 * 3 * 4)   # 4 self- and 2 cross-attention blocks, 4 matrices of d x 6
    experts = 4 * 2 * (2 * 4 * 5)           # every block: 2 experts, up and down
    router = 4 * 4 * 2
    norms = (2 * 4 + 2 + 2) * 2 * 4         # 2 per block, 1 per cross-attention, a final norm per stack
    embedding = 10 * 4                      # shared with the output head
    total = embedding + attention + experts + router + norms
    assert parameter_counts(arch) == (total, total - 4 * (2 * 4 * 5))
    assert parameter_counts(arch, embedding_active=False) == parameter_counts(arch)


@pytest.mark.parametrize("name", ["Mixtral 8x7B", "DeepSeek-V3", "GLaM 64B/64E"])
def test_dense_model_has_total_equal_active(name):
    dense = dataclasses.replace(MODELS[name], num_experts=1, k=1, num_shared_experts=0)
    total, active = parameter_counts(dense)
    assert total == active


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_more_expert_adds_one_expert_per_moe_layer_and_no_active(name):
    arch = MODELS[name]
    bigger = dataclasses.replace(arch, num_experts=arch.num_experts + 1)
    (total, active), (total2, active2) = parameter_counts(arch), parameter_counts(bigger)
    moe_layers = arch.num_layers - arch.num_dense_layers
    router_column = arch.d_model  # the router gets one more output
    assert total2 - total == moe_layers * (expert_params(arch) + router_column)
    assert active2 - active == moe_layers * router_column


def test_one_more_expert_in_a_single_moe_layer_adds_exactly_one_expert():
    arch = Architecture(name="one layer", vocab_size=7, d_model=3, num_layers=1, n_heads=1,
                        num_experts=4, k=2, expert_hidden=5)
    bigger = dataclasses.replace(arch, num_experts=5)
    assert parameter_counts(bigger)[0] - parameter_counts(arch)[0] == 3 * 3 * 5 + 3
    assert parameter_counts(bigger)[1] - parameter_counts(arch)[1] == 3  # the router's new column only
    before, after = breakdown(arch)["routed_experts"], breakdown(bigger)["routed_experts"]
    assert after[0] - before[0] == expert_params(arch) and after[1] == before[1]


def test_moe_ffn_counts_by_hand():
    expert = 3 * 8 * 16
    assert moe_ffn_counts(8, 16, num_experts=4, k=2, num_layers=3) == (3 * (4 * expert + 32), 3 * (2 * expert + 32))
    assert moe_ffn_counts(8, 16, 4, 2, 3, num_shared_experts=1, gated=False) == (
        3 * (5 * 256 + 32), 3 * (3 * 256 + 32))
    arch = MODELS["DeepSeek-V3"]
    parts = breakdown(arch)
    moe = moe_ffn_counts(arch.d_model, arch.expert_hidden, arch.num_experts, arch.k,
                         arch.num_layers - arch.num_dense_layers, arch.num_shared_experts)
    assert moe == tuple(sum(parts[c][i] for c in ("routed_experts", "shared_experts", "router")) for i in (0, 1))


def test_parse_count():
    assert parse_count("46.7B") == pytest.approx(46.7e9)
    assert parse_count("1.2T") == pytest.approx(1.2e12)
    with pytest.raises(ValueError, match="text"):
        parse_count("12 billion")


BASE = dict(name="x", vocab_size=10, d_model=8, num_layers=2, n_heads=2, num_experts=4, k=2, expert_hidden=16)


@pytest.mark.parametrize("changes, error, argument", [
    (dict(k=5), ValueError, "k must be <= num_experts=4"),
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(d_model=-8), ValueError, "d_model"),
    (dict(vocab_size=10.0), TypeError, "vocab_size"),
    (dict(num_layers=True), TypeError, "num_layers"),
    (dict(expert_hidden="16"), TypeError, "expert_hidden"),
    (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
    (dict(num_dense_layers=3, dense_hidden=4), ValueError, "num_dense_layers must be <= num_layers=2"),
    (dict(num_dense_layers=1), ValueError, "dense_hidden"),
    (dict(dense_hidden=32), ValueError, "dense_hidden"),
    (dict(n_kv_heads=3), ValueError, "n_kv_heads must divide n_heads=2"),
    (dict(n_heads=3), ValueError, "head_dim"),
    (dict(attention="gqa"), ValueError, "attention"),
    (dict(norm="batchnorm"), ValueError, "norm"),
    (dict(attention="mla"), ValueError, "kv_lora_rank"),
    (dict(kv_lora_rank=4), ValueError, "kv_lora_rank"),
    (dict(gated_experts=1), TypeError, "gated_experts"),
    (dict(name=None), TypeError, "name"),
])
def test_bad_architectures_raise_naming_the_argument(changes, error, argument):
    with pytest.raises(error, match=argument):
        Architecture(**{**BASE, **changes})


def test_bad_arguments_of_the_functions_raise_naming_the_argument():
    with pytest.raises(TypeError, match="arch"):
        parameter_counts({"d_model": 8})
    with pytest.raises(TypeError, match="embedding_active"):
        breakdown(Architecture(**BASE), embedding_active="yes")
    with pytest.raises(ValueError, match="k must be <= num_experts=4"):
        moe_ffn_counts(8, 16, num_experts=4, k=5, num_layers=1)
    with pytest.raises(ValueError, match="num_layers"):
        moe_ffn_counts(8, 16, num_experts=4, k=2, num_layers=0)
    with pytest.raises(TypeError, match="gated"):
        moe_ffn_counts(8, 16, 4, 2, 1, gated=None)
