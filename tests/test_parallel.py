"""minimoe.parallel: a layer made expert-parallel by `parallelize` against the single-process
MoELayer on 2 and 4 gloo ranks spawned here (one spawn per world size, every scenario inside it),
its errors, and the cost model against hand-computed cases."""


import itertools

import pytest
import torch
from gloo_ranks import spawn
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure
from parallel_workers import EQUALITY, SCENARIOS

from minimoe.layer import MoELayer
from minimoe.parallel import (
    all_to_all_cost,
    all_to_all_diagram,
    expected_nodes_per_token,
    expert_major_order,
    parallelize,
    split_by_rank,
    traffic_bytes,
)
from minimoe.parallel.__main__ import parse_args

SPAWN_TIMEOUT_S = 120  # a hang fails the test instead of blocking CI (collectives time out after 30 s)
ATOL = 1e-5
FOUR_RANK_SCENARIOS = ["k1", "k2_capacity", "k2_shared", "skewed_k2", "empty_rank", "shards", "average",
                       "mismatch"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """world size -> per-rank results of every scenario, spawned once per world size."""
    import parallel_workers

    return {world: spawn(parallel_workers.run, world, tmp_path_factory.mktemp(f"{world}_ranks"), scenarios,
                         timeout_s=SPAWN_TIMEOUT_S)
            for world, scenarios in ((2, list(SCENARIOS)), (4, FOUR_RANK_SCENARIOS))}


def _results(ranks, world: int, scenario: str) -> list[dict]:
    results = [r[scenario] for r in ranks[world]]
    for rank, result in enumerate(results):
        assert "exception" not in result, f"rank {rank} of {world}, {scenario}:\n{result['exception']}"
    return results


EQUALITY_RUNS = [(2, name) for name in EQUALITY] + [(4, name) for name in FOUR_RANK_SCENARIOS if name in EQUALITY]


@pytest.mark.parametrize("world, scenario", EQUALITY_RUNS, ids=[f"{w}ranks-{s}" for w, s in EQUALITY_RUNS])
def test_matches_single_process_layer(ranks, world, scenario):
    """Output, input / router / shared gradients equal MoELayer(x_r); each rank's expert
    gradients equal the sum over ranks s of MoELayer(x_s)'s, sliced to its experts."""
    for rank, result in enumerate(_results(ranks, world, scenario)):
        assert {"output", "input grad", "router.proj.weight grad", "experts.w_up grad"} <= set(result["diffs"])
        for what, diff in result["diffs"].items():
            assert diff <= ATOL, f"rank {rank} of {world}, {scenario}: {what} differs by {diff}"
        assert result["aux_loss_diff"] <= ATOL  # 0 on both for a rank without tokens
        assert result["ep_dropped_fraction"] == result["dropped_fraction"]


@pytest.mark.parametrize("world", [2, 4])
def test_skewed_router_one_rank_receives_everything(ranks, world):
    for rank, result in enumerate(_results(ranks, world, "skewed_k2")):
        assert result["sent"][1:] == [0] * (world - 1)  # every copy goes to rank 0's experts
        if rank == 0:
            assert all(n > 0 for n in result["received"])
        else:
            assert result["received"] == [0] * world


@pytest.mark.parametrize("world", [2, 4])
def test_rank_without_tokens_sends_nothing_and_still_serves_its_experts(ranks, world):
    results = _results(ranks, world, "empty_rank")
    for rank in (1, 3)[: world // 2]:
        assert results[rank]["sent"] == [0] * world
        assert sum(results[rank]["received"]) > 0


def test_an_unavailable_expert_gets_no_token(ranks):
    for result in _results(ranks, 2, "k2_unavailable_expert"):
        assert result["expert_load"][1] == 0 and sum(result["expert_load"]) > 0


def test_capacity_cases_drop_something(ranks):
    """Per-rank capacity is exercised: some assignments are dropped, the same as MoELayer(x_r)."""
    for scenario in ("k1_capacity", "k2_capacity", "skewed_k2_capacity"):
        assert max(r["dropped_fraction"] for r in _results(ranks, 2, scenario)) > 0


@pytest.mark.parametrize("world", [2, 4])
def test_parallelize_holds_the_shards_of_the_layer(ranks, world):
    for rank, result in enumerate(_results(ranks, world, "shards")):
        assert result["same_weights"] and result["rng_untouched"]
        assert result["local_experts"] == 2
        assert f"rank={rank}, world_size={world}, experts {2 * rank}..{2 * rank + 1} of {2 * world}" in result["repr"]
        assert result["indivisible"].startswith(f"ValueError: num_experts must be divisible by the world size {world}")
        assert result["indivisible"].endswith(f"got num_experts={2 * world + 1}")


def test_parallelize_a_transformer_equals_one_process_per_rank(ranks):
    """Embeddings, attention, norms, routers and shared experts replicated, experts sharded: the
    ranks' logits and losses are the single model's, the averaged gradients those of the mean loss."""
    for rank, result in enumerate(_results(ranks, 2, "transformer")):
        assert {"logits", "loss", "token_embedding.weight grad", "blocks.1.ffn.experts.w_down grad",
                "blocks.0.ffn.shared.w_up grad", "blocks.0.attn.qkv.weight grad"} <= set(result["diffs"])
        for what, diff in result["diffs"].items():
            assert diff <= ATOL, f"rank {rank}: {what} differs by {diff}"
        assert (result["params"], result["active"]) == (result["single_params"], result["single_active"])
        assert result["expert_shapes"] == [[2, 16, 8]] * 2  # 2 of the 4 experts per block, d=16, h=8


@pytest.mark.parametrize("world", [2, 4])
def test_average_gradients_gives_the_mean_loss_gradient(ranks, world):
    for rank, diffs in enumerate(_results(ranks, world, "average")):
        assert len(diffs) == 7  # router, w_gate / w_up / w_down of the experts and of the shared expert
        assert all(diff <= ATOL for diff in diffs.values()), (rank, diffs)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_built_differently_raise_on_every_rank(ranks, world):
    for rank, result in enumerate(_results(ranks, world, "mismatch")):
        expected = f"ValueError: rank {rank} of {world}: ranks were built with different configs"
        assert result["config"].startswith(expected)
        others = [r for r in range(world) if r != rank] if rank == 0 else [0]
        assert f"ranks {others} differ" in result["config"]
        assert "different replicated weights" in result["weights"]


def test_a_missing_peer_times_out_with_rank_and_phase(ranks):
    message = _results(ranks, 2, "timeout")[0]["message"]
    assert message.startswith("ExpertParallelError: rank 0 of 2: collective 'dispatch: token counts' failed")
    assert _results(ranks, 2, "timeout")[1]["message"] == "skipped the call"


# ---- without a process group ----

def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="initialised process group"):
        parallelize(MoELayer(8, 16, 4, 2))
    with pytest.raises(RuntimeError, match="initialised process group"):
        parallelize(torch.nn.Sequential(MoELayer(8, 16, 4, 2)))


def test_parallelize_needs_moe_layers():
    with pytest.raises(ValueError, match="model must contain an MoELayer to parallelize, got a Linear without one"):
        parallelize(torch.nn.Linear(8, 8))


def test_split_by_rank_and_its_errors():
    counts = torch.tensor([3, 0, 1, 4, 2, 2])
    assert split_by_rank(counts, 3).tolist() == [3, 5, 4]
    assert split_by_rank(counts, 2).tolist() == [4, 8]
    with pytest.raises(ValueError, match="world_size must divide num_experts=6, got 4"):
        split_by_rank(counts, 4)


def test_expert_major_order_by_hand():
    # rank 0 sends [a0, a1 | b0] (2 rows for local expert 0, 1 for expert 1), rank 1 sends [ | c0, c1]
    counts = torch.tensor([[2, 1], [0, 2]])
    order = expert_major_order(counts)
    assert order.tolist() == [0, 1, 2, 3, 4]  # already expert-major: a0 a1 (e0), b0 c0 c1 (e1)
    counts = torch.tensor([[1, 2], [2, 0], [1, 1]])  # arrival: s0e0 s0e1 s0e1 s1e0 s1e0 s2e0 s2e1
    assert expert_major_order(counts).tolist() == [0, 3, 4, 5, 1, 2, 6]
    assert expert_major_order(torch.zeros(3, 2, dtype=torch.int64)).tolist() == []


# ---- the cost model ----

def test_cost_flat_two_nodes_by_hand():
    # T=1000, k=2, d=1024 bf16: 2048 B per copy, 4,096,000 B of copies; W=16, G=8
    cost = all_to_all_cost(1000, 1024, 2, 16, dtype=torch.bfloat16, gpus_per_node=8, intra_bandwidth=400e9,
                           intra_latency=2e-6, inter_bandwidth=50e9, inter_latency=8e-6, concurrency=1)
    assert cost.bytes_per_copy == 2048
    assert cost.intra_bytes == 2 * 4_096_000 * 7 / 16 and cost.inter_bytes == 2 * 4_096_000 * 8 / 16
    assert (cost.intra_messages, cost.inter_messages) == (14, 16)
    # intra: 7 * 2 us + 1,792,000 B / 400 GB/s = 18.48 us; inter: 8 * 8 us + 2,048,000 B / 50 GB/s = 104.96 us
    assert cost.dispatch_seconds == pytest.approx(104.96e-6, rel=1e-12)
    assert cost.seconds == pytest.approx(209.92e-6, rel=1e-12)


def test_cost_hierarchical_two_nodes_by_hand():
    cost = all_to_all_cost(1000, 1024, 2, 16, dtype=torch.bfloat16, gpus_per_node=8, intra_bandwidth=400e9,
                           intra_latency=2e-6, inter_bandwidth=50e9, inter_latency=8e-6, hierarchical=True,
                           concurrency=1)
    # stage 1: 7 * 2 us + 4,096,000 * 7/8 B / 400 GB/s = 22.96 us; stage 2: 8 us + 2,048,000 B / 50 GB/s = 48.96 us
    assert cost.dispatch_seconds == pytest.approx(71.92e-6, rel=1e-12)
    assert cost.inter_bytes == 2 * 2_048_000 and cost.intra_bytes == 2 * 3_584_000
    assert (cost.intra_messages, cost.inter_messages) == (14, 2)


def test_cost_single_node_is_one_level_and_hierarchy_changes_nothing():
    # 2 CPU ranks, float32, d=16, k=2, 256 tokens: 256 copies of 64 B leave each rank each way
    flat = all_to_all_cost(256, 16, 2, 2, dtype=torch.float32, intra_bandwidth=1e9, intra_latency=1e-4, concurrency=1)
    assert flat.bytes_sent == 2 * 256 * 64 and flat.inter_bytes == 0 and flat.inter_messages == 0
    assert flat.dispatch_seconds == pytest.approx(1e-4 + 256 * 64 / 1e9)
    assert all_to_all_cost(256, 16, 2, 2, dtype=torch.float32, intra_bandwidth=1e9, intra_latency=1e-4,
                           hierarchical=True, concurrency=1) == flat
    # one GPU per node: nothing is intra-node, flat and hierarchical agree again
    one = dict(gpus_per_node=1, inter_bandwidth=10e9, inter_latency=5e-6)
    assert all_to_all_cost(64, 32, 4, 8, **one) == all_to_all_cost(64, 32, 4, 8, hierarchical=True, **one)


def test_cost_scales_with_dtype_imbalance_and_world():
    base = dict(tokens=4096, d_model=7168, k=8, world_size=64)
    bf16, fp8 = all_to_all_cost(**base), all_to_all_cost(**base, dtype=torch.float8_e4m3fn)
    assert bf16.bytes_sent == 2 * fp8.bytes_sent
    assert all_to_all_cost(**base, imbalance=2.0).bytes_sent == 2 * bf16.bytes_sent
    assert all_to_all_cost(**(base | dict(world_size=8))).inter_bytes == 0
    assert all_to_all_cost(0, 16, 2, 8, concurrency=1).dispatch_seconds == pytest.approx(7 * 3e-6)  # latency only
    assert all_to_all_cost(0, 16, 2, 8).dispatch_seconds == pytest.approx(3e-6)  # all 7 in flight: one latency


TWO_NODES = dict(tokens=1000, d_model=1024, k=2, world_size=16, dtype=torch.bfloat16, gpus_per_node=8,
                 intra_bandwidth=400e9, intra_latency=2e-6, inter_bandwidth=50e9, inter_latency=8e-6)


@pytest.mark.parametrize("concurrency, hierarchical, microseconds", [
    # flat, all in flight: intra 2 + 4.48 us; inter 8 + 40.96 us (the bytes of the serial case above)
    (None, False, 48.96),
    # flat, 4 at a time: intra ceil(7/4) = 2 rounds: 4 + 4.48; inter ceil(8/4) = 2: 16 + 40.96
    (4, False, 56.96),
    (7, False, 56.96),  # 7 in flight: one round inside the node, but ceil(8/7) = 2 between: 16 + 40.96
    (8, False, 48.96),  # 8 in flight: one round on both links
    # hierarchical, all in flight: stage 1 2 + 8.96 us, stage 2 (1 message) 8 + 40.96 us
    (None, True, 59.92),
    # hierarchical, 2 at a time: stage 1 ceil(7/2) = 4 rounds: 8 + 8.96; stage 2: 8 + 40.96
    (2, True, 65.92),
])
def test_cost_concurrency_by_hand(concurrency, hierarchical, microseconds):
    cost = all_to_all_cost(**TWO_NODES, concurrency=concurrency, hierarchical=hierarchical)
    assert cost.dispatch_seconds == pytest.approx(microseconds * 1e-6, rel=1e-12)
    serial = all_to_all_cost(**TWO_NODES, concurrency=1, hierarchical=hierarchical)
    assert (cost.intra_bytes, cost.inter_bytes, cost.intra_messages) == (serial.intra_bytes, serial.inter_bytes,
                                                                        serial.intra_messages)


@settings(max_examples=60)
@given(tokens=st.integers(0, 5000), nodes=st.integers(1, 8), per_node=st.sampled_from([1, 2, 4, 8]),
       c=st.integers(1, 70), hierarchical=st.booleans())
def test_cost_concurrency_properties(tokens, nodes, per_node, c, hierarchical):
    kw = dict(tokens=tokens, d_model=256, k=4, world_size=nodes * per_node, gpus_per_node=per_node,
              hierarchical=hierarchical)
    t = {q: all_to_all_cost(**kw, concurrency=q).dispatch_seconds for q in (1, c, c + 1, None)}
    assert t[1] >= t[c] >= t[c + 1] >= t[None]  # more in flight never costs more
    if c >= nodes * per_node - 1:  # as many in flight as there are peers: the same as all at once
        assert t[c] == t[None]
    # the serial latency term: every message pays alpha (3 us inside the node, 10 us between)
    zero = all_to_all_cost(**(kw | dict(tokens=0)), concurrency=1).dispatch_seconds
    world = nodes * per_node
    if hierarchical:
        assert zero == pytest.approx((per_node - 1) * 3e-6 + (nodes - 1) * 10e-6)
    else:
        assert zero == pytest.approx(max((per_node - 1) * 3e-6, (world - per_node) * 10e-6))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(world_size=12), ValueError, "world_size must be a multiple of gpus_per_node=8, got 12"),
    (dict(imbalance=0.5), ValueError, "imbalance must be >= 1"),
    (dict(dtype="bf16"), TypeError, "dtype must be a torch.dtype"),
    (dict(inter_bandwidth=0), ValueError, "inter_bandwidth must be > 0"),
    (dict(intra_latency=-1), ValueError, "intra_latency must be >= 0"),
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(concurrency=0), ValueError, "concurrency must be >= 1"),
    (dict(concurrency=2.5), TypeError, "concurrency must be an int"),
])
def test_cost_rejects_bad_arguments(kwargs, error, match):
    args = dict(tokens=128, d_model=64, k=2, world_size=16) | kwargs
    with pytest.raises(error, match=match):
        all_to_all_cost(**args)


def test_traffic_bytes_by_hand():
    traffic = torch.tensor([[5, 1, 2], [0, 4, 3], [6, 0, 7]])
    # rank 0 sends 1 + 2 copies and returns 0 + 6 results; rank 1: 0 + 3 and 1 + 0; rank 2: 6 + 0 and 2 + 3
    assert traffic_bytes(traffic, 10).tolist() == [90, 40, 110]
    with pytest.raises(ValueError, match="traffic must be square"):
        traffic_bytes(torch.zeros(2, 3), 10)


def test_expected_nodes_per_token():
    assert expected_nodes_per_token(8, 1, 4) == pytest.approx(1.0)
    assert expected_nodes_per_token(8, 8, 2) == pytest.approx(2.0)
    # E=4 on 2 nodes, k=2: the pair is on one node with probability 2/6
    assert expected_nodes_per_token(4, 2, 2) == pytest.approx(1 * 2 / 6 + 2 * 4 / 6)
    # E=6 on 3 nodes (experts 0-1, 2-3, 4-5), k=3: counted over all 20 choices of 3 experts
    nodes = [len({e // 2 for e in choice}) for choice in itertools.combinations(range(6), 3)]
    assert expected_nodes_per_token(6, 3, 3) == pytest.approx(sum(nodes) / len(nodes))
    with pytest.raises(ValueError, match="nodes dividing num_experts"):
        expected_nodes_per_token(10, 2, 4)


def test_all_to_all_diagram():
    fig = all_to_all_diagram(torch.tensor([[5, 1], [0, 4]]))
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert fig.axes[0].get_xlabel() == "token copies (rows)"
    with pytest.raises(ValueError, match="square"):
        all_to_all_diagram([[1, 2, 3], [4, 5, 6]])


def test_demo_arguments():
    args = parse_args(["--steps", "3", "--backend", "nccl"])
    assert (args.steps, args.backend, args.tokens) == (3, "nccl", 256)
    with pytest.raises(SystemExit):
        parse_args(["--tokens", "0"])


# ---- the model against DeepEP's published measurements ----

def deepep_model(world, tokens, copy_dtype, concurrency):
    """The cost model on DeepEP's H800 test bed: one phase (dispatch or combine), microseconds."""
    from minimoe.parallel import deepep
    return all_to_all_cost(tokens, deepep.HIDDEN, deepep.TOP_K, world, dtype=copy_dtype,
                           gpus_per_node=deepep.GPUS_PER_NODE, intra_bandwidth=deepep.NVLINK_BANDWIDTH,
                           inter_bandwidth=deepep.RDMA_BANDWIDTH, concurrency=concurrency).dispatch_seconds * 1e6


def test_deepep_table_is_consistent():
    # the transcription: every low-latency bandwidth is all k copies' bytes over the latency
    from minimoe.parallel import deepep
    copies = deepep.LOW_LATENCY_TOKENS * deepep.TOP_K
    for dispatch_us, combine_us, dispatch_gbs, combine_gbs in deepep.LOW_LATENCY.values():
        assert copies * deepep.FP8_COPY_BYTES / dispatch_us / 1e3 == pytest.approx(dispatch_gbs, rel=0.03)
        assert copies * deepep.BF16_COPY_BYTES / combine_us / 1e3 == pytest.approx(combine_gbs, rel=0.03)
    assert sorted(deepep.NORMAL) == [8, 16, 32, 64] and sorted(deepep.LOW_LATENCY) == [8, 16, 32, 64, 128, 256]


def test_overlapped_model_tracks_deepep_and_serial_does_not():
    """What chapter 10 states: with every message in flight the model is within a factor of 2 of
    every low-latency measurement (below it: a fixed cost of some 40-90 us per call is missing);
    charging the latencies in series is 4x too slow at EP 64 and 13x at EP 256."""
    from minimoe.parallel import deepep
    for world, (dispatch_us, combine_us, _, _) in deepep.LOW_LATENCY.items():
        for measured, dtype in ((dispatch_us, torch.float8_e4m3fn), (combine_us, torch.bfloat16)):
            overlapped = deepep_model(world, deepep.LOW_LATENCY_TOKENS, dtype, None)
            assert 0.5 < overlapped / measured < 1.0
    assert deepep_model(64, 128, torch.float8_e4m3fn, 1) / deepep.LOW_LATENCY[64][0] > 3.9
    assert deepep_model(256, 128, torch.float8_e4m3fn, 1) / deepep.LOW_LATENCY[256][0] > 13
