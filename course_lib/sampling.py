"""The sampler family by name, and batched drawing: n samples from one sampler, in batches, from seeded noise, timed.

Chapter 5 introduces the family and compares it; chapters 6 (latent diffusion), 7 (guidance), 8 (LoRA), 9 (the
same samplers as diffusers schedulers) and 10 (flow models against eps models, sample for sample) draw with it, and
`course_lib.benchmark` / `scripts/bench.py` time it. The samplers themselves are in `ddpm`, `samplers`, `solvers`
and `flow`; this module only picks one by name and runs it over many samples.

Every sampler of the family is run the way the course runs the shipped eps-model of the cosine schedule: with
x0_hat clipped to [-1, 1] (chapter 4 shows why), DDIM with "trailing" spacing, DPM-Solver++(2M) with diffusers'
default "linspace" spacing, Euler on Karras sigmas, and DDPM on every timestep.

A model that carries a `prediction_type` (as `weights.load_model` sets it from the model's card) is refused by a
sampler asked to read its output as something else: a velocity model sampled as eps gives garbage, not an error.
"""

import time
from collections.abc import Callable

import torch

from course_lib.checks import check_choice, check_model_predicts
from course_lib.data import IMAGE_SIZE
from course_lib.ddpm import Denoiser, ddpm_sample
from course_lib.flow import SOLVERS as FLOW_SOLVERS
from course_lib.flow import euler_flow_sample, heun_flow_sample
from course_lib.frame import Denoiser as VEDenoiser
from course_lib.frame import levels, ode_sample, solver_steps
from course_lib.profiles import synchronize
from course_lib.samplers import ddim_sample
from course_lib.schedules import Schedule
from course_lib.solvers import dpm_solver_sample, euler_karras_sample

IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
LATENT_SHAPE = (4, 7, 7)  # what the latent model (data/latent_mnist_eps) diffuses: data/vae_mnist's latent grid
# x0_hat of the latent model is clipped to [-4.5, 4.5]: the scaled train latents reach 4.2 (their 99.9th percentile
# of |z| is 3.2). Unclipped, DDIM from t = 999 (alpha_bar 2.4e-9) blew up (0% confident); 3.0 / 4.5 / 6.0 gave
# 86% / 92% / 86% confident on 64 samples. Chapter 6 and scripts/bench.py both sample with it.
LATENT_CLIP = 4.5

SAMPLERS = ("DDPM", "DDIM", "DPM-Solver++(2M)", "Euler (Karras)")


def run_sampler(
    sampler: str,
    model: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    clip_x0: bool | float = True,
    use_clipped_model_output: bool = False,
    prediction_type: str = "eps",
    sigma_max: float | None = None,
) -> torch.Tensor:
    """One sampler of the family from x_T with `steps` model calls per sample (x0_hat clipped to [-1, 1]; see the
    module docstring; DDIM also takes a range r, clipping to [-r, r], as scaled latents need). generator feeds
    DDPM's per-step noise; the other samplers are deterministic. use_clipped_model_output (DDIM only, see
    `ddim_step`) re-derives the noise from the clipped x0_hat, as guided sampling needs. prediction_type is what
    the model outputs ("eps", "x0" or "v"); a model that declares another one is refused. sigma_max (Euler (Karras)
    only) caps its top noise level (`solvers.karras_sigmas`)."""
    check_choice("sampler", sampler, SAMPLERS)
    check_model_predicts(model, prediction_type)
    if not isinstance(clip_x0, bool) and sampler != "DDIM":
        raise ValueError(f"a clip range ({clip_x0!r}) is for DDIM only; {sampler} takes clip_x0=True or False")
    if use_clipped_model_output and sampler != "DDIM":
        raise ValueError(f"use_clipped_model_output is for DDIM only; got sampler {sampler!r}")
    if sigma_max is not None and sampler != "Euler (Karras)":
        raise ValueError(f"sigma_max={sigma_max} is for Euler (Karras) only; got sampler {sampler!r}")
    if sampler == "DDPM":
        if steps != schedule.T:
            raise ValueError(f"DDPM visits every timestep: steps must be T={schedule.T}; got steps={steps}")
        return ddpm_sample(model, schedule, x_T, generator, prediction_type, clip_x0=clip_x0)[0]
    if sampler == "DDIM":
        options = dict(clip_x0=clip_x0, use_clipped_model_output=use_clipped_model_output)
        return ddim_sample(model, schedule, x_T, steps, prediction_type=prediction_type, **options)[0]
    if sampler == "DPM-Solver++(2M)":
        return dpm_solver_sample(model, schedule, x_T, steps, prediction_type, clip_x0=clip_x0)[0]
    return euler_karras_sample(model, schedule, x_T, steps, prediction_type, clip_x0=clip_x0, sigma_max=sigma_max)[0]


@torch.no_grad()
def draw_samples(
    model: Denoiser,
    schedule: Schedule,
    sampler: str,
    steps: int,
    n: int,
    seed: int = 0,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    shape: tuple[int, ...] = IMAGE_SHAPE,
    clip_x0: bool | float = True,
    use_clipped_model_output: bool = False,
    prediction_type: str = "eps",
    sigma_max: float | None = None,
) -> tuple[torch.Tensor, float]:
    """n digits from one sampler with `steps` model calls each, in batches, and the wall time in seconds.

    A latent model samples x_T of `shape` (for example (4, 7, 7)) with its own clip range (`clip_x0`, see
    `run_sampler`, as for `use_clipped_model_output`, `prediction_type` and `sigma_max`), and `decoder` (timed too)
    turns its samples into digits: for latent diffusion, z0 -> vae.decode(z0 / scaling_factor).

    batch_size 50: on one CPU thread the shipped UNet's forward ran at about 125 digits/s in batches of 16-50 and
    90 in batches of 250 (activations that fit in the cache); a GPU would take larger batches.

    x_T comes from one CPU generator seeded with `seed`, batch after batch, so every sampler starts from the same
    noise and a run is the same on any device (DDPM's per-step noise has a CPU generator per batch). Only the
    sampling is timed. Samples are returned on the CPU, clamped to [-1, 1] (the pixel range) for scoring.
    """
    check_choice("sampler", sampler, SAMPLERS)
    check_model_predicts(model, prediction_type)

    def sample_batch(x_T: torch.Tensor, step_generator: torch.Generator) -> torch.Tensor:
        options = dict(
            use_clipped_model_output=use_clipped_model_output, prediction_type=prediction_type, sigma_max=sigma_max
        )
        return run_sampler(sampler, model, schedule, x_T, steps, step_generator, clip_x0, **options)

    return _draw_in_batches(sample_batch, n, seed, batch_size, device, shape, decoder)


@torch.no_grad()
def draw_flow_samples(
    model: Callable[..., torch.Tensor],
    solver: str,
    steps: int,
    n: int,
    seed: int = 0,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    shape: tuple[int, ...] = IMAGE_SHAPE,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """n digits from a velocity model (`course_lib.flow`) with the Euler or Heun solver of `steps` steps (Euler:
    `steps` network calls; Heun: 2 * steps - 1), in batches, and the wall time: the same noise, batches and
    clamping as `draw_samples` with the same seed, so a flow model and an eps model can be compared sample for
    sample. A latent flow model samples x_T of `shape` and `decoder` (timed too) turns its samples into digits, as
    in `draw_samples`. A model that declares a prediction_type other than "velocity" is refused."""
    check_choice("solver", solver, FLOW_SOLVERS)
    check_model_predicts(model, "velocity")
    solve = heun_flow_sample if solver == "heun" else euler_flow_sample
    return _draw_in_batches(lambda x_T, _: solve(model, x_T, steps)[0], n, seed, batch_size, device, shape, decoder)


@torch.no_grad()
def draw_ode_samples(
    denoise_fn: VEDenoiser,
    solver: str,
    calls: int,
    n: int,
    seed: int = 0,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    sigma_max: float = 80.0,
) -> tuple[torch.Tensor, float]:
    """n digits from any model seen as D(x; sigma) (`frame.denoiser`), with one of chapter 11's ODE solvers in at
    most `calls` network calls (`frame.solver_steps`) on EDM's levels from sigma_max (`frame.levels`), and the wall
    time: the same noise and batches as `draw_samples` with the same seed, so models trained with different
    objectives are compared sample for sample at equal cost."""
    sigmas = levels(denoise_fn, solver_steps(solver, calls), sigma_max)
    return _draw_in_batches(
        lambda x_T, _: ode_sample(denoise_fn, x_T, sigmas, solver), n, seed, batch_size, device, IMAGE_SHAPE
    )


def _draw_in_batches(
    sample_batch: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    n: int,
    seed: int,
    batch_size: int,
    device: torch.device | str,
    shape: tuple[int, ...],
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """The batching, noise and timing of `draw_samples`: sample_batch(x_T, step_generator) -> x0 per batch."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1; got n={n}, batch_size={batch_size}")
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    samples, seconds = [], 0.0
    for start in range(0, n, batch_size):
        x_T = torch.randn(min(batch_size, n - start), *shape, generator=generator).to(device)
        step_generator = torch.Generator().manual_seed(seed + 1 + start)
        synchronize(device)
        began = time.perf_counter()
        x0 = sample_batch(x_T, step_generator)
        if decoder is not None:
            x0 = decoder(x0)
        synchronize(device)
        seconds += time.perf_counter() - began
        samples.append(x0.clamp(-1, 1).cpu())
    return torch.cat(samples), seconds
