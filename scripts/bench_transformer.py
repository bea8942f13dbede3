"""Chapter 12's transformer study for scripts/bench.py: every finished run of `course_lib.recipes.TRANSFORMER_STUDY`
(three DiT widths and the latent UNet, each a class-conditional flow model on data/vae_mnist's latents, trained on
the same 256,000 latents), written into docs/benchmarks.md and data/benchmarks/transformer.json:

    python scripts/bench.py transformer --samples 300 --threads 1

For each finished run: parameters; GFLOPs of one network call and of one training example (forward and backward,
`benchmark.gflops_per_call`), and so the training compute; its training wall time; and n class-balanced samples
(labels 0-9 in turn) with the flow's Euler solver of STEPS steps, decoded by the VAE, at guidance scales 1 (the
conditional model) and GUIDED: FID ± spread against held-out digits, the fraction read as the asked-for digit, the
confident fraction, milliseconds per image (sampling and decoding). All runs start from the same noise. A run
measured before at the same n, with the same card, is kept: the runs finish one by one across sessions.
"""

import torch

from course_lib.benchmark import floor_note, gflops_per_call, measure_new_runs, parameter_count, waiting_lines
from course_lib.guidance import guided_flow_samples
from course_lib.metrics import class_accuracy, load_digit_classifier, sample_scores
from course_lib.nets.vae import latent_decoder
from course_lib.recipes import RECIPES, TRANSFORMER_STUDY
from course_lib.sampling import LATENT_SHAPE
from course_lib.weights import load_card, load_model

STEPS = 20  # Euler steps (SD3 samples with 28)
SCALES = (1.0, 2.0)  # conditional, and guided at chapter 7's best trade-off of accuracy and FID
GUIDED = SCALES[1]


def measure(name: str, n: int, classifier) -> dict:
    """One run's cost and its samples at every guidance scale, from the same noise and labels."""
    card, model = load_card(name), load_model(name)
    decoder = latent_decoder(load_model(card["latents"]["vae"]), card["latents"]["scaling_factor"])
    num_classes = card["model"]["num_classes"]
    labels, null = torch.arange(n) % num_classes, torch.tensor([num_classes])  # (n,) balanced; the "no label" label
    one_label = torch.tensor([0])
    training = card["training"]
    per_example = gflops_per_call(model, LATENT_SHAPE, one_label, backward=True)
    result = {
        "about": card["about"],
        "network": card["model"]["class"].rpartition(".")[2],
        "parameters": parameter_count(model),
        "gflops_per_call": gflops_per_call(model, LATENT_SHAPE, one_label, backward=False),
        "gflops_per_training_example": per_example,
        "training_tflops": per_example * training["images_seen"] / 1e3,
        "images_seen": training["images_seen"],
        "wall_minutes": training["wall_minutes"],
        "seconds_per_step": 60 * training["wall_minutes"] / training["steps_done"],
        "training_machine": training["machine"],
        "steps": STEPS,
        "runs": [],
    }
    for scale in SCALES:
        samples, seconds = guided_flow_samples(
            model, labels, null, scale, "euler", STEPS, shape=LATENT_SHAPE, decoder=decoder
        )
        scores = sample_scores(classifier, samples)
        accuracy = class_accuracy(classifier, samples, labels)
        result["runs"].append(
            {"scale": scale, "seconds": seconds, "ms_per_image": 1000 * seconds / n, "accuracy": accuracy, **scores}
        )
        print(f"{name}, w = {scale}: FID {scores['fid']:.2f} ± {scores['fid_sd']:.2f}, accuracy {accuracy:.3f}")
    return result


def at_scale(result: dict, scale: float) -> dict:
    return next(run for run in result["runs"] if run["scale"] == scale)


def transformer(n: int) -> list[str]:
    """Measure each finished run not yet measured (at this n, with this card), then write the table of all."""
    classifier = load_digit_classifier()
    measured = measure_new_runs("transformer", TRANSFORMER_STUDY, n, lambda name: measure(name, n, classifier))["runs"]
    rows = []
    for name in TRANSFORMER_STUDY:
        if name not in measured:
            continue
        result = measured[name]
        plain, guided = at_scale(result, 1.0), at_scale(result, GUIDED)
        rows.append(
            f"| `{name}` | {result['network']} | {result['parameters'] / 1e6:.2f} M | "
            f"{result['gflops_per_call']:.3f} | "
            f"{result['training_tflops']:.1f} | {result['wall_minutes']:.0f} | {plain['ms_per_image']:.1f} | "
            f"{plain['fid']:.2f} ± {plain['fid_sd']:.2f} | {guided['fid']:.2f} ± {guided['fid_sd']:.2f} | "
            f"{plain['accuracy']:.3f} / {guided['accuracy']:.3f} | {guided['confident_fraction']:.3f} |"
        )
    lines = [
        "Each finished run of chapter 12's study (class-conditional flow on `vae_mnist`'s latents, logit-normal t, "
        "2,000 steps of 128 latents each, seed 0): "
        f"{n} samples per guidance scale, labels 0-9 in turn, Euler with {STEPS} steps from the same noise, decoded "
        "by the VAE; FID against held-out digits with its bootstrap spread"
        + floor_note(measured)
        + "; accuracy: the fraction read as the asked-for digit. GFLOPs per call: one latent, forward; training "
        "TFLOPs: forward and backward of every training example (the optimizer left out). Wall minutes as trained, "
        "on a CPU shared with other jobs; ms / image (w = 1, sampling and decoding) measured in this run, also loaded. "
        "Every number is in `data/benchmarks/transformer.json`.",
        "",
        f"| run | network | parameters | GFLOPs / call | training TFLOPs | wall min | ms / image | FID, w = 1 | "
        f"FID, w = {GUIDED:g} | accuracy, w = 1 / {GUIDED:g} | confident, w = {GUIDED:g} |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return lines + waiting_lines({name: RECIPES[name].about for name in TRANSFORMER_STUDY}, measured)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # --help prints the above and stops
    parser.error("this file holds a figure for scripts/bench.py: run `python scripts/bench.py transformer`")
