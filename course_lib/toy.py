r"""Toy distributions for chapters 1-3, generated in code: Gaussian mixtures (with exact densities and the exact
optimal denoiser), and the 2D moons and swiss roll.

Taught in notebooks/01_forward_diffusion.ipynb and notebooks/03_ddpm.ipynb.

A Gaussian mixture stays a Gaussian mixture under the forward process, so everything about it is exact:
if $x_0 \sim \sum_k \pi_k \mathcal N(\mu_k, s_k^2 I)$ then
$x_t \sim \sum_k \pi_k \mathcal N(\sqrt{\bar\alpha_t}\mu_k, (\bar\alpha_t s_k^2 + 1 - \bar\alpha_t) I)$,
and the best possible noise prediction is $\mathbb E[\epsilon \mid x_t] = -\sqrt{1 - \bar\alpha_t}\,\nabla \log q(x_t)$
(Tweedie's formula; Efron 2011, Song & Ermon 2019).
"""

import math

import torch

from course_lib.schedules import Schedule, gather


class GaussianMixture:
    """A mixture of K isotropic Gaussians in D dimensions: means (K, D), stds (K,), weights (K,) summing to 1.

    Computations run in float64; samples come back as float32.
    """

    def __init__(self, means, stds, weights):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        K = self.means.shape[0]
        if self.means.ndim != 2 or self.stds.shape != (K,) or self.weights.shape != (K,):
            raise ValueError(
                f"need means (K, D), stds (K,), weights (K,); got {tuple(self.means.shape)}, "
                f"{tuple(self.stds.shape)}, {tuple(self.weights.shape)}"
            )
        if (self.stds <= 0).any() or (self.weights < 0).any() or abs(self.weights.sum().item() - 1) > 1e-6:
            raise ValueError(
                f"need stds > 0 and weights >= 0 summing to 1; got stds {self.stds}, weights {self.weights}"
            )

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n points, shape (n, D)."""
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[component] + self.stds[component, None] * noise).float()

    def _log_components(self, x: torch.Tensor) -> torch.Tensor:
        """log(pi_k N(x; mu_k, s_k^2 I)) for every point and component: (N, K)."""
        x = x.to(torch.float64)
        squared_distance = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # (N, K)
        variance = self.stds**2
        log_normal = -0.5 * squared_distance / variance - 0.5 * self.dim * torch.log(2 * math.pi * variance)
        return self.weights.log() + log_normal

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x of shape (N, D): (N,) float64."""
        return torch.logsumexp(self._log_components(x), dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        r"""$\nabla_x \log p(x) = \sum_k r_k(x)\,(\mu_k - x) / s_k^2$, with $r_k$ the responsibilities. (N, D)."""
        responsibility = torch.softmax(self._log_components(x), dim=1)  # (N, K)
        x = x.to(torch.float64)
        pull = (self.means[None] - x[:, None, :]) / self.stds[None, :, None] ** 2  # (N, K, D)
        return (responsibility[..., None] * pull).sum(1)

    def noised(self, alpha_bar_t: float) -> "GaussianMixture":
        r"""The exact marginal $q(x_t)$ when $x_0$ follows this mixture (module docstring)."""
        if not 0 < alpha_bar_t <= 1:
            raise ValueError(f"alpha_bar_t must lie in (0, 1]; got {alpha_bar_t}")
        stds = (alpha_bar_t * self.stds**2 + 1 - alpha_bar_t).sqrt()
        return GaussianMixture(math.sqrt(alpha_bar_t) * self.means, stds, self.weights)

    def optimal_eps(self, xt: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
        r"""$\mathbb E[\epsilon \mid x_t] = -\sqrt{1 - \bar\alpha_t}\,\nabla \log q_t(x_t)$ for xt (B, D) and
        alpha_bar_t (B, 1) or a scalar: the noise prediction that no network can beat in mean squared error."""
        device = xt.device  # float64 on the data's device (CUDA and CPU; Apple's MPS has no float64)
        alpha_bar_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64, device=device).reshape(-1, 1)
        alpha_bar_t = alpha_bar_t.expand(xt.shape[0], 1)
        x = xt.to(torch.float64)
        mixture_means, stds, weights = self.means.to(device), self.stds.to(device), self.weights.to(device)
        means = alpha_bar_t.sqrt()[:, :, None] * mixture_means[None]  # (B, 1, 1) * (1, K, D) -> (B, K, D)
        variance = alpha_bar_t * stds[None] ** 2 + 1 - alpha_bar_t  # (B, K)
        squared_distance = ((x[:, None, :] - means) ** 2).sum(-1)  # (B, K)
        log_components = weights.log() - 0.5 * squared_distance / variance - 0.5 * self.dim * variance.log()
        responsibility = torch.softmax(log_components, dim=1)  # (B, K)
        score = (responsibility[..., None] * (means - x[:, None, :]) / variance[..., None]).sum(1)  # (B, D)
        return (-(1 - alpha_bar_t).sqrt() * score).to(xt.dtype)

    def optimal_denoiser(self, schedule: Schedule):
        """A model `model(xt, t)` that returns the exact E[eps | x_t] under `schedule`: a reference sampler."""

        def model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.optimal_eps(xt, gather(schedule.alpha_bar, t, xt).double())

        return model


def bimodal_1d() -> GaussianMixture:
    """Chapter 1's data: two unequal modes, 30% at -2 (narrow) and 70% at 1.5 (wide)."""
    return GaussianMixture(means=[[-2.0], [1.5]], stds=[0.35, 0.6], weights=[0.3, 0.7])


def ring_2d(k: int = 8, radius: float = 2.0, std: float = 0.15) -> GaussianMixture:
    """k equal Gaussians evenly spaced on a circle."""
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(means, torch.full((k,), std), torch.full((k,), 1 / k))


def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.08) -> torch.Tensor:
    """Two interleaved half circles (as scikit-learn's make_moons), centred and scaled to about unit spread. (n, 2)."""
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
    return points + noise * torch.randn(n, 2, generator=generator)


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """A 2D spiral r = theta for theta in [1.5 pi, 4.5 pi], scaled to about unit spread. (n, 2)."""
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    points = torch.stack([theta * theta.cos(), theta * theta.sin()], dim=1) / 7.0
    return points + noise * torch.randn(n, 2, generator=generator)
