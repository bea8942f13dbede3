r"""Beyond DDIM: DPM-Solver++(2M) and the Euler method with Karras sigmas, two solvers of the probability-flow ODE.

Taught in chapter 5 (DDIM and faster samplers), after `course_lib.samplers` (DDIM). Papers: Lu et al. 2022,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"; Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models" (EDM).

Both solve the same ODE as deterministic DDIM, in other coordinates:

    DPM-Solver++  the log-SNR time lambda = log_snr / 2; it integrates the data prediction x0_hat exactly in its
                  linear part and approximates x0_hat as linear in lambda over each step (second order)
    Euler/Karras  the variance-exploding (VE) view x = x_t / sqrt(alpha_bar_t) = x0 + sigma eps, with
                  sigma = sqrt((1 - alpha_bar) / alpha_bar), on noise levels spaced by EDM's eq. 5 (or on
                  diffusers' plain "linspace" levels, `linspace_sigmas`)
    (the two are tied by lambda = -log(sigma))

Code name -> paper symbol:
    DPM-Solver++ (its alpha_t and sigma_t are the VP signal and noise scales, not the course's alpha or the VE sigma)
        sqrt(alpha_bar_t)      alpha_t
        sqrt(1 - alpha_bar_t)  sigma_t
        log_snr_t / 2          lambda_t = log(alpha_t / sigma_t)
        x0_hat                 x_theta(x_t, t), the data prediction
        h, r                   h_i = lambda_{t_i} - lambda_{t_{i-1}} and r_i = h_{i-1} / h_i (Algorithm 2)
        t, t_last, t_next      t_{i-1}, t_{i-2} and t_i of Algorithm 2; t_next = -1 is the clean data (lambda = inf)
    Euler / EDM
        x                      x, the VE state (DDIM's x-bar, eq. 14); x_t = x / sqrt(1 + sigma^2)
        sigma                  sigma, the VE noise level; sigma_t = exp(-log_snr_t / 2)
        x0_hat                 D(x; sigma), the denoiser
        rho                    rho of eq. 5 (7 in the paper)

A model is any callable `model(xt, t)` on the course's x_t. DPM-Solver++ calls it with (B,) integer timesteps;
the Euler sampler with (B,) float32 timesteps that fall between integers (see `sigma_to_timestep`).
"""

from itertools import pairwise

import torch

from course_lib.checks import (
    check_choice,
    check_finite,
    check_model_output,
    check_model_predicts,
    check_record_every,
    check_same_shape,
    check_steps,
    should_record,
)
from course_lib.ddpm import PREDICTION_TYPES, Denoiser, split_output, split_prediction
from course_lib.samplers import SPACINGS, spaced_timesteps
from course_lib.schedules import Schedule, check_T, gather

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")  # diffusers' final_sigmas_type: the last step's target
SIGMA_SPACINGS = ("karras", "linspace")  # Euler's noise levels: Karras et al.'s, or diffusers' plain ones

# --- DPM-Solver++(2M) -----------------------------------------------------------------------------------------


def dpm_solver_timesteps(T: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The timesteps of diffusers' `DPMSolverMultistepScheduler.set_timesteps`, noisiest first.

    Its last step goes to the clean data from the last listed timestep, so "linspace" and "leading" lay
    steps + 1 points as `spaced_timesteps` does and drop the last (t = 0); "trailing" is `spaced_timesteps`.
    diffusers' default is "linspace", which starts at T - 1.
    """
    check_choice("spacing", spacing, SPACINGS)
    T = check_T(T)
    steps = check_steps(steps, T)
    if spacing == "trailing":
        return spaced_timesteps(T, steps, spacing)
    if steps + 1 > T:
        raise ValueError(f"spacing={spacing!r} lays steps + 1 points on 0..T-1: steps must be <= {T - 1}; got {steps}")
    return spaced_timesteps(T, steps + 1, spacing)[:steps]


def _alpha_sigma_lambda(schedule: Schedule, t: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    r"""DPM-Solver's $\alpha_t = \sqrt{\bar\alpha_t}$, $\sigma_t = \sqrt{1 - \bar\alpha_t}$, and
    $\lambda_t = \log(\mathrm{snr}_t) / 2$.

    Taken from the log-SNR table, since $\bar\alpha = \mathrm{sigmoid}(\log\mathrm{snr})$ and
    $1 - \bar\alpha = \mathrm{sigmoid}(-\log\mathrm{snr})$: this keeps $1 - \bar\alpha_t$ accurate at small t, where
    the float32 alpha_bar table has rounded it. t = -1, the clean data, gives (1, 0, +inf).
    """
    if t == -1:
        one = torch.ones((), dtype=like.dtype, device=like.device)
        return one, 0 * one, one * float("inf")
    log_snr_t = gather(schedule.log_snr, t, like)
    return torch.sigmoid(log_snr_t).sqrt(), torch.sigmoid(-log_snr_t).sqrt(), log_snr_t / 2


def dpm_solver_first_order_step(
    schedule: Schedule, x0_hat: torch.Tensor, xt: torch.Tensor, t: int, t_next: int
) -> torch.Tensor:
    r"""DPM-Solver++(1), the first step of Lu et al. 2022's Algorithm 2: the exact solution of the ODE when x0_hat
    is constant over the step,

    $$x_{t_{next}} = \frac{\sigma_{t_{next}}}{\sigma_t}\,x_t - \alpha_{t_{next}}\,(e^{-h} - 1)\,\hat x_0,\qquad
      h = \lambda_{t_{next}} - \lambda_t$$

    This is deterministic DDIM (`ddim_step` with eta = 0) written in lambda. To the clean data (t_next = -1) it gives
    x0_hat itself.
    """
    check_same_shape(x0_hat=x0_hat, xt=xt)
    alpha_next, sigma_next, lambda_next = _alpha_sigma_lambda(schedule, t_next, xt)
    _, sigma_t, lambda_t = _alpha_sigma_lambda(schedule, t, xt)
    h = lambda_next - lambda_t
    return sigma_next / sigma_t * xt - alpha_next * (torch.exp(-h) - 1) * x0_hat


def dpm_solver_second_order_step(
    schedule: Schedule,
    x0_hat: torch.Tensor,
    x0_hat_last: torch.Tensor,
    xt: torch.Tensor,
    t: int,
    t_last: int,
    t_next: int,
) -> torch.Tensor:
    r"""One DPM-Solver++(2M) step (Lu et al. 2022, Algorithm 2): the first-order step with x0_hat replaced by its
    linear extrapolation in lambda from the last two model calls (at t_last, then t) to the middle of the step:

    $$D = \Big(1 + \frac{1}{2r}\Big)\hat x_0(t) - \frac{1}{2r}\,\hat x_0(t_{last}),\qquad
      r = \frac{\lambda_t - \lambda_{t_{last}}}{h}$$

    $$x_{t_{next}} = \frac{\sigma_{t_{next}}}{\sigma_t}\,x_t - \alpha_{t_{next}}\,(e^{-h} - 1)\,D,\qquad
      h = \lambda_{t_{next}} - \lambda_t$$

    Equal to diffusers' "midpoint" second-order update. It cannot end at the clean data (h is infinite there).
    """
    check_same_shape(x0_hat=x0_hat, x0_hat_last=x0_hat_last, xt=xt)
    if t_next == -1:
        raise ValueError("a second-order step cannot end at the clean data (t_next=-1): take a first-order one")
    alpha_next, sigma_next, lambda_next = _alpha_sigma_lambda(schedule, t_next, xt)
    _, sigma_t, lambda_t = _alpha_sigma_lambda(schedule, t, xt)
    _, _, lambda_last = _alpha_sigma_lambda(schedule, t_last, xt)
    h = lambda_next - lambda_t
    r = (lambda_t - lambda_last) / h
    # 1. extrapolate the data prediction linearly in lambda to the middle of the step
    D = (1 + 1 / (2 * r)) * x0_hat - 1 / (2 * r) * x0_hat_last
    # 2. the first-order update with D in place of x0_hat
    return sigma_next / sigma_t * xt - alpha_next * (torch.exp(-h) - 1) * D


@torch.no_grad()
def dpm_solver_sample(
    model: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    steps: int,
    prediction_type: str = "eps",
    spacing: str = "linspace",
    clip_x0: bool = False,
    record_every: int = 0,
    final_sigmas_type: str = "zero",
    lower_order_final: bool = True,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """DPM-Solver++(2M) from x_T (pure noise) down to a sample of x0, one model call per step.

    As diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)` with its defaults:
    first order at the first step (no history yet) and at the last one, to the clean data (`lower_order_final`,
    `final_sigmas_type="zero"`), second order in between. clip_x0 clips every x0_hat to [-1, 1] before it is used,
    as diffusers' `thresholding=True` with `sample_max_value=1.0` does (its dynamic threshold is then always 1).
    Returns (x0, trajectory) as `ddim_sample` does; refuses a model that declares another prediction_type, and NaN,
    as `ddim_sample` does.

    diffusers' other settings of the two options (rules of its `step`, kept as they are):
        final_sigmas_type="sigma_min"  the last step ends at the noise level of t = 0, not at the clean data
        lower_order_final              the last step is first order when it goes to the clean data (it must: h is
                                       infinite there), or when lower_order_final is set and steps < 15; so with
                                       "sigma_min" and 15 steps or more, or lower_order_final=False, it is second order
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    check_model_predicts(model, prediction_type)
    record_every = check_record_every(record_every)
    check_finite("x_T", x_T)
    timesteps = dpm_solver_timesteps(schedule.T, steps, spacing)
    steps = len(timesteps)
    t_final = -1 if final_sigmas_type == "zero" else 0  # the clean data, or the noise level of t = 0
    first_order_last = final_sigmas_type == "zero" or (lower_order_final and steps < 15)  # diffusers' rule
    trajectory = []
    xt, x0_hat_last, t_last = x_T, None, None
    for i, (t, t_next) in enumerate(pairwise([*timesteps, t_final])):
        # 1. the network's estimate of the clean data: DPM-Solver++ integrates the data prediction
        t_batch = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        model_output = model(xt, t_batch)
        check_model_output(model_output, xt, f"t={t} (DPM-Solver++ step {i + 1} of {steps})")
        x0_hat, _ = split_prediction(schedule, xt, t, model_output, prediction_type)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        # 2. first order without history and (see above) at the last step, second order otherwise
        if x0_hat_last is None or (i == steps - 1 and first_order_last):
            x_next = dpm_solver_first_order_step(schedule, x0_hat, xt, t, t_next)
        else:
            x_next = dpm_solver_second_order_step(schedule, x0_hat, x0_hat_last, xt, t, t_last, t_next)
        if should_record(i, steps, record_every):
            trajectory.append((t, xt.cpu(), x0_hat.cpu()))
        xt, x0_hat_last, t_last = x_next, x0_hat, t
    return xt, trajectory


# --- Euler with Karras sigmas ---------------------------------------------------------------------------------


def karras_sigmas(schedule: Schedule, steps: int, rho: float = 7.0, sigma_max: float | None = None) -> torch.Tensor:
    r"""The noise levels of EDM (Karras et al. 2022, eq. 5), then 0: float64, shape (steps + 1,), decreasing.

    $$\sigma_i = \Big(\sigma_{max}^{1/\rho} + \frac{i}{N - 1}\big(\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}\big)
      \Big)^{\rho},\quad i = 0..N-1,\qquad \sigma_N = 0$$

    with $\sigma_{min}$, $\sigma_{max}$ the VE noise levels of t = 0 and t = T-1 (diffusers' default "linspace"
    spacing; for steps = 1 that spacing has the single timestep 0, so diffusers' one level is sigma_min, ours
    sigma_max). rho = 7 crowds the steps at low noise, where the ODE's path bends most.

    sigma_max caps the top level (diffusers' `sigma_max`; EDM samples from 80). The cosine schedule's last, clipped
    beta puts its sigma_max at 2 x 10^4, and with rho = 7 most levels then land above 600, all mapped to fractional
    timesteps between 998 and 999: network calls spent where the state is pure noise. Capping (say at 80) moves
    them to where the digit forms; the start x = sigma_max x_T is then noise of the capped size, whose data part
    (std 0.6 against 80) is negligible.
    """
    steps = check_steps(steps, schedule.T)
    log_sigmas = -schedule.log_snr.double() / 2  # (T,) log sigma_t = -lambda_t
    sigma_min, sigma_top = log_sigmas[0].exp().item(), log_sigmas[-1].exp().item()
    if sigma_max is not None and not sigma_min < sigma_max:
        raise ValueError(f"sigma_max must exceed the schedule's sigma_min {sigma_min:.3g}; got {sigma_max}")
    return karras_levels(steps, sigma_min, sigma_top if sigma_max is None else float(sigma_max), rho)


def karras_levels(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """EDM's eq. 5 between any two noise levels, then 0: float64, (steps + 1,), decreasing; `karras_sigmas` takes
    its ends from a schedule, chapter 11's samplers (`course_lib.frame`) from each model's range. One level
    (steps = 1) is sigma_max."""
    steps = check_steps(steps)
    if rho <= 0:
        raise ValueError(f"rho must be > 0; got rho={rho}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max; got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # i / (N - 1)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return torch.cat([(top + ramp * (bottom - top)) ** rho, torch.zeros(1, dtype=torch.float64)])


def linspace_sigmas(schedule: Schedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels of plain Euler, diffusers' `EulerDiscreteScheduler` with its defaults ("linspace" spacing,
    no Karras sigmas): (sigmas, timesteps).

    timesteps: `steps` points evenly spaced over [0, T - 1], noisiest first, fractional in general (float32, (steps,):
    what the network is told, as numpy's float32 linspace gives them). sigmas: the VE noise level at each, linearly
    interpolated in sigma between the integer timesteps around it, then 0 (float64, (steps + 1,)). diffusers
    interpolates sigma here but log sigma on its Karras path (`sigma_to_timestep`); at integer timesteps they agree.
    """
    steps = check_steps(steps, schedule.T)
    timesteps = torch.linspace(0, schedule.T - 1, steps, dtype=torch.float64).float().flip(0)  # (steps,)
    sigma_table = (-schedule.log_snr.double() / 2).exp()  # (T,) sigma_t = exp(-lambda_t)
    t = timesteps.double()
    low = t.floor().long().clamp(0, max(schedule.T - 2, 0))
    w = t - low
    sigmas = (1 - w) * sigma_table[low] + w * sigma_table[(low + 1).clamp(max=schedule.T - 1)]
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]), timesteps


def sigma_to_timestep(schedule: Schedule, sigma: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each VE noise level: log sigma interpolated linearly between integer timesteps.

    A Karras noise level falls between two of the schedule's, and the network was trained on integer t only;
    diffusers' `EulerDiscreteScheduler` (with `use_karras_sigmas=True`) hands the network this fractional t, found
    by linear interpolation of log sigma_t = -log_snr_t / 2 over t, and so does `euler_karras_sample`. Levels outside
    [sigma_0, sigma_{T-1}] give 0 or T - 1. float64, the shape of sigma. `sigma_of_timestep` is the inverse.
    """
    if (sigma <= 0).any():
        raise ValueError(f"noise levels must be > 0; got {sigma[sigma <= 0][0].item()}")
    log_sigmas = -schedule.log_snr.double().to(sigma.device) / 2  # (T,), increasing with t
    log_sigma = sigma.double().log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, schedule.T - 2)
    w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
    return low + w


def sigma_of_timestep(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """The VE noise level at a timestep t in [0, T - 1], integer or not: the inverse of `sigma_to_timestep`.

    A model that looks its noise level up by t (the exact denoiser of `course_lib.toy`) can use this to run under
    `euler_karras_sample`: alpha_bar = 1 / (1 + sigma^2). float64, the shape of t.
    """
    t = t.double()
    if t.numel() and (t.min() < 0 or t.max() > schedule.T - 1):
        raise ValueError(f"timestep t={t[(t < 0) | (t > schedule.T - 1)][0].item()} is outside [0, {schedule.T - 1}]")
    log_sigmas = -schedule.log_snr.double().to(t.device) / 2
    low = t.floor().long().clamp(0, schedule.T - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def euler_karras_step(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    prediction_type: str = "eps",
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One Euler step of the probability-flow ODE in the VE view, from noise level sigma to sigma_next
    (Karras et al. 2022, eq. 1 with eq. 3 and $\sigma(t) = t$; the first half of their Algorithm 1):

    $$\frac{dx}{d\sigma} = \frac{x - D(x; \sigma)}{\sigma},\qquad
      x_{next} = x + (\sigma_{next} - \sigma)\,\frac{x - D(x; \sigma)}{\sigma}$$

    D(x; sigma) = x0_hat comes from the network's output through `ddpm.split_output` on the VE state
    $x = x_0 + \sigma\epsilon$ (signal 1, noise sigma): $x - \sigma\hat\epsilon$ for eps,
    $x / (1 + \sigma^2) - \sigma\,\hat v / \sqrt{1 + \sigma^2}$ for v, the output itself for x0. With eps the slope
    is $\hat\epsilon$ itself: this is deterministic DDIM on other noise levels (DDIM eq. 14).
    clip_x0 clips D to [-1, 1] before the slope is taken (as `ddim_step` clips x0_hat); diffusers' Euler scheduler
    has no such option. Returns (x_next, x0_hat). Equal to diffusers' `EulerDiscreteScheduler.step` (no churn) on
    the same inputs when clip_x0 is False. (`flow.euler_flow_step` is the Euler step of a flow's ODE in t.)
    """
    # 1. the denoised estimate D(x; sigma)
    x0_hat, _ = split_output(x, model_output, prediction_type, 1, sigma)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    # 2. the slope dx/dsigma, then one step along it
    slope = (x - x0_hat) / sigma
    return x + slope * (sigma_next - sigma), x0_hat


@torch.no_grad()
def euler_karras_sample(
    model: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    steps: int,
    prediction_type: str = "eps",
    rho: float = 7.0,
    clip_x0: bool = False,
    record_every: int = 0,
    sigma_spacing: str = "karras",
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor, torch.Tensor]]]:
    """The Euler method of Karras et al. (`euler_karras_step`) on `karras_sigmas(schedule, steps, rho, sigma_max)`,
    from x_T (pure noise) to a sample of x0; with sigma_spacing="linspace", on diffusers' plain levels
    (`linspace_sigmas`; sigma_max must then be None).

    As diffusers' `EulerDiscreteScheduler(use_karras_sigmas=True)` (False for "linspace"): the VE state starts at
    sigma_max * x_T (its `init_noise_sigma`); the network sees the course's x_t = x / sqrt(1 + sigma^2) (its
    `scale_model_input`) and the fractional timestep of the level as float32 (`sigma_to_timestep` for Karras
    levels). Returns (x0, trajectory) as `ddim_sample` does, with fractional t and the course's x_t in the
    trajectory. clip_x0: see `euler_karras_step`. Refuses a model that declares another prediction_type, and NaN,
    as `ddim_sample` does.
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_choice("sigma_spacing", sigma_spacing, SIGMA_SPACINGS)
    check_model_predicts(model, prediction_type)
    record_every = check_record_every(record_every)
    check_finite("x_T", x_T)
    if sigma_spacing == "linspace" and sigma_max is not None:
        raise ValueError(f"sigma_max={sigma_max} caps Karras levels only; sigma_spacing='linspace' takes None")
    if sigma_spacing == "karras":
        sigmas = karras_sigmas(schedule, steps, rho, sigma_max)  # (steps + 1,) float64
        timesteps = sigma_to_timestep(schedule, sigmas[:-1]).float()  # (steps,) what the network is told
    else:
        sigmas, timesteps = linspace_sigmas(schedule, steps)
    where = [f"sigma={sigma:.4g}, t={t:.2f}" for sigma, t in zip(sigmas.tolist(), timesteps.tolist(), strict=False)]
    sigmas = sigmas.to(device=x_T.device, dtype=x_T.dtype)
    steps = len(timesteps)
    trajectory = []
    x = sigmas[0] * x_T  # (B, ...) the VE state
    for i, (t, (sigma, sigma_next)) in enumerate(zip(timesteps.tolist(), pairwise(sigmas), strict=True)):
        # 1. the network's output on the course's x_t, at the fractional timestep of this noise level
        xt = x / (sigma**2 + 1) ** 0.5
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        model_output = model(xt, t_batch)
        check_model_output(model_output, xt, f"{where[i]} (Euler step {i + 1} of {steps})")
        # 2. one Euler step to the next noise level
        x_next, x0_hat = euler_karras_step(model_output, x, sigma, sigma_next, prediction_type, clip_x0)
        if should_record(i, steps, record_every):
            trajectory.append((t, xt.cpu(), x0_hat.cpu()))
        x = x_next
    return x, trajectory
