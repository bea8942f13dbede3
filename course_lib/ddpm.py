r"""DDPM: the posterior q(x_{t-1} | x_t, x_0), the three parameterisations, the simple loss, the ancestral sampler.

Taught in notebooks/03_ddpm.ipynb. Papers: Ho et al. 2020 (DDPM); Salimans & Ho 2022 (v-prediction).

Code name -> paper symbol:
    xt, x0, eps      x_t, x_0, epsilon
    x0_hat, eps_hat  the model's estimates of x_0 and epsilon
    v                sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0  (Salimans & Ho 2022, section 4)
    prediction_type  what the network outputs: "eps", "x0" or "v" (diffusers: "epsilon", "sample", "v_prediction")
    variance_type    "fixed_small" (sigma_t^2 = beta_tilde_t) or "fixed_large" (sigma_t^2 = beta_t), Ho et al. sec. 3.2

A model is any callable `model(xt, t)` with t a (B,) integer tensor; it knows nothing of the schedule.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from course_lib.checks import (
    check_choice,
    check_finite,
    check_model_output,
    check_model_predicts,
    check_record_every,
    check_same_shape,
    check_single_timestep,
)
from course_lib.forward import q_sample
from course_lib.profiles import randn_like
from course_lib.schedules import Schedule, gather

PREDICTION_TYPES = ("eps", "x0", "v")
VARIANCE_TYPES = ("fixed_small", "fixed_large")

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --- conversions between the parameterisations ------------------------------------------------------------------


OUTPUT_KINDS = (*PREDICTION_TYPES, "score", "velocity")  # what split_output reads (chapter 11's table)


def split_output(
    x: torch.Tensor, model_output: torch.Tensor, prediction_type: str, signal, noise
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(x0_hat, eps_hat) from a network output of any parameterisation, for a state $x = s\,x_0 + n\,\epsilon$ with
    signal scale s and noise scale n (tensors broadcasting against x, or numbers): the one place where outputs are
    converted, for every sampler of the course. `prediction_targets` is its inverse.

        eps       $\hat x_0 = (x - n\,\hat\epsilon) / s$  (Ho et al. 2020, eq. 4 solved for x0)
        x0        $\hat\epsilon = (x - s\,\hat x_0) / n$
        v         $\hat x_0 = (s\,x - n r\,\hat v) / r^2$, $\hat\epsilon = (n\,x + s r\,\hat v) / r^2$,
                  $r^2 = s^2 + n^2$: Salimans & Ho 2022's $v = (s\,\epsilon - n\,x_0) / r$, defined on the
                  variance-preserving state x / r
        score     $\nabla_x \log p(x) = -\hat\epsilon / n$ (Tweedie; chapter 11), so $\hat\epsilon = -n\,\hat s$
        velocity  $u = \epsilon - x_0$, the straight path's velocity (chapter 10): $\hat x_0 = (x - n\,\hat u)/(s + n)$,
                  $\hat\epsilon = (x + s\,\hat u) / (s + n)$

    The course's x_t has $s = \sqrt{\bar\alpha_t}$, $n = \sqrt{1 - \bar\alpha_t}$ (r = 1: `split_prediction`);
    the variance-exploding state of EDM, $x = x_t / \sqrt{\bar\alpha_t} = x_0 + \sigma\epsilon$, has s = 1, n = sigma
    (`solvers.euler_karras_step`, `course_lib.frame`), where these are diffusers' `EulerDiscreteScheduler`
    conversions; the flow path of chapter 10 has s = 1 - t, n = t (`flow.split_velocity`).
    """
    check_choice("prediction_type", prediction_type, OUTPUT_KINDS)
    check_same_shape(x=x, model_output=model_output)
    if prediction_type == "eps":
        return (x - noise * model_output) / signal, model_output
    if prediction_type == "x0":
        return model_output, (x - signal * model_output) / noise
    if prediction_type == "score":
        eps_hat = -noise * model_output
        return (x - noise * eps_hat) / signal, eps_hat
    if prediction_type == "velocity":
        return (x - noise * model_output) / (signal + noise), (x + signal * model_output) / (signal + noise)
    r_squared = signal**2 + noise**2  # 1 on the course's path, 1 + sigma^2 on the VE one
    r = r_squared**0.5
    return (signal * x - noise * r * model_output) / r_squared, (noise * x + signal * r * model_output) / r_squared


def prediction_targets(x0: torch.Tensor, eps: torch.Tensor, signal, noise) -> dict[str, torch.Tensor]:
    r"""What a network of each kind is trained to output for the state $x = s\,x_0 + n\,\epsilon$: the conversion
    table of chapter 11 read forwards (`split_output` reads it backwards; the tests check the round trip).

        eps $\epsilon$;  x0 $x_0$;  v $(s\,\epsilon - n\,x_0) / \sqrt{s^2 + n^2}$;  score $-\epsilon / n$;
        velocity $\epsilon - x_0$

    signal and noise are numbers or tensors broadcasting against x0. Returns a dict keyed by `OUTPUT_KINDS`.
    """
    check_same_shape(x0=x0, eps=eps)
    r = (signal**2 + noise**2) ** 0.5
    return {
        "eps": eps,
        "x0": x0,
        "v": (signal * eps - noise * x0) / r,
        "score": -eps / noise,
        "velocity": eps - x0,
    }


def split_prediction(
    schedule: Schedule, xt: torch.Tensor, t: torch.Tensor | int, model_output: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from a network output of any parameterisation at x_t: `split_output` with
    signal sqrt(alpha_bar_t) and noise sqrt(1 - alpha_bar_t)."""
    alpha_bar_t = gather(schedule.alpha_bar, t, xt)
    return split_output(xt, model_output, prediction_type, alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt())


def x0_from_eps(schedule: Schedule, xt: torch.Tensor, t: torch.Tensor | int, eps: torch.Tensor) -> torch.Tensor:
    r"""$\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}$ (Ho et al. 2020, eq. 4
    solved for x0)."""
    return split_prediction(schedule, xt, t, eps, "eps")[0]


def eps_from_x0(schedule: Schedule, xt: torch.Tensor, t: torch.Tensor | int, x0: torch.Tensor) -> torch.Tensor:
    r"""$\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0) / \sqrt{1 - \bar\alpha_t}$."""
    return split_prediction(schedule, xt, t, x0, "x0")[1]


def v_from_x0_eps(schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    r"""$v = \sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1 - \bar\alpha_t}\,x_0$ (Salimans & Ho 2022, section 4)."""
    alpha_bar_t = gather(schedule.alpha_bar, t, x0)
    return prediction_targets(x0, eps, alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt())["v"]


def x0_from_v(schedule: Schedule, xt: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
    r"""$\hat x_0 = \sqrt{\bar\alpha_t}\,x_t - \sqrt{1 - \bar\alpha_t}\,\hat v$."""
    return split_prediction(schedule, xt, t, v, "v")[0]


def eps_from_v(schedule: Schedule, xt: torch.Tensor, t: torch.Tensor | int, v: torch.Tensor) -> torch.Tensor:
    r"""$\hat\epsilon = \sqrt{1 - \bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\,\hat v$."""
    return split_prediction(schedule, xt, t, v, "v")[1]


def training_target(
    schedule: Schedule, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the network is trained to output: eps, x0 or v."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "eps":
        return eps
    if prediction_type == "x0":
        return x0
    return v_from_x0_eps(schedule, x0, eps, t)


# --- the posterior and the loss -------------------------------------------------------------------------------


def posterior(
    schedule: Schedule, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of $q(x_{t-1} \mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t I)$
    (Ho et al. 2020, eq. 6-7):

    $$\tilde\mu_t = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\,x_0
                  + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\,x_t,\qquad
      \tilde\beta_t = \frac{1 - \bar\alpha_{t-1}}{1 - \bar\alpha_t}\,\beta_t$$

    At t = 0 the "previous" state is the clean data: the mean is x0 and the variance 0.
    The variance comes back broadcastable against x0.
    """
    check_same_shape(x0=x0, xt=xt)
    mean = gather(schedule.posterior_coef_x0, t, x0) * x0 + gather(schedule.posterior_coef_xt, t, xt) * xt
    return mean, gather(schedule.posterior_variance, t, x0)


def simple_loss(
    model: Denoiser,
    schedule: Schedule,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    prediction_type: str = "eps",
    min_snr_gamma: float | None = None,
    cond: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""$L_{simple} = \mathbb E_{t, x_0, \epsilon}\,\lVert \epsilon - \epsilon_\theta(x_t, t) \rVert^2$
    (Ho et al. 2020, eq. 14),

    with t uniform in 0..T-1, and the target swapped for x0 or v when the model predicts those.
    With `min_snr_gamma`, each example is weighted by min-SNR-gamma (Hang et al. 2023, section 3.4), which caps
    the weight of the nearly clean timesteps: $w_t = \min(\mathrm{snr}_t, \gamma) / \mathrm{snr}_t$ for eps,
    $\min(\mathrm{snr}_t, \gamma)$ for x0 and $\min(\mathrm{snr}_t, \gamma) / (\mathrm{snr}_t + 1)$ for v.
    With `cond` (a condition per example: labels, say) the model is called as model(xt, t, cond).
    """
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator).to(x0.device)  # (B,)
    eps = randn_like(x0, generator)
    xt = q_sample(schedule, x0, t, eps)
    target = training_target(schedule, x0, eps, t, prediction_type)
    prediction = model(xt, t) if cond is None else model(xt, t, cond)
    if min_snr_gamma is None:
        return F.mse_loss(prediction, target)
    if min_snr_gamma <= 0:
        raise ValueError(f"min_snr_gamma must be > 0; got {min_snr_gamma}")
    snr = schedule.snr.to(x0.device)[t]  # (B,)
    clipped = snr.clamp(max=min_snr_gamma)
    weight = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[prediction_type]  # (B,)
    per_example = (prediction - target).pow(2).flatten(1).mean(1)  # (B,)
    return (weight * per_example).mean()


# --- the ancestral sampler ------------------------------------------------------------------------------------


def ddpm_step(
    schedule: Schedule,
    model_output: torch.Tensor,
    t: int,
    xt: torch.Tensor,
    noise: torch.Tensor,
    prediction_type: str = "eps",
    variance_type: str = "fixed_small",
    clip_x0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One ancestral step $x_t \to x_{t-1}$ (Ho et al. 2020, Algorithm 2, written through $\hat x_0$):

    $$x_{t-1} = \tilde\mu_t(\hat x_0, x_t) + \sigma_t z,\qquad
      \sigma_t^2 = \tilde\beta_t\ \text{(fixed\_small)}\ \text{or}\ \beta_t\ \text{(fixed\_large)}$$

    with no noise added at t = 0. Returns (x_{t-1}, x0_hat). Equal to diffusers' `DDPMScheduler.step` with
    `clip_sample=clip_x0` on the same inputs. t is one integer timestep: an int, a numpy integer or a 0-d tensor.
    """
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    check_same_shape(xt=xt, noise=noise)
    t = check_single_timestep("t", t, schedule.T)
    # 1. the network's estimate of the clean data
    x0_hat, _ = split_prediction(schedule, xt, t, model_output, prediction_type)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1, 1)
    # 2. the mean of the posterior q(x_{t-1} | x_t, x0_hat)
    mean, posterior_variance = posterior(schedule, x0_hat, xt, t)
    if t == 0:
        return mean, x0_hat
    # 3. add noise with the chosen variance
    variance = posterior_variance if variance_type == "fixed_small" else gather(schedule.betas, t, xt)
    return mean + variance.sqrt() * noise, x0_hat


@torch.no_grad()
def ddpm_sample(
    model: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
    prediction_type: str = "eps",
    variance_type: str = "fixed_small",
    clip_x0: bool = False,
    record_every: int = 0,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Run the reverse chain from x_T (pure noise) down to a sample of x0 with `ddpm_step` (Algorithm 2).

    Returns (x0, trajectory): trajectory holds (t, x_t, x0_hat) every `record_every` steps (and at t = 0),
    empty when record_every is 0. The device and dtype come from x_T. A model whose `prediction_type` attribute
    differs from prediction_type is refused; a NaN or infinity in x_T or in a model output raises, saying where.
    """
    check_model_predicts(model, prediction_type)
    record_every = check_record_every(record_every)
    check_finite("x_T", x_T)
    trajectory = []
    xt = x_T
    for t in reversed(range(schedule.T)):
        # 1. the network's output at this step, for the whole batch
        t_batch = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        model_output = model(xt, t_batch)
        check_model_output(model_output, xt, f"t={t} (DDPM step {schedule.T - t} of {schedule.T})")
        # 2. one ancestral step with fresh noise
        x_prev, x0_hat = ddpm_step(
            schedule, model_output, t, xt, randn_like(xt, generator), prediction_type, variance_type, clip_x0
        )
        if record_every and (t % record_every == 0):
            trajectory.append((t, xt.cpu(), x0_hat.cpu()))
        xt = x_prev
    return xt, trajectory
