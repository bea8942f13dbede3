"""Train the course's digit diffusion models and export them to data/: resumable, time-budgeted.

    python scripts/train_unet.py --budget-minutes 60               train unet_mnist_eps for up to an hour, resuming
    python scripts/train_unet.py --export                          write data/unet_mnist_eps.{safetensors,json}
    python scripts/train_unet.py --recipe unet_mnist_class --budget-minutes 60      another recipe (see RECIPES)

Recipes (each a fixed model, schedule and optimiser, so that every session trains the same run) live in
course_lib/recipes.py, which lists them; `--recipe cmp_eps` and the other cmp_* recipes are chapter 11's
equal-budget comparison (`--recipe comparison` trains them one after another within the budget); dit_s, dit_m,
dit_l and latent_unet_flow_class are chapter 12's transformer study (`--recipe transformer`, likewise).

Stop it at any moment: it checkpoints every few minutes and at the end of its budget, and the next call continues
exactly where it stopped. The checkpoint of an unfinished run is committed as data/training/NAME.pt (AdamW state
included, loaded with weights_only=True), so that the next session, on a fresh clone, continues it; it is removed
once the finished model is exported.

On several GPUs or machines, the same script under accelerate (pip install accelerate; README.md, "Training on
several GPUs"):

    accelerate launch --multi_gpu --num_processes 4 scripts/train_unet.py --budget-minutes 60 --mixed-precision bf16

Each process draws its own minibatches of the recipe's batch size (the effective batch is that times the number of
processes), DDP keeps the weights equal, the main process alone writes the checkpoint, and all stop together.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from course_lib.captions import caption_parts, random_captions, tokenize
from course_lib.data import load_digits
from course_lib.guidance import label_condition
from course_lib.nets.vae import encode_latents
from course_lib.profiles import describe_machine, get_device
from course_lib.recipes import (
    CAPTION_DROPOUT,
    GROUPS,
    LABEL_DROPOUT,
    RECIPES,
    Recipe,
    build,
    prediction_type,
)
from course_lib.schedules import make_schedule
from course_lib.train import stop_on_signals, train
from course_lib.weights import images_seen_in_all, load_card, load_model, save_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def training_data(recipe: Recipe) -> tuple[torch.Tensor, Callable | None]:
    """The recipe's training examples (pixels, or the VAE's latent means times its scaling factor) and the
    `condition` that gives each minibatch its labels or caption tokens."""
    images, labels = load_digits("train")
    condition = None
    if recipe.condition == "labels":
        condition = label_condition(labels, LABEL_DROPOUT, null_label=10)
    elif recipe.condition == "captions":
        parts = caption_parts(images, labels)
        condition = lambda index, generator: tokenize(  # noqa: E731
            random_captions([parts[i] for i in index.tolist()], generator, **CAPTION_DROPOUT)
        )
    if recipe.latents:
        images = encode_latents(load_model(recipe.latents), images, load_card(recipe.latents)["scaling_factor"])
    return images, condition


LOSS_CURVE_POINTS = 100


def loss_curve(losses: torch.Tensor) -> dict:
    """The training loss as the card keeps it: the mean of each of up to LOSS_CURVE_POINTS equal runs of steps
    (chapter 11 plots these; the checkpoint, which holds every step's loss, is removed after export)."""
    every = max(1, -(-len(losses) // LOSS_CURVE_POINTS))
    means = [round(chunk.mean().item(), 5) for chunk in losses.split(every)] if len(losses) else []
    return {"steps_per_point": every, "mean_loss": means}


def export(recipe: Recipe, checkpoint: Path) -> None:
    """Write the checkpoint's EMA weights to data/NAME.safetensors with a card; an unfinished run says so."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build(recipe)
    model.load_state_dict(payload["ema"])
    step, steps = payload["step"], recipe.config.steps
    card = {
        "model": {"class": recipe.model_class, **recipe.model},
        "schedule": recipe.schedule,
        "prediction_type": prediction_type(recipe),
        "about": recipe.about,
        "training": {
            **asdict(recipe.config),
            "steps_done": step,
            "images_seen": step * recipe.config.batch_size,
            "status": "finished" if step >= steps else f"interim: {step} of {steps} steps, continuing",
            "data": "data/mnist5k.parquet, split train (4,000 digits)",
            "wall_minutes": round(payload["seconds"] / 60, 1),
            "loss_curve": loss_curve(payload["losses"]),
            "machine": describe_machine(),
            "command": f"python scripts/train_unet.py --recipe {recipe.name} --budget-minutes N (resumed until "
            "done), then --export",
        },
        "weights": "EMA weights, stored as float16",
    }
    if recipe.init_from:
        card["training"]["init_from"] = f"data/{recipe.init_from}.safetensors (new layers initialised as no-ops)"
        before = images_seen_in_all(recipe.init_from)  # all of them, if it was trained from another in turn
        card["training"]["images_seen_in_all"] = before + card["training"]["images_seen"]
    if recipe.condition:
        card["condition"] = {
            "labels": {"kind": "labels 0-9, 10 = no label", "dropout": LABEL_DROPOUT},
            "captions": {"kind": "course_lib.captions (tokenize)", "dropout": CAPTION_DROPOUT},
        }[recipe.condition]
    if recipe.latents:
        card["latents"] = {"vae": recipe.latents, "scaling_factor": load_card(recipe.latents)["scaling_factor"]}
    path = save_weights(model, recipe.name, card)
    print(f"exported {path} at step {step} ({path.stat().st_size / 1e6:.1f} MB)")


def make_accelerator(mixed_precision: str | None):
    """An `accelerate.Accelerator` when the script runs under `accelerate launch` (or torchrun) or is asked for
    mixed precision; otherwise None, and training is the plain single-process PyTorch loop."""
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and mixed_precision in (None, "no"):
        return None
    try:
        from accelerate import Accelerator
    except ImportError as error:
        raise SystemExit(
            f"accelerate is not installed (launched: {launched}, --mixed-precision {mixed_precision}): "
            "pip install accelerate, or run without accelerate launch and --mixed-precision"
        ) from error
    accelerator = Accelerator(mixed_precision=mixed_precision)  # None: as accelerate launch (or its config) says
    world_size = os.environ.get("WORLD_SIZE")  # set by torchrun-style launchers
    if world_size is not None and int(world_size) != accelerator.num_processes:  # else each would train alone
        raise SystemExit(
            f"WORLD_SIZE={world_size} processes but accelerate sees {accelerator.num_processes} "
            "(no GPU here? several CPU processes need ACCELERATE_USE_CPU=true)"
        )
    return accelerator


def train_recipe(recipe: Recipe, budget_s: float, checkpoint: Path, accelerator) -> None:
    """Train (or resume) one recipe for up to budget_s seconds, checkpointing to `checkpoint`; print where it stands."""
    device = get_device() if accelerator is None else accelerator.device
    torch.manual_seed(recipe.config.seed)
    model = build(recipe).to(device)
    data, condition = training_data(recipe)
    schedule = make_schedule(**recipe.schedule) if recipe.schedule else None
    start = time.perf_counter()
    state, _ = train(
        model,
        schedule,
        data.to(device),
        recipe.config,
        budget_s=budget_s,
        checkpoint=checkpoint,
        condition=condition,
        accelerator=accelerator,
    )
    recent = state.losses[-100:]
    processes = 1 if accelerator is None else accelerator.num_processes
    if accelerator is None or accelerator.is_main_process:
        print(
            f"{recipe.name}: step {state.step}/{recipe.config.steps}, {state.step * recipe.config.batch_size} "
            f"examples{f' per process, {processes} processes' if processes > 1 else ''}, loss (mean of the "
            f"last 100) {sum(recent) / max(1, len(recent)):.4f}, this call {time.perf_counter() - start:.0f} s, "
            f"all sessions {state.seconds / 60:.1f} min",
            flush=True,
        )


def steps_done(checkpoint: Path, card: Path | None = None) -> int:
    """The step a run has reached: its checkpoint's, or, once exported and the checkpoint removed, its card's
    (so `--recipe comparison` does not train a finished run again from scratch); 0 without either."""
    if checkpoint.exists():
        return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["step"])
    if card is not None and card.exists():
        return int(json.loads(card.read_text())["training"]["steps_done"])
    return 0


def status(recipes: list[Recipe]) -> list[str]:
    """Where each run stands, from its checkpoint (or its exported card): a markdown table, printed and returned."""
    rows = []
    for recipe in recipes:
        checkpoint = ROOT / "data" / "training" / f"{recipe.name}.pt"
        card_path = ROOT / "data" / f"{recipe.name}.json"
        if checkpoint.exists():
            payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
            step, minutes, losses = payload["step"], payload["seconds"] / 60, payload["losses"][-100:]
            loss = f"{losses.mean():.4f}" if len(losses) else "-"
        elif card_path.exists():
            training = load_card(recipe.name)["training"]
            step, minutes, loss = training["steps_done"], training["wall_minutes"], "(exported)"
        else:
            step, minutes, loss = 0, 0.0, "-"
        images = step * recipe.config.batch_size
        rows.append(
            f"| `{recipe.name}` | {recipe.about} | {step:,d} / {recipe.config.steps:,d} | {images:,d} | "
            f"{minutes:.0f} | {loss} |"
        )
    header = [
        "| run | objective | steps | images | wall min | loss (last 100 steps) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    print("\n".join(header + rows))
    return header + rows


GROUP_TITLES = {"comparison": "Chapter 11's equal-budget comparison", "transformer": "Chapter 12's transformer study"}
GROUP_ABOUT = {
    "comparison": "Each run: the course UNet from scratch, seed 0, 2,000 steps of 128 images (256,000), AdamW 2e-3 "
    "with warm-up and cosine decay, EMA 0.999.",
    "transformer": "Each run: a class-conditional flow model (logit-normal t, 10% of labels dropped) from scratch on "
    "`vae_mnist`'s latents, seed 0, 2,000 steps of 128 latents (256,000), AdamW 1e-3 with warm-up and cosine decay, "
    "EMA 0.999.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--recipe",
        default="unet_mnist_eps",
        choices=[*sorted(RECIPES), *GROUPS],
        help="which model to train ('comparison': chapter 11's cmp_* recipes in turn, each until it is done; "
        "'transformer': chapter 12's DiTs and latent UNet likewise)",
    )
    parser.add_argument("--budget-minutes", type=float, default=0, help="wall-clock budget of this call (0: none)")
    parser.add_argument("--checkpoint", type=Path, help="default: data/training/RECIPE.pt")
    parser.add_argument("--export", action="store_true", help="export the checkpoint's EMA weights to data/")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--status",
        action="store_true",
        help="print where each run stands (and, for a group, write it into docs/benchmarks.md); trains nothing",
    )
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        help="through accelerate (default: as accelerate launch says; without it, none)",
    )
    args = parser.parse_args()
    recipes = [RECIPES[name] for name in GROUPS[args.recipe]] if args.recipe in GROUPS else [RECIPES[args.recipe]]
    if args.status:
        table = status(recipes)
        if args.recipe in GROUPS:
            lines = [
                f"### {GROUP_TITLES[args.recipe]}: training progress",
                "",
                f"`python scripts/train_unet.py --recipe {args.recipe} --status` on {describe_machine()}, "
                f"{time.strftime('%Y-%m-%d')}. {GROUP_ABOUT[args.recipe]} Trained with `--recipe {args.recipe} "
                "--threads 1 --budget-minutes N`, one run after another, resumed across sessions. Wall minutes were "
                "measured on a CPU shared with other jobs: compare them only roughly.",
                "",
                *table,
            ]
            replace_section(ROOT / "docs" / "benchmarks.md", f"{args.recipe}-progress", lines)
        return
    if args.budget_minutes < 0:
        parser.error(f"--budget-minutes must be >= 0 (0: train nothing, e.g. with --export); got {args.budget_minutes}")
    if args.budget_minutes == 0 and not args.export:
        parser.error("nothing to do: give --budget-minutes N to train, --export to export, or both")
    if args.checkpoint is not None and len(recipes) > 1:
        parser.error(f"--checkpoint names one run's file; with --recipe {args.recipe} each run uses its default")
    if args.threads:
        torch.set_num_threads(args.threads)
    stop_on_signals()
    accelerator = make_accelerator(args.mixed_precision)
    main_process = accelerator is None or accelerator.is_main_process
    deadline = time.perf_counter() + args.budget_minutes * 60
    for recipe in recipes:
        checkpoint = args.checkpoint or ROOT / "data" / "training" / f"{recipe.name}.pt"
        left = max(0.0, deadline - time.perf_counter())  # the first recipe always trains (at least one step)
        wanted = args.budget_minutes > 0 and (recipe is recipes[0] or left > 0)
        if wanted and steps_done(checkpoint, ROOT / "data" / f"{recipe.name}.json") < recipe.config.steps:
            train_recipe(recipe, left, checkpoint, accelerator)
        if args.export and main_process and checkpoint.exists():
            export(recipe, checkpoint)
        elif args.export and main_process and len(recipes) == 1:
            raise SystemExit(f"{recipe.name}: no checkpoint at {checkpoint}, nothing to export")
        elif args.export and main_process:
            print(f"{recipe.name}: no checkpoint at {checkpoint} yet, nothing to export")
    if accelerator is not None:
        accelerator.end_training()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:  # train() has saved the checkpoint and said so
        raise SystemExit(f"stopped ({stop}); the same command resumes from the checkpoint") from None
