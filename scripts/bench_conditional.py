"""The figures of chapter 7's conditional models for scripts/bench.py: `guidance` (the class model under
classifier-free guidance) and `captions` (does each word of a prompt do what it says). Run them through bench.py,
which writes them into docs/benchmarks.md:

    python scripts/bench.py guidance --samples 500 --threads 1
    python scripts/bench.py captions --samples 300 --threads 1
"""

from datetime import date

import torch

from course_lib.benchmark import save_results
from course_lib.captions import SLANT_CHOICES, caption, measure_thickness, word_agreement
from course_lib.data import load_digits
from course_lib.guidance import caption_samples, guided_samples
from course_lib.metrics import class_accuracy, class_spread, load_digit_classifier, sample_scores
from course_lib.profiles import describe_machine
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model

GUIDANCE_SCALES = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)


def guidance(n: int, steps: int = 20) -> list[str]:
    """Classifier-free guidance on the class-conditional model: per scale w, n samples (n / 10 of each digit, the
    same noise for every w), DDIM with chapter 7's cpu step count."""
    name = "unet_mnist_class"
    card, model, classifier = load_card(name), load_model(name), load_digit_classifier()
    schedule, null = make_schedule(**card["schedule"]), torch.tensor([card["model"]["num_classes"]])
    labels = torch.arange(n) % 10
    real_images, real_labels = load_digits("heldout")
    real_spread = class_spread(classifier, real_images[:n])  # grouped by the digit the classifier reads
    results = {"model": name, "model_status": card["training"]["status"], "machine": describe_machine()}
    results.update({"date": str(date.today()), "n": n, "steps": steps, "real_spread": real_spread, "runs": []})
    for scale in GUIDANCE_SCALES:
        samples, seconds = guided_samples(model, schedule, labels, null, scale, steps)
        scores = sample_scores(classifier, samples)
        accuracy, spread = class_accuracy(classifier, samples, labels), class_spread(classifier, samples)
        results["runs"].append({"scale": scale, "seconds": seconds, "accuracy": accuracy, "spread": spread, **scores})
        save_results("guidance", results)
        print(f"w = {scale}: accuracy {accuracy:.3f}, FID {scores['fid']:.2f}, {seconds:.0f} s", flush=True)
    rows = [
        f"| {run['scale']:g} | {run['accuracy']:.3f} | {run['fid']:.2f} ± {run['fid_sd']:.2f} | "
        f"{run['spread'] / real_spread:.2f} | "
        f"{run['confident_fraction']:.3f} | {1000 * run['seconds'] / n:.0f} |"
        for run in results["runs"]
    ]
    best = max(results["runs"], key=lambda run: run["accuracy"])
    return [
        f"Model `{name}` ({card['training']['status']}); {n} DDIM-{steps} samples per guidance scale w ({n // 10} of "
        f"each digit, the same noise for every w), x0_hat clipped to [-1, 1] and the noise re-derived from it; FID "
        f"against {n} held-out digits (floor {results['runs'][0]['fid_floor']:.2f} ± "
        f"{results['runs'][0]['fid_floor_sd']:.2f}); spread: the within-class spread of the classifier's features "
        f"(grouped by the digit it reads) over that of {n} held-out digits. Also written to "
        "`data/benchmarks/guidance.json` (chapter 7 plots it).",
        "",
        "| w | conditional accuracy | FID ± sd | spread / real | confident (>= 0.9) | ms / image |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- best conditional accuracy **{best['accuracy']:.3f}** at w = {best['scale']:g} (target >= 0.95).",
    ]


CAPTION_SCALE = 3.0  # the guidance scale of every caption prompt (chapter 7)


def captions(n: int, steps: int = 20) -> list[str]:
    """Every prompt set asks for each digit n / 10 times: "a seven", "a thick seven", "a seven leaning left", ...;
    the samples' digits are read by the classifier and their words measured (`captions.word_agreement`). The
    negative prompt "a thick" replaces the empty caption for plain digit prompts."""
    name = "unet_mnist_text"
    card, model, classifier = load_card(name), load_model(name), load_digit_classifier()
    schedule, digits = make_schedule(**card["schedule"]), torch.arange(n) % 10

    results = {"model": name, "model_status": card["training"]["status"], "machine": describe_machine()}
    results.update({"date": str(date.today()), "n": n, "steps": steps, "scale": CAPTION_SCALE, "prompts": []})
    asks = [{}, {"thickness": "thin"}, {"thickness": "thick"}, *({"slant": word} for word in SLANT_CHOICES)]
    for words, negative in [(ask, "") for ask in asks] + [({}, "a thick")]:
        samples = caption_samples(model, schedule, digits, words, negative, CAPTION_SCALE, steps)
        row = {"words": words, "negative": negative, "digit_accuracy": class_accuracy(classifier, samples, digits)}
        row["word_agreement"] = word_agreement(samples, **words) if words else None
        row["thickness"] = measure_thickness(samples).mean().item()
        results["prompts"].append(row)
        save_results("captions", results)
        print(f"{words} (negative {negative!r}): digit accuracy {row['digit_accuracy']:.3f}", flush=True)
    rows = []
    for row in results["prompts"]:
        prompt = caption(7, **row["words"]).replace("seven", "DIGIT")
        agreement = f"{row['word_agreement']:.3f}" if row["word_agreement"] is not None else "-"
        negative = f"`{row['negative']}`" if row["negative"] else ""
        rows.append(f"| `{prompt}` | {negative} | {row['digit_accuracy']:.3f} | {agreement} | {row['thickness']:.2f} |")
    return [
        f"Model `{name}` ({card['training']['status']}); per prompt {n} DDIM-{steps} samples ({n // 10} of each "
        f"digit), guidance scale {CAPTION_SCALE}; digit accuracy by the classifier, word agreement = the fraction of "
        "samples whose measured thickness / slant word is the one asked for (`course_lib.captions`). Also written "
        "to `data/benchmarks/captions.json`.",
        "",
        "| prompt | negative prompt | digit accuracy | word agreement | mean thickness |",
        "|---|---|---:|---:|---:|",
        *rows,
    ]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # --help prints the above and stops
    parser.error("this file holds figures for scripts/bench.py: run `python scripts/bench.py guidance` or `captions`")
