"""Measuring models and samplers: the diffusers baseline UNet, FLOPs, training throughput, and sampler runs timed.

Used by `scripts/bench.py` (the figures in docs/benchmarks.md) and by the chapters that show those figures live
(4: the UNet against diffusers; 5: the sampler family), so a notebook and the benchmark measure the same thing.

Every sampler of the family is run the way the course runs the shipped eps-model of the cosine schedule: with
x0_hat clipped to [-1, 1] (chapter 4 shows why), DDIM with "trailing" spacing, DPM-Solver++(2M) with diffusers'
default "linspace" spacing, Euler on Karras sigmas, and DDPM on every timestep.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.data import data_dir, record_sha256, verify_file
from course_lib.ddpm import Denoiser, check_choice, ddpm_sample
from course_lib.flow import SOLVERS as FLOW_SOLVERS
from course_lib.flow import euler_sample as euler_flow_sample
from course_lib.flow import heun_sample as heun_flow_sample
from course_lib.samplers import ddim_sample
from course_lib.schedules import Schedule
from course_lib.solvers import dpm_solver_sample, euler_sample

IMAGE_SHAPE = (1, 28, 28)
LATENT_SHAPE = (4, 7, 7)  # what the latent model (data/latent_mnist_eps) diffuses: data/vae_mnist's latent grid
# x0_hat of the latent model is clipped to [-4.5, 4.5]: the scaled train latents reach 4.2 (their 99.9th percentile
# of |z| is 3.2). Unclipped, DDIM from t = 999 (alpha_bar 2.4e-9) blew up (0% confident); 3.0 / 4.5 / 6.0 gave
# 86% / 92% / 86% confident on 64 samples. Chapter 6 and scripts/bench.py both sample with it.
LATENT_CLIP = 4.5


# --- networks -------------------------------------------------------------------------------------------------


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel as the design's baseline (widths 32/64/64, two layers per block, attention in the
    two lower blocks: 1.7M parameters), called like the course's models: model(xt, t) -> tensor."""

    CONFIG = {
        "sample_size": 28,
        "in_channels": 1,
        "out_channels": 1,
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 8,
    }

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(**self.CONFIG)

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(xt, t).sample


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_image(model: torch.nn.Module, backward: bool = True) -> float:
    """FLOPs of one 28 x 28 image through `model(xt, t)`, forward plus backward unless backward=False, counted by
    torch's FlopCounterMode (a multiply-add counts 2)."""
    device = next(model.parameters()).device
    xt, t = torch.randn(1, *IMAGE_SHAPE, device=device), torch.tensor([10], device=device)
    with FlopCounterMode(display=False) as counter:
        if backward:
            model(xt, t).sum().backward()
        else:
            with torch.no_grad():
                model(xt, t)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def training_images_per_second(model: torch.nn.Module, batch_size: int = 128, steps: int = 8) -> float:
    """Images per second of full training steps (forward, backward, AdamW) after two untimed warm-up steps."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1; got steps={steps}, batch_size={batch_size}")
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *IMAGE_SHAPE, generator=generator).to(device)
    t = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
    model.train()
    for step in range(steps + 2):
        if step == 2:
            synchronize(device)
            start = time.perf_counter()
        loss = (model(x, t) - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(device)
    return batch_size * steps / (time.perf_counter() - start)


@torch.no_grad()
def ms_per_call(model: Denoiser, shape: tuple[int, ...], batch_size: int = 50, repeats: int = 5) -> float:
    """Milliseconds of one forward call `model(x_t, t)` on a batch of `batch_size` inputs of `shape`, averaged over
    `repeats` calls after one untimed warm-up, on the model's device."""
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1; got batch_size={batch_size}, repeats={repeats}")
    device = next(model.parameters()).device
    x, t = torch.randn(batch_size, *shape, device=device), torch.full((batch_size,), 500, device=device)
    model(x, t)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(repeats):
        model(x, t)
    synchronize(device)
    return (time.perf_counter() - began) / repeats * 1000


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the sampler family ---------------------------------------------------------------------------------------

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
) -> torch.Tensor:
    """One sampler of the family from x_T with `steps` model calls per sample (x0_hat clipped to [-1, 1]; see the
    module docstring; DDIM also takes a range r, clipping to [-r, r], as scaled latents need). generator feeds
    DDPM's per-step noise; the other samplers are deterministic. use_clipped_model_output (DDIM only, see
    `ddim_step`) re-derives the noise from the clipped x0_hat, as guided sampling needs."""
    check_choice("sampler", sampler, SAMPLERS)
    if not isinstance(clip_x0, bool) and sampler != "DDIM":
        raise ValueError(f"a clip range ({clip_x0!r}) is for DDIM only; {sampler} takes clip_x0=True or False")
    if use_clipped_model_output and sampler != "DDIM":
        raise ValueError(f"use_clipped_model_output is for DDIM only; got sampler {sampler!r}")
    if sampler == "DDPM":
        if steps != schedule.T:
            raise ValueError(f"DDPM visits every timestep: steps must be T={schedule.T}; got steps={steps}")
        return ddpm_sample(model, schedule, x_T, generator, clip_x0=clip_x0)[0]
    if sampler == "DDIM":
        return ddim_sample(
            model, schedule, x_T, steps, clip_x0=clip_x0, use_clipped_model_output=use_clipped_model_output
        )[0]
    if sampler == "DPM-Solver++(2M)":
        return dpm_solver_sample(model, schedule, x_T, steps, clip_x0=clip_x0)[0]
    return euler_sample(model, schedule, x_T, steps, clip_x0=clip_x0)[0]


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
) -> tuple[torch.Tensor, float]:
    """n digits from one sampler with `steps` model calls each, in batches, and the wall time in seconds.

    A latent model samples x_T of `shape` (for example (4, 7, 7)) with its own clip range (`clip_x0`, see
    `run_sampler`, as for `use_clipped_model_output`), and `decoder` (timed too) turns its samples into digits: for
    latent diffusion, z0 -> vae.decode(z0 / scaling_factor).

    batch_size 50: on one CPU thread the shipped UNet's forward ran at about 125 digits/s in batches of 16-50 and
    90 in batches of 250 (activations that fit in the cache); a GPU would take larger batches.

    x_T comes from one CPU generator seeded with `seed`, batch after batch, so every sampler starts from the same
    noise and a run is the same on any device (DDPM's per-step noise has a CPU generator per batch). Only the
    sampling is timed. Samples are returned on the CPU, clamped to [-1, 1] (the pixel range) for scoring.
    """
    check_choice("sampler", sampler, SAMPLERS)

    def sample_batch(x_T: torch.Tensor, step_generator: torch.Generator) -> torch.Tensor:
        return run_sampler(sampler, model, schedule, x_T, steps, step_generator, clip_x0, use_clipped_model_output)

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
) -> tuple[torch.Tensor, float]:
    """n digits from a velocity model (`course_lib.flow`) with the Euler or Heun solver of `steps` steps (Euler:
    `steps` network calls; Heun: 2 * steps - 1), in batches, and the wall time: the same noise, batches and
    clamping as `draw_samples` with the same seed, so a flow model and an eps model can be compared sample for
    sample."""
    check_choice("solver", solver, FLOW_SOLVERS)
    solve = heun_flow_sample if solver == "heun" else euler_flow_sample
    return _draw_in_batches(lambda x_T, _: solve(model, x_T, steps)[0], n, seed, batch_size, device, IMAGE_SHAPE)


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


# --- results kept for the notebooks ---------------------------------------------------------------------------


def results_path(name: str) -> Path:
    return data_dir() / "benchmarks" / f"{name}.json"


def save_results(name: str, results: dict) -> None:
    """Write a benchmark's measured results to data/benchmarks/NAME.json, for a chapter to show, and record its
    sha256 in data/benchmarks/SHA256SUMS as for every shipped file."""
    path = results_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    record_sha256(path)


def load_results(name: str) -> dict:
    """The results `scripts/bench.py NAME` measured and saved (docs/benchmarks.md shows the same figures)."""
    path = results_path(name)
    verify_file(path, f"python scripts/bench.py {name}")
    return json.loads(path.read_text())
