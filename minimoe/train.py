"""Train an MoETransformer on the corpus: AdamW, linear warmup then cosine decay, gradient
clipping, periodic validation, a per-step History of losses and routing, and checkpoints that
resume bit-exactly.

    trainer = Trainer(model, load_corpus(), TrainConfig(steps=300))
    history = trainer.run()
    trainer.save("run.pt"); trainer = Trainer.load("run.pt", corpus)
"""

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
from tqdm import tqdm  # the text bar: tqdm.auto needs ipywidgets in notebooks

from minimoe import _checks
from minimoe.data import Corpus
from minimoe.model import MoETransformer, MoETransformerConfig


@dataclass(frozen=True)
class TrainConfig:
    """steps: the schedule's length (the cosine reaches min_lr at the last step).
    max_seconds: stop `run` early once this much training time has passed (equal-time
    comparisons); None trains all steps. Batches depend only on (seed, step)."""

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

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            _checks.positive_int(name, getattr(self, name))
        _checks.positive_int("warmup_steps", self.warmup_steps, minimum=0)
        _checks.positive_int("seed", self.seed, minimum=0)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            _checks.non_negative(name, getattr(self, name))
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr={self.lr}, got {self.min_lr}")
        if self.max_seconds is not None and _checks.non_negative("max_seconds", self.max_seconds) == 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds}")


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

    load[i]              [n_moe_blocks][E] share of assignments per expert at step i
    dropped_fraction[i]  [n_moe_blocks] share of assignments dropped by capacity
    val_step, val_loss   the validation cross-entropy (nats per character) when it was measured
    """

    step: list = field(default_factory=list)
    lr: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    aux_loss: list = field(default_factory=list)
    z_loss: list = field(default_factory=list)
    load: list = field(default_factory=list)
    dropped_fraction: list = field(default_factory=list)
    tokens_per_s: list = field(default_factory=list)
    val_step: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)

    def array(self, name: str) -> np.ndarray:
        """A field as a NumPy array, e.g. array("load") -> [steps, n_moe_blocks, E]."""
        if name not in {f.name for f in fields(self)}:
            raise ValueError(f"name must be a History field {[f.name for f in fields(self)]}, got {name!r}")
        return np.asarray(getattr(self, name), dtype=float)


@torch.no_grad()
def evaluate(model: MoETransformer, corpus: Corpus, num_batches: int = 8, batch_size: int = 32,
             seed: int = 0, split: str = "val") -> float:
    """Mean cross-entropy (nats per character) of `model` on num_batches fixed windows of split."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(_checks.positive_int("num_batches", num_batches)):
        x, y, _ = corpus.batch(split, batch_size, model.config.seq_len, seed=seed, step=i)
        model(x, y)
        losses.append(float(model.last_losses["task"]))
    model.train(was_training)
    return float(np.mean(losses))


class Trainer:
    """Owns the model, the optimiser, the step counter and the History; `run` trains."""

    def __init__(self, model: MoETransformer, corpus: Corpus, config: TrainConfig = TrainConfig()):
        if not isinstance(model, MoETransformer):
            raise TypeError(f"model must be an MoETransformer, got {type(model).__name__}")
        if corpus.vocab_size != model.config.vocab_size:
            raise ValueError(f"model.config.vocab_size must equal the corpus's {corpus.vocab_size}, "
                             f"got {model.config.vocab_size}")
        self.model, self.corpus, self.config = model, corpus, config
        decay = [p for p in model.parameters() if p.dim() >= 2]  # weights and embeddings, not norms
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
        self.step = 0
        self.history = History()

    def train_step(self) -> None:
        """One optimiser step on batch `self.step`, logged in the History."""
        model, config = self.model, self.config
        started = time.perf_counter()
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, _ = self.corpus.batch("train", config.batch_size, model.config.seq_len, config.seed, self.step)
        model.train()
        _, loss = model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        self.optimizer.step()
        model.update_router_biases()
        stats = model.routing_stats()
        h = self.history
        h.step.append(self.step)
        h.lr.append(lr)
        h.loss.append(float(model.last_losses["task"]))
        h.aux_loss.append(float(model.last_losses["aux"]))
        h.z_loss.append(float(model.last_losses["z"]))
        h.load.append([s.load.tolist() for s in stats])
        h.dropped_fraction.append([s.dropped_fraction for s in stats])
        h.tokens_per_s.append(x.numel() / (time.perf_counter() - started))
        self.step += 1

    def run(self, steps: int | None = None, progress: bool = True) -> History:
        """Train `steps` more steps (default: up to config.steps), validating every eval_every
        steps, at config.steps, and when config.max_seconds of training have passed (then it stops)."""
        config = self.config
        end = config.steps if steps is None else self.step + _checks.positive_int("steps", steps, minimum=0)
        started = time.perf_counter()
        bar = tqdm(total=end - self.step, disable=not progress, desc="training", unit="step")
        while self.step < end:
            self.train_step()
            bar.update()
            bar.set_postfix(loss=f"{self.history.loss[-1]:.3f}")
            out_of_time = config.max_seconds is not None and time.perf_counter() - started >= config.max_seconds
            if self.step % config.eval_every == 0 or self.step == config.steps or out_of_time:
                self.history.val_step.append(self.step)
                self.history.val_loss.append(evaluate(self.model, self.corpus, config.eval_batches,
                                                      config.batch_size, seed=config.seed))
            if out_of_time:
                break
        bar.close()
        return self.history

    def save(self, path) -> None:
        """Everything `load` needs to continue exactly where this run stands."""
        torch.save({"model_config": asdict(self.model.config), "train_config": asdict(self.config),
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "step": self.step, "history": asdict(self.history), "rng": torch.get_rng_state()}, path)

    @classmethod
    def load(cls, path, corpus: Corpus) -> "Trainer":
        checkpoint = torch.load(path, weights_only=True)
        model = MoETransformer(MoETransformerConfig(**checkpoint["model_config"]))
        model.load_state_dict(checkpoint["model"])
        trainer = cls(model, corpus, TrainConfig(**checkpoint["train_config"]))
        trainer.optimizer.load_state_dict(checkpoint["optimizer"])
        trainer.step = checkpoint["step"]
        trainer.history = History(**checkpoint["history"])
        torch.set_rng_state(checkpoint["rng"])
        return trainer


def steps_for_budget(model: MoETransformer, corpus: Corpus, config: TrainConfig, seconds: float,
                     calibration_steps: int = 8) -> int:
    """How many steps of `config` `model` trains in about `seconds` on this machine: the budget
    over the median time of calibration_steps steps on a copy (after one untimed step; the median
    ignores a step slowed by another process). Validation time is not included. Use it to give
    models of different speed the same wall-clock budget."""
    if _checks.non_negative("seconds", seconds) == 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
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
