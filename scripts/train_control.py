"""Train chapter 13's two models and export them to data/: the edge ControlNet and the noisy digit classifier.

    python scripts/train_control.py --model controlnet --budget-minutes 30    train (or resume) for up to 30 minutes
    python scripts/train_control.py --model controlnet --export               write data/controlnet_edges.*
    python scripts/train_control.py --model noisy_classifier --budget-minutes 10 --export    train, then export
    python scripts/train_control.py --status                                  where each run stands

controlnet: a ControlNet (`course_lib.control`) on the frozen shipped data/unet_mnist_eps, whose control is the
outline of each training digit (`control.edge_map`), trained with the base's own objective and schedule (eps, min-SNR-5,
cosine, `course_lib.train.train`): only the ControlNet's parameters learn. The export holds the ControlNet's weights
only; its card names the base, and `control.load_controlnet("controlnet_edges")` puts the two together. The card also
says how well DDIM samples follow their held-out controls (`control.edge_agreement`), beside the base's samples from
the same noise.

noisy_classifier: `nets.classifier.NoisyDigitClassifier` trained on digits noised to a uniform t of unet_mnist_eps's
schedule (`editing.noisy_classifier_loss`), for classifier guidance. Its card holds its accuracy on the 1,000
held-out digits noised to t = 0, 250, 500, 750 (`editing.noisy_class_accuracy`), measured at export.

Both train on the 4,000 train digits only, one CPU thread by default (--threads), and stop at any moment without
loss: a checkpoint is written every few minutes, at the end of the budget and on SIGTERM or Ctrl-C, to
data/training/NAME.pt, and the same command resumes it. A checkpoint written with another configuration, other data,
another schedule or (ControlNet) another base is refused, naming what differs.
"""

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from course_lib.control import ControlledUNet, ControlNet, controlnet_parameter_count, edge_agreement, edge_map
from course_lib.data import data_dir, load_digits
from course_lib.editing import noisy_class_accuracy, noisy_classifier_loss
from course_lib.metrics import class_accuracy, confident_fraction, load_digit_classifier
from course_lib.nets.classifier import NoisyDigitClassifier
from course_lib.nets.unet import UNet
from course_lib.profiles import describe_machine
from course_lib.recipes import FINE_TUNE_CONFIG
from course_lib.samplers import ddim_sample
from course_lib.schedules import make_schedule
from course_lib.train import (
    EMA,
    TrainConfig,
    TrainState,
    check_finite,
    fingerprint,
    load_checkpoint,
    run_identity,
    save_checkpoint,
    stop_on_signals,
    train,
    warmup_cosine,
)
from course_lib.weights import STORAGE_DTYPE, load_card, load_model, save_weights

BASE = "unet_mnist_eps"  # the frozen model the ControlNet steers; the classifier is trained on its schedule


@dataclass(frozen=True)
class Run:
    name: str  # data/NAME.safetensors and data/training/NAME.pt
    model: dict  # keyword arguments: NoisyDigitClassifier's, or ControlNet's besides its base
    config: TrainConfig
    about: str  # one line for the card and the status table


# The conditional models' fine-tune settings (AdamW 1e-3, warm-up 100, EMA 0.999, eps with min-SNR-5), shorter: a
# ControlNet step took 2.36 s on one thread (batch 128; a frozen forward of the base, the copy's forward and backward,
# and the backward through the base's decoder to the residuals) against 2.20 s for a step of the UNet itself,
# measured side by side on the 2-core AMD EPYC while two other training jobs ran; 1,200 steps: about 47 minutes.
CONTROLNET = Run(
    "controlnet_edges",
    dict(control_channels=1, hint_channels=(16, 32), hint_stride=1),
    replace(FINE_TUNE_CONFIG, steps=1200),
    "ControlNet on unet_mnist_eps, control: each digit's outline (control.edge_map)",
)
# 0.066 s a step on one thread for the loss, backward and AdamW (batch 128, measured beside the ControlNet's), 0.07 to
# 0.10 s a step of this script's whole loop (clipping, EMA, progress bar) while two other jobs shared the 2 cores;
# 5,000 steps: 6 to 8 minutes.
NOISY_CLASSIFIER = Run(
    "noisy_classifier",
    dict(channels=(16, 32, 64), n_classes=10, time_dim=32, groups=8),
    TrainConfig(steps=5000, batch_size=128, lr=2e-3, warmup=200, ema_decay=0.999, seed=0, checkpoint_every_s=300),
    "noisy digit classifier p(y | x_t, t) for classifier guidance, on unet_mnist_eps's schedule",
)
RUNS = {"controlnet": CONTROLNET, "noisy_classifier": NOISY_CLASSIFIER}
ACCURACY_TIMESTEPS = (0, 250, 500, 750)  # the noise levels at which the classifier's card gives its accuracy
EDGE_SAMPLES, SAMPLE_STEPS = 100, 20  # the ControlNet's card: 100 DDIM-20 samples, one per held-out control
# TrainConfig's fields that only a denoiser's loss reads: left out of the classifier's card
CLASSIFIER_UNUSED = ("objective", "prediction_type", "min_snr_gamma", "time_sampling")


def checkpoint_path(run: Run) -> Path:
    return data_dir() / "training" / f"{run.name}.pt"


def as_shipped(state: dict) -> dict:
    """Weights rounded to the storage dtype and back, as a model loaded from data/ will hold them."""
    return {key: value.to(STORAGE_DTYPE).to(value.dtype) for key, value in state.items()}


def final_loss(losses: torch.Tensor) -> float | None:
    """The mean training loss of the last 100 steps (None before the first)."""
    return round(losses[-100:].mean().item(), 5) if len(losses) else None


def run_status(config: TrainConfig, step: int) -> str:
    return "finished" if step >= config.steps else f"interim: {step} of {config.steps} steps, continuing"


# --- the ControlNet ---------------------------------------------------------------------------------------------


def check_same_base(checkpoint: Path, state: dict, base: UNet) -> None:
    """Refuse a ControlNet checkpoint whose frozen base (`state`'s "base." entries, saved with it) is not `base`:
    the ControlNet learnt residuals for those weights, and its card will name the shipped base."""
    base_state = base.state_dict()
    saved = {key.removeprefix("base."): value for key, value in state.items() if key.startswith("base.")}
    if set(saved) != set(base_state):
        raise ValueError(
            f"{checkpoint} was trained on a base of another architecture: it holds {len(saved)} base tensors, the "
            f"base has {len(base_state)} (e.g. {sorted(set(saved) ^ set(base_state))[:3]})"
        )
    different = [key for key, value in base_state.items() if not torch.equal(saved[key], value.cpu())]
    if different:
        raise ValueError(
            f"{checkpoint} was trained on other weights of the base ({len(different)} of its {len(base_state)} "
            f"tensors differ, e.g. {different[0]}): the base model changed since; delete the checkpoint to train "
            "afresh on this base"
        )


def build_controlled(run: Run, base: UNet) -> ControlledUNet:
    """The frozen base with a fresh ControlNet, its hint encoder drawn from the run's seed (a resume loads the
    trained weights over all of it afterwards, so the copy of the base's way down is never copied again)."""
    torch.manual_seed(run.config.seed)
    return ControlledUNet(base, ControlNet(base, **run.model))


def train_controlnet(
    run: Run,
    base: UNet,
    schedule_options: dict,
    images: torch.Tensor,
    checkpoint: Path,
    budget_s: float | None = None,
    progress: bool = True,
) -> tuple[ControlledUNet, TrainState]:
    """Train (or resume) a ControlNet on `base` with control = edge_map of each of `images` (N, 1, 28, 28), for up
    to budget_s seconds, checkpointing to `checkpoint`. Returns the controlled model (its training weights; the
    EMA's are in the checkpoint) and where the run stands."""
    if checkpoint.exists():
        check_same_base(checkpoint, torch.load(checkpoint, map_location="cpu", weights_only=True)["model"], base)
    controlled = build_controlled(run, base)
    edges = edge_map(images)  # (N, 1, 28, 28): the control of each training digit
    schedule = make_schedule(**schedule_options)
    condition = lambda index, generator: edges[index]  # noqa: E731  (the minibatch's controls)
    state, _ = train(
        controlled, schedule, images, run.config, budget_s, checkpoint, progress=progress, condition=condition
    )
    return controlled, state


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """The mean of (n,) values and its standard error (NaN for n = 1), rounded to 4 digits."""
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return round(values.mean().item(), 4), round(se, 4)


@torch.no_grad()
def following(
    controlled: ControlledUNet, schedule_options: dict, controls: torch.Tensor, labels: torch.Tensor, steps: int
) -> dict:
    """How well DDIM samples follow their controls, the ControlNet's beside the base's from the same noise (seed 0):
    the boundary F1 of each sample's outline with its control (`edge_agreement`, exact and within 1 pixel; mean and
    standard error), how often the shipped digit classifier reads the sample as the digit the control was drawn
    from (`metrics.class_accuracy`; the base's is near chance, 0.1), and its confident fraction (still a digit)."""
    schedule, classifier = make_schedule(**schedule_options), load_digit_classifier("cpu")
    x_T = torch.randn(controls.shape, generator=torch.Generator().manual_seed(0))
    models = {"controlnet": controlled.bind(controls), "base": controlled.base}
    reading = {}
    for label, model in models.items():
        samples, _ = ddim_sample(model, schedule, x_T, steps, clip_x0=True)
        samples = samples.clamp(-1, 1)
        f1, f1_se = mean_and_se(edge_agreement(samples, controls))
        near, near_se = mean_and_se(edge_agreement(samples, controls, tolerance=1))
        reading[label] = {
            "edge_f1": f1,
            "edge_f1_se": f1_se,
            "edge_f1_within_1px": near,
            "edge_f1_within_1px_se": near_se,
            "class_accuracy": round(class_accuracy(classifier, samples, labels), 4),
            "confident_fraction": round(confident_fraction(classifier, samples), 4),
        }
    return {
        "how": f"DDIM-{steps} samples from the same noise, one per control: the outlines (control.edge_map) of the "
        f"first {len(controls)} held-out digits; edge_f1 = control.edge_agreement (tolerance 0, and 1 pixel), "
        "class_accuracy = the shipped digit classifier reads the sample as the control's digit",
        **reading,
    }


def export_controlnet(
    run: Run,
    base: UNet,
    base_name: str,
    schedule_options: dict,
    checkpoint: Path,
    controls: tuple[torch.Tensor, torch.Tensor],
    folder: Path | None = None,
    sample_steps: int = SAMPLE_STEPS,
) -> Path:
    """Write the checkpoint's EMA ControlNet (its weights only, float16) to FOLDER/NAME.safetensors with a card that
    names the base, and measure how its samples follow `controls`: (control images (B, 1, 28, 28), the labels of
    the digits they were drawn from (B,)). An unfinished run says so."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    check_same_base(checkpoint, payload["model"], base)
    config = TrainConfig(**payload["config"])
    controlled = build_controlled(run, base)
    controlled.load_state_dict(payload["ema"])
    controlled.controlnet.load_state_dict(as_shipped(controlled.controlnet.state_dict()))  # measured as shipped
    controlled.eval()
    step = payload["step"]
    card = {
        "base": base_name,
        "controlnet": run.model,
        "control": "course_lib.control.edge_map of the digit: +1 on its outline, -1 elsewhere (1 x 28 x 28)",
        "schedule": schedule_options,
        "prediction_type": "eps",
        "about": run.about,
        "parameters": controlnet_parameter_count(controlled.controlnet, base),
        "follows_control": following(controlled, schedule_options, *controls, sample_steps),
        "training": {
            **asdict(config),
            "steps_done": step,
            "images_seen": step * config.batch_size,
            "status": run_status(config, step),
            "trainable": f"the ControlNet only; the base {base_name} frozen",
            "data": "data/mnist5k.parquet, split train (4,000 digits), each with its edge_map as the control",
            "final_loss": final_loss(payload["losses"]),
            "wall_minutes": round(payload["seconds"] / 60, 1),
            "machine": describe_machine(),
            "command": "python scripts/train_control.py --model controlnet --budget-minutes N (resumed until done), "
            "then --export",
        },
        "weights": f"EMA weights of the ControlNet only, float16; the base is data/{base_name}.safetensors "
        "(course_lib.control.load_controlnet puts the two together)",
    }
    path = save_weights(controlled.controlnet, run.name, card, folder)
    print(f"exported {path} at step {step} ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
    return path


# --- the noisy classifier ---------------------------------------------------------------------------------------


def train_noisy_classifier(
    run: Run,
    schedule_options: dict,
    images: torch.Tensor,
    labels: torch.Tensor,
    checkpoint: Path,
    budget_s: float | None = None,
    progress: bool = True,
) -> tuple[NoisyDigitClassifier, TrainState]:
    """Train (or resume) the noisy classifier on `images` (N, 1, 28, 28) and `labels` (N,) for up to budget_s
    seconds: `course_lib.train.train`'s loop with `noisy_classifier_loss` in place of the denoising loss, and its
    checkpoints (the same file format, resume and refusals)."""
    config, schedule = run.config, make_schedule(**schedule_options)
    torch.manual_seed(config.seed)
    classifier = NoisyDigitClassifier(**run.model)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA(classifier, config.ema_decay) if config.ema_decay else None
    identity = {**run_identity(schedule, images), "labels": fingerprint(labels)}
    state = TrainState()
    if checkpoint.exists():
        state = load_checkpoint(checkpoint, classifier, optimizer, ema, generator, config, identity=identity)
    start = last_save = time.perf_counter()

    def save() -> None:
        elapsed = time.perf_counter() - start
        save_checkpoint(checkpoint, classifier, optimizer, ema, generator, config, state, elapsed, identity=identity)

    classifier.train()
    bar = tqdm(total=config.steps, initial=state.step, disable=not progress, desc=run.name)
    try:
        while state.step < config.steps:
            # 1. a random minibatch of train digits and their labels
            index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
            # 2. the cross-entropy of the classifier's logits at x_t, t uniform, fresh noise
            loss = noisy_classifier_loss(classifier, schedule, images[index], labels[index], generator)
            # 3. the gradient at this step's learning rate (a non-finite value stops the run before anything is saved)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * warmup_cosine(state.step, config.steps, config.warmup)
            optimizer.zero_grad(set_to_none=True)
            check_finite("loss", loss, state.step, checkpoint)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(classifier.parameters(), config.grad_clip or math.inf)
            check_finite("gradient norm", grad_norm, state.step, checkpoint)
            # 4. one optimiser step, then the EMA
            optimizer.step()
            if ema is not None:
                ema.update(classifier)
            state.step += 1
            state.losses.append(loss.item())
            bar.update(1)
            # 5. checkpoint and stop on time
            if time.perf_counter() - last_save > config.checkpoint_every_s:
                save()
                last_save = time.perf_counter()
            if budget_s is not None and time.perf_counter() - start > budget_s:
                break
    except KeyboardInterrupt:
        save()
        print(f"interrupted at step {state.step}: saved {checkpoint}; the same call resumes from there")
        raise
    finally:
        bar.close()
        classifier.eval()
    save()
    state.seconds += time.perf_counter() - start
    return classifier, state


def export_noisy_classifier(
    run: Run,
    schedule_options: dict,
    checkpoint: Path,
    heldout: tuple[torch.Tensor, torch.Tensor],
    folder: Path | None = None,
) -> Path:
    """Write the checkpoint's EMA classifier (float16) to FOLDER/NAME.safetensors with a card holding its accuracy
    on `heldout` (images, labels) noised to each of ACCURACY_TIMESTEPS, measured here on the float16 weights."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = TrainConfig(**payload["config"])
    classifier = NoisyDigitClassifier(**run.model)
    classifier.load_state_dict(as_shipped(payload["ema"] if payload["ema"] is not None else payload["model"]))
    classifier.eval()
    schedule = make_schedule(**schedule_options)
    generator = torch.Generator().manual_seed(0)
    accuracy = noisy_class_accuracy(classifier, schedule, *heldout, ACCURACY_TIMESTEPS, generator)
    step = payload["step"]
    training = {key: value for key, value in asdict(config).items() if key not in CLASSIFIER_UNUSED}
    card = {
        "model": {"class": "course_lib.nets.classifier.NoisyDigitClassifier", **run.model},
        "noise_schedule": schedule_options,  # not "schedule": the classifier is no denoiser (weights.load_model)
        "about": run.about,
        "heldout_accuracy": {
            "by_t": {str(t): round(value, 4) for t, value in accuracy.items()},
            "n": len(heldout[1]),
            "chance": 1 / run.model["n_classes"],
            "how": "editing.noisy_class_accuracy on the held-out split, noise drawn with seed 0, float16 weights",
        },
        "training": {
            **training,
            "loss": "course_lib.editing.noisy_classifier_loss (cross-entropy at x_t, t uniform in 0..T-1)",
            "steps_done": step,
            "images_seen": step * config.batch_size,
            "status": run_status(config, step),
            "data": "data/mnist5k.parquet, split train (4,000 digits); held-out split used only for the accuracy",
            "final_loss": final_loss(payload["losses"]),
            "wall_minutes": round(payload["seconds"] / 60, 1),
            "machine": describe_machine(),
            "command": "python scripts/train_control.py --model noisy_classifier --budget-minutes N, then --export",
        },
        "weights": "EMA weights, float16; the accuracies above are those of the float16 weights",
    }
    path = save_weights(classifier, run.name, card, folder)
    readings = ", ".join(f"t={t}: {value:.1%}" for t, value in accuracy.items())
    print(f"exported {path} at step {step}; held-out accuracy {readings}", flush=True)
    return path


# --- where the runs stand, and the command line -----------------------------------------------------------------


def steps_done(run: Run, checkpoint: Path, folder: Path) -> tuple[int, float, str]:
    """(step, wall minutes, source) of a run: from its checkpoint, or, once exported and the checkpoint removed,
    from its card; (0, 0, "not started") without either."""
    if checkpoint.exists():
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
        return int(payload["step"]), payload["seconds"] / 60, f"checkpoint, loss {final_loss(payload['losses'])}"
    if (folder / f"{run.name}.json").exists():
        training = load_card(run.name, folder)["training"]
        return int(training["steps_done"]), float(training["wall_minutes"]), "exported"
    return 0, 0.0, "not started"


def status(runs: list[Run], folder: Path, checkpoints: dict[str, Path]) -> list[str]:
    """Where each run stands: a markdown table, printed and returned."""
    rows = ["| run | steps | wall min | from |", "|---|---:|---:|---|"]
    for run in runs:
        step, minutes, source = steps_done(run, checkpoints[run.name], folder)
        rows.append(f"| `{run.name}` | {step:,d} / {run.config.steps:,d} | {minutes:.1f} | {source} |")
    print("\n".join(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(RUNS), help="which run to train or export")
    parser.add_argument("--budget-minutes", type=float, default=0, help="wall-clock budget of this call (0: none)")
    parser.add_argument("--checkpoint", type=Path, help="default: data/training/NAME.pt")
    parser.add_argument("--export", action="store_true", help="export the checkpoint's EMA weights to data/")
    parser.add_argument("--status", action="store_true", help="print where each run stands; trains nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); default 1")
    args = parser.parse_args()
    if args.status:
        status(list(RUNS.values()), data_dir(), {run.name: checkpoint_path(run) for run in RUNS.values()})
        return
    if args.model is None:
        parser.error("name the run: --model controlnet or --model noisy_classifier (or ask for --status)")
    if args.budget_minutes < 0:
        parser.error(f"--budget-minutes must be >= 0 (0: train nothing, e.g. with --export); got {args.budget_minutes}")
    if args.budget_minutes == 0 and not args.export:
        parser.error("nothing to do: give --budget-minutes N to train, --export to export, or both")
    if args.threads:
        torch.set_num_threads(args.threads)
    stop_on_signals()
    run = RUNS[args.model]
    checkpoint = args.checkpoint or checkpoint_path(run)
    schedule_options = load_card(BASE)["schedule"]
    step, _, _ = steps_done(run, checkpoint, data_dir())
    if args.budget_minutes > 0 and step < run.config.steps:
        start = time.perf_counter()
        if run is CONTROLNET:
            _, state = train_controlnet(
                run, load_model(BASE), schedule_options, load_digits("train")[0], checkpoint, args.budget_minutes * 60
            )
        else:
            _, state = train_noisy_classifier(
                run, schedule_options, *load_digits("train"), checkpoint, args.budget_minutes * 60
            )
        recent = state.losses[-100:]
        print(
            f"{run.name}: step {state.step}/{run.config.steps}, loss (mean of the last 100) "
            f"{sum(recent) / max(1, len(recent)):.4f}, this call {time.perf_counter() - start:.0f} s, all sessions "
            f"{state.seconds / 60:.1f} min",
            flush=True,
        )
    elif args.budget_minutes > 0:
        print(f"{run.name}: finished ({step} of {run.config.steps} steps); nothing to train")
    if args.export:
        if not checkpoint.exists():
            raise SystemExit(f"{run.name}: no checkpoint at {checkpoint}, nothing to export")
        heldout = load_digits("heldout")
        if run is CONTROLNET:
            controls = edge_map(heldout[0][:EDGE_SAMPLES]), heldout[1][:EDGE_SAMPLES]  # class-balanced prefix
            export_controlnet(run, load_model(BASE), BASE, schedule_options, checkpoint, controls)
        else:
            export_noisy_classifier(run, schedule_options, checkpoint, heldout)
        step, _, _ = steps_done(run, checkpoint, data_dir())
        if step >= run.config.steps:
            print(f"{run.name} is finished: its checkpoint {checkpoint} can go (git rm), as other finished runs'")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:  # training has saved the checkpoint and said so
        raise SystemExit(f"stopped ({stop}); the same command resumes from the checkpoint") from None
