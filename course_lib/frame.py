r"""One frame for every model of the course: the denoiser $D(x; \sigma)$ in the variance-exploding (VE) frame, the
score it implies, and the samplers of the probability-flow ODE and of annealed Langevin dynamics, written once.

Taught in chapter 11 (one frame: score matching, SDEs and the probability-flow ODE, parameterisations,
preconditioning). Papers: Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution"
(annealed Langevin); Song et al. 2021, "Score-Based Generative Modeling through Stochastic Differential Equations"
(the SDEs and the probability-flow ODE); Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM: the VE frame, Algorithm 1, the Karras levels); Lu et al. 2022 (DPM-Solver++(2M)); Efron
2011 (Tweedie's formula).

Every model of the course sees a state $x_{native} = s\,x_0 + n\,\epsilon$ with its own signal and noise scales:

    VP models (chapters 3-8)   s = sqrt(alpha_bar_t), n = sqrt(1 - alpha_bar_t), integer time t in 0..T-1
    flow models (chapter 10)   s = 1 - t, n = t, t in [0, 1]
    EDM models (chapter 11)    s = 1, n = sigma

Divided by s, each is the VE state $x = x_0 + \sigma\epsilon$ with $\sigma = n / s$: the same state for every model,
one noise level per step whatever the model's own clock. `denoiser(model)` turns any of the course's models into
$D(x; \sigma) \approx \mathbb E[x_0 \mid x]$, and then one sampler serves them all (`ode_sample`), which is how
chapter 11 compares models trained with different objectives at equal network calls.

Tweedie's formula ties D to the score of the noised data: $\nabla_x \log p_\sigma(x) = (D(x; \sigma) - x) / \sigma^2$
(`score`), and the probability-flow ODE in this frame is $dx/d\sigma = -\sigma\,\nabla_x\log p_\sigma(x)
= (x - D(x; \sigma)) / \sigma$ (Karras et al. 2022, eq. 3 with sigma(t) = t).

Code name -> paper symbol:
    x, sigma        the VE state x and its noise level sigma (EDM's x and sigma; DDIM's x-bar and sigma, eq. 14)
    x0_hat, D       D(x; sigma), the denoiser's estimate of the clean data (EDM's D_theta)
    sigmas          the noise levels (`solvers.karras_levels`: EDM's eq. 5 between any two levels)
                     sigma_0 > sigma_1 > ... > sigma_N = 0 of a sampler (EDM's t_i)
    rho             rho of EDM's eq. 5
    step_size       epsilon of Song & Ermon's Algorithm 1 (alpha_i = epsilon sigma_i^2 / sigma_L^2)
"""

import math
from collections.abc import Callable
from itertools import pairwise

import torch

from course_lib.checks import check_choice, check_finite, check_model_output, check_steps
from course_lib.ddpm import OUTPUT_KINDS, split_output
from course_lib.edm import SIGMA_MAX, SIGMA_MIN, denoise
from course_lib.flow import velocity
from course_lib.profiles import randn_like
from course_lib.schedules import Schedule
from course_lib.solvers import karras_levels, sigma_of_timestep

ODE_SOLVERS = ("euler", "heun", "dpmpp_2m")


class Denoiser:
    r"""$D(x; \sigma)$ for a batch of VE states x and one noise level sigma (a float): the model's estimate of the
    clean data, optionally clipped to [-clip, clip]. sigma_min and sigma_max bound the levels the model was trained
    on (the samplers start at min(sigma_max, their own cap) and stop at sigma_min before the last step to 0).
    `calls` counts the network evaluations, so samplers can be compared at equal cost."""

    def __init__(self, fn: Callable, sigma_min: float, sigma_max: float, clip: float | None = None, name: str = ""):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 (or None: no clipping); got {clip}")
        self.fn, self.sigma_min, self.sigma_max, self.clip, self.name = fn, sigma_min, sigma_max, clip, name
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0 (the clean data has no denoiser call); got {sigma}")
        self.calls += 1
        x0_hat = self.fn(x, sigma)
        check_model_output(x0_hat, x, f"sigma={sigma:.4g}")
        return x0_hat if self.clip is None else x0_hat.clamp(-self.clip, self.clip)


def ve_sigma(alpha_bar: torch.Tensor) -> torch.Tensor:
    r"""$\sigma = \sqrt{(1 - \bar\alpha) / \bar\alpha}$, the VE noise level of a VP state (`n / s`)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def _vp_timestep(schedule: Schedule, sigma: float) -> float:
    """The fractional timestep whose VE noise level is sigma, log sigma interpolated between integer timesteps (as
    `solvers.sigma_to_timestep`, here for a schedule whose last level may be infinite: zero terminal SNR)."""
    log_sigmas = (-schedule.log_snr.double() / 2).tolist()  # increasing with t; the last may be +inf
    log_sigma = math.log(sigma)
    if log_sigma <= log_sigmas[0]:
        return 0.0
    for t, (low, high) in enumerate(pairwise(log_sigmas)):
        if log_sigma <= high:
            return t + (log_sigma - low) / (high - low) if math.isfinite(high) else float(t)
    return float(schedule.T - 1)


def denoiser(
    model, prediction_type: str | None = None, schedule: Schedule | None = None, clip: float | None = 1.0
) -> Denoiser:
    r"""Any of the course's models as $D(x; \sigma)$ on the VE state $x = x_0 + \sigma\epsilon$.

    prediction_type defaults to the model's own (`weights.load_model` sets it from the card):
        "eps", "x0", "v", "score"  a VP model with `schedule`: it sees $x_t = x / \sqrt{1 + \sigma^2}$ at the
                                   fractional timestep of sigma, and `ddpm.split_output` (signal 1, noise sigma)
                                   turns its output into x0_hat
        "velocity"                 a flow model (chapter 10): $t = \sigma / (1 + \sigma)$, $x_t = x / (1 + \sigma)$
        "edm"                      a preconditioned network: `edm.denoise`
    clip: x0_hat clipped to [-clip, clip] (1.0: the pixel range, as the course's DDIM clips; None: not clipped).
    """
    kind = prediction_type or getattr(model, "prediction_type", None)
    if kind is None:
        raise ValueError("the model declares no prediction_type: pass prediction_type=")
    check_choice("prediction_type", kind, (*OUTPUT_KINDS, "edm"))
    name = type(model).__name__
    if kind == "edm":
        return Denoiser(lambda x, sigma: denoise(model, x, sigma), SIGMA_MIN, SIGMA_MAX, clip, name)
    if kind == "velocity":

        def flow_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
            t = sigma / (1 + sigma)
            return split_output(x, velocity(model, x / (1 + sigma), t), "velocity", 1, sigma)[0]

        return Denoiser(flow_fn, SIGMA_MIN, SIGMA_MAX, clip, name)
    if schedule is None:
        raise ValueError(f"prediction_type {kind!r} is a VP model's: pass the schedule it was trained with")
    sigma_table = (-schedule.log_snr.double() / 2).exp()

    def vp_fn(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((len(x),), _vp_timestep(schedule, sigma), device=x.device, dtype=torch.float32)
        output = model(x / math.sqrt(1 + sigma**2), t)
        return split_output(x, output, kind, 1, sigma)[0]

    sigma_max = sigma_table[-1].item() if math.isfinite(sigma_table[-1].item()) else sigma_table[-2].item()
    return Denoiser(vp_fn, sigma_table[0].item(), max(sigma_max, SIGMA_MAX), clip, name)


def as_vp_model(denoise_fn: Denoiser, schedule: Schedule) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    r"""The denoiser as an eps-prediction model on a VP schedule's clock, `model(xt, t) -> eps_hat`, so that the VP
    samplers (`sampling.draw_samples`: DDPM, DDIM, DPM-Solver++(2M), Euler (Karras)) run any model of the course,
    a flow or EDM model included, with the schedule's timesteps: the inverse of `denoiser` for "eps".

    At timestep t (integer, or fractional as Euler (Karras) passes it) the level is $\sigma_t$
    (`solvers.sigma_of_timestep`), the VE state is $x = x_t\sqrt{1 + \sigma_t^2}$ (that is $x_t / \sqrt{\bar\alpha_t}$),
    and $\hat\epsilon = (x - D(x; \sigma_t)) / \sigma_t$. The course's samplers call every row with the same t;
    a batch of mixed timesteps is refused. Pass a denoiser built with clip=None: the samplers clip x0_hat themselves.
    """

    def model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        steps = torch.as_tensor(t).flatten().unique()
        if len(steps) != 1:
            raise ValueError(f"as_vp_model takes one timestep per batch; got {steps.tolist()[:4]}...")
        sigma = sigma_of_timestep(schedule, steps.cpu()).item()
        x = xt * math.sqrt(1 + sigma**2)
        return ((x - denoise_fn(x, sigma)) / sigma).to(xt.dtype)

    model.prediction_type = "eps"
    return model


def score(denoise_fn: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""Tweedie's formula: $\nabla_x \log p_\sigma(x) = (D(x; \sigma) - x) / \sigma^2$ for the VE state x."""
    return (denoise_fn(x, sigma) - x) / sigma**2


def levels(denoise_fn: Denoiser, steps: int, sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> torch.Tensor:
    """EDM's noise levels for one model: `solvers.karras_levels` from min(sigma_max, the model's top level) down
    to the model's lowest trained level, then 0. sigma_max = 80 is EDM's start; the cosine schedule's own top
    level (2 x 10^4) would spend most steps on pure noise (chapter 5, Euler's handicap)."""
    return karras_levels(steps, denoise_fn.sigma_min, min(sigma_max, denoise_fn.sigma_max), rho)


def solver_steps(solver: str, calls: int) -> int:
    """The number of noise levels a solver can afford in `calls` network evaluations: Heun's second-order
    correction costs a call on every step but the last (2N - 1 calls), Euler and DPM-Solver++(2M) one per step."""
    check_choice("solver", solver, ODE_SOLVERS)
    calls = check_steps(calls)
    return (calls + 1) // 2 if solver == "heun" else calls


@torch.no_grad()
def ode_sample(
    denoise_fn: Denoiser,
    x_T: torch.Tensor,
    sigmas: torch.Tensor,
    solver: str = "euler",
) -> torch.Tensor:
    r"""Integrate the probability-flow ODE $dx/d\sigma = (x - D(x; \sigma)) / \sigma$ from $x = \sigma_0 x_T$
    through the noise levels `sigmas` (decreasing, ending at 0) and return the clean sample.

        euler     one slope per step (EDM Algorithm 1 without its correction); with a VP eps model on the levels of
                  DDIM's timesteps, this is deterministic DDIM (chapter 11 checks it)
        heun      EDM's Algorithm 1 (deterministic): Euler, then the trapezoid rule with the slope at the end of the
                  step, except on the last step to sigma = 0
        dpmpp_2m  DPM-Solver++(2M) in this frame (Lu et al. 2022, Algorithm 2, with lambda = -log sigma):
                  $x_{i+1} = \frac{\sigma_{i+1}}{\sigma_i} x_i + (1 - \frac{\sigma_{i+1}}{\sigma_i}) D_i'$, where
                  $D_i' = (1 + \frac{1}{2r}) D_i - \frac{1}{2r} D_{i-1}$, $r = h_{i-1} / h_i$ (first order on the first
                  and the last step)
    """
    check_choice("solver", solver, ODE_SOLVERS)
    check_finite("x_T", x_T)
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or len(sigmas) < 2 or sigmas[-1] != 0 or not (sigmas[:-1] > 0).all():
        raise ValueError(f"sigmas must be decreasing positive levels ending at 0; got {sigmas.tolist()[:6]}...")
    if not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas must decrease; got {sigmas.tolist()[:6]}...")
    levels = sigmas.tolist()
    x = levels[0] * x_T
    previous = None  # (D, h) of the step before, for DPM-Solver++(2M)
    for sigma, sigma_next in pairwise(levels):
        x0_hat = denoise_fn(x, sigma)
        if solver == "dpmpp_2m":
            if sigma_next == 0:
                x = x0_hat
                continue
            h = math.log(sigma / sigma_next)  # lambda_next - lambda
            blended = x0_hat
            if previous is not None:
                r = previous[1] / h
                blended = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * previous[0]
            x = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * blended
            previous = (x0_hat, h)
            continue
        slope = (x - x0_hat) / sigma
        x_next = x + (sigma_next - sigma) * slope
        if solver == "heun" and sigma_next > 0:
            slope_next = (x_next - denoise_fn(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (slope + slope_next) / 2
        x = x_next
    return x


@torch.no_grad()
def annealed_langevin(
    score_fn: Callable[[torch.Tensor, float], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    steps_per_level: int,
    step_size: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    r"""Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1): at each noise level $\sigma_i$ (decreasing, all
    > 0), `steps_per_level` steps of

    $$x \leftarrow x + \frac{\alpha_i}{2}\,\nabla_x \log p_{\sigma_i}(x) + \sqrt{\alpha_i}\,z,\qquad
      \alpha_i = \epsilon\,\sigma_i^2 / \sigma_L^2$$

    with $\epsilon$ = step_size and $\sigma_L$ the last level; score_fn(x, sigma) is the score of the data noised
    to sigma (VE). Returns x after the last level (still carrying noise of about sigma_L)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or not (sigmas > 0).all():
        raise ValueError(f"sigmas must be positive noise levels; got {sigmas.tolist()[:6]}")
    steps_per_level = check_steps(steps_per_level)
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0; got {step_size}")
    check_finite("x", x)
    last = sigmas[-1].item()
    for sigma in sigmas.tolist():
        alpha = step_size * sigma**2 / last**2
        for _ in range(steps_per_level):
            x = x + alpha / 2 * score_fn(x, sigma) + math.sqrt(alpha) * randn_like(x, generator)
    return x
