"""One training step of chapter 07's MoE transformer against its dense twin, side by side in one process.

    python benchmarks/train_step.py                    # default shape, E/k/h 8/2/64, 16/4/32, 32/8/16
    python benchmarks/train_step.py --shape full --repeats 15
    python benchmarks/train_step.py --no-profile       # timings and memory only

A step is `minimoe.train.Trainer.train_step()`: batch, forward, backward, gradient clipping,
AdamW (the Trainer's three parameter groups), the router statistics and the History entry,
exactly what the chapter's training loop runs. The models are built and stepped interleaved
(dense, MoE 1, MoE 2, ..., dense, ...) so that drift in machine speed hits all alike; the table
gives medians and each one's ratio to the dense twin (`config.dense_equivalent()`: FFN width
k * h, the same active FLOPs). Nothing here changes the allocator: this is what a notebook gets.

The profile attributes the self time of every operator of a few MoE steps to a stage: the
forward ops by the MoELayer function they run in (wrapped in `record_function` scopes for the
profile only, so the timed runs carry no profiler hooks), the backward ops by the forward op
that made their autograd node (same sequence number). "experts" holds the gather of the
experts' rows, their FFNs and the combine: MoELayer's torch backend does all three inside the
experts, and the other backends' permute and unpermute are counted there too.
Peak memory is the highest sum of live CPU allocations the profiler saw during one forward +
backward, above what was live before.
"""

import argparse
import functools
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import minimoe.layer
import minimoe.metrics
from minimoe.data import load_corpus
from minimoe.experts import FeedForward, GroupedExperts
from minimoe.layer import MoELayer
from minimoe.model import MoETransformer, MoETransformerConfig
from minimoe.routing import Router
from minimoe.train import SingleProcess, TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or loaded from a path by the tests
from memory import peak_memory  # noqa: E402

SHAPES = {  # chapter 07: model shape, dense FFN width (= k * h), batch size
    "default": (dict(d_model=64, n_layers=2, n_heads=4, seq_len=64), 128, 16),
    "full": (dict(d_model=96, n_layers=3, n_heads=4, seq_len=96), 192, 24),
}
VARIANTS = ((8, 2), (16, 4), (32, 8))  # (E, k); h = width // k keeps k * h = the dense width
STAGES = ("router", "plan", "experts", "losses and stats", "optimiser", "rest of the model")


def _subclasses(cls: type) -> list[type]:
    return [cls] + [sub for child in cls.__subclasses__() for sub in _subclasses(child)]


# where each stage runs: (object, attribute) wrapped in a record_function scope while profiling
_STAGE_FUNCTIONS = {
    "router": [(cls, "_route") for cls in _subclasses(Router) if "_route" in vars(cls)],
    "plan": [(minimoe.layer, "_make_plan")],
    "experts": [(GroupedExperts, "_forward"), (FeedForward, "forward"), (minimoe.layer, "permute"),
                (minimoe.layer, "unpermute")],
    "losses and stats": [(minimoe.layer, "_load_balancing_loss"), (minimoe.layer, "router_z_loss"),
                         (minimoe.metrics, "_routed_load"), (MoETransformer, "routing_stats")],
    "optimiser": [(torch.optim.AdamW, "step"), (torch.optim.AdamW, "zero_grad"), (SingleProcess, "clip_grad_norm")],
}


def configs(shape: str, variants=VARIANTS) -> dict[str, MoETransformerConfig]:
    """'dense' -> the dense twin, 'E=.., k=.., h=..' -> each MoE variant, of chapter 07's shape."""
    dims, width, _ = SHAPES[shape]
    moes = {f"E={E}, k={k}, h={width // k}": MoETransformerConfig(**dims, d_hidden=width // k, num_experts=E, k=k)
            for E, k in variants}
    return {"dense": next(iter(moes.values())).dense_equivalent(), **moes}


def trainers(shape: str, variants=VARIANTS, corpus=None, batch_size: int | None = None) -> dict[str, Trainer]:
    """name -> a Trainer of that config (seed 0), as chapter 07 trains it."""
    corpus = corpus or load_corpus()
    batch_size = batch_size or SHAPES[shape][2]
    out = {}
    for name, config in configs(shape, variants).items():
        torch.manual_seed(0)
        out[name] = Trainer(MoETransformer(config), corpus, TrainConfig(steps=10_000, batch_size=batch_size))
    return out


def time_steps(runs: dict[str, Trainer], repeats: int = 9, warmup: int = 2) -> dict[str, float]:
    """Median seconds of one train_step per trainer, steps interleaved, after `warmup` untimed ones."""
    times = {name: [] for name in runs}
    for rep in range(warmup + repeats):
        for name, trainer in runs.items():
            start = time.perf_counter()
            trainer.train_step()
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@contextmanager
def _stage_scopes():
    """Every function of _STAGE_FUNCTIONS runs inside record_function('stage: <name>')."""
    def scoped(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapper
    with ExitStack() as stack:
        for stage, places in _STAGE_FUNCTIONS.items():
            for owner, attr in places:
                stack.enter_context(mock.patch.object(owner, attr, scoped(getattr(owner, attr), f"stage: {stage}")))
        yield


def stage_times(trainer: Trainer, steps: int = 3) -> dict[str, float]:
    """Milliseconds per step of each stage (STAGES), from the profiler's self times, over `steps` steps."""
    trainer.train_step()  # warm-up
    with _stage_scopes(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
    events = prof.events()
    stage_of_event, stage_of_seq = {}, {}

    def stage(event):
        if id(event) not in stage_of_event:
            parent = event.cpu_parent
            if event.name.startswith("stage: "):
                found = event.name[len("stage: "):]
            elif event.name.startswith("autograd::engine::evaluate_function: "):
                found = stage_of_seq.get(event.sequence_nr)
            else:
                found = None
            stage_of_event[id(event)] = found or (stage(parent) if parent is not None else None)
        return stage_of_event[id(event)]

    for event in sorted(events, key=lambda e: e.time_range.start):  # an op's node: the op's stage
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::engine"):
            found = stage(event)
            if found is not None:
                stage_of_seq.setdefault(event.sequence_nr, found)
    totals = dict.fromkeys(STAGES, 0.0)
    for event in events:
        totals[stage(event) or "rest of the model"] += event.self_cpu_time_total / 1e3 / steps
    return totals


def layer_memory(shape: str, variants=VARIANTS) -> dict[str, int]:
    """Peak bytes of forward + backward of one FFN of the shape on a batch of tokens: the dense
    FFN of width k * h, and each variant's MoELayer."""
    dims, width, batch = SHAPES[shape]
    d, tokens = dims["d_model"], batch * dims["seq_len"]
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    out = {"dense": peak_memory(FeedForward(d, width), x)}
    for E, k in variants:
        out[f"E={E}, k={k}, h={width // k}"] = peak_memory(MoELayer(d, width // k, E, k), x)
    return out


def report(shape: str, medians: dict[str, float], memory: dict[str, int]) -> str:
    dims, width, batch = SHAPES[shape]
    base, base_mem = medians["dense"], memory["dense"]
    lines = [f"{shape} shape: d_model={dims['d_model']}, n_layers={dims['n_layers']}, seq_len={dims['seq_len']}, "
             f"batch {batch}, dense FFN width {width}",
             f"{'model':<20} {'ms/step':>8} {'/ dense':>8} {'FFN peak MB':>12} {'/ dense':>8}"]
    lines += [f"{name:<20} {1e3 * t:>8.2f} {t / base:>8.2f} {memory[name] / 2**20:>12.2f} "
              f"{memory[name] / base_mem:>8.2f}" for name, t in medians.items()]
    return "\n".join(lines)


def stage_report(stages: dict[str, dict[str, float]]) -> str:
    names = list(stages)
    lines = ["ms per step by stage (profiler self time; the profiler slows every op alike)",
             f"{'stage':<20}" + "".join(f"{name:>18}" for name in names)]
    for stage in STAGES:
        lines.append(f"{stage:<20}" + "".join(f"{stages[name][stage]:>18.2f}" for name in names))
    lines.append(f"{'total':<20}" + "".join(f"{sum(stages[name].values()):>18.2f}" for name in names))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), action="append")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU, {args.threads} threads, float32, Trainer.train_step, "
          f"median of {args.repeats} interleaved steps, default allocator\n")
    corpus = load_corpus()
    for shape in args.shape or ["default"]:
        runs = trainers(shape, corpus=corpus)
        print(report(shape, time_steps(runs, args.repeats), layer_memory(shape)), "\n")
        if not args.no_profile:
            print(stage_report({name: stage_times(trainer) for name, trainer in runs.items()}), "\n")


if __name__ == "__main__":
    main()
