"""Peak CPU memory of a forward + backward, read from the profiler's allocation events (the
benchmarks' shared helper; the allocator's own caching does not enter into it)."""

import torch
from torch.profiler import ProfilerActivity, profile


def peak_memory(fn, x: torch.Tensor) -> int:
    """Highest bytes of CPU memory allocated at once during fn(x).square().sum().backward(),
    above what was live at the start."""
    x = x.detach().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(x).square().sum().backward()
    memory = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in memory:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
