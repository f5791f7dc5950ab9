"""minimoe.train: the schedule, learning on the corpus, early stopping, the History, and
checkpoints that resume bit-exactly."""

import copy
import math

import pytest
import torch

from minimoe.data import load_corpus
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.reference import kept_assignments
from minimoe.train import History, TrainConfig, Trainer, evaluate, learning_rate, steps_for_budget

TINY = dict(seq_len=32, d_model=32, n_layers=2, n_heads=4, d_hidden=32, num_experts=4, k=2)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def test_learning_rate_warms_up_linearly_then_follows_the_cosine():
    config = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert [learning_rate(s, config) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    for step in (10, 40, 70, 109):
        progress = (step - 10) / 99
        assert learning_rate(step, config) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    assert learning_rate(109, config) == pytest.approx(0.1)


def test_a_few_dozen_steps_lower_the_loss(corpus):
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**TINY))
    before = evaluate(model, corpus, num_batches=4, batch_size=16)
    assert before == pytest.approx(math.log(96), abs=0.1)  # near-uniform at initialisation
    history = Trainer(model, corpus, TrainConfig(steps=40, batch_size=16, eval_every=20)).run(progress=False)
    assert history.val_step == [20, 40]
    assert history.val_loss[-1] < before - 1.0
    assert sum(history.loss[-5:]) / 5 < history.loss[0] - 0.8


def test_history_records_every_step(corpus):
    """Step 0's routing in the History against the same initial model run here on the two
    shards of batch 0, its assignments counted and its capacity applied one by one."""
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**TINY, capacity_factor=1.0))
    twin = copy.deepcopy(model)
    history = Trainer(model, corpus, TrainConfig(steps=6, batch_size=4, micro_batches=2, eval_every=100)).run(
        progress=False)
    assert history.step == list(range(6)) and history.val_step == [6]
    assert history.array("load_share").shape == (6, 2, 4) and history.array("shard_load_share").shape == (6, 2, 2, 4)

    x, y, _ = corpus.batch("train", 4, 32, 0, 0)
    counts, dropped = torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2)  # [shard, block, E], [block]
    for shard in range(2):
        twin(x[shard::2], y[shard::2])
        for block, layer in enumerate(twin.moe_layers):
            routing = layer.last_routing
            counts[shard, block] = torch.bincount(routing.expert_idx.reshape(-1), minlength=4).double()
            capacity = math.ceil(2 * 64 * 1.0 / 4)  # k * T * capacity_factor / E, T = 2 rows x 32
            dropped[block] += 128 - len(kept_assignments(routing, 4, capacity, "position"))
    total = counts.sum(0)
    step0 = {name: torch.tensor(getattr(history, name)[0], dtype=torch.float64)
             for name in ("load_share", "shard_load_share", "dropped_fraction")}
    torch.testing.assert_close(step0["load_share"], total / total.sum(-1, keepdim=True))
    torch.testing.assert_close(step0["shard_load_share"], counts / 128)
    torch.testing.assert_close(step0["dropped_fraction"], dropped.double() / 256)
    assert sum(history.dropped_fraction[0]) > 0  # capacity factor 1 drops something here
    assert all(a > 0 for a in history.aux_loss) and all(t > 0 for t in history.tokens_per_s)
    with pytest.raises(ValueError, match="name must be a History field"):
        history.array("accuracy")


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_grad_norm_is_the_norm_before_clipping(corpus, grad_clip):
    """Step 0's grad_norm against the gradient of the same initial model on batch 0, computed here."""
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**TINY))
    twin = copy.deepcopy(model)
    history = Trainer(model, corpus, TrainConfig(steps=2, batch_size=4, grad_clip=grad_clip)).run(progress=False)
    x, y, _ = corpus.batch("train", 4, 32, 0, 0)
    twin(x, y)[1].backward()
    norm = math.sqrt(sum(float(p.grad.double().square().sum()) for p in twin.parameters() if p.grad is not None))
    assert norm > 1e-2  # so the 1e-3 clip does clip, and the norm recorded is the one before
    assert history.grad_norm[0] == pytest.approx(norm, rel=1e-4)
    assert len(history.grad_norm) == 2


def test_max_seconds_stops_early_and_validates_on_the_way_out(corpus):
    model = MoETransformer(MoETransformerConfig(**TINY))
    history = Trainer(model, corpus, TrainConfig(steps=50, batch_size=4, max_seconds=1e-9)).run(progress=False)
    assert history.step == [0] and history.val_step == [1]


@pytest.mark.parametrize("router", ["noisy_topk", "sigmoid_bias"])  # global RNG; a bias buffer
def test_a_resumed_run_equals_an_uninterrupted_one_bit_for_bit(corpus, tmp_path, router):
    def fresh():
        torch.manual_seed(5)
        model = MoETransformer(MoETransformerConfig(**TINY, router=router, bias_update_rate=0.01))
        return Trainer(model, corpus, TrainConfig(steps=8, batch_size=4, eval_every=3))

    straight = fresh()
    straight.run(progress=False)

    interrupted = fresh()
    interrupted.run(steps=4, progress=False)
    interrupted.save(tmp_path / "run.pt")
    torch.manual_seed(123)  # whatever happens between the runs must not matter
    resumed = Trainer.load(tmp_path / "run.pt", corpus)
    assert resumed.step == 4
    resumed.run(progress=False)

    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for field in ("step", "lr", "loss", "aux_loss", "z_loss", "load_share", "dropped_fraction", "grad_norm",
                  "val_step", "val_loss"):
        assert getattr(straight.history, field) == getattr(resumed.history, field), field


def test_steps_for_budget_scales_with_the_budget_and_leaves_the_model_alone(corpus):
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**TINY))
    model(*corpus.batch("train", 2, 8)[:2])  # a model that has run holds graph tensors (aux_loss...)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(batch_size=4)
    short, long = (steps_for_budget(model, corpus, config, s, calibration_steps=3) for s in (0.05, 5.0))
    assert 1 <= short and long >= 10 * short  # 100x the budget; a wide margin for timing noise
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="seconds must be > 0"):
        steps_for_budget(model, corpus, config, 0)


def test_bad_arguments_name_themselves(corpus):
    with pytest.raises(ValueError, match="min_lr must be <= lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        TrainConfig(max_seconds=0)
    with pytest.raises(ValueError, match="vocab_size must equal the corpus's 96"):
        Trainer(MoETransformer(MoETransformerConfig(**TINY, vocab_size=50)), corpus)
    with pytest.raises(TypeError, match="model must be an MoETransformer"):
        Trainer(torch.nn.Linear(2, 2), corpus)
    assert History().step == []


def test_routers_get_their_own_undecayed_group_with_its_learning_rate(corpus):
    """Three AdamW groups: matrices (decayed), norms, routers (weight_decay 0, lr * router_lr_scale);
    one step moves the routers by exactly what AdamW without decay at that lr gives."""
    torch.manual_seed(0)
    model = MoETransformer(MoETransformerConfig(**TINY))
    router = [p for layer in model.moe_layers for p in layer.router.parameters()]
    start = [p.detach().clone() for p in router]
    trainer = Trainer(model, corpus, TrainConfig(steps=5, batch_size=8, weight_decay=0.5, router_lr_scale=0.25,
                                                 warmup_steps=0, grad_clip=0))
    decay, norms, routers = trainer.optimizer.param_groups
    assert {id(p) for p in routers["params"]} == {id(p) for p in router}
    assert (decay["weight_decay"], norms["weight_decay"], routers["weight_decay"]) == (0.5, 0.0, 0.0)
    assert not {id(p) for p in router} & {id(p) for p in decay["params"] + norms["params"]}
    trainer.train_step()
    assert routers["lr"] == pytest.approx(0.25 * trainer.config.lr) and decay["lr"] == pytest.approx(trainer.config.lr)
    # Adam's first step (bias-corrected m = g, v = g^2) moves each weight by lr * g / (|g| + eps),
    # with no decay term
    for p, p0 in zip(router, start, strict=True):
        expected = 0.25 * trainer.config.lr * p.grad / (p.grad.abs() + 1e-8)
        torch.testing.assert_close(p0 - p.detach(), expected, rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match=r"router_lr_scale must be > 0, got 0"):
        TrainConfig(router_lr_scale=0)
