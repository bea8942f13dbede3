"""Issue 15's flagship for scripts/bench.py: the shipped flow model (`unet_mnist_flow_logit`, the comparison's
leader trained on) against the course's digit-model targets, at n = 1,000 with spreads:

    python scripts/bench.py flagship --samples 1000 --threads 1

Every sampler runs on the cosine schedule's clock (`frame.as_vp_model`: the flow model read as an eps model), from
the same noise: DDIM-50 and -100, DPM-Solver++(2M)-20, Euler (Karras)-20 (from the schedule's sigma_max, and from
sigma_max 80 as chapter 5 advises) and DDPM-1000 (ancestral); and the eps model it could replace, `unet_mnist_eps`,
under DDIM-50 from the same noise, so that the two compare in one run. The targets: DDIM-50's FID <= 3x the
real-vs-real floor and >= 90% of its samples read with confidence; DDIM-50 within 1.25x of DDPM-1000's FID;
DPM-Solver++(2M)-20 within 1.2x of DDIM-100's; Euler (Karras)-20 within 1.2x of DPM-Solver++(2M)-20's (each
Euler run a row). A ratio is read beside the spreads of both FIDs.

DDPM-1000 makes a million network calls at n = 1,000 (about two hours on one CPU thread), so samples are drawn in
chunks of CHUNK, each from its own seed (the same chunks for every sampler), and every finished chunk is kept in
data/training/bench_flagship_chunks.pt (committed while unfinished, like a training checkpoint): a stopped run
resumes at the chunks it was drawing, in a later session too. The chunks of a model whose card changed are dropped;
the file is removed once every sampler is measured. The samples of the runs in STORED are kept (uint8) in
data/benchmarks/flagship_samples.safetensors: chapter 11 shows them, and they can be scored again without drawing.

`--workers W` draws chunks in W processes of one torch thread each (two one-thread processes on two cores outrun one
two-thread process: a batch of 50 at 28 x 28 is too small to split well); only the main process writes the file and
the results, so stopping it loses only the chunks in flight.
"""

import multiprocessing
import signal
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from course_lib.benchmark import card_digest, load_results, results_path, save_results
from course_lib.claims import clearly_below, fraction_sd, paired_fraction_gap
from course_lib.data import data_dir, record_sha256
from course_lib.frame import as_vp_model, denoiser
from course_lib.metrics import (
    classifier_features,
    classifier_probabilities,
    load_digit_classifier,
    paired_fid_gap,
    real_digits,
    sample_scores,
)
from course_lib.profiles import describe_machine
from course_lib.recipes import DIGIT_SCHEDULE
from course_lib.sampling import draw_samples
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model

NAME, BASE = "unet_mnist_flow_logit", "unet_mnist_eps"  # the flagship, and the eps model it could replace
CHUNK = 50  # samples per chunk: one batch; DDPM-1000 takes about 6 minutes a chunk on one thread


class Run(NamedTuple):
    model: str
    sampler: str
    steps: int
    sigma_max: float | None = None  # Euler (Karras)'s first level; None: the schedule's (2.0e4 for the cosine)

    @property
    def key(self) -> str:
        """'SAMPLER-STEPS' for the flagship (with ' (sigma_max S)' when capped), 'BASE SAMPLER-STEPS' for another."""
        key = f"{self.sampler}-{self.steps}" + (f" (sigma_max {self.sigma_max:g})" if self.sigma_max else "")
        return key if self.model == NAME else f"{self.model} {key}"


RUNS = [Run(NAME, "DDIM", 50), Run(NAME, "DDIM", 100), Run(NAME, "DPM-Solver++(2M)", 20)]  # quick ones first
RUNS += [Run(NAME, "Euler (Karras)", 20), Run(NAME, "Euler (Karras)", 20, 80.0), Run(BASE, "DDIM", 50)]
RUNS += [Run(NAME, "DDPM", 1000)]
# (the run's key, its reference's, the largest ratio of their FIDs)
RATIO_TARGETS = [
    ("DDIM-50", "DDPM-1000", 1.25),
    ("DPM-Solver++(2M)-20", "DDIM-100", 1.2),
    ("Euler (Karras)-20", "DPM-Solver++(2M)-20", 1.2),
    ("Euler (Karras)-20 (sigma_max 80)", "DPM-Solver++(2M)-20", 1.2),
]
FLOOR_TIMES, CONFIDENT = 3.0, 0.9  # DDIM-50's FID against the floor, and its confident fraction
STORED = ("DDIM-50", "unet_mnist_eps DDIM-50", "DDPM-1000")  # runs whose samples are kept (chapter 11 shows them)
PAIRS = [("DDIM-50", "unet_mnist_eps DDIM-50"), ("DDIM-50", "DDPM-1000")]  # compared sample for sample (same noise)


def chunks_path() -> Path:
    return data_dir() / "training" / "bench_flagship_chunks.pt"


def samples_path() -> Path:
    return data_dir() / "benchmarks" / "flagship_samples.safetensors"


def store_samples(key: str, samples: torch.Tensor) -> None:
    """Keep one run's samples (uint8, 0-255) beside the others in samples_path(), for grids and later scoring."""
    stored = load_file(samples_path()) if samples_path().exists() else {}
    stored[key] = ((samples + 1) * 127.5).round().to(torch.uint8)
    save_file(stored, samples_path())
    record_sha256(samples_path())


def load_models() -> tuple[dict[str, torch.nn.Module], object]:
    """{NAME: the flagship read as an eps model on the cosine schedule's clock, BASE: the eps model}, the schedule."""
    schedule = make_schedule(**DIGIT_SCHEDULE)
    flagship = as_vp_model(denoiser(load_model(NAME), clip=None), schedule)
    return {NAME: flagship, BASE: load_model(BASE)}, schedule


_WORKER: dict = {}  # each drawing process's models and schedule, loaded once by `_start_worker`


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["models"], _WORKER["schedule"] = load_models()


def draw_chunk(job: tuple[Run, int, int]) -> tuple[str, int, dict]:
    """One chunk of one run, (run, chunk index k, samples in it), from seed 1000 k."""
    run, k, size = job
    model = _WORKER["models"][run.model]
    samples, seconds = draw_samples(
        model, _WORKER["schedule"], run.sampler, run.steps, size, seed=1000 * k, sigma_max=run.sigma_max
    )
    return run.key, k, {"samples": ((samples + 1) * 127.5).round().to(torch.uint8), "seconds": seconds}


def missing_chunks(runs: list[Run], n: int, chunks: dict) -> list[tuple[Run, int, int]]:
    """The chunks still to draw, run after run in the order given (RUNS': the quick samplers' results first)."""
    count = -(-n // CHUNK)
    return [(run, k, min(CHUNK, n - k * CHUNK)) for run in runs for k in range(count) if str(k) not in chunks[run.key]]


def draw(
    runs: list[Run],
    n: int,
    chunks: dict,
    digest: str,
    workers: int,
    finished: Callable[[str, torch.Tensor, float], None],
) -> None:
    """Draw the runs' missing chunks (in `workers` processes when > 1) into `chunks` ({run_key: {"k": chunk}}),
    saving the chunks file after each one; call finished(key, samples, seconds) as soon as a run has all its chunks
    (at once for a run drawn before)."""
    count = -(-n // CHUNK)

    def complete(key: str) -> None:
        done = chunks[key]
        samples = torch.cat([done[str(k)]["samples"] for k in range(count)])[:n].float() / 127.5 - 1
        finished(key, samples, sum(done[str(k)]["seconds"] for k in range(count)))

    jobs = missing_chunks(runs, n, chunks)
    waiting = {run.key for run, _, _ in jobs}
    for run in runs:
        if run.key not in waiting:
            complete(run.key)
    if not jobs:
        return
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(1,))
        drawn = pool.imap_unordered(draw_chunk, jobs)
    else:
        _start_worker(torch.get_num_threads())
        drawn = map(draw_chunk, jobs)
    stop = lambda *_: sys.exit(f"stopped (SIGTERM); the same command resumes from {chunks_path()}")  # noqa: E731
    previous = signal.signal(signal.SIGTERM, stop)  # unwind, so that the pool's processes stop too
    try:
        for key, k, chunk in drawn:
            chunks.setdefault(key, {})[str(k)] = chunk
            torch.save({"card_sha256": digest, "chunks": chunks}, chunks_path())
            print(f"{key}: chunk {k + 1} of {count} ({chunk['seconds']:.0f} s)", flush=True)
            if len(chunks[key]) == count:
                complete(key)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            pool.terminate()  # stopped or done: no chunk is left drawing


def flagship(n: int, workers: int = 1) -> list[str]:
    if not (data_dir() / f"{NAME}.json").exists():
        return [f"`{NAME}` is not exported yet: train it (`python scripts/train_unet.py --recipe {NAME}`) first."]
    card, digest = load_card(NAME), card_digest(NAME)
    if card["training"]["status"] != "finished":  # hours of sampling: only for the model that ships
        return [f"`{NAME}` is exported but not finished ({card['training']['status']}): finish its training first."]
    saved = torch.load(chunks_path(), weights_only=True) if chunks_path().exists() else {}
    chunks = saved["chunks"] if saved.get("card_sha256") == digest else {}
    classifier = load_digit_classifier()
    old = load_results("flagship") if results_path("flagship").exists() else {}
    results = {"model": NAME, "card_sha256": digest, "n": n, "machine": describe_machine(), "date": str(date.today())}
    kept = old.get("runs", {}) if old.get("card_sha256") == digest and old.get("n") == n else {}
    for run in RUNS:  # runs measured before the table named their model
        kept.get(run.key, {}).setdefault("model", run.model)
    results["runs"] = kept
    began = time.perf_counter()

    def score(key: str, samples: torch.Tensor, seconds: float) -> None:
        run = next(run for run in RUNS if run.key == key)
        results["runs"][key] = {**run._asdict(), "seconds": seconds}
        results["runs"][key].update(sample_scores(classifier, samples))
        if key in STORED:
            store_samples(key, samples)
            results["paired"] = paired_gaps(classifier, n)
        save_results("flagship", results)
        print(f"{key}: FID {results['runs'][key]['fid']:.2f} ({time.perf_counter() - began:.0f} s in)", flush=True)

    results["paired"] = paired_gaps(classifier, n) if samples_path().exists() else []
    save_results("flagship", results)
    runs = [run for run in RUNS if run.key not in kept]
    draw(runs, n, {**chunks, **{run.key: chunks.get(run.key, {}) for run in runs}}, digest, workers, score)
    chunks_path().unlink(missing_ok=True)  # every sampler measured: the chunks are in the results now
    return report(results, card)


def paired_gaps(classifier, n: int, seed: int = 0) -> list[dict]:
    """For each of PAIRS whose samples are both stored (row i of both from the same noise): the FID gap against
    the held-out digits `sample_scores` used and the confident-fraction gap, each with its paired spread."""
    stored = {key: images.float() / 127.5 - 1 for key, images in load_file(samples_path()).items()}
    reference = classifier_features(classifier, real_digits(n, seed)[0])
    features = {key: classifier_features(classifier, images) for key, images in stored.items()}
    confident = {
        key: classifier_probabilities(classifier, images).max(dim=1).values >= 0.9 for key, images in stored.items()
    }
    gaps = []
    for a, b in (pair for pair in PAIRS if set(pair) <= set(stored)):
        fid_gap, fid_gap_sd = paired_fid_gap(features[a], features[b], reference, seed=seed)
        confident_gap, confident_gap_sd = paired_fraction_gap(confident[a], confident[b])
        gaps.append(
            {
                "a": a,
                "b": b,
                "fid_gap": fid_gap,
                "fid_gap_sd": fid_gap_sd,
                "confident_gap": confident_gap,
                "confident_gap_sd": confident_gap_sd,
            }
        )
    return gaps


def report(results: dict, card: dict) -> list[str]:
    runs, n = results["runs"], results["n"]
    training = card["training"]
    ddim50, base = runs["DDIM-50"], runs.get(Run(BASE, "DDIM", 50).key)
    rows = [
        f"| `{run.model}` | {run.sampler} | {run.steps} | {'schedule' if run.sigma_max is None else run.sigma_max} | "
        f"{measured['fid']:.2f} ± {measured['fid_sd']:.2f} | "
        f"{measured['confident_fraction']:.3f} ± {fraction_sd(measured['confident_fraction'], n):.3f} | "
        f"{1000 * measured['seconds'] / n:.0f} |"
        for run, measured in ((run, runs[run.key]) for run in RUNS if run.key in runs)
    ]
    floor, floor_sd = ddim50["fid_floor"], ddim50["fid_floor_sd"]
    confident, confident_sd = ddim50["confident_fraction"], fraction_sd(ddim50["confident_fraction"], n)
    lines = [
        f"Model `{NAME}` ({training['status']}; {training.get('images_seen_in_all', training['images_seen']):,d} "
        f"training images in all, the shipped eps model's 768,000 the goal) and `{BASE}` beside it, {n} samples per "
        f"sampler from the same noise, on the cosine schedule's clock (`frame.as_vp_model`); FID against {n} held-out "
        f"digits, floor {floor:.2f} ± {floor_sd:.2f}; a confident fraction's spread is its binomial sd. Also "
        "written to `data/benchmarks/flagship.json`.",
        "",
        "| model | sampler | steps | sigma_max | FID ± sd | confident (>= 0.9) ± sd | ms / image (one thread) |",
        "|---|---|---:|---|---:|---:|---:|",
        *rows,
        "",
        "| target | measured | met |",
        "|---|---:|---|",
        f"| DDIM-50 FID <= {FLOOR_TIMES:g}x the floor | {ddim50['fid'] / floor:.2f}x ({ddim50['fid']:.2f} ± "
        f"{ddim50['fid_sd']:.2f} against {FLOOR_TIMES:g} x ({floor:.2f} ± {floor_sd:.2f})) | "
        f"{'yes' if ddim50['fid'] <= FLOOR_TIMES * floor else '**no**'} |",
        f"| DDIM-50 confident >= {CONFIDENT:.0%} | {confident:.1%} ± {confident_sd:.1%} | "
        f"{'yes' if confident >= CONFIDENT else '**no**'} |",
    ]
    for key, reference_key, limit in RATIO_TARGETS:
        run, reference = runs.get(key), runs.get(reference_key)
        if run is None or reference is None:
            continue
        ratio = run["fid"] / reference["fid"]
        lines.append(
            f"| {key} FID <= {limit}x {reference_key}'s | {ratio:.2f}x ({run['fid']:.2f} ± "
            f"{run['fid_sd']:.2f} against {reference['fid']:.2f} ± {reference['fid_sd']:.2f}) | "
            f"{'yes' if ratio <= limit else '**no**'} |"
        )
    if base is not None:
        below = clearly_below(ddim50["fid"], ddim50["fid_sd"], base["fid"], base["fid_sd"])
        lines += [
            "",
            f"Against `{BASE}` under DDIM-50 from the same noise: FID {ddim50['fid']:.2f} ± {ddim50['fid_sd']:.2f} "
            f"against {base['fid']:.2f} ± {base['fid_sd']:.2f} ({'clearly below' if below else 'inside the spreads'}"
            f"), confident {confident:.1%} against {base['confident_fraction']:.1%}.",
        ]
    for pair in results.get("paired", []):
        fid_clear = clearly_below(pair["fid_gap"], pair["fid_gap_sd"], 0, 0) or clearly_below(
            0, 0, pair["fid_gap"], pair["fid_gap_sd"]
        )
        confident_clear = abs(pair["confident_gap"]) > 2 * pair["confident_gap_sd"]
        lines.append(
            f"- Paired, sample for sample ({pair['a']} minus {pair['b']}, the same noise and held-out digits in every "
            f"bootstrap draw): FID {pair['fid_gap']:+.2f} ± {pair['fid_gap_sd']:.2f} "
            f"({'beyond' if fid_clear else 'inside'} twice its spread), confident {pair['confident_gap']:+.1%} ± "
            f"{pair['confident_gap_sd']:.1%} ({'beyond' if confident_clear else 'inside'} twice its spread)."
        )
    return lines


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # --help prints the above and stops
    parser.error("this file holds a figure for scripts/bench.py: run `python scripts/bench.py flagship`")
