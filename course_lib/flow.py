r"""Flow matching and rectified flow: straight paths from data to noise, a velocity network, ODE samplers; reflow
and the straightness of paths are in `course_lib.reflow`.

Taught in chapter 10 (Flow matching and rectified flow). Papers: Lipman et al. 2023, "Flow Matching for Generative
Modeling"; Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow";
Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (Stable Diffusion 3).

The convention of this module (that of diffusers' `FlowMatchEulerDiscreteScheduler` and of SD3, whose sigma is t):
time is continuous, t in [0, 1], t = 0 is the data and t = 1 the noise, and the path between them is straight,

    $$x_t = (1 - t)\,x_0 + t\,\epsilon,\qquad v = \frac{dx_t}{dt} = \epsilon - x_0$$

A network trained to output v at (x_t, t) learns $v(x, t) = \mathbb E[\epsilon - x_0 \mid x_t = x]$, the velocity of
an ODE $dx/dt = v(x, t)$ whose solution from noise at t = 1 back to t = 0 is a sample of the data (Lipman et al.
2023, theorem 1; Liu et al. 2023, the marginal-preserving property of rectified flow).

The network is called as model(xt, t * TIME_SCALE), or model(xt, t * TIME_SCALE, cond) with a condition, and
TIME_SCALE = 1000: the course's UNet and MLP embed their time input with sinusoids built for timesteps 0..999, and
they take fractional ones unchanged. diffusers' SD3 pipeline does the same (the transformer is given
timesteps = sigmas * num_train_timesteps).

Code name -> paper symbol (both Lipman et al. and Liu et al. run time the other way, noise at 0 and data at 1: their
t is our 1 - t and their velocity minus ours; SD3 is written as here):
    x0, eps, xt      x_0, epsilon and z_t = a_t x_0 + b_t epsilon with rectified flow's a_t = 1 - t, b_t = t (SD3)
    v, v_hat         the target u_t(z | epsilon) = epsilon - x_0 and the network's v_Theta(z, t)
    x1               the noise at t = 1, where sampling starts (X_0 ~ pi_0 in Liu et al.)
    shift            SD3's timestep shift alpha (section 5.3.2): t' = alpha t / (1 + (alpha - 1) t)
    pairs            the coupling (Z_0, Z_1) = (noise, ODE sample) that reflow trains the next flow on (Liu et al.)

`course_lib.guidance.Guided` wraps a conditional flow model for classifier-free guidance as for any other model.
"""

from collections.abc import Callable
from itertools import pairwise

import torch
import torch.nn.functional as F

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
from course_lib.ddpm import split_output
from course_lib.profiles import randn_like

TIME_SCALE = 1000  # the network's time input is t * TIME_SCALE, as diffusers' timesteps = sigmas * 1000
TIME_SAMPLINGS = ("uniform", "logit_normal")
GRID_SPACINGS = ("uniform", "diffusers")
SOLVERS = ("euler", "heun")

VelocityModel = Callable[..., torch.Tensor]


def check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1: no shift; SD3 uses 3); got shift={shift!r}")


def per_example(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """t (a float, a 0-d tensor or one time per example, (B,)) as (B, 1, ...) to broadcast against like."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim > 1 or (t.ndim == 1 and len(t) != len(like)):
        raise ValueError(f"t must be a float or one time per example, ({len(like)},); got shape {tuple(t.shape)}")
    return t.expand(len(like)).reshape(-1, *([1] * (like.ndim - 1)))


def velocity(model: VelocityModel, xt: torch.Tensor, t: torch.Tensor | float, cond=None) -> torch.Tensor:
    """The network's v_hat at (xt, t), t a float or (B,): model(xt, t * TIME_SCALE[, cond]) with a (B,) time input,
    float32 (float64 for float64 xt: the exact velocities of the tests need it)."""
    dtype = torch.promote_types(xt.dtype, torch.float32)
    time_input = per_example(t, xt).flatten().to(dtype) * TIME_SCALE  # (B,)
    v_hat = model(xt, time_input) if cond is None else model(xt, time_input, cond)
    check_same_shape(xt=xt, model_output=v_hat)
    return v_hat


# --- the straight path and the loss ---------------------------------------------------------------------------


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    r"""The point at time t of the straight path, $x_t = (1 - t)\,x_0 + t\,\epsilon$ (Esser et al. 2024, section 3,
    "Rectified Flow"; Liu et al. 2023, eq. 1, with time reversed).

    t is a float or a (B,) tensor, one time per example. Equal to diffusers' `scale_noise(x0, t * 1000, eps)`.
    """
    check_same_shape(x0=x0, eps=eps)
    t = per_example(t, x0)  # (B, 1, ...)
    return (1 - t) * x0 + t * eps


def split_velocity(xt: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""(x0_hat, eps_hat) from a velocity: $\hat x_0 = x_t - t\,\hat v$ and $\hat\epsilon = x_t + (1 - t)\,\hat v$,
    the two ends of the straight line through x_t with slope v_hat (solve $x_t = (1-t)x_0 + t\epsilon$,
    $v = \epsilon - x_0$). A flow model is thus also a denoiser: x0_hat is its estimate of the clean data."""
    check_same_shape(xt=xt, v=v)
    t = per_example(t, xt)
    return split_output(xt, v, "velocity", 1 - t, t)  # signal 1 - t and noise t sum to 1


def sample_times(
    n: int,
    generator: torch.Generator | None = None,
    time_sampling: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    r"""n training times in (0, 1), float32, drawn on the generator's device (the default device without one).

    uniform        $t \sim \mathcal U(0, 1)$ (Lipman et al. 2023; Liu et al. 2023)
    logit_normal   $t = \mathrm{sigmoid}(u)$, $u \sim \mathcal N(m, s^2)$: the density
                   $\pi_{ln}(t; m, s) = \frac{1}{s\sqrt{2\pi}}\frac{1}{t(1-t)}
                   \exp\big(-\frac{(\mathrm{logit}(t) - m)^2}{2 s^2}\big)$
                   (Esser et al. 2024, section 3.1, eq. 19), which puts more training on the middle times;
                   SD3 found m = 0, s = 1 best.
    """
    check_choice("time_sampling", time_sampling, TIME_SAMPLINGS)
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0; got logit_std={logit_std!r}")
    device = generator.device if generator is not None else None
    if time_sampling == "uniform":
        return torch.rand(n, generator=generator, device=device)
    return torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))


def flow_loss(
    model: VelocityModel,
    x0: torch.Tensor,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    time_sampling: str = "uniform",
    eps: torch.Tensor | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    r"""The conditional flow-matching loss (Lipman et al. 2023, eq. 9, on their optimal-transport path with
    sigma_min = 0; Liu et al. 2023, eq. 1; Esser et al. 2024, the CFM loss of section 2 on the rectified-flow path):

    $$L_{CFM} = \mathbb E_{t, x_0, \epsilon}\,\lVert v_\theta(x_t, t) - (\epsilon - x_0) \rVert^2,\qquad
      x_t = (1 - t)\,x_0 + t\,\epsilon$$

    the mean over examples and coordinates, as `ddpm.simple_loss`, whose signature this follows less the schedule
    (a flow has none). One t per example from `sample_times`, then fresh noise, both from `generator` (a CPU generator
    gives the same numbers on any device). With `eps` given, the pairs (x0, eps) are kept and only t is drawn: reflow
    trains so on (ODE sample, its noise) pairs (`reflow_pairs`, `reflow_loss`). `cond` is passed to the model.
    """
    if eps is not None:
        check_same_shape(x0=x0, eps=eps)
    t = sample_times(len(x0), generator, time_sampling, logit_mean, logit_std).to(x0)  # (B,)
    if eps is None:
        eps = randn_like(x0, generator)
    xt = interpolate(x0, eps, t)
    return F.mse_loss(velocity(model, xt, t, cond), eps - x0)


def reflow_loss(
    model: VelocityModel,
    pairs: torch.Tensor,
    generator: torch.Generator | None = None,
    cond: torch.Tensor | None = None,
    time_sampling: str = "uniform",
) -> torch.Tensor:
    """`flow_loss` on fixed pairs stacked as pairs[:, 0] = noise, pairs[:, 1] = its ODE sample, shape (B, 2, ...):
    the loss of reflow (Liu et al. 2023), in the training loop's (model, data, generator, cond) form."""
    if pairs.ndim < 2 or pairs.shape[1] != 2:
        raise ValueError(f"pairs must be (B, 2, ...) with noise at [:, 0], sample at [:, 1]; got {tuple(pairs.shape)}")
    return flow_loss(model, pairs[:, 1], generator, cond, time_sampling, eps=pairs[:, 0])


# --- the time grid and the samplers ---------------------------------------------------------------------------


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    r"""SD3's timestep shift $t' = \frac{\alpha t}{1 + (\alpha - 1)\,t}$ (Esser et al. 2024, section 5.3.2, with
    alpha = shift): it keeps 0 and 1 and, for alpha > 1, spends more steps at high noise (SD3: alpha = 3)."""
    check_shift(shift)
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, spacing: str = "uniform") -> torch.Tensor:
    r"""The sampling times $1 = t_0 > t_1 > \dots > t_{steps} = 0$, float64, shape (steps + 1,), after `shift_times`.

        uniform     $t_i = 1 - i / steps$, then shifted (the course's grid)
        diffusers   as `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).set_timesteps(steps)`:
                    steps points evenly spaced from 1 down to $s(1/1000)$, with $s$ the shift, then shifted, then 0.
                    Its last step before 0 starts at $s(s(1/1000))$: the shift is applied twice to that end point.
    The network's time inputs are `time_grid(...)[:-1] * TIME_SCALE` (diffusers' `scheduler.timesteps`).
    """
    steps = check_steps(steps)  # any number: time is continuous
    check_shift(shift)
    check_choice("spacing", spacing, GRID_SPACINGS)
    if spacing == "uniform":
        return shift_times(torch.linspace(1, 0, steps + 1, dtype=torch.float64), shift)
    t_end = shift_times(torch.tensor(1 / TIME_SCALE, dtype=torch.float64), shift).item()
    times = shift_times(torch.linspace(1, t_end, steps, dtype=torch.float64), shift)
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)])


def euler_flow_step(v_hat: torch.Tensor, xt: torch.Tensor, t, t_next) -> torch.Tensor:
    r"""One Euler step of the flow's ODE $dx/dt = v(x, t)$ from t to t_next < t:
    $x_{t_{next}} = x_t + (t_{next} - t)\,\hat v(x_t, t)$. Equal to diffusers' `FlowMatchEulerDiscreteScheduler.step`
    (its sigma is t). (`solvers.euler_karras_step` is the Euler step of a diffusion model's ODE in sigma.)"""
    check_same_shape(xt=xt, v_hat=v_hat)
    return xt + (t_next - t) * v_hat


def _solve(
    model: VelocityModel,
    x1: torch.Tensor,
    steps: int,
    cond: torch.Tensor | None,
    shift: float,
    spacing: str,
    record_every: int,
    second_order: bool,
) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor, torch.Tensor]]]:
    """The stepping loop of `euler_flow_sample` (second_order False) and `heun_flow_sample` (True)."""
    check_model_predicts(model, "velocity")
    record_every = check_record_every(record_every)
    check_finite("x1", x1)
    times = time_grid(steps, shift, spacing)  # (steps + 1,) float64
    steps = len(times) - 1
    labels = [f"t={t:.4f}" for t in times.tolist()]  # for the error messages
    times = times.to(device=x1.device, dtype=x1.dtype)
    trajectory = []
    xt = x1
    for i, (t, t_next) in enumerate(pairwise(times)):
        # 1. the velocity here, and an Euler step with it (Heun's predictor)
        v_hat = velocity(model, xt, t, cond)
        check_model_output(v_hat, xt, f"{labels[i]} (step {i + 1} of {steps})")
        x_next = euler_flow_step(v_hat, xt, t, t_next)
        # 2. Heun: the velocity where that step lands, and the step again with the mean of both slopes (the corrector)
        if second_order and t_next > 0:
            v_next = velocity(model, x_next, t_next, cond)
            check_model_output(v_next, x_next, f"{labels[i + 1]} (Heun's corrector of step {i + 1} of {steps})")
            x_next = euler_flow_step((v_hat + v_next) / 2, xt, t, t_next)
        if should_record(i, steps, record_every):
            trajectory.append((t.item(), xt.cpu(), split_velocity(xt, t, v_hat)[0].cpu()))
        xt = x_next
    return xt, trajectory


@torch.no_grad()
def euler_flow_sample(
    model: VelocityModel,
    x1: torch.Tensor,
    steps: int,
    cond: torch.Tensor | None = None,
    shift: float = 1.0,
    spacing: str = "uniform",
    record_every: int = 0,
) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor, torch.Tensor]]]:
    """The Euler method from noise x1 (t = 1) to a sample (t = 0) on `time_grid(steps, shift, spacing)`:
    one network call per step, `steps` in all. Liu et al. 2023 sample this way; with a straight flow one step is exact.

    Returns (x0, trajectory): trajectory holds (t, x_t, x0_hat) every `record_every` steps counted back from the
    last one (always recorded), x0_hat = x_t - t v_hat (`split_velocity`); empty when record_every is 0. The device
    and dtype come from x1. A model whose `prediction_type` attribute is set and not "velocity" (an eps model, say)
    is refused; a NaN or infinity in x1 or in a velocity raises, saying at which time.
    """
    return _solve(model, x1, steps, cond, shift, spacing, record_every, second_order=False)


@torch.no_grad()
def heun_flow_sample(
    model: VelocityModel,
    x1: torch.Tensor,
    steps: int,
    cond: torch.Tensor | None = None,
    shift: float = 1.0,
    spacing: str = "uniform",
    record_every: int = 0,
) -> tuple[torch.Tensor, list[tuple[float, torch.Tensor, torch.Tensor]]]:
    r"""Heun's method (second order; Karras et al. 2022, Algorithm 1) on `time_grid(steps, shift, spacing)`:

    $$\tilde x = x_t + (t_{next} - t)\,\hat v(x_t, t),\qquad
      x_{t_{next}} = x_t + (t_{next} - t)\,\tfrac12\big(\hat v(x_t, t) + \hat v(\tilde x, t_{next})\big)$$

    The last step, into t = 0, is a plain Euler step (as in Karras et al. and diffusers'
    `FlowMatchHeunDiscreteScheduler`), so a run costs 2 * steps - 1 network calls. Returns (x0, trajectory) and
    refuses models and NaN as `euler_flow_sample` does.
    """
    return _solve(model, x1, steps, cond, shift, spacing, record_every, second_order=True)
