r"""Noise schedules: the per-timestep tables that every sampler and loss of the course indexes.

Taught in notebooks/02_noise_schedules.ipynb. Papers: Ho et al. 2020 (DDPM, linear schedule), Nichol & Dhariwal
2021 (improved DDPM, cosine schedule), Rombach et al. 2022 (the "scaled linear" schedule of Stable Diffusion,
called "quadratic" here), Jabri et al. 2023 (sigmoid schedule), Lin et al. 2024 (zero terminal SNR).

Timestep convention, for the whole course and the same as diffusers': an integer t in 0..T-1.
t = 0 is the first, least noisy step; t = T-1 the last, noisiest one; the clean data x0 has no index.

    beta[t]       variance added by step t                 q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    alpha[t]      1 - beta[t]
    alpha_bar[t]  prod_{s=0}^{t} alpha[s]                  q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    alpha_bar_prev[t]  alpha_bar[t-1], and 1 at t = 0 (the clean data)
    snr[t]        alpha_bar[t] / (1 - alpha_bar[t]);  log_snr[t] = log(snr[t])

Tables are computed in float64 and handed out as float32. `gather` is the one helper that indexes a table with a
batch of timesteps and broadcasts the result against a batch of data.
"""

import math
from dataclasses import dataclass

import torch

SCHEDULE_NAMES = ("linear", "cosine", "quadratic", "sigmoid")

# The name of each schedule in diffusers' `beta_schedule` argument.
DIFFUSERS_BETA_SCHEDULE = {
    "linear": "linear",
    "cosine": "squaredcos_cap_v2",
    "quadratic": "scaled_linear",
    "sigmoid": "sigmoid",
}


def check_T(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T (the number of diffusion steps) must be an integer >= 1; got T={T!r}")


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1; got beta_start={beta_start}, beta_end={beta_end}")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    r"""$\beta_t$ evenly spaced from beta_start to beta_end (Ho et al. 2020, section 4). float64, shape (T,)."""
    check_T(T)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def quadratic_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    r"""$\sqrt{\beta_t}$ evenly spaced, then squared: diffusers' "scaled_linear" (Stable Diffusion). float64, (T,)."""
    check_T(T)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    r"""$\beta_t = \beta_{start} + (\beta_{end} - \beta_{start})\,\sigma(s_t)$, $s_t$ evenly spaced in [-6, 6]
    (as diffusers' "sigmoid"). float64, shape (T,)."""
    check_T(T)
    _check_beta_range(beta_start, beta_end)
    s = torch.linspace(-6, 6, T, dtype=torch.float64)
    return torch.sigmoid(s) * (beta_end - beta_start) + beta_start


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    r"""The cosine schedule (Nichol & Dhariwal 2021, eq. 17):

    $$\bar\alpha(\tau) = \cos^2\!\Big(\frac{\tau + s}{1 + s}\,\frac{\pi}{2}\Big),\qquad
      \beta_t = \min\!\Big(1 - \frac{\bar\alpha((t+1)/T)}{\bar\alpha(t/T)},\ \beta_{max}\Big)$$

    The clip at max_beta keeps the last steps from being singular. float64, shape (T,).
    """
    check_T(T)
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must lie in (0, 1); got max_beta={max_beta}")

    def alpha_bar_of(tau: float) -> float:
        return math.cos((tau + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar_of((t + 1) / T) / alpha_bar_of(t / T), max_beta) for t in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


@dataclass(frozen=True)
class Schedule:
    """Every per-timestep table of one noise schedule: float32 tensors of shape (T,), indexed by t in 0..T-1.

    The posterior coefficients are those of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7):
    mean = posterior_coef_x0 * x0 + posterior_coef_xt * xt, variance = posterior_variance.
    """

    name: str
    T: int
    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    snr: torch.Tensor
    log_snr: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_coef_x0: torch.Tensor
    posterior_coef_xt: torch.Tensor


def schedule_from_betas(betas: torch.Tensor, name: str = "custom") -> Schedule:
    r"""All tables from a beta sequence, computed in float64 and returned as float32.

    $\alpha_t = 1 - \beta_t$, $\bar\alpha_t = \prod_{s \le t} \alpha_s$ (Ho et al. 2020, eq. 4),
    $\tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\beta_t$,
    $\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1 - \bar\alpha_t} x_0
                 + \frac{\sqrt{\alpha_t}(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t} x_t$ (eq. 7).
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {tuple(betas.shape)}")
    outside = (betas <= 0) | (betas >= 1) | betas.isnan()
    if outside.any():
        t_bad = int(outside.nonzero()[0])
        raise ValueError(f"betas must lie in (0, 1); got beta[{t_bad}]={betas[t_bad].item()}")
    alphas = 1 - betas
    alpha_bar = torch.cumprod(alphas, dim=0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    snr = alpha_bar / (1 - alpha_bar)
    tables = dict(
        betas=betas,
        alphas=alphas,
        alpha_bar=alpha_bar,
        alpha_bar_prev=alpha_bar_prev,
        snr=snr,
        log_snr=snr.log(),
        posterior_variance=(1 - alpha_bar_prev) / (1 - alpha_bar) * betas,
        posterior_coef_x0=alpha_bar_prev.sqrt() * betas / (1 - alpha_bar),
        posterior_coef_xt=alphas.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar),
    )
    return Schedule(name=name, T=len(betas), **{key: value.float() for key, value in tables.items()})


def make_schedule(name: str = "linear", T: int = 1000, **kwargs) -> Schedule:
    """A named schedule: "linear", "cosine", "quadratic" or "sigmoid" (keyword arguments go to its beta function)."""
    beta_functions = {
        "linear": linear_betas,
        "cosine": cosine_betas,
        "quadratic": quadratic_betas,
        "sigmoid": sigmoid_betas,
    }
    if name not in beta_functions:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    return schedule_from_betas(beta_functions[name](T, **kwargs), name=name)


def check_timesteps(t: torch.Tensor, T: int) -> None:
    """Raise if t is not an integer tensor with every value in 0..T-1."""
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor; got dtype {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() > T - 1):
        bad = t[(t < 0) | (t > T - 1)][0].item()
        raise ValueError(f"timestep t={bad} is out of range; valid: 0..{T - 1} (T={T})")


def gather(table: torch.Tensor, t: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped to broadcast against `like`: (B,) timesteps give (B, 1, 1, ...); an int gives a scalar.

    The result takes the device and dtype of `like`. This is the one helper that indexes a per-timestep table.
    """
    if isinstance(t, int):
        t = torch.tensor(t)
    check_timesteps(t, len(table))
    if t.ndim == 1 and like.ndim >= 1 and t.shape[0] != like.shape[0]:
        raise ValueError(f"{t.shape[0]} timesteps for a batch of {like.shape[0]}; give one t per example")
    if t.ndim > 1:
        raise ValueError(f"timesteps must be a scalar or of shape (B,); got shape {tuple(t.shape)}")
    values = table.to(like.device)[t.to(like.device)].to(like.dtype)  # () or (B,)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
