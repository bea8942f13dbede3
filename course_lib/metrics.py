"""How close are samples to the data? Distances for the toy distributions of chapters 1-3.

Taught in notebooks/03_ddpm.ipynb. Every distance should be read beside its floor: the same distance between two
independent samples of the true distribution, at the same sample count.
"""

import torch


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""The 1-Wasserstein (earth mover's) distance between two 1D samples,
    $W_1 = \int_0^1 |F_a^{-1}(u) - F_b^{-1}(u)|\,du$, from their quantile functions on a common grid."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(f"need non-empty samples; got {a.numel()} and {b.numel()} points")
    if a.numel() == b.numel():
        return (a.sort().values - b.sort().values).abs().mean().item()
    levels = (torch.arange(max(a.numel(), b.numel()), dtype=torch.float64) + 0.5) / max(a.numel(), b.numel())
    return (torch.quantile(a, levels) - torch.quantile(b, levels)).abs().mean().item()


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, n_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """The average `wasserstein_1d` between a and b (N, D) projected on random unit directions (Rabin et al. 2011)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) samples of the same D; got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(n_projections, a.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)  # (P, D)
    a_proj, b_proj = a.double().cpu() @ directions.T, b.double().cpu() @ directions.T  # (N, P)
    return sum(wasserstein_1d(a_proj[:, p], b_proj[:, p]) for p in range(n_projections)) / n_projections


def mode_proportions(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The fraction of points x (N, D) whose nearest mode among `means` (K, D) is each mode: (K,) summing to 1."""
    nearest = torch.cdist(x.double().cpu(), torch.as_tensor(means, dtype=torch.float64)).argmin(dim=1)  # (N,)
    return torch.bincount(nearest, minlength=len(means)).double() / len(x)
