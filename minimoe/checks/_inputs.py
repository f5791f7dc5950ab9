"""Random routing decisions shared by the chapter checks."""

import numpy as np
import torch


def random_floats(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """float32 tensor of the given shape, N(0, scale^2) entries."""
    return torch.from_numpy((scale * rng.standard_normal(shape)).astype(np.float32))


def random_expert_idx(rng: np.random.Generator, num_tokens: int, num_experts: int, k: int, *,
                      concentration: float = 0.7, idle: int = 0, idle_probability: float = 1.0) -> torch.Tensor:
    """[T, k] int64: k distinct experts per token, as a top-k router picks them, with uneven
    loads (Dirichlet(concentration) popularity; smaller is more skewed). With probability
    idle_probability (drawn after the popularity unless it is 1) the last min(idle, E - k)
    experts get no token."""
    popularity = rng.dirichlet(np.full(num_experts, concentration))
    if idle_probability >= 1 or rng.random() < idle_probability:
        popularity[num_experts - min(idle, num_experts - k):] = 0.0
    popularity /= popularity.sum()
    rows = [rng.choice(num_experts, size=k, replace=False, p=popularity) for _ in range(num_tokens)]
    return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(num_tokens, k))
