r"""Noise schedules: the per-timestep tables that every sampler and loss of the course indexes.

Taught in notebooks/02_noise_schedules.ipynb. Papers: Ho et al. 2020 (DDPM, linear schedule), Nichol & Dhariwal
2021 (improved DDPM, cosine schedule), Rombach et al. 2022 (the "scaled linear" schedule of Stable Diffusion,
called "quadratic" here), Xu et al. 2022 (GeoDiff: the sigmoid on beta that diffusers calls "sigmoid"; not the
sigmoid on alpha_bar of Jabri et al. 2023 / Chen 2023), Lin et al. 2024 (zero terminal SNR).

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

from course_lib.checks import as_integer

SCHEDULE_NAMES = ("linear", "cosine", "quadratic", "sigmoid")

# The name of each schedule in diffusers' `beta_schedule` argument.
DIFFUSERS_BETA_SCHEDULE = {
    "linear": "linear",
    "cosine": "squaredcos_cap_v2",
    "quadratic": "scaled_linear",
    "sigmoid": "sigmoid",
}


def check_T(T) -> int:
    """T as a Python int (a numpy integer or a 0-d integer tensor will do); raise unless it is an integer >= 1."""
    integer = as_integer(T)
    if integer is None or integer < 1:
        raise ValueError(
            f"T (the number of diffusion steps) must be an integer >= 1; got T={T if integer is None else integer!r}"
        )
    return integer


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1; got beta_start={beta_start}, beta_end={beta_end}")


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    r"""$\beta_t$ evenly spaced from beta_start to beta_end (Ho et al. 2020, section 4). float64, shape (T,)."""
    T = check_T(T)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def quadratic_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    r"""$\sqrt{\beta_t}$ evenly spaced, then squared: diffusers' "scaled_linear" (Stable Diffusion). float64, (T,)."""
    T = check_T(T)
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    r"""$\beta_t = \beta_{start} + (\beta_{end} - \beta_{start})\,\sigma(s_t)$, $s_t$ evenly spaced in [-6, 6]
    (as diffusers' "sigmoid", from GeoDiff, Xu et al. 2022). float64, shape (T,)."""
    T = check_T(T)
    _check_beta_range(beta_start, beta_end)
    s = torch.linspace(-6, 6, T, dtype=torch.float64)
    return torch.sigmoid(s) * (beta_end - beta_start) + beta_start


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    r"""The cosine schedule (Nichol & Dhariwal 2021, eq. 17):

    $$\bar\alpha(\tau) = \cos^2\!\Big(\frac{\tau + s}{1 + s}\,\frac{\pi}{2}\Big),\qquad
      \beta_t = \min\!\Big(1 - \frac{\bar\alpha((t+1)/T)}{\bar\alpha(t/T)},\ \beta_{max}\Big)$$

    The clip at max_beta keeps the last steps from being singular. float64, shape (T,).
    """
    T = check_T(T)
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

    Every beta lies in (0, 1), except that the last one may be exactly 1: a zero-terminal-SNR schedule
    (`rescale_zero_terminal_snr`), whose alpha_bar, snr and sqrt(alpha_bar) end at 0 and log_snr at -inf.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D sequence; got shape {tuple(betas.shape)}")
    outside = (betas <= 0) | (betas > 1) | betas.isnan()
    outside[:-1] |= betas[:-1] == 1  # beta = 1 only at the last step (zero terminal SNR)
    if outside.any():
        t_bad = int(outside.nonzero()[0])
        raise ValueError(
            f"betas must lie in (0, 1) (the last may be 1: zero terminal SNR); got beta[{t_bad}]={betas[t_bad].item()}"
        )
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


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    r"""The same schedule with zero SNR at the last step (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): shift $\sqrt{\bar\alpha_t}$ so that its last value is 0, and scale it so
    that its first value is kept,

    $$\sqrt{\bar\alpha_t}\ \leftarrow\ \big(\sqrt{\bar\alpha_t} - \sqrt{\bar\alpha_{T-1}}\big)\,
      \frac{\sqrt{\bar\alpha_0}}{\sqrt{\bar\alpha_0} - \sqrt{\bar\alpha_{T-1}}}$$

    then read the betas back from the new alpha_bar; the last beta is exactly 1, so that x_{T-1} is pure noise and
    holds nothing of the data. Equal to diffusers' `rescale_betas_zero_snr=True`. float64 in and out, shape (T,).
    Only eps-free parameterisations (v, x0) can be trained at the last step: eps is then x_{T-1} itself.
    """
    betas = torch.as_tensor(betas, dtype=torch.float64)
    sqrt_alpha_bar = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * first / (first - last)
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_schedule(name: str = "linear", T: int = 1000, zero_terminal_snr: bool = False, **kwargs) -> Schedule:
    """A named schedule: "linear", "cosine", "quadratic" or "sigmoid" (keyword arguments go to its beta function);
    with zero_terminal_snr=True, rescaled by `rescale_zero_terminal_snr` (Lin et al. 2024)."""
    beta_functions = {
        "linear": linear_betas,
        "cosine": cosine_betas,
        "quadratic": quadratic_betas,
        "sigmoid": sigmoid_betas,
    }
    if name not in beta_functions:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULE_NAMES)}")
    betas = beta_functions[name](T, **kwargs)
    if zero_terminal_snr:
        return schedule_from_betas(rescale_zero_terminal_snr(betas), name=f"{name}, zero terminal SNR")
    return schedule_from_betas(betas, name=name)


def check_timesteps(t, T: int) -> torch.Tensor:
    """t as an integer tensor, raising unless every value lies in 0..T-1.

    t is a tensor of integer timesteps (any shape), or one timestep: a Python int, a numpy integer or a 0-d integer
    tensor. Anything else (a float such as 2.5 or 2.0, a bool) raises TypeError naming the value."""
    if not isinstance(t, torch.Tensor):
        integer = as_integer(t)
        if integer is None:
            raise TypeError(f"a timestep must be an integer in 0..{T - 1} (T={T}); got t={t!r} ({type(t).__name__})")
        t = torch.tensor(integer)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"timesteps must be an integer tensor; got dtype {t.dtype}")
    if t.numel() and (t.min() < 0 or t.max() > T - 1):
        bad = t[(t < 0) | (t > T - 1)][0].item()
        raise ValueError(f"timestep t={bad} is out of range; valid: 0..{T - 1} (T={T})")
    return t


def gather(table: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """table[t] shaped to broadcast against `like`: (B,) timesteps give (B, 1, 1, ...); one timestep (an int, a numpy
    integer or a 0-d integer tensor) gives a scalar.

    The result takes the device and dtype of `like`. This is the one helper that indexes a per-timestep table.
    """
    t = check_timesteps(t, len(table))
    if t.ndim == 1 and like.ndim >= 1 and t.shape[0] != like.shape[0]:
        raise ValueError(f"{t.shape[0]} timesteps for a batch of {like.shape[0]}; give one t per example")
    if t.ndim > 1:
        raise ValueError(f"timesteps must be a scalar or of shape (B,); got shape {tuple(t.shape)}")
    values = table.to(like.device)[t.to(like.device)].to(like.dtype)  # () or (B,)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))
