"""Measure the course's speed and quality figures and write each into docs/benchmarks.md (`make bench`).

    python scripts/bench.py                    every figure, one after another (long: run it in the background)
    python scripts/bench.py unet_speed         one figure only

Each figure rewrites its own marked section of docs/benchmarks.md as soon as it is measured, with the command and
the machine, so a long run can be stopped and one figure redone later. Ratios are always measured in one run.
Figures:
    unet_speed   training images/s of the course UNet vs diffusers' UNet2DModel of about the same size
    unet_loss    their held-out loss after the same number of training images, same recipe and seed
"""

import argparse
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.data import load_digits
from course_lib.forward import q_sample
from course_lib.nets.unet import UNet
from course_lib.profiles import describe_machine
from course_lib.schedules import make_schedule
from course_lib.train import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import replace_section  # noqa: E402
from train_unet import CONFIG, MODEL, SCHEDULE  # noqa: E402

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DModel as the design's baseline (widths 32/64/64, two layers per block, attention in the
    two lower blocks: 1.7M parameters), called like the course's models: model(xt, t) -> tensor."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            sample_size=28,
            in_channels=1,
            out_channels=1,
            block_out_channels=(32, 64, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(xt, t).sample


def candidates() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"course UNet": UNet(**MODEL), "diffusers UNet2DModel": DiffusersUNet()}


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gflops_per_image(model: torch.nn.Module) -> float:
    """Forward plus backward FLOPs for one 28 x 28 image, counted by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 1, 28, 28), torch.tensor([10])).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def training_images_per_second(model: torch.nn.Module, batch_size: int = 128, steps: int = 8) -> float:
    """Images per second of full training steps (forward, backward, AdamW) after two warm-up steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, 28, 28, generator=generator)
    t = torch.randint(0, 1000, (batch_size,), generator=generator)
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        loss = (model(x, t) - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch_size * steps / (time.perf_counter() - start)


def unet_speed() -> list[str]:
    rows, speeds = [], {}
    for name, model in candidates().items():
        speeds[name] = training_images_per_second(model)
        rows.append(
            f"| {name} | {parameters(model) / 1e6:.2f} M | {gflops_per_image(model):.2f} | {speeds[name]:.1f} |"
        )
    ratio = speeds["course UNet"] / speeds["diffusers UNet2DModel"]
    return [
        "Training throughput at 28 x 28, batch 128, forward + backward + AdamW, measured in one run:",
        "",
        "| model | parameters | GFLOP / image (fwd + bwd) | images / s |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Speed ratio, course UNet / diffusers: **{ratio:.2f}x** (target >= 1.5x).",
    ]


def held_out_loss(model: torch.nn.Module, schedule, images: torch.Tensor) -> float:
    """The plain eps-MSE on fixed (x0, t, eps) triples of held-out digits: the same draws for every model."""
    generator = torch.Generator().manual_seed(1234)
    t = torch.randint(0, schedule.T, (len(images),), generator=generator)
    eps = torch.randn(images.shape, generator=generator)
    xt = q_sample(schedule, images, t, eps)
    with torch.no_grad():
        return (
            sum(
                (model(xt[i : i + 250], t[i : i + 250]) - eps[i : i + 250]).pow(2).sum().item()
                for i in range(0, len(images), 250)
            )
            / eps.numel()
        )


def unet_loss(images_budget: int = 32_000) -> list[str]:
    train_images, _ = load_digits("train")
    heldout, _ = load_digits("heldout")
    schedule = make_schedule(**SCHEDULE)
    steps = images_budget // CONFIG.batch_size
    config = replace(CONFIG, steps=steps, warmup=min(CONFIG.warmup, steps // 10))
    rows = []
    for name, model in candidates().items():
        start = time.perf_counter()
        state, ema = train(model, schedule, train_images, config, progress=False)
        minutes = (time.perf_counter() - start) / 60
        loss, ema_loss = held_out_loss(model, schedule, heldout), held_out_loss(ema.model, schedule, heldout)
        rows.append(f"| {name} | {steps * config.batch_size} | {minutes:.1f} | {loss:.4f} | {ema_loss:.4f} |")
    return [
        f"Held-out eps-MSE after the same number of training images, same recipe as scripts/train_unet.py "
        f"(schedule {SCHEDULE['name']}, batch {config.batch_size}, peak lr {config.lr}, min-SNR gamma "
        f"{config.min_snr_gamma}, learning-rate schedule compressed to {steps} steps), same seed:",
        "",
        "| model | training images | minutes | held-out loss | held-out loss (EMA) |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]


FIGURES = {"unet_speed": unet_speed, "unet_loss": unet_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", nargs="*", help=f"figures to measure, of {', '.join(FIGURES)} (default: all)")
    args = parser.parse_args()
    unknown = [name for name in args.figures if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]!r}; valid: {', '.join(FIGURES)}")
    for name in args.figures or FIGURES:
        start = time.perf_counter()
        lines = FIGURES[name]()
        header = f"Measured {date.today()} with `python scripts/bench.py {name}` on {describe_machine()}."
        replace_section(REPORT, f"bench:{name}", [f"### {name}", "", header, "", *lines])
        print(f"{name}: written to {REPORT.name} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
