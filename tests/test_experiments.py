"""minimoe.experiments: the qualitative outcomes the course's chapters 04-06 show (collapse and
its cures, token dropping, the router zoo) with the default seeds, plus shape and content sanity
of the returned data. Each experiment runs once per module, at the defaults the chapters use."""

import math

import numpy as np
import pytest
import torch

from minimoe.experiments import (
    BALANCING,
    EVAL_SEED,
    NUM_EXPERTS,
    MoEClassifier,
    capacity_sweep,
    collapse_experiment,
    compare_routers,
    evaluate_classifier,
    make_task,
    train_classifier,
)
from minimoe.layer import MoELayer
from minimoe.routing import HashRouter

EVAL_TOKENS, BATCH = 4096, 256


@pytest.fixture(scope="module")
def collapse():
    return {balancing: collapse_experiment(balancing) for balancing in BALANCING}


@pytest.fixture(scope="module")
def sweep():
    return capacity_sweep()


@pytest.fixture(scope="module")
def zoo():
    return compare_routers()


# ---- 1. collapse ------------------------------------------------------------------------------

def test_collapse_without_balancing_develops_during_training(collapse):
    result = collapse["none"]
    assert result.final.load_entropy < 0.6 or result.final.dead_experts >= 1
    # rich get richer: the load gets more uneven than the router started with
    assert result.trace.load_entropy[-20:].mean() < result.trace.load_entropy[:5].mean() - 0.1


@pytest.mark.parametrize("balancing", ["aux_loss", "aux_free_bias"])
def test_balancing_keeps_every_expert_alive(collapse, balancing):
    final = collapse[balancing].final
    assert final.load_entropy > 0.9
    assert final.dead_experts == 0
    assert final.accuracy >= collapse["none"].final.accuracy


def test_z_loss_shrinks_logits_without_balancing(collapse):
    none, z = collapse["none"].final, collapse["z_loss"].final
    assert z.logsumexp < none.logsumexp / 2
    assert z.logit_max < none.logit_max
    assert z.load_entropy < 0.9  # z-loss is no balancing method


def test_collapse_trace_shapes_and_content(collapse):
    steps = 300
    for result in collapse.values():
        trace, final = result.trace, result.final
        assert trace.load.shape == (steps, NUM_EXPERTS)
        assert (trace.load.sum(1) == BATCH).all()  # top-1: one assignment per token
        assert ((trace.load_entropy >= 0) & (trace.load_entropy <= 1)).all()
        np.testing.assert_array_equal(trace.dead_experts, (trace.load == 0).sum(1))
        for name in ("logit_rms", "logit_max", "logsumexp", "loss"):
            assert getattr(trace, name).shape == (steps,) and np.isfinite(getattr(trace, name)).all()
        assert final.load.sum() == EVAL_TOKENS and 0 <= final.load_entropy <= 1
        assert final.cluster_expert.sum() == EVAL_TOKENS and final.dropped_fraction == 0


def test_collapse_is_reproducible():
    a, b = collapse_experiment("none", steps=5), collapse_experiment("none", steps=5)
    np.testing.assert_array_equal(a.trace.load, b.trace.load)
    np.testing.assert_array_equal(a.trace.loss, b.trace.loss)


def test_collapse_experiment_in_deepseek_v3s_setting_routes_two_renormalised_sigmoid_scores():
    result = collapse_experiment("aux_free_bias", steps=5, k=2, score="sigmoid", normalize=True,
                                 routed_scaling_factor=2.5)
    assert (result.trace.load.sum(1) == 2 * BATCH).all()  # two assignments per token
    assert result.final.kept_weight == pytest.approx(2.5 / 2)  # the two weights sum to 2.5
    plain = collapse_experiment("aux_free_bias", steps=5)
    assert (plain.trace.load.sum(1) == BATCH).all() and plain.final.kept_weight < 1


# ---- 2. capacity ------------------------------------------------------------------------------

def test_dropped_fraction_falls_to_zero(sweep):
    dropped = sweep.dropped_fraction
    assert dropped.shape == (2, 2, len(sweep.capacity_factors))
    np.testing.assert_array_equal(dropped[:, 0], dropped[:, 1])  # the policy picks which, not how many
    assert dropped[0, :, -1].max() == 0  # balanced routing at capacity factor 2.0
    for row in dropped.reshape(-1, dropped.shape[-1]):
        assert ((row >= 0) & (row <= 1)).all()
        positive = row[row > 0]
        assert (np.diff(positive) < 0).all() and (row[len(positive):] == 0).all()
    assert (dropped[1] >= dropped[0]).all() and (dropped[1, :, -1] > 0).all()  # skew overflows


def test_score_policy_keeps_the_heavier_assignments(sweep):
    dropped = sweep.dropped_fraction[:, 0]
    position, score = sweep.kept_weight[:, 0], sweep.kept_weight[:, 1]
    assert (score[dropped > 0] > position[dropped > 0]).all()
    np.testing.assert_allclose(position[dropped == 0], 0.5)  # k=2 weights sum to 1 per token
    low = sweep.capacity_factors <= 0.75
    assert (sweep.loss[:, 1, low] < sweep.loss[:, 0, low]).all()
    assert (sweep.tokens_dropped[:, 1] <= sweep.tokens_dropped[:, 0]).all()


def test_dropping_costs_quality(sweep):
    assert (sweep.loss[:, :, 0] > sweep.dropless_loss[:, None]).all()
    balanced_no_drop = sweep.dropped_fraction[0, 0] == 0
    np.testing.assert_allclose(sweep.loss[0, :, balanced_no_drop], sweep.dropless_loss[0], rtol=1e-6)
    assert (sweep.load.sum(1) == 2 * EVAL_TOKENS).all()


def test_per_cluster_accuracy_is_counted_token_by_token(sweep):
    """cluster_accuracy against a loop over the held-out tokens of a trained model; the sweep's
    dropless accuracy is its cluster accuracies weighted by the batch's cluster counts."""
    task = make_task()
    torch.manual_seed(0)
    model = MoEClassifier(MoELayer(task.d_model, 32, NUM_EXPERTS), task.num_classes)
    train_classifier(model, task, steps=20)
    skewed = 0.6 ** np.arange(task.num_clusters)
    final = evaluate_classifier(model, task, num_tokens=512, cluster_probs=skewed)
    batch = task.sample(512, seed=EVAL_SEED, cluster_probs=skewed)
    with torch.no_grad():
        predicted = model.eval()(batch["x"]).argmax(-1).tolist()
    right, seen = np.zeros(task.num_clusters), np.zeros(task.num_clusters)
    for p, label, c in zip(predicted, batch["labels"].tolist(), batch["clusters"].tolist(), strict=True):
        seen[c] += 1
        right[c] += p == label
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(final.cluster_accuracy, right / seen, equal_nan=True)
    np.testing.assert_allclose(sweep.cluster_probs.sum(1), 1)
    np.testing.assert_allclose(sweep.cluster_probs[0], 1 / task.num_clusters)
    np.testing.assert_allclose(sweep.cluster_probs[1], skewed / skewed.sum())
    counts = np.bincount(task.sample(EVAL_TOKENS, seed=EVAL_SEED)["clusters"].numpy(), minlength=task.num_clusters)
    assert (sweep.dropless_cluster_accuracy[0] * counts).sum() / EVAL_TOKENS == pytest.approx(
        sweep.dropless_accuracy[0], abs=1e-6)


# ---- 3. router zoo ----------------------------------------------------------------------------

def row(zoo, name):
    return zoo.routers.index(name)


def test_expert_choice_fills_every_expert_exactly(zoo):
    i = row(zoo, "expert_choice")
    capacity = math.ceil(EVAL_TOKENS / NUM_EXPERTS)
    assert (zoo.load[i] == capacity).all()
    assert zoo.max_violation[i] == 0 and zoo.cv[i] == 0 and zoo.load_entropy[i] == 1
    assert zoo.coverage[i, 0] > 0  # some tokens were picked by no expert


@pytest.mark.parametrize(("name", "experts"), [("switch", 1), ("topk", 2), ("noisy_topk", 2), ("sigmoid_bias", 2)])
def test_token_choice_gives_every_token_k_experts(zoo, name, experts):
    i = row(zoo, name)
    np.testing.assert_array_equal(zoo.coverage[i], [0, 1, 0] if experts == 1 else [0, 0, 1])
    assert zoo.experts_per_token[i] == experts and zoo.load[i].sum() == experts * EVAL_TOKENS


def test_hash_load_is_the_hash_tables_count(zoo):
    task = make_task()
    torch.manual_seed(0)
    router = HashRouter(task.d_model, NUM_EXPERTS, task.vocab_size, k=1, seed=0)
    vocab = torch.arange(task.vocab_size)
    table = router(torch.zeros(task.vocab_size, task.d_model), token_ids=vocab).expert_idx[:, 0]
    ids = task.sample(EVAL_TOKENS, seed=EVAL_SEED)["token_ids"]
    expected = torch.bincount(table[ids], minlength=NUM_EXPERTS).numpy()
    np.testing.assert_array_equal(zoo.load[row(zoo, "hash")], expected)


def test_router_comparison_sanity(zoo):
    R = len(zoo.routers)
    assert zoo.load.shape == (R, NUM_EXPERTS) and zoo.coverage.shape == (R, 3)
    np.testing.assert_allclose(zoo.coverage.sum(1), 1)
    np.testing.assert_allclose(zoo.load.sum(1), zoo.experts_per_token * EVAL_TOKENS)
    assert ((zoo.load_entropy >= 0) & (zoo.load_entropy <= 1)).all()
    assert (zoo.mutual_information >= 0).all() and (zoo.accuracy > 0.5).all()


# ---- input validation -------------------------------------------------------------------------

@pytest.mark.parametrize(("call", "error", "name"), [
    (lambda: collapse_experiment("dropout"), ValueError, "balancing"),
    (lambda: collapse_experiment("none", steps=0), ValueError, "steps"),
    (lambda: collapse_experiment("none", lr=-1.0), ValueError, "lr"),
    (lambda: capacity_sweep(capacity_factors=(1.0, 0.0)), ValueError, "capacity_factors"),
    (lambda: capacity_sweep(capacity_factors=()), ValueError, "capacity_factors"),
    (lambda: capacity_sweep(skew=1.5), ValueError, "skew"),
    (lambda: compare_routers(("topk", "top3")), ValueError, "routers"),
    (lambda: compare_routers("topk"), TypeError, "routers"),
    (lambda: make_task(num_clusters=0), ValueError, "num_clusters"),
    (lambda: make_task().sample(8, cluster_probs=[1.0, 2.0]), ValueError, "cluster_probs"),
    (lambda: MoEClassifier(torch.nn.Linear(4, 4), 3), TypeError, "moe"),
])
def test_bad_arguments_name_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
