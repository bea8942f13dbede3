"""Teach the caption model a new concept from a few examples (chapter 14): textual inversion, DreamBooth, and
DreamBooth with LoRA, each judged by what it learnt and what it forgot.

    python scripts/train_concept.py --method textual_inversion --budget-minutes 30 --threads 1   train (resumes)
    python scripts/train_concept.py --method textual_inversion --export     data/concept_textual_inversion.*
    python scripts/train_concept.py --method textual_inversion --judge      sample, measure, write into the card
    python scripts/train_concept.py --report                                the judged methods side by side

(--method dreambooth and dreambooth_lora likewise; --budget-minutes, --export and --judge combine in one call.)

The concept: digits with a bar struck through them (`course_lib.styles.strike_bar`), which the shipped caption model
`unet_mnist_text` has never seen; --examples of them (10: one of each digit, picked by label), captioned "a <bar>
seven" with the new word "<bar>" (`course_lib.personalize`). DreamBooth's class images (PRIOR_IMAGES, "a seven" and
the others, drawn once by the frozen model before training) are kept in data/training/concept_prior.safetensors.
Training stops at the end of its budget and checkpoints to data/training/concept_METHOD.pt; the same command
continues it. --export writes the trained part (see `personalize.save_concept`), its card data/concept_METHOD.json
and their sha256 into data/SHA256SUMS. --judge draws --samples digits (n / 10 of each) from "a <bar> DIGIT" and from
the ordinary "a DIGIT", before and after, the same noise for all, DDIM-20 at guidance 3, and writes into the card:
how often the bar appears (`captions.barred_fraction`), digit accuracy, and what the model kept on ordinary prompts
(`metrics.kept_and_changed`: class histogram, largest class share, confident fraction, FID ± sd beside the base's),
with the samples in data/benchmarks/concept_METHOD_samples.safetensors for chapter 14's grids.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from course_lib.benchmark import save_results
from course_lib.captions import barred_fraction, measure_bar
from course_lib.data import data_dir, record_sha256
from course_lib.metrics import class_accuracy, kept_and_changed, load_digit_classifier
from course_lib.personalize import (
    BASE,
    LORA_ALPHA,
    LORA_RANK,
    LORA_TARGETS,
    METHODS,
    TOKEN,
    class_captions,
    concept_captions,
    concept_examples,
    load_concept,
    prepare,
    prompt_samples,
    save_concept,
    tokenize_concept,
    train_concept,
)
from course_lib.profiles import describe_machine
from course_lib.schedules import make_schedule
from course_lib.styles import balanced_digits, strike_bar
from course_lib.train import TrainConfig, stop_on_signals
from course_lib.weights import STORAGE_DTYPE, load_card, load_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from report import replace_section  # noqa: E402

TRAINING = ROOT / "data" / "training"
_settings = dict(warmup=100, grad_clip=1.0, ema_decay=None, min_snr_gamma=None, seed=0, checkpoint_every_s=300)
# Steps chosen so that each method trains in 10-25 minutes on one thread. Per-step times measured with --threads 1
# on the 2-core AMD EPYC while two other training jobs held both cores (so a free core is faster): textual inversion
# 0.27 s (16 examples; no weight gradients, but the backward still runs through the whole UNet), DreamBooth 0.45 s
# (8 examples + 8 class images), DreamBooth-LoRA 0.35 s (the same 16 images, only adapter gradients).
CONFIGS = {
    # one row of 64 numbers: a high rate (diffusers' example runs 5e-4 x batch 4 x accumulation 4 = 8e-3)
    "textual_inversion": TrainConfig(steps=3000, batch_size=16, lr=5e-3, **_settings),  # 3000 x 0.27 s = 13.5 min
    # every UNet weight: a rate 20x below the base model's 1e-3, as fine-tunes of all weights take lower rates
    "dreambooth": TrainConfig(steps=2000, batch_size=8, lr=5e-5, **_settings),  # 2000 x 0.45 s = 15 min
    "dreambooth_lora": TrainConfig(steps=2000, batch_size=8, lr=1e-3, **_settings),  # 2000 x 0.35 s = 11.7 min
}
PRIOR_WEIGHT = 1.0  # lambda of the prior-preservation loss (the paper's and diffusers' default)
PRIOR_IMAGES, PRIOR_SEED = 200, 1  # class images, 20 of each digit (about a minute to draw on one thread)
SCALE, SAMPLE_STEPS, JUDGE_SEED = 3.0, 20, 0  # chapter 7's guidance scale and DDIM steps for caption prompts


def paths(method: str) -> dict[str, Path]:
    return {
        "checkpoint": TRAINING / f"concept_{method}.pt",
        "weights": data_dir() / f"concept_{method}.safetensors",
        "card": data_dir() / f"concept_{method}.json",
        "samples": data_dir() / "benchmarks" / f"concept_{method}_samples.safetensors",
    }


def schedule():
    return make_schedule(**load_card(BASE)["schedule"])


def prior_images() -> tuple[torch.Tensor, torch.Tensor]:
    """DreamBooth's class images and their class captions: PRIOR_IMAGES digits the frozen base model draws for "a
    DIGIT" (guided, DDIM-20), made once and kept, so that a resumed run trains on the very same images."""
    path = TRAINING / "concept_prior.safetensors"
    digits = torch.arange(PRIOR_IMAGES) % 10
    if not path.exists():
        print(f"drawing {PRIOR_IMAGES} class images from {BASE} (once) ...", flush=True)
        images = prompt_samples(load_model(BASE), schedule(), digits, False, SCALE, SAMPLE_STEPS, PRIOR_SEED)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images, "digits": digits}, path, metadata={"seed": str(PRIOR_SEED), "base": BASE})
    stored = load_file(path)
    if not torch.equal(stored["digits"], digits):
        raise ValueError(f"{path} holds {len(stored['digits'])} class images, not {PRIOR_IMAGES}: delete it")
    return stored["images"], tokenize_concept(class_captions(digits))


def fresh_model(method: str) -> tuple[torch.nn.Module, int]:
    model = load_model(BASE)
    return model, prepare(model, method)


def train(method: str, examples: int, budget_s: float) -> None:
    model, trainable = fresh_model(method)
    x0, labels = concept_examples(examples)
    prior = prior_images() if method != "textual_inversion" else None
    config = CONFIGS[method]
    state = train_concept(
        model,
        schedule(),
        x0,
        tokenize_concept(concept_captions(labels)),
        config,
        prior,
        PRIOR_WEIGHT,
        budget_s=budget_s,
        checkpoint=paths(method)["checkpoint"],
    )
    recent = state.losses[-100:]
    print(
        f"{method}: step {state.step}/{config.steps}, {trainable:,d} parameters trained, loss (mean of the last "
        f"100) {sum(recent) / max(1, len(recent)):.4f}, all sessions {state.seconds / 60:.1f} min",
        flush=True,
    )


def export(method: str, examples: int) -> None:
    """The checkpoint's trained part to data/concept_METHOD.safetensors (+ _emb for DreamBooth-LoRA) and its card."""
    where = paths(method)
    if not where["checkpoint"].exists():
        raise SystemExit(f"{method}: no checkpoint at {where['checkpoint']}, nothing to export")
    payload = torch.load(where["checkpoint"], map_location="cpu", weights_only=True)
    model, trainable = fresh_model(method)
    model.load_state_dict(payload["model"])
    dtype = None if method == "textual_inversion" else STORAGE_DTYPE  # the embedding stays float32 (256 bytes)
    files = save_concept(model, method, where["weights"], dtype=dtype)
    config, step = CONFIGS[method], payload["step"]
    losses = payload["losses"]
    every = max(1, -(-len(losses) // 100))
    card = {
        "base": BASE,
        "method": method,
        "token": TOKEN,
        "files": [file.name for file in files],
        "file_bytes": sum(file.stat().st_size for file in files),
        "trainable_parameters": trainable,
        "trainable_share": round(trainable / sum(p.numel() for p in load_model(BASE).parameters()), 6),
        "training": {
            **asdict(config),
            "examples": f"{examples} train digits, picked by label (one of each digit per 10), barred",
            "captions": f"a {TOKEN} DIGIT",
            "steps_done": step,
            "status": "finished" if step >= config.steps else f"interim: {step} of {config.steps} steps",
            "wall_minutes": round(payload["seconds"] / 60, 1),
            "loss_curve": {
                "steps_per_point": every,
                "mean_loss": [round(c.mean().item(), 5) for c in losses.split(every)],
            },
            "machine": describe_machine(),
            "command": f"python scripts/train_concept.py --method {method} --budget-minutes N (resumed until done), "
            "then --export",
        },
    }
    card["token_init"] = (
        "the embedding of 'thick' (trained)" if method == "textual_inversion" else "a random vector (seed 0), frozen"
    )
    if method != "textual_inversion":
        card["training"]["prior"] = {"images": PRIOR_IMAGES, "weight": PRIOR_WEIGHT, "captions": "a DIGIT"}
    if method == "dreambooth_lora":
        card["lora"] = {"targets": LORA_TARGETS, "rank": LORA_RANK, "alpha": LORA_ALPHA}
    where["card"].write_text(json.dumps(card, indent=2) + "\n")
    for file in [*files, where["card"]]:
        record_sha256(file)
    print(f"exported {', '.join(file.name for file in files)} ({card['file_bytes']:,d} bytes) at step {step}")


def judge(method: str, n: int) -> None:
    """Sample before and after, measure, and write the numbers into the card (and the samples beside them)."""
    where = paths(method)
    card = load_card(f"concept_{method}")
    model = load_concept(load_model(BASE), method, where["weights"])
    base, classifier, digits = load_model(BASE), load_digit_classifier("cpu"), torch.arange(n) % 10
    options = dict(scale=SCALE, steps=SAMPLE_STEPS, seed=JUDGE_SEED)
    began = time.perf_counter()
    base_plain = prompt_samples(base, schedule(), digits, concept=False, **options)
    plain = prompt_samples(model, schedule(), digits, concept=False, **options)
    concept = prompt_samples(model, schedule(), digits, concept=True, **options)
    seconds = time.perf_counter() - began
    real, real_labels = balanced_digits(-(-n // 10), "heldout")
    real, real_labels = real[:n], real_labels[:n]
    card["judged"] = {
        "n": n,
        "sampling": f"DDIM-{SAMPLE_STEPS}, guidance {SCALE} against the empty caption, seed {JUDGE_SEED}, the same "
        "noise for every prompt and model",
        "concept_prompt": {  # "a <bar> DIGIT": how strongly the concept appears, and whether the digit stays
            "barred_fraction": barred_fraction(concept),
            "mean_bar_measure": measure_bar(concept).mean().item(),
            "digit_accuracy": class_accuracy(classifier, concept, digits),
            "kept": kept_and_changed(classifier, concept, base_plain, strike_bar),  # against barred real digits
        },
        "ordinary_prompt": {  # "a DIGIT": what the model forgot
            "barred_fraction_before": barred_fraction(base_plain),
            "barred_fraction_after": barred_fraction(plain),
            "digit_accuracy_before": class_accuracy(classifier, base_plain, digits),
            "digit_accuracy_after": class_accuracy(classifier, plain, digits),
            "identical_to_base": torch.equal(plain, base_plain),
            "kept": kept_and_changed(classifier, plain, base_plain),
        },
        "reference": {  # real held-out digits, n / 10 of each, plain and barred
            "plain_barred_fraction": barred_fraction(real),
            "barred_digit_accuracy": class_accuracy(classifier, strike_bar(real), real_labels),
            "plain_digit_accuracy": class_accuracy(classifier, real, real_labels),
        },
        "sampling_seconds": round(seconds, 1),
        "machine": describe_machine(),
    }
    where["card"].write_text(json.dumps(card, indent=2) + "\n")
    record_sha256(where["card"])
    where["samples"].parent.mkdir(parents=True, exist_ok=True)
    save_file({"base": base_plain.half(), "ordinary": plain.half(), "concept": concept.half()}, where["samples"])
    record_sha256(where["samples"])
    judged = card["judged"]
    print(
        f"{method}: barred {judged['concept_prompt']['barred_fraction']:.1%} of '{TOKEN}' samples; digit accuracy on "
        f"ordinary prompts {judged['ordinary_prompt']['digit_accuracy_before']:.3f} -> "
        f"{judged['ordinary_prompt']['digit_accuracy_after']:.3f}; FID / base "
        f"{judged['ordinary_prompt']['kept']['fid_ratio']:.2f}; sampled in {seconds:.0f} s",
        flush=True,
    )


def report() -> None:
    """The judged methods side by side: printed as a markdown table and kept in data/benchmarks/concept.json."""
    rows, results = [], {}
    for method in METHODS:
        if not paths(method)["card"].exists() or "judged" not in load_card(f"concept_{method}"):
            print(f"{method}: not judged yet (--export, then --judge)")
            continue
        card = load_card(f"concept_{method}")
        judged, training = card["judged"], card["training"]
        asked, ordinary = judged["concept_prompt"], judged["ordinary_prompt"]
        after, before = ordinary["kept"]["model"], ordinary["kept"]["base"]
        results[method] = {key: card[key] for key in ("trainable_parameters", "file_bytes", "training", "judged")}
        rows.append(
            f"| {method} | {card['trainable_parameters']:,d} | {card['file_bytes'] / 1e3:,.1f} | "
            f"{training['wall_minutes']} | {asked['barred_fraction']:.1%} | {asked['digit_accuracy']:.3f} | "
            f"{ordinary['digit_accuracy_before']:.3f} -> {ordinary['digit_accuracy_after']:.3f} | "
            f"{before['largest_class_share']:.1%} -> {after['largest_class_share']:.1%} | "
            f"{before['confident_fraction']:.1%} -> {after['confident_fraction']:.1%} | "
            f"{before['fid']:.2f} ± {before['fid_sd']:.2f} -> {after['fid']:.2f} ± {after['fid_sd']:.2f} | "
            f"{ordinary['barred_fraction_after']:.1%} |"
        )
    if not rows:
        raise SystemExit("no method has been judged yet")
    reference = next(iter(results.values()))["judged"]["reference"]
    lines = [
        f"| method | parameters trained | file kB | wall min | barred ('a {TOKEN} DIGIT') | digit accuracy (same) | "
        "digit accuracy, ordinary prompts | largest class | confident | FID ± sd | barred (ordinary prompts) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Ordinary prompts: before -> after, on the same noise. Real held-out digits: barred ones read as their digit "
        f"{reference['barred_digit_accuracy']:.1%} of the time (plain ones {reference['plain_digit_accuracy']:.1%}); "
        f"plain ones read as barred {reference['plain_barred_fraction']:.1%}.",
    ]
    print("\n".join(lines))
    save_results("concept", {"methods": results, "table": lines, "machine": describe_machine()})
    how = (
        "Each method trained on the ten barred train digits (one of each class) by `python scripts/train_concept.py "
        "--method METHOD --budget-minutes N`, then `--export --judge`: 300 samples per prompt set, 30 of each digit, "
        f"DDIM-{SAMPLE_STEPS} at guidance {SCALE:g}, the same noise before and after; FID of the ordinary prompts' "
        "samples against held-out digits with its bootstrap spread. Wall minutes from the cards, on one thread beside "
        "other jobs. This table: `python scripts/train_concept.py --report`."
    )
    replace_section(ROOT / "docs" / "benchmarks.md", "concept", ["### A new concept (chapter 14)", "", how, "", *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS)
    parser.add_argument("--budget-minutes", type=float, default=0, help="wall-clock budget of this call (0: none)")
    parser.add_argument("--examples", type=int, default=10, help="barred training digits (one of each digit per 10)")
    parser.add_argument("--export", action="store_true", help="write the trained part and its card to data/")
    parser.add_argument("--judge", action="store_true", help="sample, measure, and write the numbers into the card")
    parser.add_argument("--samples", type=int, default=300, help="digits per prompt set for --judge (n / 10 each)")
    parser.add_argument("--report", action="store_true", help="print the judged methods side by side")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.report:
        return report()
    if args.method is None:
        parser.error("give --method (textual_inversion, dreambooth or dreambooth_lora), or --report")
    if args.budget_minutes < 0:
        parser.error(f"--budget-minutes must be >= 0; got {args.budget_minutes}")
    if not (args.budget_minutes or args.export or args.judge):
        parser.error("nothing to do: give --budget-minutes N to train, --export, --judge, or several")
    if not 10 <= args.samples <= 1000:
        parser.error(f"--samples must lie in 10..1000 (FID compares with as many held-out digits); got {args.samples}")
    stop_on_signals()
    if args.budget_minutes:
        train(args.method, args.examples, args.budget_minutes * 60)
    if args.export:
        export(args.method, args.examples)
    if args.judge:
        judge(args.method, args.samples)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as stop:  # train_concept has saved the checkpoint and said so
        raise SystemExit(f"stopped ({stop}); the same command resumes from the checkpoint") from None
