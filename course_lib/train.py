"""The training loop, kept plain and visible: sample a batch, compute the loss, step the optimiser.

Taught in notebooks/03_ddpm.ipynb. The loss is `ddpm.simple_loss` (Ho et al. 2020, eq. 14); the learning rate
warms up linearly and then decays on a cosine (Loshchilov & Hutter 2017), which lets small models take a large
peak learning rate.
"""

import math

import torch
from tqdm.auto import tqdm

from course_lib.ddpm import simple_loss
from course_lib.schedules import Schedule


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over `warmup` steps, then a cosine from 1 down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_denoiser(
    model: torch.nn.Module,
    schedule: Schedule,
    data: torch.Tensor,
    steps: int,
    batch_size: int = 512,
    lr: float = 2e-3,
    prediction_type: str = "eps",
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train `model` on random minibatches of `data` (N, ...) with the simple loss; returns the loss of every step.

    The device comes from the model's parameters; batches are drawn with a generator seeded by `seed`.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1; got steps={steps}, batch_size={batch_size}")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, warmup=min(200, steps // 10 + 1))
    )
    losses = []
    model.train()
    for _ in tqdm(range(steps), disable=not progress, desc="training"):
        # 1. a random minibatch of clean data
        index = torch.randint(0, len(data), (batch_size,), generator=generator)
        x0 = data[index].to(device)
        # 2. the simple loss at random t with fresh noise
        loss = simple_loss(model, schedule, x0, generator, prediction_type)
        # 3. one optimiser step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
