r"""DDIM: fewer, deterministic steps through the same trained model; inversion of real data; interpolation of noise.

Taught in chapter 5 (DDIM and faster samplers). Paper: Song, Meng & Ermon 2021, "Denoising Diffusion Implicit
Models" (DDIM); Lin et al. 2024 for the timestep spacings. The solvers that go further (DPM-Solver++, Euler with
Karras sigmas) are in `course_lib.solvers`.

DDIM keeps the training marginals $q(x_t \mid x_0)$ of DDPM but samples on a sub-sequence $\tau$ of the T
timesteps, with a noise level eta chosen freely: eta = 0 is a deterministic map from noise to data (an ODE solver),
eta = 1 with every timestep is DDPM's ancestral sampler.

Code name -> paper symbol (DDIM writes alpha_t for what the course calls alpha_bar_t):
    alpha_bar        alpha_t in the DDIM paper (the cumulative product; the course never writes it alpha)
    t, t_next        tau_i and tau_{i-1}: a step goes from t to t_next (t_next < t when sampling, > t when inverting)
    -1               the clean data x0 as a timestep: alpha_bar_{-1} = 1 (diffusers' `final_alpha_cumprod`)
    eta              eta of eq. 16; std is sigma_{tau_i}(eta), the standard deviation of the added noise
    x0_hat, eps_hat  f_theta^{(t)}(x_t) of eq. 9 and epsilon_theta^{(t)}(x_t)
    spacing          how tau is laid over 0..T-1: "leading", "trailing" or "linspace" (diffusers' `timestep_spacing`)

A model is any callable `model(xt, t)` with t a (B,) integer tensor; it knows nothing of the schedule.
"""

import math
from itertools import pairwise

import torch

from course_lib.checks import (
    as_integer,
    check_choice,
    check_finite,
    check_model_output,
    check_model_predicts,
    check_record_every,
    check_same_shape,
    check_single_timestep,
    check_steps,
    should_record,
)
from course_lib.ddpm import PREDICTION_TYPES, Denoiser, split_output, split_prediction
from course_lib.profiles import randn_like
from course_lib.schedules import Schedule, check_T, gather

SPACINGS = ("leading", "trailing", "linspace")


def check_clip(clip_x0: bool | float) -> None:
    if not isinstance(clip_x0, bool) and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be True / False or a positive range r (clamp to [-r, r]); got {clip_x0!r}")


# --- which timesteps to visit ---------------------------------------------------------------------------------


def spaced_timesteps(T: int, steps: int, spacing: str = "trailing", steps_offset: int = 0) -> list[int]:
    r"""The sub-sequence $\tau$ of `steps` timesteps, noisiest first, as diffusers' `DDIMScheduler.set_timesteps`.

        leading    $k \lfloor T/n \rfloor + o$ for $k = 0..n-1$: from $(n-1)\lfloor T/n \rfloor + o$ down to o
        trailing   $\mathrm{round}(k\,T/n) - 1$ for $k = 1..n$: from $T-1$ down to $\mathrm{round}(T/n) - 1$
        linspace   $n$ points evenly spaced in $[0, T-1]$, rounded: from $T-1$ down to 0

    "leading" (diffusers' default for DDIM) never visits t = T-1, so with schedules that keep some signal there
    the sampler starts from the wrong distribution; Lin et al. 2024 ("sample from the last timestep") recommend
    "trailing", the course's default. After the last listed timestep a sampler steps to the clean data (t = -1).
    steps_offset (o, diffusers' option of that name; Stable Diffusion's configs set 1) shifts the "leading"
    timesteps up; as in diffusers, the other two spacings ignore it.
    """
    T = check_T(T)
    steps = check_steps(steps, T)
    check_choice("spacing", spacing, SPACINGS)
    offset = as_integer(steps_offset)
    if offset is None or offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0; got steps_offset={steps_offset!r}")
    if spacing == "leading":
        step_ratio = T // steps
        if (steps - 1) * step_ratio + offset > T - 1:
            largest = (steps - 1) * step_ratio + offset
            raise ValueError(f"steps_offset={offset} puts the first timestep at {largest}, past T - 1 = {T - 1}")
        return [i * step_ratio + offset for i in reversed(range(steps))]
    if spacing == "trailing":
        # numpy's arange(T, 0, -T/steps), which diffusers uses, adds i times the rounded step (T - T/steps) - T;
        # the same arithmetic here makes the lists equal even where a point falls on a rounding tie
        step = (T - T / steps) - T
        return [round(T + i * step) - 1 for i in range(steps)]
    if steps == 1:
        return [0]
    step = (T - 1) / (steps - 1)
    return [round(i * step) for i in reversed(range(steps))]


# --- one DDIM step --------------------------------------------------------------------------------------------


def _alpha_bar(schedule: Schedule, t: int, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t as a scalar in like's dtype, and 1 for t = -1 (the clean data)."""
    if t == -1:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return gather(schedule.alpha_bar, t, like)


def ddim_step(
    schedule: Schedule,
    model_output: torch.Tensor,
    t: int,
    t_next: int,
    xt: torch.Tensor,
    noise: torch.Tensor | None = None,
    eta: float = 0.0,
    prediction_type: str = "eps",
    clip_x0: bool | float = False,
    use_clipped_model_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One DDIM step $x_t \to x_{t_{next}}$ (Song et al. 2021, eq. 12, with $\bar\alpha$ for their $\alpha$):

    $$x_{t_{next}} = \sqrt{\bar\alpha_{t_{next}}}\,\hat x_0
        + \sqrt{1 - \bar\alpha_{t_{next}} - s^2}\;\hat\epsilon + s\,z,\qquad
      \hat x_0 = \frac{x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon}{\sqrt{\bar\alpha_t}}$$

    $$s = \eta\,\sqrt{\frac{1 - \bar\alpha_{t_{next}}}{1 - \bar\alpha_t}}\,
          \sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_{t_{next}}}}\qquad \text{(eq. 16)}$$

    eta = 0: deterministic; the update is then the Euler method for the ODE of eq. 14 in
    $\bar x = x / \sqrt{\bar\alpha}$ and $\sigma = \sqrt{(1 - \bar\alpha)/\bar\alpha}$.
    eta = 1 with t_next = t - 1: $s^2 = \tilde\beta_t$ and the step is DDPM's (`ddpm_step`, fixed_small).
    t_next = -1 steps to the clean data; t = -1 (the start of an inversion) takes x_t as x0_hat.
    noise (z) is needed when eta > 0. Returns (x_{t_next}, x0_hat). Equal to diffusers' `DDIMScheduler.step`
    with `clip_sample=clip_x0` and `variance_noise=noise` when t_next = t - T // steps (what diffusers steps to).
    clip_x0=True clamps x0_hat to [-1, 1], the pixel range; a number r clamps it to [-r, r] (diffusers'
    `clip_sample_range`), for data such as scaled latents that reach beyond 1.
    use_clipped_model_output=True (diffusers' option of the same name) re-derives the noise from the clamped
    x0_hat, $\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0) / \sqrt{1 - \bar\alpha_t}$, so that the
    step's two terms agree. It changes little for a plain model, and a lot under strong guidance, whose
    extrapolated noise is far from any the network was trained on (chapter 7 measures it).
    t and t_next are integers in -1..T-1: ints, numpy integers or 0-d tensors.
    """
    t = check_single_timestep("t", t, schedule.T, clean_data=True)
    t_next = check_single_timestep("t_next", t_next, schedule.T, clean_data=True)
    check_clip(clip_x0)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: as much noise as DDPM); got eta={eta}")
    if eta > 0 and noise is None:
        raise ValueError(f"eta={eta} adds noise: pass `noise`, a standard normal tensor shaped like xt")
    if noise is not None:
        check_same_shape(xt=xt, noise=noise)
    # 1. the network's estimates of the clean data and of the noise
    if t == -1:  # the clean data: x0_hat is x_t itself, and eps and v predictions are both the noise
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "x0":
            raise ValueError("an x0-prediction gives no eps_hat at the clean data (t=-1); invert an eps or v model")
        check_same_shape(xt=xt, model_output=model_output)
        x0_hat, eps_hat = xt, model_output
    else:
        x0_hat, eps_hat = split_prediction(schedule, xt, t, model_output, prediction_type)
    if use_clipped_model_output and not clip_x0:
        raise ValueError("use_clipped_model_output=True re-derives the noise from a clipped x0_hat: set clip_x0")
    if clip_x0:
        x0_hat = x0_hat.clamp(-float(clip_x0), float(clip_x0))
        if use_clipped_model_output:  # eps_hat from the clipped x0_hat, as an x0-prediction would give it
            alpha_bar_t = _alpha_bar(schedule, t, xt)
            eps_hat = split_output(xt, x0_hat, "x0", alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt())[1]
    # 2. the standard deviation of the added noise (eq. 16), zero at eta = 0 (where it can be 0 / 0 when inverting)
    alpha_bar_t, alpha_bar_next = _alpha_bar(schedule, t, xt), _alpha_bar(schedule, t_next, xt)
    std = torch.zeros_like(alpha_bar_t)
    if eta > 0:
        std = eta * ((1 - alpha_bar_next) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_next)).sqrt()
    # 3. point back at x_t from x0_hat ("direction pointing to x_t" in eq. 12), then add the noise
    x_next = alpha_bar_next.sqrt() * x0_hat + (1 - alpha_bar_next - std**2).sqrt() * eps_hat
    if eta > 0:
        x_next = x_next + std * noise
    return x_next, x0_hat


# --- the sampler and its inverse ------------------------------------------------------------------------------


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    steps: int,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    prediction_type: str = "eps",
    spacing: str = "trailing",
    clip_x0: bool | float = False,
    record_every: int = 0,
    use_clipped_model_output: bool = False,
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    """Run `ddim_step` from x_T (pure noise) through `spaced_timesteps(T, steps, spacing, steps_offset)` down to a
    sample of x0.

    Each step goes to the next listed timestep, the paper's sub-sequence tau, and the last one to the clean data.
    (diffusers' `DDIMScheduler.step` always goes to t - T // steps instead: the same for "leading", and for
    "trailing" when steps divides T, but not for "linspace", where its steps skip past the listed timesteps.)
    set_alpha_to_one=False (diffusers' option, False in Stable Diffusion's configs) ends the last step at the noise
    level of t = 0, alpha_bar_0, instead of the clean data: the sample keeps a trace of noise (sqrt(1 - alpha_bar_0)).
    With eta > 0 one noise tensor is drawn per step, after the model call, as `ddpm_sample` does.
    Returns (x0, trajectory): trajectory holds (t, x_t, x0_hat) every `record_every` steps, counted back from the
    last step (always recorded); empty when record_every is 0. The device and dtype come from x_T.
    A model whose `prediction_type` attribute differs from prediction_type is refused; a NaN or infinity in x_T or
    in a model output raises, saying at which step.
    """
    check_model_predicts(model, prediction_type)
    record_every = check_record_every(record_every)
    check_finite("x_T", x_T)
    timesteps = spaced_timesteps(schedule.T, steps, spacing, steps_offset)
    steps = len(timesteps)
    t_final = -1 if set_alpha_to_one else 0  # the clean data, or the noise level of t = 0
    trajectory = []
    xt = x_T
    for i, (t, t_next) in enumerate(pairwise([*timesteps, t_final])):
        # 1. the network's output at this step, for the whole batch
        t_batch = torch.full((xt.shape[0],), t, device=xt.device, dtype=torch.long)
        model_output = model(xt, t_batch)
        check_model_output(model_output, xt, f"t={t} (DDIM step {i + 1} of {steps})")
        # 2. one DDIM step, with fresh noise when eta > 0
        noise = randn_like(xt, generator) if eta > 0 else None
        x_next, x0_hat = ddim_step(
            schedule, model_output, t, t_next, xt, noise, eta, prediction_type, clip_x0, use_clipped_model_output
        )
        if should_record(i, steps, record_every):
            trajectory.append((t, xt.cpu(), x0_hat.cpu()))
        xt = x_next
    return xt, trajectory


@torch.no_grad()
def ddim_invert(
    model: Denoiser,
    schedule: Schedule,
    x0: torch.Tensor,
    steps: int,
    prediction_type: str = "eps",
    spacing: str = "trailing",
    record_every: int = 0,
) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, torch.Tensor]]]:
    r"""DDIM inversion: the deterministic update (eta = 0) run forward in time, from real data x0 to its noise.

    The timesteps are those of `ddim_sample` with the same steps and spacing, in increasing order, so that
    `ddim_sample` started from the result retraces the path back to (nearly) x0 (Song et al. 2021, section 5.4:
    the ODE of eq. 14 can be integrated in either direction). A step from s up to t needs $\hat\epsilon(x_t, t)$,
    which is unknown before x_t is; as diffusers' `DDIMInverseScheduler` (and Mokady et al. 2023), the network is
    called on the current state x_s at the target timestep t. That approximation, and the Euler method's own
    error, make the round trip exact only as steps grows. Returns (x_T, trajectory): trajectory holds
    (t, x_t, x0_hat) for the states reached, every `record_every` steps counted back from the last one.
    Refuses a model that declares another prediction_type, and NaN as `ddim_sample` does.
    """
    check_model_predicts(model, prediction_type)
    record_every = check_record_every(record_every)
    check_finite("x0", x0)
    timesteps = list(reversed(spaced_timesteps(schedule.T, steps, spacing)))
    steps = len(timesteps)
    trajectory = []
    x = x0
    for i, (t_now, t) in enumerate(pairwise([-1, *timesteps])):  # the first step leaves the clean data, t = -1
        # 1. the network's output at the timestep this step goes to, on the current state
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        model_output = model(x, t_batch)
        check_model_output(model_output, x, f"t={t} (DDIM inversion step {i + 1} of {steps})")
        # 2. one deterministic DDIM step up to t
        x, x0_hat = ddim_step(schedule, model_output, t_now, t, x, prediction_type=prediction_type)
        if should_record(i, steps, record_every):
            trajectory.append((t, x.cpu(), x0_hat.cpu()))
    return x, trajectory


# --- walking between noises -----------------------------------------------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    r"""Spherical linear interpolation between two tensors of the same shape, each taken as one vector
    (Shoemake 1985; used on x_T by Song et al. 2021, section 5.3, to interpolate DDIM samples):

    $$\mathrm{slerp}(a, b; w) = \frac{\sin((1 - w)\,\theta)}{\sin\theta}\,a + \frac{\sin(w\,\theta)}{\sin\theta}\,b,
      \qquad \cos\theta = \frac{\langle a, b\rangle}{\lVert a\rVert\,\lVert b\rVert}$$

    Two independent noise samples in D dimensions are nearly orthogonal with norms near sqrt(D); the straight line
    between them passes through norms near sqrt(D / 2), which the model never saw, while the arc keeps the norm.
    weight 0 gives a and 1 gives b. For (nearly) parallel a and b the formula tends to linear interpolation, which
    is used there; opposite a and b have no unique arc between them and raise.
    """
    check_same_shape(a=a, b=b)
    if not 0 <= weight <= 1:
        raise ValueError(f"weight must lie in [0, 1] (0 gives a, 1 gives b); got weight={weight}")
    norm_a, norm_b = a.norm().item(), b.norm().item()
    if norm_a == 0 or norm_b == 0:
        raise ValueError(f"slerp needs two non-zero tensors; got norms {norm_a} and {norm_b}")
    cos_theta = (a * b).sum().item() / (norm_a * norm_b)
    theta = math.acos(min(max(cos_theta, -1.0), 1.0))
    if theta < 1e-4:
        return (1 - weight) * a + weight * b
    if math.pi - theta < 1e-4:
        raise ValueError(
            f"a and b point in opposite directions (angle {theta:.6f}); the arc between them is not unique"
        )
    return (math.sin((1 - weight) * theta) * a + math.sin(weight * theta) * b) / math.sin(theta)
