r"""EDM preconditioning: a network wrapped so that its input and its target have unit variance at every noise level.

Taught in chapter 11 (one frame: score, SDE, ODE, parameterisations, preconditioning). Paper: Karras, Aittala,
Aila & Laine 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM), section 5 and Table 1.

EDM writes diffusion in the variance-exploding frame: x = y + sigma n, with y the clean data and n ~ N(0, I); the
course's VP state is x_t = sqrt(alpha_bar_t) (y + sigma_t n) with sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).
The denoiser D(x; sigma) estimates y and is built from a raw network F:

    $$D(x; \sigma) = c_{skip}(\sigma)\,x + c_{out}(\sigma)\,F\big(c_{in}(\sigma)\,x;\ c_{noise}(\sigma)\big)$$

    $$c_{skip} = \frac{\sigma_d^2}{\sigma^2 + \sigma_d^2},\quad
      c_{out} = \frac{\sigma\,\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}},\quad
      c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}}$$      (Table 1, "Network and preconditioning")

Trained with ln(sigma) ~ N(P_mean, P_std^2) and the weight lambda(sigma) = 1 / c_out(sigma)^2, so that the loss on
F's output has unit weight at every sigma (section 5, "Loss weighting and sampling").

Code name -> paper symbol:
    x0               y, the clean data (the course's x0)
    sigma            sigma, the noise level of the VE frame
    SIGMA_DATA       sigma_data, the standard deviation of the training data (measured on the digits: see below)
    c_skip, c_out, c_in   c_skip(sigma), c_out(sigma), c_in(sigma)
    noise_input      the network's time input, our c_noise (below)
    P_MEAN, P_STD    P_mean, P_std of the training noise levels
    x0_hat           D(x; sigma), the denoised estimate

c_noise: EDM feeds ln(sigma) / 4 to its networks' embedding. The course's UNet embeds its time input with sinusoids
built for timesteps 0..999, so we feed an affine function of ln(sigma) that spans that range: SIGMA_MIN maps to 0 and
SIGMA_MAX to 1000. Any affine function of ln(sigma) carries the same information; this one puts it where the
UNet's embedding resolves it.
"""

import math

import torch
import torch.nn.functional as F

from course_lib.checks import check_same_shape
from course_lib.profiles import randn_like

SIGMA_DATA = 0.62  # std of the train digits in [-1, 1]: 0.617 (tests/test_edm.py measures it)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's sampling range (Table 1), also the range of the time input
P_MEAN, P_STD = -1.2, 1.2  # ln(sigma) ~ N(P_MEAN, P_STD^2) in training (Table 1)
TIME_SCALE = 1000  # the time input spans 0..TIME_SCALE over [SIGMA_MIN, SIGMA_MAX]


def c_skip(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    r"""$c_{skip}(\sigma) = \sigma_d^2 / (\sigma^2 + \sigma_d^2)$ (Karras et al. 2022, Table 1)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    r"""$c_{out}(\sigma) = \sigma\,\sigma_d / \sqrt{\sigma^2 + \sigma_d^2}$ (Table 1)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    r"""$c_{in}(\sigma) = 1 / \sqrt{\sigma^2 + \sigma_d^2}$ (Table 1): the network's input has unit variance."""
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def noise_input(sigma: torch.Tensor) -> torch.Tensor:
    r"""The network's time input: $1000\,(\ln\sigma - \ln\sigma_{min}) / (\ln\sigma_{max} - \ln\sigma_{min})$, an
    affine function of EDM's $c_{noise} = \frac14\ln\sigma$ that spans the UNet's 0..999 (module docstring)."""
    log_min, log_max = math.log(SIGMA_MIN), math.log(SIGMA_MAX)
    return TIME_SCALE * (sigma.log() - log_min) / (log_max - log_min)


def per_example_sigma(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """sigma (a float or one per example, (B,)) as (B, 1, ...) to broadcast against `like`; raises unless > 0."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim > 1 or (sigma.ndim == 1 and len(sigma) != len(like)):
        raise ValueError(f"sigma must be a float or one per example, ({len(like)},); got shape {tuple(sigma.shape)}")
    if not (sigma > 0).all():
        raise ValueError(f"sigma must be > 0 (and not NaN); got {sigma.flatten()[:4].tolist()}")
    return sigma.expand(len(like)).reshape(-1, *([1] * (like.ndim - 1)))


def denoise(network, x: torch.Tensor, sigma: torch.Tensor | float, cond=None) -> torch.Tensor:
    r"""$D(x; \sigma) = c_{skip}\,x + c_{out}\,F(c_{in}\,x;\ c_{noise})$ (Karras et al. 2022, eq. 7): the
    preconditioned network's estimate of the clean data. sigma is a float or (B,); `network` is the raw F."""
    sigma = per_example_sigma(sigma, x)  # (B, 1, 1, 1)
    time_input = noise_input(sigma.flatten())  # (B,)
    raw = network(c_in(sigma) * x, time_input) if cond is None else network(c_in(sigma) * x, time_input, cond)
    check_same_shape(x=x, model_output=raw)
    return c_skip(sigma) * x + c_out(sigma) * raw


def sample_sigmas(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""n training noise levels, $\ln\sigma \sim \mathcal N(P_{mean}, P_{std}^2)$ (Table 1), float32, on the CPU."""
    return (P_MEAN + P_STD * torch.randn(n, generator=generator)).exp()


def edm_loss(
    network,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""EDM's training loss (Karras et al. 2022, eq. 8 with Table 1's weighting):

    $$\mathbb E_{\sigma, y, n}\,\lambda(\sigma)\,\lVert D(y + \sigma n; \sigma) - y \rVert^2,\qquad
      \lambda(\sigma) = 1 / c_{out}(\sigma)^2$$

    computed as the equal loss on F's output, $\lVert F(c_{in}x; c_{noise}) - (y - c_{skip}x) / c_{out} \rVert^2$
    (eq. 8 rearranged): a target of unit variance at every sigma. The mean over examples and coordinates, as
    `ddpm.simple_loss`; one sigma per example, then fresh noise, both from `generator`.
    """
    sigma = sample_sigmas(len(x0), generator).to(x0)  # (B,)
    x = x0 + per_example_sigma(sigma, x0) * randn_like(x0, generator)
    sigma_b = per_example_sigma(sigma, x0)  # (B, 1, 1, 1)
    target = (x0 - c_skip(sigma_b) * x) / c_out(sigma_b)
    time_input = noise_input(sigma)
    raw = network(c_in(sigma_b) * x, time_input) if cond is None else network(c_in(sigma_b) * x, time_input, cond)
    return F.mse_loss(raw, target)
