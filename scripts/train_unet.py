"""Train the course's unconditional digit model (chapters 4-5) and export it to data/: resumable, time-budgeted.

    python scripts/train_unet.py --budget-minutes 60          train for up to an hour, resuming from the checkpoint
    python scripts/train_unet.py --export                     write data/unet_mnist_eps.{safetensors,json} from it

Stop it at any moment: it checkpoints every few minutes and at the end of its budget, and the next call continues
exactly where it stopped. The checkpoint of an unfinished run is committed as data/training/NAME.pt (AdamW state
included, loaded with weights_only=True), so that the next session, on a fresh clone, continues it.
The recipe (model, schedule, optimiser) is fixed below so that every session trains the same run; change NAME to
start another.
"""

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from course_lib.data import load_digits
from course_lib.nets.unet import UNet
from course_lib.profiles import describe_machine, get_device
from course_lib.schedules import make_schedule
from course_lib.train import TrainConfig, train
from course_lib.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
NAME = "unet_mnist_eps"
MODEL = dict(channels=(32, 64, 96), blocks=(1, 1, 2), attention=(False, False, True), heads=4, groups=8)
SCHEDULE = dict(name="cosine", T=1000)
CONFIG = TrainConfig(
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


def export(checkpoint: Path) -> None:
    """Write the checkpoint's EMA weights to data/NAME.safetensors with a card; an unfinished run says so."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = UNet(**MODEL)
    model.load_state_dict(payload["ema"])
    step = payload["step"]
    card = {
        "model": {"class": "course_lib.nets.unet.UNet", **MODEL},
        "schedule": SCHEDULE,
        "prediction_type": CONFIG.prediction_type,
        "training": {
            **asdict(CONFIG),
            "steps_done": step,
            "images_seen": step * CONFIG.batch_size,
            "status": "finished" if step >= CONFIG.steps else f"interim: {step} of {CONFIG.steps} steps, continuing",
            "data": "data/mnist5k.parquet, split train (4,000 digits)",
            "wall_minutes": round(payload["seconds"] / 60, 1),
            "machine": describe_machine(),
            "command": "python scripts/train_unet.py --budget-minutes N (resumed until done), then --export",
        },
        "weights": "EMA weights, stored as float16",
    }
    path = save_weights(model, NAME, card)
    print(f"exported {path.relative_to(ROOT)} at step {step} ({path.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-minutes", type=float, default=0, help="wall-clock budget of this call (0: none)")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "data" / "training" / f"{NAME}.pt")
    parser.add_argument("--export", action="store_true", help="export the checkpoint's EMA weights to data/")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.budget_minutes > 0:
        device = get_device()
        torch.manual_seed(CONFIG.seed)
        model = UNet(**MODEL).to(device)
        images, _ = load_digits("train")
        schedule = make_schedule(**SCHEDULE)
        start = time.perf_counter()
        budget_s = args.budget_minutes * 60
        state, _ = train(model, schedule, images.to(device), CONFIG, budget_s=budget_s, checkpoint=args.checkpoint)
        print(
            f"step {state.step}/{CONFIG.steps}, {state.step * CONFIG.batch_size} images, "
            f"loss (mean of the last 100) {sum(state.losses[-100:]) / max(1, len(state.losses[-100:])):.4f}, "
            f"this call {time.perf_counter() - start:.0f} s, all sessions {state.seconds / 60:.1f} min"
        )
    if args.export:
        export(args.checkpoint)


if __name__ == "__main__":
    sys.exit(main())
