"""Measuring models: the diffusers baseline UNet, FLOPs, training throughput, the time of a forward call, and the
measured results that the chapters show.

Used by `scripts/bench.py` (the figures in docs/benchmarks.md) and by the chapters that show those figures live
(4: the UNet against diffusers; 5-10: the saved results), so a notebook and the benchmark measure the same thing.
The sampler family and batched, timed drawing that the benchmark runs are in `course_lib.sampling`.
"""

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.claims import fraction_sd
from course_lib.data import data_dir, record_sha256, verify_file
from course_lib.ddpm import Denoiser
from course_lib.metrics import CONFIDENT
from course_lib.profiles import describe_machine, synchronize
from course_lib.sampling import IMAGE_SHAPE
from course_lib.weights import load_card

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
    """FLOPs of one 28 x 28 image through `model(xt, t)`, forward plus backward unless backward=False: see
    `gflops_per_call`."""
    return gflops_per_call(model, IMAGE_SHAPE, backward=backward)


def gflops_per_call(
    model: torch.nn.Module, shape: tuple[int, ...], cond: torch.Tensor | None = None, backward: bool = True
) -> float:
    """FLOPs of one input of `shape` through `model(xt, t)` (or `model(xt, t, cond)`, cond for a batch of one),
    forward plus backward unless backward=False, counted by torch's FlopCounterMode (a multiply-add counts 2;
    matrix products and convolutions only).

    Attention runs under SDPA's MATH backend while counting: on CPU, torch's fused attention kernel has no FLOP
    formula, and FlopCounterMode would count its products as zero (1.5% of the course UNet's forward, two thirds
    of a small DiT's attention). `nets.dit.dit_gflops` counts a DiT by hand, and the tests check the two agree."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = next(model.parameters()).device
    xt, t = torch.randn(1, *shape, device=device), torch.full((1,), 500.0, device=device)
    inputs = (xt, t) if cond is None else (xt, t, cond.to(device))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        if backward:
            model(*inputs).sum().backward()
        else:
            with torch.no_grad():
                model(*inputs)
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


# --- the flagship digit model's targets (issue 15; `scripts/bench.py flagship`, chapter 11) -------------------

FLAGSHIP_FLOOR_TIMES = 3.0  # a sampler's FID against the real-vs-real floor (its confident share against CONFIDENT)
# (a run's key, its reference's, the largest ratio of their FIDs)
FLAGSHIP_RATIO_TARGETS = (
    ("DDIM-50", "DDPM-1000", 1.25),
    ("DPM-Solver++(2M)-20", "DDIM-100", 1.2),
    ("Euler (Karras)-20", "DPM-Solver++(2M)-20", 1.2),
    ("Euler (Karras)-20 (sigma_max 80)", "DPM-Solver++(2M)-20", 1.2),
)


class Target(NamedTuple):
    goal: str  # "DDIM-50 FID <= 3x the floor"
    measured: str  # the ratio or share with the numbers and spreads it comes from
    met: bool


def flagship_targets(runs: dict[str, dict], n: int) -> list[Target]:
    """The flagship's targets, judged on one benchmark's runs (`data/benchmarks/flagship*.json`: key -> "fid",
    "fid_sd", "fid_floor", "fid_floor_sd", "confident_fraction"; n samples each): FID within 3x the floor and at
    least 90% confident, for DDIM-50 (deterministic) and DDPM-1000 (ancestral), then the FID ratios between
    samplers. A target whose runs are not measured yet is left out. `met` compares the measured values themselves;
    `measured` carries their spreads, which say how sure that verdict is."""
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}")
    targets = []
    for key in ("DDIM-50", "DDPM-1000"):
        if key not in runs:
            continue
        run = runs[key]
        floor, floor_sd, confident = run["fid_floor"], run["fid_floor_sd"], run["confident_fraction"]
        targets += [
            Target(
                f"{key} FID <= {FLAGSHIP_FLOOR_TIMES:g}x the floor",
                f"{run['fid'] / floor:.2f}x ({run['fid']:.2f} ± {run['fid_sd']:.2f} against "
                f"{FLAGSHIP_FLOOR_TIMES:g} x ({floor:.2f} ± {floor_sd:.2f}))",
                run["fid"] <= FLAGSHIP_FLOOR_TIMES * floor,
            ),
            Target(
                f"{key} confident >= {CONFIDENT:.0%}",
                f"{confident:.1%} ± {fraction_sd(confident, n):.1%}",
                confident >= CONFIDENT,
            ),
        ]
    for key, reference_key, limit in FLAGSHIP_RATIO_TARGETS:
        if key not in runs or reference_key not in runs:
            continue
        run, reference = runs[key], runs[reference_key]
        ratio = run["fid"] / reference["fid"]
        targets.append(
            Target(
                f"{key} FID <= {limit}x {reference_key}'s",
                f"{ratio:.2f}x ({run['fid']:.2f} ± {run['fid_sd']:.2f} against {reference['fid']:.2f} ± "
                f"{reference['fid_sd']:.2f})",
                ratio <= limit,
            )
        )
    return targets


# --- runs that finish one by one across sessions ----------------------------------------------------------------


def card_digest(name: str) -> str:
    """A shipped model's identity: the sha256 of its card (a retrained or continued run has another)."""
    return hashlib.sha256((data_dir() / f"{name}.json").read_bytes()).hexdigest()


def finished_runs(names: Iterable[str]) -> list[str]:
    """Those of `names` whose exported card says their training finished, in the given order."""
    return [
        name
        for name in names
        if (data_dir() / f"{name}.json").exists() and load_card(name)["training"]["status"] == "finished"
    ]


def floor_note(measured: dict) -> str:
    """ " (floor F ± sd)": the real-vs-real FID floor of a study's first measured run, for the text above its table
    (every run of a study is scored against the same held-out digits at the same n); "" before any is measured."""
    if not measured:
        return ""
    floor = next(iter(measured.values()))["runs"][0]
    return f" (floor {floor['fid_floor']:.2f} ± {floor['fid_floor_sd']:.2f})"


def waiting_lines(about: dict[str, str], measured: dict) -> list[str]:
    """The lines under a study's table that name its runs not measured yet, each with what it is (`about`: run
    name -> description, in the study's order); none when every run is measured."""
    waiting = [f"`{name}` ({description})" for name, description in about.items() if name not in measured]
    return ["", "Not finished yet: " + ", ".join(waiting) + "."] if waiting else []


def best_solver(result: dict, budget: int) -> dict:
    """Of one run's measurements in a study of solvers at network-call budgets (`scripts/bench.py comparison`:
    result["runs"], each with "budget" and "fid"), the one with the lowest FID at this budget."""
    at_budget = [run for run in result["runs"] if run["budget"] == budget]
    if not at_budget:
        raise ValueError(f"no run at budget {budget}; measured: {sorted({run['budget'] for run in result['runs']})}")
    return min(at_budget, key=lambda run: run["fid"])


def measure_new_runs(figure: str, names: Iterable[str], n: int, measure: Callable[[str], dict]) -> dict:
    """data/benchmarks/FIGURE.json with every finished run of `names` measured at n: a run measured before at the
    same n with the same card is kept, any other is measured (`measure(name)` -> its results) and saved at once,
    so a study whose runs finish across sessions (chapters 11 and 12) is measured one run at a time, and a
    stopped benchmark loses at most the run it was measuring. Returns the results, {"runs": {name: ...}, ...}."""
    results = load_results(figure) if results_path(figure).exists() else {}
    measured = results.setdefault("runs", {})
    for name in finished_runs(names):
        kept = measured.get(name)
        if kept and kept["n"] == n and kept["card_sha256"] == card_digest(name):
            print(f"{name}: measured before at n = {n}, kept", flush=True)
            continue
        measured[name] = {"card_sha256": card_digest(name), "n": n, **measure(name)}
        results.update({"date": str(date.today()), "machine": describe_machine()})
        save_results(figure, results)
    return results
