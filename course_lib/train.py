"""The training loop, kept plain and visible: sample a batch, compute the loss, step the optimiser, update the EMA.

Taught in notebooks/03_ddpm.ipynb (toy data) and notebooks/04_unet.ipynb (digits). The loss is
`ddpm.simple_loss` (Ho et al. 2020, eq. 14, optionally min-SNR weighted), or in chapter 10 the flow-matching loss
`flow.flow_loss` (`objective="flow"`; `"reflow"` trains on fixed (noise, sample) pairs). AdamW (Loshchilov &
Hutter 2019) with a linear warm-up and a cosine decay (Loshchilov & Hutter 2017), gradient-norm clipping, and an
exponential moving average of the weights with warm-up (the EMA weights are the ones we sample with).

A run can be given a wall-clock budget and a checkpoint file: it stops when the budget is spent, saves
everything needed to continue (model, EMA, optimiser, step, random state, loss history), and the next call with
the same checkpoint continues exactly where it stopped.

On several processes (`accelerate launch`, see scripts/train_unet.py), `train` takes an `accelerator`, any object
with the methods of `accelerate.Accelerator` it uses (this module does not import accelerate): the accelerator
wraps the model for DDP and mixed precision, each process draws its own minibatches of config.batch_size (the
effective batch is batch_size x processes), the processes agree at every step on the mean loss, on when to
checkpoint and on when to stop (the main process decides), and only the main process writes the checkpoint.
"""

import copy
import hashlib
import math
import os
import pickle
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course_lib.checks import check_choice
from course_lib.ddpm import simple_loss
from course_lib.edm import edm_loss
from course_lib.flow import TIME_SAMPLINGS, flow_loss, reflow_loss
from course_lib.schedules import Schedule

# Every objective's loss, called the same way: (model, schedule, x0, generator, cond, config) -> scalar.
LOSSES = {
    "ddpm": lambda model, schedule, x0, generator, cond, config: simple_loss(
        model, schedule, x0, generator, config.prediction_type, config.min_snr_gamma, cond
    ),
    "flow": lambda model, schedule, x0, generator, cond, config: flow_loss(
        model, x0, generator, cond, config.time_sampling
    ),
    "reflow": lambda model, schedule, x0, generator, cond, config: reflow_loss(
        model, x0, generator, cond, config.time_sampling
    ),
    "edm": lambda model, schedule, x0, generator, cond, config: edm_loss(model, x0, generator, cond),
}
OBJECTIVES = tuple(LOSSES)


@dataclass
class TrainConfig:
    steps: int = 5000  # optimiser steps of the whole run; the learning-rate schedule spans them
    batch_size: int = 128
    lr: float = 3e-3  # peak learning rate
    warmup: int = 200  # steps of linear warm-up
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0  # max gradient norm (None: no clipping)
    ema_decay: float | None = 0.999  # EMA decay after warm-up (None: no EMA)
    objective: str = "ddpm"  # "ddpm": simple_loss; "flow": flow_loss; "reflow": reflow_loss on (B, 2, ...) pairs;
    #                          "edm": edm.edm_loss (the model is EDM's raw network F)
    prediction_type: str = "eps"  # what a "ddpm" model predicts (flow models always predict the velocity)
    min_snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023); None: the plain simple loss
    time_sampling: str = "uniform"  # how "flow" / "reflow" draw t: "uniform" or "logit_normal" (flow.sample_times)
    seed: int = 0
    checkpoint_every_s: float = 300.0  # seconds between checkpoints when a checkpoint file is given

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.warmup < 0:
            raise ValueError(
                f"need steps >= 1, batch_size >= 1, warmup >= 0; got steps={self.steps}, "
                f"batch_size={self.batch_size}, warmup={self.warmup}"
            )
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("time_sampling", self.time_sampling, TIME_SAMPLINGS)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0; got lr={self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, or None for no clipping; got grad_clip={self.grad_clip}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in (0, 1); got {self.ema_decay}")
        if self.min_snr_gamma is not None and self.objective != "ddpm":
            raise ValueError(
                f"min_snr_gamma={self.min_snr_gamma} weights the 'ddpm' loss only; objective {self.objective!r} "
                "would ignore it: set min_snr_gamma=None"
            )


def warmup_cosine(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over `warmup` steps, then a cosine from 1 down to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """An exponential moving average of a model's weights, with the warm-up of Tarvainen & Valpola 2017:
    decay_k = min(decay, (1 + k) / (10 + k)) at update k, so early averages are not dominated by the random init."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.model.parameters(), model.parameters(), strict=True):
            averaged.lerp_(current, 1 - decay)
        for averaged, current in zip(self.model.buffers(), model.buffers(), strict=True):
            averaged.copy_(current)


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint holds besides the weights."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # training wall time so far, over every session


def train(
    model: torch.nn.Module,
    schedule: Schedule | None,
    data: torch.Tensor,
    config: TrainConfig,
    budget_s: float | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    condition: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    accelerator=None,
    step_loss: Callable[[torch.nn.Module, torch.Generator], torch.Tensor] | None = None,
) -> tuple[TrainState, EMA | None]:
    """Train `model` in place on random minibatches of `data` (N, ...); returns (state, ema).

    With `condition`, the model is called as model(xt, t, cond) with cond = condition(index, generator) for the
    minibatch's indices into data: labels with some dropped (`guidance.label_condition`), or caption tokens.

    With `step_loss`, each step's loss is step_loss(model, generator) instead of config.objective's on a minibatch
    of data: the function draws its own minibatch from the generator (`personalize.train_concept`: the concept's
    examples beside DreamBooth's prior images). `data` then only identifies the run in its checkpoint.

    `schedule` is the DDPM schedule of the "ddpm" objective; the flow objectives have none and take None.
    Stops after config.steps in all, or after budget_s seconds of this call. With `checkpoint`, resumes from the
    file if it exists and saves to it every config.checkpoint_every_s seconds and at the end.
    The device comes from the model's parameters.

    With `accelerator` (an `accelerate.Accelerator`, or anything with its methods), the model is moved to
    accelerator.device and the model and optimiser are prepared by it (DDP, mixed precision); process k draws
    from a generator seeded with config.seed + k, the EMA averages the unwrapped model, and the checkpoint holds
    every process's generator state, so that a resume on as many processes continues exactly (on more processes,
    the new ones draw from a fresh seed). Every process must see the same checkpoint file.
    """
    if config.objective == "ddpm" and schedule is None:
        raise ValueError('the "ddpm" objective needs the schedule; the others ("flow", "reflow", "edm") take None')
    if step_loss is not None and condition is not None:
        raise ValueError("give condition or step_loss, not both: step_loss draws its own minibatch and conditions")
    if len(data) == 0:
        raise ValueError(f"no training data: data has shape {tuple(data.shape)}")
    if budget_s is not None and not budget_s >= 0:
        raise ValueError(f"budget_s must be >= 0 seconds (0: one step; None: no budget); got budget_s={budget_s}")
    if accelerator is not None:
        model.to(accelerator.device)  # the accelerator places the model (as its prepare would)
    device = next(model.parameters()).device
    rank = accelerator.process_index if accelerator is not None else 0
    generator = torch.Generator().manual_seed(config.seed + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(model, config.ema_decay) if config.ema_decay else None
    state = TrainState()
    identity = run_identity(schedule, data)
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, model, optimizer, ema, generator, config, rank, identity)
    # what the loop calls: the model and optimiser themselves, or the accelerator's wrappers around them
    net, opt, backward, clip_grad_norm = model, optimizer, torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    if accelerator is not None:
        net, opt = accelerator.prepare(model, optimizer)
        backward, clip_grad_norm = accelerator.backward, accelerator.clip_grad_norm_
        steps = accelerator.gather(torch.tensor([state.step], device=device)).tolist()
        if len(set(steps)) > 1:
            raise ValueError(f"the processes start at different steps {steps}: they must all see {checkpoint}")
    if step_loss is None:
        loss_of = LOSSES[config.objective]

        def step_loss(net: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
            # 1. a random minibatch of clean data
            index = torch.randint(0, len(data), (config.batch_size,), generator=generator)
            x0 = data[index].to(device)
            cond = condition(index, generator).to(device) if condition is not None else None
            # 2. the loss at random t with fresh noise (reflow: with the noise of each pair)
            return loss_of(net, schedule, x0, generator, cond, config)

    start, last_save = time.perf_counter(), time.perf_counter()

    def save() -> None:
        elapsed = time.perf_counter() - start
        save_checkpoint(checkpoint, model, optimizer, ema, generator, config, state, elapsed, accelerator, identity)

    model.train()
    bar = tqdm(total=config.steps, initial=state.step, disable=not progress or rank > 0, desc="training")
    try:
        while state.step < config.steps:
            # 1-2. the loss of a fresh minibatch
            loss = step_loss(net, generator)
            # 3. the gradient at this step's learning rate; a non-finite loss or gradient stops the run before the
            #    optimiser step and before any save, so the checkpoint keeps the last good state
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(state.step, config.steps, config.warmup)
            opt.zero_grad(set_to_none=True)
            check_finite("loss", loss, state.step, checkpoint)
            backward(loss)
            grad_norm = clip_grad_norm(model.parameters(), config.grad_clip or math.inf)
            check_finite("gradient norm", grad_norm, state.step, checkpoint)
            # 4. one optimiser step, then the EMA
            opt.step()
            if ema is not None:
                ema.update(model)
            state.step += 1
            # 5. checkpoint and stop on time (several processes: as the main process says, so all stop together)
            loss_value = loss.item()
            time_to_save = checkpoint is not None and time.perf_counter() - last_save > config.checkpoint_every_s
            stop = budget_s is not None and time.perf_counter() - start > budget_s
            if accelerator is not None:
                loss_value, time_to_save, stop = agree(accelerator, loss_value, time_to_save, stop)
            state.losses.append(loss_value)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
            if time_to_save:
                save()
                last_save = time.perf_counter()
            if stop:
                break
    except KeyboardInterrupt:  # the notebook's Stop button: keep what was trained, then stop as asked
        if checkpoint is not None and accelerator is None:
            save()
            print(f"interrupted at step {state.step}: saved {checkpoint}; the same call resumes from there")
        raise
    finally:
        bar.close()
        model.eval()
    if checkpoint is not None:
        save()
    state.seconds += time.perf_counter() - start
    return state, ema


def check_finite(what: str, value: torch.Tensor, step: int, checkpoint) -> None:
    """Raise FloatingPointError if a training loss or gradient norm is NaN or infinite (before anything is saved)."""
    if not torch.isfinite(value).all():
        kept = f"; {checkpoint} still holds the last good state" if checkpoint is not None else ""
        raise FloatingPointError(
            f"the {what} is {value.item()} at step {step}: training diverged (NaN in the data, or too large a "
            f"learning rate?){kept}"
        )


def run_identity(schedule: Schedule | None, data: torch.Tensor) -> dict:
    """What a run trains on besides its config: the schedule's name and a fingerprint of its betas, and the data's
    shape and a fingerprint of its values. A checkpoint records them; resuming with others is refused."""
    schedule_id = None
    if schedule is not None:
        schedule_id = f"{schedule.name}, T={schedule.T}, {fingerprint(schedule.betas)}"
    return {"schedule": schedule_id, "data": f"{tuple(data.shape)}, {fingerprint(data)}"}


def fingerprint(tensor: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of a tensor's float32 values (as stored on the CPU)."""
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(values.tobytes()).hexdigest()[:16]


def agree(accelerator, loss: float, save: bool, stop: bool) -> tuple[float, bool, bool]:
    """The same on every process: the mean of the processes' losses, and the main process's save and stop."""
    rows = accelerator.gather(torch.tensor([[loss, save, stop]], device=accelerator.device))  # (processes, 3)
    return rows[:, 0].mean().item(), bool(rows[0, 1]), bool(rows[0, 2])


def save_checkpoint(
    path, model, optimizer, ema, generator, config, state, elapsed, accelerator=None, identity=None
) -> None:
    """Everything `train` needs to continue, written atomically (a crash never leaves half a file).

    With an accelerator every process calls it (to hand over its generator state) and the main process writes."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.model.state_dict() if ema else None,
        "ema_updates": ema.updates if ema else 0,
        "generator": generator.get_state(),
        "config": asdict(config),
        "step": state.step,
        "losses": torch.tensor(state.losses),
        "seconds": state.seconds + elapsed,
        "identity": identity or {},
    }
    if accelerator is not None:  # (processes, state size): process k's generator in row k
        payload["generators"] = accelerator.gather(generator.get_state()[None].to(accelerator.device)).cpu()
    if accelerator is None or accelerator.is_main_process:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    if accelerator is not None:
        accelerator.wait_for_everyone()  # the file is complete before any process goes on


def load_checkpoint(path, model, optimizer, ema, generator, config, rank: int = 0, identity=None) -> TrainState:
    """Restore a checkpoint written by `save_checkpoint` (tensors only: loaded with weights_only=True).

    Refused, with what differs, if the checkpoint was written with another config, schedule or data (`identity`,
    from `run_identity`; a checkpoint from before identities were recorded is not checked for them).
    Process `rank` takes its own generator state if the checkpoint holds one (a single-process checkpoint holds
    that of rank 0); otherwise it draws from a fresh seed, config.seed + rank + 1,000,003 x the step."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {str(error)[:120]}); delete it to start "
            "the run afresh, or restore it (git checkout, or the .tmp file beside it if a save was cut short)"
        ) from error
    saved = {**asdict(TrainConfig()), **payload["config"]}  # fields added since the save count at their defaults
    if saved != asdict(config):
        changed = {k: (v, asdict(config)[k]) for k, v in saved.items() if asdict(config)[k] != v}
        raise ValueError(f"{path} was written with another configuration (saved, asked): {changed}")
    saved_identity = payload.get("identity") or {}
    different = {k: (v, (identity or {}).get(k)) for k, v in saved_identity.items() if (identity or {}).get(k) != v}
    if identity is not None and different:
        raise ValueError(f"{path} was written for another schedule or other data (saved, asked): {different}")
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise ValueError(f"{path} holds another architecture's weights: {str(error)[:300]}") from error
    optimizer.load_state_dict(payload["optimizer"])
    if ema is not None:
        ema.model.load_state_dict(payload["ema"])
        ema.updates = payload["ema_updates"]
    generators = payload.get("generators", payload["generator"][None])
    if rank < len(generators):
        generator.set_state(generators[rank].clone())  # a copy: set_state crashes on a row view (torch 2.14)
    else:
        generator.manual_seed(config.seed + rank + 1_000_003 * payload["step"])
    return TrainState(step=payload["step"], losses=payload["losses"].tolist(), seconds=payload["seconds"])


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
    """`train` for small models (chapter 3): no EMA, no clipping, short warm-up; returns the loss of every step."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1 and batch_size >= 1; got steps={steps}, batch_size={batch_size}")
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup=min(200, steps // 10 + 1),
        grad_clip=None,
        ema_decay=None,
        prediction_type=prediction_type,
        seed=seed,
    )
    state, _ = train(model, schedule, data, config, progress=progress)
    return state.losses


def stop_on_signals() -> None:
    """SIGTERM (kill, a session or job ending) and SIGINT (Ctrl-C) raise KeyboardInterrupt, on which `train` (and
    the course's other resumable loops) save their checkpoint. A shell starts background jobs with SIGINT ignored,
    and Python then installs no handler for it: without this, `kill -INT` or the end of a session would lose the
    work since the last periodic save. Called once by each training script's main()."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
