"""Train the course's digit diffusion models and export them to data/: resumable, time-budgeted.

    python scripts/train_unet.py --budget-minutes 60               train unet_mnist_eps for up to an hour, resuming
    python scripts/train_unet.py --export                          write data/unet_mnist_eps.{safetensors,json}
    python scripts/train_unet.py --recipe unet_mnist_class --budget-minutes 60      another recipe (see RECIPES)

Recipes (each a fixed model, schedule and optimiser, so that every session trains the same run):
    unet_mnist_eps      unconditional digits, eps prediction (chapters 4-5)
    unet_mnist_class    class-conditional digits with 10% label dropout, for classifier-free guidance (chapter 7)
    unet_mnist_text     digits from captions ("a thick seven leaning right"), text encoder and cross-attention
                        trained together, parts and whole captions dropped (chapter 7)
    latent_mnist_eps    unconditional digits in the latent space of data/vae_mnist (chapter 6; needs that VAE)
    unet_mnist_flow     unconditional digits by flow matching (velocity on straight paths), started from
                        unet_mnist_eps (chapter 10)

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
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from course_lib.captions import caption_parts, random_captions, tokenize
from course_lib.data import load_digits
from course_lib.guidance import label_condition
from course_lib.profiles import describe_machine, get_device
from course_lib.schedules import make_schedule
from course_lib.train import TrainConfig, train
from course_lib.weights import load_card, load_model, load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Recipe:
    name: str  # data/NAME.safetensors and data/training/NAME.pt
    model: dict  # keyword arguments of model_class
    config: TrainConfig
    schedule: dict | None = field(default_factory=lambda: dict(name="cosine", T=1000))  # None: a flow objective
    condition: str | None = None  # None, "labels" or "captions" (each partly dropped: classifier-free guidance)
    latents: str | None = None  # train on this shipped VAE's scaled latents instead of pixels
    model_class: str = "course_lib.nets.unet.UNet"
    init_from: str | None = None  # start the UNet from this shipped model (new layers start as no-ops)


LABEL_DROPOUT = 0.1  # labels trained as "no label"
CAPTION_DROPOUT = dict(drop_part=0.3, drop_all=0.1)  # see course_lib.captions.random_captions


DIGIT_MODEL = dict(channels=(32, 64, 96), blocks=(1, 1, 2), attention=(False, False, True), heads=4, groups=8)
DIGIT_CONFIG = TrainConfig(
    steps=6000,
    batch_size=128,
    lr=2e-3,
    warmup=200,
    grad_clip=1.0,
    ema_decay=0.999,
    prediction_type="eps",
    min_snr_gamma=5.0,
    seed=0,
    checkpoint_every_s=300,
)
# The conditional models start from the unconditional one, whose denoising they keep, and learn the condition.
FINE_TUNE_CONFIG = replace(DIGIT_CONFIG, steps=2000, lr=1e-3, warmup=100)
# The flow model keeps the eps model's features and relearns what its output means (a velocity): the fine-tune's
# 2,000 steps, as the class model (about 2 h on one CPU thread).
FLOW_CONFIG = replace(FINE_TUNE_CONFIG, objective="flow")
RECIPES = {
    recipe.name: recipe
    for recipe in [
        Recipe("unet_mnist_eps", DIGIT_MODEL, DIGIT_CONFIG),
        Recipe(
            "unet_mnist_class",
            {**DIGIT_MODEL, "num_classes": 10},
            FINE_TUNE_CONFIG,
            condition="labels",
            init_from="unet_mnist_eps",
        ),
        Recipe(
            "unet_mnist_text",
            {**DIGIT_MODEL, "text": dict(dim=64, layers=2, heads=4)},
            replace(FINE_TUNE_CONFIG, steps=3000),
            condition="captions",
            model_class="course_lib.nets.text.TextConditionedUNet",
            init_from="unet_mnist_eps",
        ),
        Recipe(
            "unet_mnist_flow",
            DIGIT_MODEL,
            FLOW_CONFIG,
            schedule=None,
            init_from="unet_mnist_eps",
        ),
        Recipe(
            "latent_mnist_eps",
            # one block per level: 0.76 s a step on one thread against 1.51 with two (same widths), 106 ms against
            # 170 per call of 50 latents (measured before the first run; the pixel UNet takes about 400)
            dict(in_channels=4, channels=(64, 128), blocks=(1, 1), attention=(False, True), heads=4, groups=8),
            DIGIT_CONFIG,
            latents="vae_mnist",
        ),
    ]
}
# The unconditional digit model, as scripts/bench.py imports it.
NAME, MODEL, SCHEDULE, CONFIG = "unet_mnist_eps", DIGIT_MODEL, RECIPES["unet_mnist_eps"].schedule, DIGIT_CONFIG


def build(recipe: Recipe) -> torch.nn.Module:
    """The recipe's model at initialisation, or started from `init_from`: its UNet takes the shipped weights, and
    the class embedding starts at zero, so that at step 0 the model is the shipped unconditional one (the
    cross-attention layers start as no-ops anyway: their output layers are zero-initialised)."""
    module_name, _, class_name = recipe.model_class.rpartition(".")
    model = getattr(importlib.import_module(module_name), class_name)(**recipe.model)
    if recipe.init_from:
        unet = getattr(model, "unet", model)
        load_weights(unet, recipe.init_from, allow_new=True)
        if unet.class_emb is not None:
            torch.nn.init.zeros_(unet.class_emb.weight)
    return model


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
        vae, scale = load_model(recipe.latents), load_card(recipe.latents)["scaling_factor"]
        images = torch.cat([vae.encode(images[i : i + 500]).mode() for i in range(0, len(images), 500)]) * scale
    return images, condition


def export(recipe: Recipe, checkpoint: Path) -> None:
    """Write the checkpoint's EMA weights to data/NAME.safetensors with a card; an unfinished run says so."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = build(recipe)
    model.load_state_dict(payload["ema"])
    step, steps = payload["step"], recipe.config.steps
    card = {
        "model": {"class": recipe.model_class, **recipe.model},
        "schedule": recipe.schedule,
        "prediction_type": "velocity" if recipe.config.objective != "ddpm" else recipe.config.prediction_type,
        "training": {
            **asdict(recipe.config),
            "steps_done": step,
            "images_seen": step * recipe.config.batch_size,
            "status": "finished" if step >= steps else f"interim: {step} of {steps} steps, continuing",
            "data": "data/mnist5k.parquet, split train (4,000 digits)",
            "wall_minutes": round(payload["seconds"] / 60, 1),
            "machine": describe_machine(),
            "command": f"python scripts/train_unet.py --recipe {recipe.name} --budget-minutes N (resumed until "
            "done), then --export",
        },
        "weights": "EMA weights, stored as float16",
    }
    if recipe.init_from:
        card["training"]["init_from"] = f"data/{recipe.init_from}.safetensors (new layers initialised as no-ops)"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=NAME, choices=sorted(RECIPES), help="which model to train")
    parser.add_argument("--budget-minutes", type=float, default=0, help="wall-clock budget of this call (0: none)")
    parser.add_argument("--checkpoint", type=Path, help="default: data/training/RECIPE.pt")
    parser.add_argument("--export", action="store_true", help="export the checkpoint's EMA weights to data/")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        help="through accelerate (default: as accelerate launch says; without it, none)",
    )
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    checkpoint = args.checkpoint or ROOT / "data" / "training" / f"{recipe.name}.pt"
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = make_accelerator(args.mixed_precision)
    main_process = accelerator is None or accelerator.is_main_process

    if args.budget_minutes > 0:
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
            budget_s=args.budget_minutes * 60,
            checkpoint=checkpoint,
            condition=condition,
            accelerator=accelerator,
        )
        recent = state.losses[-100:]
        processes = 1 if accelerator is None else accelerator.num_processes
        if main_process:
            print(
                f"{recipe.name}: step {state.step}/{recipe.config.steps}, {state.step * recipe.config.batch_size} "
                f"examples{f' per process, {processes} processes' if processes > 1 else ''}, loss (mean of the "
                f"last 100) {sum(recent) / max(1, len(recent)):.4f}, this call {time.perf_counter() - start:.0f} s, "
                f"all sessions {state.seconds / 60:.1f} min"
            )
    if args.export and main_process:
        export(recipe, checkpoint)
    if accelerator is not None:
        accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
