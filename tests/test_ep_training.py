"""Expert-parallel training of the chapter-07 model (chapter 12): 2 gloo ranks spawned here
train the same steps as one process, and a 2-rank checkpoint resumes on one process.

The single-process reference is the same TrainConfig on one process: micro_batches=2 shards of
every batch (rows s::2), run one after the other and averaged (gradient accumulation); on 2
ranks, rank r runs shard r. Per shard because the Switch aux loss is not additive over tokens
(f and P are statistics of the routed batch): with aux_loss_coef > 0 a 2-rank run differs from
one process on the whole batch, and equals one process on the same two shards.
"""


import numpy as np
import pytest
import torch
from ep_training_workers import HALF, RUNS, TINY, TRAIN
from gloo_ranks import spawn

from minimoe.data import load_corpus
from minimoe.experts import Experts
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.monitor import RoutingMonitor
from minimoe.parallel import Parallel, parallelize
from minimoe.train import TrainConfig, Trainer
from minimoe.train_cli import configs, parse_args

SPAWN_TIMEOUT_S = 90  # a hang fails the test instead of blocking CI (collectives time out after 30 s)
WORLD = 2
ATOL = 1e-5


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """(per-rank results of every run, folder of the checkpoints)."""
    import ep_training_workers

    tmp = tmp_path_factory.mktemp("ep_training")
    return spawn(ep_training_workers.run, WORLD, tmp, timeout_s=SPAWN_TIMEOUT_S), tmp


def _results(ranks, name: str) -> list[dict]:
    results = [r[name] for r in ranks[0]]
    for rank, result in enumerate(results):
        assert "exception" not in result, f"rank {rank}, run {name}:\n{result['exception']}"
    return results


@pytest.fixture(scope="module")
def reference(corpus):
    """name -> the one-process Trainer of each run after TRAIN.steps steps."""
    trainers = {}
    for name, config in RUNS.items():
        torch.manual_seed(0)
        trainers[name] = Trainer(MoETransformer(MoETransformerConfig(**config)), corpus, TRAIN)
        trainers[name].run(progress=False)
    return trainers


def _close(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).max())


@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_train_like_one_process(ranks, reference, name):
    expected = reference[name].history
    for rank, result in enumerate(_results(ranks, name)):
        h = result["history"]
        assert h["step"] == list(range(TRAIN.steps)) and h["val_step"] == [3, 6]
        for field in ("loss", "aux_loss", "z_loss", "val_loss", "load_share", "shard_load_share", "dropped_fraction",
                      "lr", "grad_norm"):
            assert _close(h[field], getattr(expected, field)) <= ATOL, (rank, field)
        assert h["loss"][-1] < h["loss"][0]  # it learns


def test_shard_loads_are_the_per_rank_routing(ranks):
    rank0, rank1 = _results(ranks, "topk")
    shard_load = np.asarray(rank0["history"]["shard_load_share"])  # [steps, shards, blocks, E]
    assert shard_load.shape == (TRAIN.steps, 2, 2, 4)
    assert not np.allclose(shard_load[:, 0], shard_load[:, 1])  # the ranks route different tokens
    assert np.allclose(shard_load.mean(1), rank0["history"]["load_share"])  # equal shard sizes: mean = batch share
    # routing_stats() stays per rank: the last shard's 4 rows x 32 positions x k=2 copies per block
    assert rank0["stats_tokens"] == rank1["stats_tokens"] == [4 * 32 * 2] * 2


def test_the_monitor_records_each_ranks_expert_gradients(ranks, corpus):
    """A RoutingMonitor built before the Trainer parallelises the model records, on each rank, the
    gradient norms of that rank's E / W experts; together they are the one-process model's, times W
    (recorded as backward ends, before the Trainer averages: an expert then holds the sum over the
    ranks' losses)."""
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**TINY))
    with RoutingMonitor(model) as monitor:
        Trainer(model, corpus, TRAIN).run(steps=HALF, progress=False)
    # one process accumulates 2 micro-batches per step (2 records each, one per MoE layer): the
    # second backward's records hold the whole gradient, which each rank has after its one backward
    per_step_layer = [r["expert_grad_norm"] for i, r in enumerate(monitor.grad_records) if i % 4 >= 2]
    assert len(per_step_layer) == 2 * HALF  # HALF steps x 2 MoE layers
    rank0, rank1 = (result["expert_grad_norms"] for result in _results(ranks, "topk"))
    assert len(rank0) == len(rank1) == 2 * HALF
    for expected, mine, theirs in zip(per_step_layer, rank0, rank1, strict=True):
        assert len(mine) == len(theirs) == 2  # E / W experts per rank
        assert _close(mine + theirs, WORLD * np.asarray(expected)) <= ATOL


def test_model_api_on_ranks(ranks):
    single = MoETransformer(MoETransformerConfig(**TINY))
    expert_weights = 2 * 3 * 4 * 32 * 32  # blocks x (w_gate, w_up, w_down) x E x d x h
    for result in _results(ranks, "topk"):
        assert result["expert_types"] == ["ExpertParallelExperts"] * 2 and result["all_expert_parallel"]
        assert result["params"] == single.num_params()  # the whole model, on every rank
        assert result["active_params"] == single.num_params(active=True)
        assert result["held_params"] == single.num_params() - expert_weights // 2


def test_router_biases_stay_identical_across_ranks(ranks, reference):
    results = _results(ranks, "sigmoid_bias")
    expected = [layer.router.expert_bias.tolist() for layer in reference["sigmoid_bias"].model.moe_layers]
    assert results[0]["biases"] == results[1]["biases"]  # bit for bit: the loads were summed over ranks
    assert _close(results[0]["biases"], expected) <= ATOL
    assert _close(expected, 0.0) > 0  # the biases moved


@pytest.mark.parametrize("name", list(RUNS))
def test_a_two_rank_checkpoint_resumes_on_one_process(ranks, reference, corpus, name):
    _, folder = ranks
    trainer = Trainer.load(folder / f"{name}.pt", corpus)
    assert trainer.step == HALF and all(type(layer.experts) is Experts for layer in trainer.model.moe_layers)
    assert trainer.model.moe_layers[0].experts.w_up.shape[0] == 4  # all experts, gathered
    trainer.run(progress=False)
    expected, ep = reference[name].history, _results(ranks, name)[0]["history"]
    assert _close(trainer.history.loss, expected.loss) <= ATOL
    assert _close(trainer.history.loss[HALF:], ep["loss"][HALF:]) <= ATOL
    for a, b in zip(trainer.model.state_dict().values(), reference[name].model.state_dict().values(), strict=True):
        assert _close(a, b) <= ATOL


@pytest.mark.parametrize("name", list(RUNS))
def test_a_checkpoint_resumes_resharded_over_two_ranks(ranks, name):
    """Trainer.load(parallel=Parallel()): the single-process checkpoint is cut into expert shards
    (weights and Adam moments) and continues exactly as the uninterrupted 2-rank run."""
    for result in _results(ranks, name):
        assert _close(result["resumed_loss"], result["history"]["loss"]) <= ATOL


def test_micro_batches_without_aux_loss_equal_the_whole_batch(corpus):
    """Cross-entropy and z-loss are means over tokens: without the aux loss, 2 shards of a batch
    train like the whole batch. The aux loss is not: f and P are statistics of the shard."""
    def history(micro_batches: int):
        torch.manual_seed(0)
        model = MoETransformer(MoETransformerConfig(**TINY, aux_loss_coef=0.0))
        config = TrainConfig(steps=4, batch_size=8, micro_batches=micro_batches, warmup_steps=1, eval_every=100)
        return Trainer(model, corpus, config).run(progress=False)

    whole, shards = history(1), history(2)
    assert _close(whole.loss, shards.loss) <= ATOL and _close(whole.z_loss, shards.z_loss) <= ATOL
    assert _close(whole.aux_loss, shards.aux_loss) > 1e-4  # f and P of a shard are not those of the batch


def test_micro_batches_are_checked(corpus):
    with pytest.raises(ValueError, match="micro_batches must divide batch_size=8, got 3"):
        TrainConfig(batch_size=8, micro_batches=3)
    with pytest.raises(ValueError, match="micro_batches must be >= 1"):
        TrainConfig(micro_batches=0)


def test_expert_parallel_needs_a_process_group_and_experts():
    with pytest.raises(RuntimeError, match="initialised process group"):
        parallelize(MoETransformer(MoETransformerConfig(**TINY)))
    with pytest.raises(RuntimeError, match="initialised process group"):
        Parallel()
    with pytest.raises(ValueError, match="model must contain an MoELayer to parallelize, got a MoETransformer"):
        parallelize(MoETransformer(MoETransformerConfig(**TINY).dense_equivalent()))


def test_command_line_arguments():
    args = parse_args(["--steps", "40", "--num-experts", "4", "--capacity-factor", "1.25"])
    model, train = configs(args, world=2)
    assert (model.num_experts, model.capacity_factor, model.d_model) == (4, 1.25, 64)
    assert (train.steps, train.micro_batches, train.batch_size) == (40, 2, 16)
    assert configs(parse_args(["--micro-batches", "4"]), world=2)[1].micro_batches == 4
    with pytest.raises(ValueError, match="k must be <= num_experts=2"):
        configs(parse_args(["--num-experts", "2", "--k", "3"]), world=1)
    with pytest.raises(SystemExit):
        parse_args(["--save-every", "-1"])
