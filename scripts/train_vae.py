"""Train the course's latent autoencoder (chapter 6) and export it to data/.

    python scripts/train_vae.py                  train on the train split, measure on held-out digits, export
    python scripts/train_vae.py --no-export      the same, without writing data/

Trains `course_lib.nets.vae.VAE` (digits 1 x 28 x 28 <-> latents 4 x 7 x 7) on the 4,000 train digits for a fixed
number of epochs with the summed squared error plus a small KL weight (Rombach et al. 2022 keep it small so that
the decoder stays sharp). Then, with the float16 weights as they ship, it measures on the 1,000 held-out digits:
the reconstruction PSNR, and the fraction of reconstructions the shipped digit classifier reads as the right
digit (target >= 97%); and it computes the latent scaling factor (1 / std of the latent means over the train
digits, Stable Diffusion's `scaling_factor`). All of it goes into the card, data/vae_mnist.json.
"""

import argparse
import math
import sys
import time

import torch

from course_lib.data import load_digits
from course_lib.metrics import class_accuracy, load_digit_classifier
from course_lib.nets.vae import VAE, latent_scale, vae_loss
from course_lib.profiles import describe_machine
from course_lib.train import warmup_cosine
from course_lib.weights import STORAGE_DTYPE, save_weights

NAME = "vae_mnist"
MODEL = dict(channels=(32, 64), latent_channels=4, groups=8)


@torch.no_grad()
def reconstruct(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Decode the latent means: what latent diffusion's decoder gives back for a digit."""
    return torch.cat(
        [vae.decode(vae.encode(images[i : i + batch_size]).mode()) for i in range(0, len(images), batch_size)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, warm-up then cosine)")
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="weight of the KL term (per image)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-export", action="store_true", help="train and report, but do not write data/")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vae = VAE(**MODEL)
    images, _ = load_digits("train")
    heldout, heldout_labels = load_digits("heldout")
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr)
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    steps, warmup = args.epochs * steps_per_epoch, steps_per_epoch

    start, step = time.perf_counter(), 0
    for epoch in range(args.epochs):
        vae.train()
        order, sums = torch.randperm(len(images), generator=generator), torch.zeros(2)
        for first in range(0, len(images), args.batch_size):
            # 1. a shuffled minibatch, encoded, a latent sampled, decoded
            x = images[order[first : first + args.batch_size]]
            reconstruction, posterior = vae(x, generator)
            # 2. squared error plus the weighted KL, one AdamW step at this step's learning rate
            loss, squared_error, kl = vae_loss(x, reconstruction, posterior, args.kl_weight)
            for group in optimizer.param_groups:
                group["lr"] = args.lr * warmup_cosine(step, steps, warmup)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([squared_error, kl]) * len(x)
            step += 1
        squared_error, kl = (sums / len(images)).tolist()
        print(
            f"epoch {epoch + 1}/{args.epochs}: squared error {squared_error:.2f}, KL {kl:.1f} per digit, "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    seconds = time.perf_counter() - start

    # What ships: float16 weights, measured on held-out digits.
    vae.load_state_dict({key: value.to(STORAGE_DTYPE).to(value.dtype) for key, value in vae.state_dict().items()})
    vae.eval()
    reconstructions = reconstruct(vae, heldout).clamp(-1, 1)
    mse = (reconstructions - heldout).pow(2).mean().item()
    psnr = 10 * math.log10(4 / mse)  # pixel range [-1, 1]: peak-to-peak 2
    accuracy = class_accuracy(load_digit_classifier(), reconstructions, heldout_labels)
    original_accuracy = class_accuracy(load_digit_classifier(), heldout, heldout_labels)
    scale = latent_scale(vae, images)
    print(
        f"held-out reconstructions: PSNR {psnr:.1f} dB, classified correctly {accuracy:.2%} "
        f"(originals {original_accuracy:.2%}); scaling factor {scale:.4f}; training took {seconds / 60:.1f} min"
    )
    if args.no_export:
        return
    card = {
        "model": {"class": "course_lib.nets.vae.VAE", **MODEL},
        "scaling_factor": round(scale, 6),
        "heldout": {
            "psnr_db": round(psnr, 2),
            "reconstruction_accuracy": round(accuracy, 4),
            "original_accuracy": round(original_accuracy, 4),
        },
        "training": {
            "data": "data/mnist5k.parquet, split train (4,000 digits); held-out split used only for the measures",
            "epochs": args.epochs,
            "steps": steps,
            "batch_size": args.batch_size,
            "optimizer": "AdamW",
            "lr": args.lr,
            "lr_schedule": f"linear warm-up over {warmup} steps, then cosine to 0 (course_lib.train.warmup_cosine)",
            "kl_weight": args.kl_weight,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "wall_minutes": round(seconds / 60, 1),
            "machine": describe_machine(),
            "command": "python " + " ".join(["scripts/train_vae.py", *sys.argv[1:]]),
        },
        "weights": "stored as float16; the measures above are those of the float16 weights",
    }
    path = save_weights(vae, NAME, card)
    print(f"exported {path} ({path.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    sys.exit(main())
