"""Train the course's digit classifier (the judge of generated samples) and export it to data/.

    python scripts/train_classifier.py                  train on the train split, report held-out accuracy, export
    python scripts/train_classifier.py --no-export      the same, without writing data/

It trains on the 4,000 train digits only, for a fixed number of epochs: the 1,000 held-out digits are never used
to choose anything, so the accuracy measured on them at the end is an honest estimate (that of the float16 weights
that ship). Writes data/digit_classifier.safetensors and .json and records both in data/SHA256SUMS.

Two things make it a fair judge of generated digits, not only an accurate classifier:
- augmentation, done in torch: small random rotations, scalings and shifts, and on half the digits a little blur and
  grain (clipped to [-1, 1] as samplers clip), so that a soft or grainy but well-formed digit still counts;
- outlier exposure (Hendrycks et al. 2019): beside every batch, a quarter as many images that are no digit (noise,
  random blobs, two digits on top of each other) trained towards the uniform distribution, so that the classifier is
  unsure of them. Without it, a plain CNN calls uniform noise a digit with probability above 0.9.
"""

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from course_lib.data import load_digits
from course_lib.metrics import class_accuracy
from course_lib.nets.classifier import DigitClassifier
from course_lib.profiles import describe_machine
from course_lib.train import warmup_cosine
from course_lib.weights import STORAGE_DTYPE, save_weights

NAME = "digit_classifier"
MODEL = dict(channels=(32, 64, 128), convs=2, feature_dim=128, n_classes=10, dropout=0.3)
AUGMENT = dict(degrees=10.0, scale=0.1, shift_pixels=2.0)  # rotation +-degrees, scale 1 +- scale, shift +-pixels
DEGRADE = dict(fraction=0.5, max_noise=0.3)  # this fraction of the digits is softened and noised


def augment(x: torch.Tensor, generator: torch.Generator, degrees: float, scale: float, shift_pixels: float):
    """A random small affine transform per image (B, 1, H, W), background -1 filled in from outside the frame."""
    B, _, H, W = x.shape
    uniform = lambda low, high: low + (high - low) * torch.rand(B, generator=generator)  # noqa: E731
    angle = uniform(-degrees, degrees) * math.pi / 180
    zoom = uniform(1 - scale, 1 + scale)
    shift = torch.stack([uniform(-shift_pixels, shift_pixels) * 2 / W, uniform(-shift_pixels, shift_pixels) * 2 / H], 1)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([theta, shift[:, :, None]], dim=2).to(x)  # (B, 2, 3): output coords -> input coords
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x + 1, grid, padding_mode="zeros", align_corners=False) - 1  # zeros of x + 1 are -1 of x


def degrade(x: torch.Tensor, generator: torch.Generator, fraction: float, max_noise: float) -> torch.Tensor:
    """Soften a random `fraction` of the images (B, 1, H, W) by up to a 3x3 box blur and add Gaussian noise of a
    random standard deviation up to `max_noise`, clipped to [-1, 1]: a soft or grainy digit is still that digit."""
    B = len(x)
    chosen = (torch.rand(B, 1, 1, 1, generator=generator) < fraction).float()
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = x + chosen * torch.rand(B, 1, 1, 1, generator=generator) * (blurred - x)
    sigma = chosen * max_noise * torch.rand(B, 1, 1, 1, generator=generator)
    return (x + sigma * torch.randn(x.shape, generator=generator)).clamp(-1, 1)  # clamped, as samplers clamp


def not_digits(x: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images that are no digit, shaped like x (B, 1, H, W): uniform noise, smooth random blobs (from none to 40 %
    of the image), or two digits of different classes on top of each other, a third of each. The classifier learns
    to be unsure of them."""
    B = len(x)
    noise = torch.rand(x.shape, generator=generator) * 2 - 1
    field = torch.randn(x.shape, generator=generator)
    for _ in range(2):
        field = F.avg_pool2d(field, 5, stride=1, padding=2)  # a smooth random field
    quantile = (0.6 + 0.4 * torch.rand(B, generator=generator)) * field[0].numel()  # keep the top 0-40 %
    cut = field.flatten(1).sort(dim=1).values[torch.arange(B), quantile.long()]  # (B,)
    blobs = torch.where(field > cut[:, None, None, None], 1.0, -1.0)
    blobs = F.avg_pool2d(blobs, 3, stride=1, padding=1, count_include_pad=False)  # soft edges
    partner = torch.randperm(B, generator=generator)
    overlay = torch.maximum(x, x[partner])
    kind = torch.randint(0, 3, (B,), generator=generator)
    kind = torch.where((kind == 2) & (labels == labels[partner]), 1, kind)  # same class on top: blobs instead
    choose = lambda k: (kind == k)[:, None, None, None]  # noqa: E731
    return torch.where(choose(0), noise, torch.where(choose(1), blobs, overlay))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--outlier-weight", type=float, default=0.2, help="weight of the outlier-exposure loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-export", action="store_true", help="train and report, but do not write data/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = DigitClassifier(**MODEL)
    images, labels = load_digits("train")
    heldout, heldout_labels = load_digits("heldout")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    steps, warmup = args.epochs * steps_per_epoch, steps_per_epoch

    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        model.train()
        order, losses = torch.randperm(len(images), generator=generator), []
        for first in range(0, len(images), args.batch_size):
            # 1. a shuffled minibatch of train digits, randomly rotated, scaled and shifted, some softened
            index = order[first : first + args.batch_size]
            x = degrade(augment(images[index], generator, **AUGMENT), generator, **DEGRADE)
            # 2. a quarter as many images that are no digit (outlier exposure, Hendrycks et al. 2019)
            outliers = not_digits(x[: len(x) // 4], labels[index][: len(x) // 4], generator)
            # 3. cross-entropy on the digits, plus cross-entropy to the uniform distribution on the outliers
            logits = model(torch.cat([x, outliers]))  # (B + B / 4, 10)
            loss = F.cross_entropy(logits[: len(x)], labels[index])
            loss = loss - args.outlier_weight * logits[len(x) :].log_softmax(dim=1).mean()
            # 4. one AdamW step at this step's learning rate
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warmup_cosine(step, steps, warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
        elapsed = time.perf_counter() - start
        print(f"epoch {epoch + 1}/{args.epochs}: loss {sum(losses) / len(losses):.4f}, {elapsed:.0f} s")
    seconds = time.perf_counter() - start

    # The accuracy of the weights as shipped: rounded to float16 and back.
    model.load_state_dict({key: value.to(STORAGE_DTYPE).to(value.dtype) for key, value in model.state_dict().items()})
    model.eval()
    heldout_accuracy = class_accuracy(model, heldout, heldout_labels)
    train_accuracy = class_accuracy(model, images, labels)
    print(f"held-out accuracy {heldout_accuracy:.2%} (train {train_accuracy:.2%}), training took {seconds:.0f} s")
    if args.no_export:
        return
    card = {
        "model": {"class": "course_lib.nets.classifier.DigitClassifier", **MODEL},
        "heldout_accuracy": round(heldout_accuracy, 4),
        "train_accuracy": round(train_accuracy, 4),
        "training": {
            "data": "data/mnist5k.parquet, split train (4,000 digits); held-out split used only for the final accuracy",
            "epochs": args.epochs,
            "steps": steps,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "lr_schedule": f"linear warm-up over {warmup} steps, then cosine to 0 (course_lib.train.warmup_cosine)",
            "weight_decay": args.weight_decay,
            "augmentation": {"affine": AUGMENT, "blur_and_grain": DEGRADE},
            "outlier_exposure": {"weight": args.outlier_weight, "outliers_per_batch": args.batch_size // 4},
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "wall_minutes": round(seconds / 60, 1),
            "machine": describe_machine(),
            "command": "python " + " ".join(["scripts/train_classifier.py", *sys.argv[1:]]),
        },
        "weights": "stored as float16; the accuracies above are those of the float16 weights",
    }
    path = save_weights(model, NAME, card)
    print(f"exported {path} ({path.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    sys.exit(main())
