"""Run profiles and the device: the one place that decides how much work a notebook does.

Every notebook reads its budgets from `get_profile()`, never from numbers of its own, so the same notebook runs
in seconds under CI (`smoke`), in minutes on a student's laptop (`cpu`) and larger on a GPU (`gpu`).

    COURSE_PROFILE=smoke   CI: seconds per notebook, tiny budgets, results carried by pretrained weights
    COURSE_PROFILE=cpu     a laptop CPU: minutes per notebook, live training kept short
    COURSE_PROFILE=gpu     one GPU: larger and longer
    (unset)                `gpu` when CUDA is available, else `cpu`

The device comes from `get_device()` (CUDA, then Apple's MPS, then the CPU; `COURSE_DEVICE` overrides it).
"""

import os
import platform
from dataclasses import dataclass

import torch

PROFILE_NAMES = ("smoke", "cpu", "gpu")
DEVICE_NAMES = ("cuda", "mps", "cpu")


@dataclass(frozen=True)
class Profile:
    """The budgets of one run profile. Add a field here when a chapter needs a new budget."""

    name: str
    toy_samples: int  # points drawn from a toy distribution for histograms, samplers and distances
    toy_train_steps: int  # optimisation steps of the toy MLP denoiser (chapter 3)
    toy_batch_size: int  # batch size of the toy MLP denoiser
    toy_model_samples: int  # points drawn by a trained toy model's reverse process (each costs T network calls)
    grid_images: int  # digits shown in an image grid
    unet_train_steps: int  # optimisation steps of the small UNet trained live (chapter 4)
    unet_batch_size: int  # its batch size
    bench_steps: int  # timed training steps per network when comparing two UNets (chapter 4)
    sample_steps: int  # DDIM steps per digit sample (chapters 4 on)
    unet_samples: int  # digits drawn from the shipped UNet to score with FID (2..1000, see metrics.real_digits)
    sampler_samples: int  # digits per sampler when samplers are compared live (chapter 5; 2..1000)
    step_counts: tuple[int, ...]  # numbers of sampling steps swept (chapter 5), each in 1..T
    inversion_images: int  # real digits inverted to noise and back (chapter 5)
    vae_digits: int  # held-out digits sent through the VAE and back (chapter 6; 200..1000)
    lora_train_steps: int  # steps of the LoRA fine-tune trained live (chapter 8)
    style_samples: int  # digits sampled to measure a style (chapter 8)
    float64_digits: int  # digits sampled in float64 to check an identity to rounding (slow on a CPU; chapter 11)
    frame_digits: int  # digits per model when chapter 11 measures the comparison's models live (2..1000)
    diagnose_digits: int  # held-out digits a model is measured on by `diagnose` (chapter 15; its default is 128)


PROFILES = {
    "smoke": Profile(
        "smoke",
        toy_samples=2_000,
        toy_train_steps=200,
        toy_batch_size=128,
        toy_model_samples=500,
        grid_images=16,
        unet_train_steps=3,
        unet_batch_size=16,
        bench_steps=1,
        sample_steps=3,
        unet_samples=16,
        sampler_samples=16,
        step_counts=(2, 5),
        inversion_images=2,
        vae_digits=200,
        lora_train_steps=2,
        style_samples=20,  # two of each digit: the spread within classes needs two
        float64_digits=2,
        frame_digits=8,
        diagnose_digits=32,
    ),
    "cpu": Profile(
        "cpu",
        toy_samples=20_000,
        toy_train_steps=3_000,
        toy_batch_size=512,
        toy_model_samples=5_000,
        grid_images=64,
        unet_train_steps=300,
        unet_batch_size=64,
        bench_steps=3,
        sample_steps=20,
        unet_samples=256,
        sampler_samples=150,
        step_counts=(5, 10, 20, 50, 100),
        inversion_images=8,
        vae_digits=1000,
        lora_train_steps=100,
        style_samples=100,
        float64_digits=16,
        frame_digits=150,
        diagnose_digits=128,
    ),
    "gpu": Profile(
        "gpu",
        toy_samples=100_000,
        toy_train_steps=20_000,
        toy_batch_size=2048,
        toy_model_samples=20_000,
        grid_images=64,
        unet_train_steps=3_000,
        unet_batch_size=128,
        bench_steps=10,
        sample_steps=50,
        unet_samples=1000,
        sampler_samples=1000,
        step_counts=(5, 10, 20, 50, 100, 200),
        inversion_images=32,
        vae_digits=1000,
        lora_train_steps=600,
        style_samples=500,
        float64_digits=16,
        frame_digits=1000,
        diagnose_digits=128,
    ),
}


def profile_name() -> str:
    """The active profile's name: `COURSE_PROFILE` if set, else `gpu` with CUDA, else `cpu`."""
    name = os.environ.get("COURSE_PROFILE", "").strip()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(f"COURSE_PROFILE={name!r} is not a profile; valid: {', '.join(PROFILE_NAMES)}")
    return name


def get_profile() -> Profile:
    """The budgets of the active profile (see the module docstring)."""
    return PROFILES[profile_name()]


def available_devices() -> list[str]:
    """The values of COURSE_DEVICE this machine can honour: cuda and cuda:N per GPU, mps if available, cpu."""
    count = torch.cuda.device_count()
    cuda = ["cuda", *(f"cuda:{index}" for index in range(count))] if count else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return [*cuda, *mps, "cpu"]


def requested_device(name: str) -> torch.device:
    """The device COURSE_DEVICE=name asks for, checked against what this machine has."""
    kind, colon, index = name.partition(":")
    if kind not in DEVICE_NAMES or (colon and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"COURSE_DEVICE={name!r} is not a device; valid: cuda, cuda:N, mps, cpu")
    available = available_devices()
    if name not in available:
        count = torch.cuda.device_count() if kind == "cuda" else int(torch.backends.mps.is_available())
        raise ValueError(
            f"COURSE_DEVICE={name!r} asks for a {kind} device this machine lacks (it has {count or 'none'}); "
            f"valid here: {', '.join(available)} (or unset COURSE_DEVICE to pick the best one)"
        )
    return torch.device(name)


def get_device() -> torch.device:
    """The device to compute on: `COURSE_DEVICE` if set (checked to exist here), else CUDA, else MPS, else the CPU."""
    name = os.environ.get("COURSE_DEVICE", "").strip()
    if name:
        return requested_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x, on x's device and dtype, drawn on the generator's device.

    With a CPU generator the numbers are the same whatever device x is on, so a seeded notebook gives the same
    noise on a laptop and on a GPU runner.
    """
    draw_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=draw_device, dtype=x.dtype).to(x.device)


def describe_machine() -> str:
    """One line for benchmark tables and model cards: cores, CPU model, GPU if any, torch version."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{os.cpu_count()} cores ({cpu}){gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so that a timer around it measures it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
