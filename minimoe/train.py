"""Train an MoETransformer on the corpus: AdamW, linear warmup then cosine decay, gradient
clipping, periodic validation, a per-step History of losses and routing, and checkpoints that
resume bit-exactly.

    trainer = Trainer(model, load_corpus(), TrainConfig(steps=300))
    history = trainer.run()
    trainer.save("run.pt"); trainer = Trainer.load("run.pt", corpus)

Data + expert parallelism (chapter 12; `minimoe train` under torchrun): give the Trainer
`parallel=minimoe.parallel.Parallel()`, which makes the model expert-parallel and does every
collective; this module itself imports nothing distributed (`SingleProcess` is the one-process
stand-in). Each global batch is cut into `micro_batches` shards, rows s::M; rank r of W runs the
shards s with s % W == r, one after another, and the loss of the step is the mean of the shard
losses. The same config on one process runs all M shards itself (gradient accumulation), so a
W-rank run and a one-process run with the same micro_batches take the same steps, up to float
rounding. Per shard, not per batch, because the Switch aux loss of a shard is not additive: f
and P are statistics of the tokens it routes (cross-entropy and z-loss, being means over tokens,
would not care). Random draws in the forward (the noisy top-k router's noise) are seeded per
(seed, step, shard), so they too do not depend on which rank runs a shard.
"""

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from tqdm import tqdm  # the text bar: tqdm.auto needs ipywidgets in notebooks

from minimoe import _checks, metrics
from minimoe._tensorboard import add_load_share, summary_writer
from minimoe.data import Corpus
from minimoe.model import MoETransformer, MoETransformerConfig


class SingleProcess:
    """The processes a Trainer runs on, when it is just this one: rank 0 of 1, every collective
    the identity. `minimoe.parallel.Parallel` has the same methods over a process group."""

    rank, world_size = 0, 1

    def parallelize(self, model):
        return model

    def all_gather(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        """x [...] -> [1, ...]."""
        return x[None]

    def all_reduce(self, x: torch.Tensor, phase: str) -> torch.Tensor:
        return x

    def average_gradients(self, model) -> None:
        pass

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))

    def full_state_dict(self, model) -> dict:
        return {name: tensor.cpu() for name, tensor in model.state_dict().items()}

    def gather_optimizer_state(self, model, state: dict, names: list[str]) -> dict:
        return state

    def shard_optimizer_state(self, model, state: dict, names: list[str]) -> dict:
        return state


@dataclass(frozen=True)
class TrainConfig:
    """steps: the schedule's length (the cosine reaches min_lr at the last step).
    max_seconds: stop `run` early once this much training time has passed (equal-time
    comparisons); None trains all steps. Batches depend only on (seed, step).
    micro_batches: shards per batch (rows s::M), each a forward/backward of its own; the loss is
    their mean. An expert-parallel run needs M divisible by its W ranks (each runs M / W).
    router_lr_scale: the routers' learning rate as a multiple of lr (their own AdamW group, never
    weight-decayed). 1 by default: 0.3 did not lower chapter 07's validation loss beyond the seed
    spread (course/results/ch07_study_default_1000.json)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    seed: int = 0
    max_seconds: float | None = None
    micro_batches: int = 1
    router_lr_scale: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "micro_batches"):
            _checks.positive_int(name, getattr(self, name))
        if self.batch_size % self.micro_batches:
            raise ValueError(f"micro_batches must divide batch_size={self.batch_size}, got {self.micro_batches}")
        _checks.positive_int("warmup_steps", self.warmup_steps, minimum=0)
        _checks.positive_int("seed", self.seed, minimum=0)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            _checks.non_negative(name, getattr(self, name))
        _checks.positive("router_lr_scale", self.router_lr_scale)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr={self.lr}, got {self.min_lr}")
        _checks.positive("max_seconds", self.max_seconds, none_means="no time limit")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup from lr / warmup_steps to lr, then cosine from lr down to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - 1 - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass
class History:
    """One entry per training step (lists, so a checkpoint stores them as plain data).

    load_share[i]        [n_moe_blocks][E] share of the assignments routed to each expert at step i
    dropped_fraction[i]  [n_moe_blocks] share of assignments dropped by capacity
    shard_load_share[i]  [micro_batches][n_moe_blocks][E] load_share of each shard (on W ranks,
                         shard s ran on rank s % W: the per-rank routing)
    grad_norm[i]         the total gradient norm before clipping
    val_step, val_loss   the validation cross-entropy (nats per character) when it was measured
    """

    step: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)
    z_loss: list = field(default_factory=list)
    load_share: list = field(default_factory=list)
    dropped_fraction: list = field(default_factory=list)
    shard_load_share: list = field(default_factory=list)
    tokens_per_s: list = field(default_factory=list)
    grad_norm: list = field(default_factory=list)
    val_step: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)

    def array(self, name: str) -> np.ndarray:
        """A field as a NumPy array, e.g. array("load_share") -> [steps, n_moe_blocks, E]."""
        if name not in {f.name for f in fields(self)}:
            raise ValueError(f"name must be a History field {[f.name for f in fields(self)]}, got {name!r}")
        return np.asarray(getattr(self, name), dtype=float)


@torch.no_grad()
def evaluate(model: MoETransformer, corpus: Corpus, num_batches: int = 8, batch_size: int = 32,
             seed: int = 0, split: str = "val", parallel=None) -> float:
    """Mean cross-entropy (nats per character) of `model` on num_batches fixed windows of split.
    parallel (a `minimoe.parallel.Parallel`, collective: every rank calls it): rank r runs rows r::W."""
    parallel = parallel or SingleProcess()
    rank, world = parallel.rank, parallel.world_size
    if batch_size % world:
        raise ValueError(f"batch_size must be divisible by the {world} ranks, got {batch_size}")
    was_training = model.training
    model.eval()
    device = model.token_embedding.weight.device
    losses = []
    for i in range(_checks.positive_int("num_batches", num_batches)):
        x, y, _ = corpus.batch(split, batch_size, model.config.seq_len, seed=seed, step=i)
        model(x[rank::world].to(device), y[rank::world].to(device))
        task = parallel.all_reduce(model.last_losses["task"].double().reshape(1), "validation loss")
        losses.append(float(task) / world)
    model.train(was_training)
    return float(np.mean(losses))


class Trainer:
    """Owns the model, the optimiser, the step counter and the History; `run` trains.

    parallel: None (this process alone) or a `minimoe.parallel.Parallel`: the Trainer then makes
    `model` expert-parallel in place (every rank passes the same model, built with the same seed)
    and is data parallel over the rest; see the module docstring.
    writer: None (no logging; tensorboard is not imported), a `torch.utils.tensorboard.SummaryWriter`
    or a log directory to make one in (`pip install minimoe[tensorboard]`). Rank 0 then logs each
    step's History entry as it is made (see `_log_step`; global_step = the History's step), and
    val/loss at each validation, and flushes at the end of `run`. An argument, like `parallel`,
    and not a TrainConfig field: a writer is an open file, not part of the run a checkpoint stores."""

    def __init__(self, model: MoETransformer, corpus: Corpus, config: TrainConfig = TrainConfig(), parallel=None,
                 writer=None):
        if not isinstance(model, MoETransformer):
            raise TypeError(f"model must be an MoETransformer, got {type(model).__name__}")
        if corpus.vocab_size != model.config.vocab_size:
            raise ValueError(f"model.config.vocab_size must equal the corpus's {corpus.vocab_size}, "
                             f"got {model.config.vocab_size}")
        self.parallel = parallel or SingleProcess()
        self.rank, self.world = self.parallel.rank, self.parallel.world_size
        if config.micro_batches % self.world:
            raise ValueError(f"micro_batches must be divisible by the {self.world} ranks (each runs micro_batches / "
                             f"ranks shards), got {config.micro_batches}")
        self.model, self.corpus, self.config = self.parallel.parallelize(model), corpus, config
        params = dict(self.model.named_parameters())
        decay, no_decay, router = ([params[name] for name in names] for names in _parameter_groups(self.model))
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
                                            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
                                            {"params": router, "weight_decay": 0.0,
                                             "lr_scale": config.router_lr_scale}], lr=config.lr)
        self.step = 0
        self.history = History()
        self.writer = summary_writer(writer)[0] if writer is not None and self.rank == 0 else None

    def train_step(self) -> None:
        """One optimiser step on batch `self.step`, logged in the History."""
        model, config, parallel = self.model, self.config, self.parallel
        started = time.perf_counter()
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x, y, _ = self.corpus.batch("train", config.batch_size, model.config.seq_len, config.seed, self.step)
        M, W = config.micro_batches, self.world
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        mine = torch.stack([self._forward_backward(x[shard::M], y[shard::M], shard, M // W)
                            for shard in range(self.rank, M, W)])
        parallel.average_gradients(model)
        # max_norm inf scales the gradients by exactly 1: the norm without clipping
        grad_norm = parallel.clip_grad_norm(model, config.grad_clip if config.grad_clip > 0 else math.inf)
        self.optimizer.step()

        # every shard's row on every rank: [W ranks, M / W slots, ...], shard s = rank s % W, slot s // W
        rows = parallel.all_gather(mine, "gather step statistics").transpose(0, 1).reshape(M, -1)
        n_blocks, E = len(model.moe_layers), model.config.num_experts
        shard_load = rows[:, 3:3 + n_blocks * E].reshape(M, n_blocks, E)
        load, dropped = shard_load.sum(0), rows[:, 3 + n_blocks * E:].sum(0)  # [n_blocks, E], [n_blocks]
        if n_blocks:
            model.update_router_biases(list(load.to(torch.int64)))  # all ranks' loads: equal biases everywhere
        task, aux, z = rows[:, :3].mean(0).tolist()
        h = self.history
        h.step.append(self.step)
        h.lr.append(lr)
        h.loss.append(task)
        h.aux_loss.append(aux)
        h.z_loss.append(z)
        h.load_share.append((load / load.sum(-1, keepdim=True).clamp(min=1)).tolist())
        h.dropped_fraction.append((dropped / load.sum(-1).clamp(min=1)).tolist())
        h.shard_load_share.append((shard_load / shard_load.sum(-1, keepdim=True).clamp(min=1)).tolist())
        h.tokens_per_s.append(x.numel() / (time.perf_counter() - started))
        h.grad_norm.append(grad_norm)
        if self.writer is not None:
            self._log_step()
        self.step += 1

    def _log_step(self) -> None:
        """The History's last step to the writer: train/{loss, aux_loss, z_loss, lr, grad_norm,
        tokens_per_s}, and per MoE block i train/routing/layer{i}/{load_entropy, dead_experts,
        max_violation, cv, dropped_fraction} and the histogram train/routing/layer{i}/load_share."""
        h, step = self.history, self.history.step[-1]
        for name in ("loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s"):
            self.writer.add_scalar(f"train/{name}", getattr(h, name)[-1], step)
        for i, (share, dropped) in enumerate(zip(h.load_share[-1], h.dropped_fraction[-1], strict=True)):
            tag = f"train/routing/layer{i}"
            for name, value in (("load_entropy", metrics.load_entropy(share)),
                                ("dead_experts", metrics.dead_experts(share)),
                                ("max_violation", metrics.max_violation(share)),
                                ("cv", metrics.coefficient_of_variation(share)), ("dropped_fraction", dropped)):
                self.writer.add_scalar(f"{tag}/{name}", value, step)
            add_load_share(self.writer, f"{tag}/load_share", share, step)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, shard: int, shards_here: int) -> torch.Tensor:
        """Forward and backward of one shard -> its row of statistics, float64: the task, aux and
        z losses, then per MoE block the load [E], then per MoE block the dropped assignments."""
        model, device = self.model, self.model.token_embedding.weight.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(hash((self.config.seed, self.step, shard)) % 2**63)  # the shard's own noise
            _, loss = model(x.to(device), y.to(device))
        (loss / shards_here).backward()
        loads = [metrics._routed_load(layer.last_routing, layer.last_plan) for layer in model.moe_layers]
        parts = [model.last_losses[name].double().reshape(1) for name in ("task", "aux", "z")]
        parts += [load.to(device, torch.float64) for load, _ in loads]
        parts.append(torch.tensor([float(dropped) for _, dropped in loads], dtype=torch.float64, device=device))
        return torch.cat(parts)

    def run(self, steps: int | None = None, progress: bool = True) -> History:
        """Train `steps` more steps (default: up to config.steps), validating every eval_every
        steps, at config.steps, and when config.max_seconds of training have passed (then it stops)."""
        config = self.config
        end = config.steps if steps is None else self.step + _checks.positive_int("steps", steps, minimum=0)
        started, device = time.perf_counter(), self.model.token_embedding.weight.device
        bar = tqdm(total=end - self.step, disable=not progress or self.rank != 0, desc="training", unit="step")
        while self.step < end:
            self.train_step()
            bar.update()
            bar.set_postfix(loss=f"{self.history.loss[-1]:.3f}")
            out_of_time = config.max_seconds is not None and time.perf_counter() - started >= config.max_seconds
            if config.max_seconds is not None:  # stop together, or collectives mismatch
                votes = self.parallel.all_reduce(torch.tensor([float(out_of_time)], device=device), "stop vote")
                out_of_time = bool(votes[0] > 0)
            if self.step % config.eval_every == 0 or self.step == config.steps or out_of_time:
                self.history.val_step.append(self.step)
                self.history.val_loss.append(evaluate(self.model, self.corpus, config.eval_batches,
                                                      config.batch_size, seed=config.seed, parallel=self.parallel))
                if self.writer is not None:
                    self.writer.add_scalar("val/loss", self.history.val_loss[-1], self.step)
            if out_of_time:
                break
        bar.close()
        if self.writer is not None:
            self.writer.flush()
        return self.history

    def save(self, path) -> None:
        """Everything `load` needs to continue exactly where this run stands. A parallel run
        (collective: every rank calls it) gathers the expert shards, weights and AdamW moments,
        into the single-process checkpoint, which rank 0 writes."""
        names = sum(_parameter_groups(self.model), [])
        model_state = self.parallel.full_state_dict(self.model)
        optimizer_state = self.parallel.gather_optimizer_state(self.model, self.optimizer.state_dict(), names)
        if self.rank == 0:
            torch.save({"model_config": asdict(self.model.config), "train_config": asdict(self.config),
                        "model": model_state, "optimizer": optimizer_state, "step": self.step,
                        "history": asdict(self.history), "rng": torch.get_rng_state()}, path)

    @classmethod
    def load(cls, path, corpus: Corpus, parallel=None, device=None, writer=None, **changes) -> "Trainer":
        """The Trainer `save` wrote, on one process, or re-sharded over `parallel` (a
        `minimoe.parallel.Parallel`; collective: every rank loads the same file). device: where
        the model goes (default CPU). writer: as for Trainer (the run's log directory again
        continues its curves). changes: TrainConfig fields to change (e.g. steps=600, or
        micro_batches for more ranks)."""
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
        model = MoETransformer(MoETransformerConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        trainer = cls(model.to(device), corpus, replace(TrainConfig(**checkpoint["train_config"]), **changes),
                      parallel, writer)
        names = sum(_parameter_groups(trainer.model), [])
        trainer.optimizer.load_state_dict(
            trainer.parallel.shard_optimizer_state(trainer.model, checkpoint["optimizer"], names))
        trainer.step = checkpoint["step"]
        trainer.history = History(**checkpoint["history"])
        torch.set_rng_state(checkpoint["rng"])
        return trainer


def _parameter_groups(model: MoETransformer) -> tuple[list[str], list[str], list[str]]:
    """Parameter names in the optimizer's order: weights and embeddings (decayed), norms, and
    the routers' weights (not decayed: decay would pull the logits towards a uniform router,
    working against the specialisation the router is there to learn)."""
    named = list(model.named_parameters())
    router = [n for n, _ in named if ".router." in n]
    rest = [(n, p) for n, p in named if ".router." not in n]
    return [n for n, p in rest if p.dim() >= 2], [n for n, p in rest if p.dim() < 2], router


def steps_for_budget(model: MoETransformer, corpus: Corpus, config: TrainConfig, seconds: float,
                     calibration_steps: int = 8) -> int:
    """How many steps of `config` `model` trains in about `seconds` on this machine: the budget
    over the median time of calibration_steps steps on a copy (after one untimed step; the median
    ignores a step slowed by another process). Validation time is not included. Use it to give
    models of different speed the same wall-clock budget."""
    _checks.positive("seconds", seconds)
    calibration_steps = _checks.positive_int("calibration_steps", calibration_steps)
    twin = MoETransformer(model.config)  # not deepcopy: the last forward's losses are graph tensors
    twin.load_state_dict(model.state_dict())
    trial = Trainer(twin, corpus, replace(config, steps=calibration_steps + 1))
    trial.train_step()
    durations = []
    for _ in range(calibration_steps):
        started = time.perf_counter()
        trial.train_step()
        durations.append(time.perf_counter() - started)
    return max(1, int(seconds / float(np.median(durations))))

