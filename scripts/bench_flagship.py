"""Issue 15's flagship for scripts/bench.py: the shipped flow model (`unet_mnist_flow_logit`, the comparison's
leader trained on) against the course's digit-model targets, at n = 1,000 with spreads:

    python scripts/bench.py flagship --samples 1000 --threads 1
    python scripts/bench.py flagship_long --samples 1000 --threads 1   the same for unet_mnist_flow_logit_long

Every sampler runs on the cosine schedule's clock (`frame.as_vp_model`: the flow model read as an eps model), from
the same noise: DDIM-50 and -100, DPM-Solver++(2M)-20, Euler (Karras)-20 (from the schedule's sigma_max, and from
sigma_max 80 as chapter 5 advises) and DDPM-1000 (ancestral); and the eps model it could replace, `unet_mnist_eps`,
under DDIM-50 from the same noise, so that the two compare in one run (`flagship_long`: the flagship trained on
past its 768,000-image goal, with the flagship beside it). The targets: FID <= 3x the real-vs-real floor and >= 90%
of samples read with confidence (each read for DDIM-50 and for DDPM-1000); DDIM-50 within 1.25x of DDPM-1000's FID;
DPM-Solver++(2M)-20 within 1.2x of DDIM-100's; Euler (Karras)-20 within 1.2x of DPM-Solver++(2M)-20's (each
Euler run a row). A ratio is read beside the spreads of both FIDs, and beside the paired gap between the two runs
(the same noise: a spread that knows the samples are paired). The targets themselves are in
`benchmark.flagship_targets`, which chapter 11 reads too.

DDPM-1000 makes a million network calls at n = 1,000 (about two hours on one CPU thread), so samples are drawn in
chunks of CHUNK, each from its own seed (the same chunks for every sampler), and every finished chunk is kept in
data/training/bench_FIGURE_chunks.pt (committed while unfinished, like a training checkpoint): a stopped run
resumes at the chunks it was drawing, in a later session too. The chunks of a model whose card changed are dropped;
the file is removed once every sampler is measured. Every run's samples are kept (uint8, 0.8 MB a run) in
data/benchmarks/FIGURE_samples.safetensors: chapter 11 shows them, and their class histograms, copy checks
(`metrics.copy_check`) and paired gaps are read from them (again at every call, without drawing); a run measured
before whose samples are not kept is drawn again (from the same seeds: the same samples).

`--workers W` draws chunks in W processes of one torch thread each (two one-thread processes on two cores outrun one
two-thread process: a batch of 50 at 28 x 28 is too small to split well); only the main process writes the file and
the results, so stopping it loses only the chunks in flight.
"""

import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file

from course_lib.benchmark import (
    FLAGSHIP_RATIO_TARGETS,
    card_digest,
    flagship_targets,
    load_results,
    results_path,
    save_results,
)
from course_lib.claims import clearly_below, fraction_sd, paired_fraction_gap
from course_lib.data import data_dir, record_sha256
from course_lib.frame import as_vp_model, denoiser
from course_lib.metrics import (
    class_histogram,
    classifier_features,
    confident_flags,
    copy_check,
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
LONG = "unet_mnist_flow_logit_long"  # the flagship trained on past the 768,000-image goal
# Each figure: (the model measured, the model drawn beside it from the same noise). flagship_long asks whether the
# extra images helped: the flagship at 768,000 beside it, sample for sample.
STAGES = {"flagship": (NAME, BASE), "flagship_long": (LONG, NAME)}
CHUNK = 50  # samples per chunk: one batch; DDPM-1000 takes about 6 minutes a chunk on one thread


class Run(NamedTuple):
    model: str
    sampler: str
    steps: int
    sigma_max: float | None = None  # Euler (Karras)'s first level; None: the schedule's (2.0e4 for the cosine)
    beside: bool = False  # the model drawn beside the measured one: its key names it

    @property
    def key(self) -> str:
        """'SAMPLER-STEPS' for the measured model (with ' (sigma_max S)' when capped), 'MODEL SAMPLER-STEPS' for
        the model beside it."""
        key = f"{self.sampler}-{self.steps}" + (f" (sigma_max {self.sigma_max:g})" if self.sigma_max else "")
        return f"{self.model} {key}" if self.beside else key


def stage_runs(model: str, beside: str) -> list[Run]:
    """The runs of one figure, quickest answers first: DDIM-50 and the model beside it under DDIM-50 (the paired
    comparison), the 20-step samplers, DDIM-100, and DDPM-1000 (a million network calls) last."""
    runs = [Run(model, "DDIM", 50), Run(beside, "DDIM", 50, beside=True), Run(model, "DPM-Solver++(2M)", 20)]
    runs += [Run(model, "Euler (Karras)", 20), Run(model, "Euler (Karras)", 20, 80.0), Run(model, "DDIM", 100)]
    return runs + [Run(model, "DDPM", 1000)]


def pairs(beside: str) -> list[tuple[str, str]]:
    """The runs compared sample for sample (drawn from the same noise): DDIM-50 against the model beside it, then
    each ratio target's run against its reference (`benchmark.FLAGSHIP_RATIO_TARGETS`), so that a target missed or
    met is read with the spread of the gap itself, not only of each FID."""
    beside_key = Run(beside, "DDIM", 50, beside=True).key
    return [("DDIM-50", beside_key), *((key, reference) for key, reference, _ in FLAGSHIP_RATIO_TARGETS)]


def chunks_path(figure: str = "flagship") -> Path:
    return data_dir() / "training" / f"bench_{figure}_chunks.pt"


def samples_path(figure: str = "flagship") -> Path:
    return data_dir() / "benchmarks" / f"{figure}_samples.safetensors"


def store_samples(path: Path, key: str, samples: torch.Tensor) -> None:
    """Keep one run's samples (uint8, 0-255) beside the others in `path`, for grids and later scoring."""
    stored = load_file(path) if path.exists() else {}
    stored[key] = ((samples + 1) * 127.5).round().to(torch.uint8)
    save_file(stored, path)
    record_sha256(path)


def load_models(names: tuple[str, ...]) -> tuple[dict[str, torch.nn.Module], object]:
    """{name: the model read as an eps model on the cosine schedule's clock}, the schedule: a flow model through
    `frame.as_vp_model`, the eps model as it is."""
    schedule = make_schedule(**DIGIT_SCHEDULE)
    models = {}
    for name in names:
        model = load_model(name)
        eps = load_card(name)["prediction_type"] == "eps"
        models[name] = model if eps else as_vp_model(denoiser(model, clip=None), schedule)
    return models, schedule


_WORKER: dict = {}  # each drawing process's models and schedule, loaded once by `_start_worker`


def _start_worker(threads: int, names: tuple[str, ...]) -> None:
    torch.set_num_threads(threads)
    _WORKER["models"], _WORKER["schedule"] = load_models(names)


def draw_chunk(job: tuple[Run, int, int]) -> tuple[str, int, dict]:
    """One chunk of one run, (run, chunk index k, samples in it), from seed 1000 k."""
    run, k, size = job
    model = _WORKER["models"][run.model]
    samples, seconds = draw_samples(
        model, _WORKER["schedule"], run.sampler, run.steps, size, seed=1000 * k, sigma_max=run.sigma_max
    )
    return run.key, k, {"samples": ((samples + 1) * 127.5).round().to(torch.uint8), "seconds": seconds}


def missing_chunks(runs: list[Run], n: int, chunks: dict) -> list[tuple[Run, int, int]]:
    """The chunks still to draw, run after run in the order given (stage_runs': the quickest answers first)."""
    count = -(-n // CHUNK)
    return [(run, k, min(CHUNK, n - k * CHUNK)) for run in runs for k in range(count) if str(k) not in chunks[run.key]]


def draw(
    runs: list[Run],
    n: int,
    chunks: dict,
    digest: str,
    workers: int,
    finished: Callable[[str, torch.Tensor, float], None],
    path: Path,
) -> None:
    """Draw the runs' missing chunks (in `workers` processes when > 1) into `chunks` ({run_key: {"k": chunk}}),
    saving them to `path` after each one; call finished(key, samples, seconds) as soon as a run has all its chunks
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
    pool, names = None, tuple(dict.fromkeys(run.model for run in runs))
    if workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_start_worker, initargs=(1, names))
        drawn = pool.imap_unordered(draw_chunk, jobs)
    else:
        _start_worker(torch.get_num_threads(), names)
        drawn = map(draw_chunk, jobs)
    stop = lambda *_: sys.exit(f"stopped (SIGTERM); the same command resumes from {path}")  # noqa: E731
    previous = signal.signal(signal.SIGTERM, stop)  # unwind, so that the pool's processes stop too
    try:
        for key, k, chunk in drawn:
            chunks.setdefault(key, {})[str(k)] = chunk
            torch.save({"card_sha256": digest, "chunks": chunks}, path)
            print(f"{key}: chunk {k + 1} of {count} ({chunk['seconds']:.0f} s)", flush=True)
            if len(chunks[key]) == count:
                complete(key)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if pool is not None:
            pool.terminate()  # stopped or done: no chunk is left drawing


def kept_runs(old: dict, digest: str, n: int, stored: Iterable[str]) -> dict[str, dict]:
    """Of a figure's saved results (`old`), the runs that need no drawing: measured for this card (its sha256,
    `digest`) at this n, and with their samples in `stored` (the keys of the samples file). Any other run is drawn
    again, from the same seeds."""
    if old.get("card_sha256") != digest or old.get("n") != n:
        return {}
    return {key: run for key, run in old.get("runs", {}).items() if key in stored}


def flagship(n: int, workers: int = 1, figure: str = "flagship") -> list[str]:
    """Measure one of STAGES (resuming its chunks), write data/benchmarks/FIGURE.json; the report's lines."""
    name, beside = STAGES[figure]
    if not (data_dir() / f"{name}.json").exists():
        return [f"`{name}` is not exported yet: train it (`python scripts/train_unet.py --recipe {name}`) first."]
    card, digest = load_card(name), card_digest(name)
    if card["training"]["status"] != "finished":  # hours of sampling: only for a finished model
        return [f"`{name}` is exported but not finished ({card['training']['status']}): finish its training first."]
    stage = stage_runs(name, beside)
    saved = torch.load(chunks_path(figure), weights_only=True) if chunks_path(figure).exists() else {}
    chunks = saved["chunks"] if saved.get("card_sha256") == digest else {}
    classifier = load_digit_classifier()
    old = load_results(figure) if results_path(figure).exists() else {}
    results = {"model": name, "card_sha256": digest, "n": n, "machine": describe_machine(), "date": str(date.today())}
    stored = load_file(samples_path(figure)) if samples_path(figure).exists() else {}
    kept = kept_runs(old, digest, n, stored)
    for run in stage:  # runs measured before the table named their model
        kept.get(run.key, {}).setdefault("model", run.model)
    results["runs"] = kept
    began = time.perf_counter()

    def score(key: str, samples: torch.Tensor, seconds: float) -> None:
        run = next(run for run in stage if run.key == key)
        results["runs"][key] = {**run._asdict(), "seconds": seconds}
        results["runs"][key].update(sample_scores(classifier, samples))
        store_samples(samples_path(figure), key, samples)  # every run's: the paired gaps and copy checks read them
        judge_stored(results, classifier, figure)
        results["runs"] = {run.key: results["runs"][run.key] for run in stage if run.key in results["runs"]}
        save_results(figure, results)  # the runs in the stage's order, however many sessions measured them
        print(f"{key}: FID {results['runs'][key]['fid']:.2f} ({time.perf_counter() - began:.0f} s in)", flush=True)

    judge_stored(results, classifier, figure)
    results["runs"] = {run.key: kept[run.key] for run in stage if run.key in kept}
    save_results(figure, results)
    runs = [run for run in stage if run.key not in kept]
    chunks = {**chunks, **{run.key: chunks.get(run.key, {}) for run in runs}}
    draw(runs, n, chunks, digest, workers, score, chunks_path(figure))
    chunks_path(figure).unlink(missing_ok=True)  # every sampler measured: the chunks are in the results now
    return report(results, card, figure)


def judge_stored(results: dict, classifier, figure: str, seed: int = 0) -> None:
    """From the stored samples (row i of every run from the same noise): each stored run's class histogram and copy
    check (`metrics.copy_check`: nearer to the training digits than new digits are?), and for each pair of
    `pairs` stored, the FID gap against the held-out digits `sample_scores` used and the confident-fraction gap,
    each with its paired spread. Written into `results` ("runs"[key]["histogram"], ["copies"]; "paired")."""
    path, beside = samples_path(figure), STAGES[figure][1]
    stored = {key: images.float() / 127.5 - 1 for key, images in load_file(path).items()} if path.exists() else {}
    for key, images in stored.items():
        if key in results["runs"]:
            results["runs"][key]["histogram"] = class_histogram(classifier, images).tolist()
            results["runs"][key]["copies"] = copy_check(images)
    reference = classifier_features(classifier, real_digits(results["n"], seed)[0])
    features = {key: classifier_features(classifier, images) for key, images in stored.items()}
    confident = {key: confident_flags(classifier, images) for key, images in stored.items()}
    results["paired"] = []
    for a, b in (pair for pair in pairs(beside) if set(pair) <= set(stored)):
        fid_gap, fid_gap_sd = paired_fid_gap(features[a], features[b], reference, seed=seed)
        confident_gap, confident_gap_sd = paired_fraction_gap(confident[a], confident[b])
        results["paired"].append(
            {
                "a": a,
                "b": b,
                "fid_gap": fid_gap,
                "fid_gap_sd": fid_gap_sd,
                "confident_gap": confident_gap,
                "confident_gap_sd": confident_gap_sd,
            }
        )


def report(results: dict, card: dict, figure: str = "flagship") -> list[str]:
    name, beside = STAGES[figure]
    runs, n = results["runs"], results["n"]
    training = card["training"]
    ddim50 = runs["DDIM-50"]
    rows = [
        f"| `{run.model}` | {run.sampler} | {run.steps} | {'schedule' if run.sigma_max is None else run.sigma_max} | "
        f"{measured['fid']:.2f} ± {measured['fid_sd']:.2f} | "
        f"{measured['confident_fraction']:.3f} ± {fraction_sd(measured['confident_fraction'], n):.3f} | "
        f"{1000 * measured['seconds'] / n:.0f} |"
        for run, measured in ((run, runs[run.key]) for run in stage_runs(name, beside) if run.key in runs)
    ]
    floor, floor_sd = ddim50["fid_floor"], ddim50["fid_floor_sd"]
    lines = [
        f"Model `{name}` ({training['status']}; {training['images_seen_in_all']:,d} "
        f"training images in all, the shipped eps model's 768,000 the goal) and `{beside}` beside it, {n} samples "
        f"per sampler from the same noise, on the cosine schedule's clock (`frame.as_vp_model`); FID against {n} "
        f"held-out digits, floor {floor:.2f} ± {floor_sd:.2f}; a confident fraction's spread is its binomial sd. "
        f"Also written to `data/benchmarks/{figure}.json`.",
        "",
        "| model | sampler | steps | sigma_max | FID ± sd | confident (>= 0.9) ± sd | ms / image (one thread) |",
        "|---|---|---:|---|---:|---:|---:|",
        *rows,
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    targets = flagship_targets(runs, n)
    lines += [f"| {target.goal} | {target.measured} | {'yes' if target.met else '**no**'} |" for target in targets]
    judged = [(key, run) for key, run in runs.items() if "copies" in run]
    if judged:
        lines += [
            "",
            "What the model must keep, read on the stored samples: every class (largest class share; 10% is "
            "balanced, the fine-tunes' bound is 15%), and no copies of its 4,000 training digits (median distance "
            "in pixels to the nearest training digit, beside the held-out digits' "
            f"{judged[0][1]['copies']['heldout_median']:.2f}; share nearer than the held-out digits' "
            f"{judged[0][1]['copies']['quantile']:.0%} quantile, about that share when nothing is copied):",
            "",
            "| run | largest class | smallest class | nearest training digit (median) | nearer than new digits ± sd |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {key} | {max(run['histogram']):.1%} | {min(run['histogram']):.1%} | "
                f"{run['copies']['median']:.2f} | {run['copies']['near_share']:.1%} ± "
                f"{fraction_sd(run['copies']['near_share'], run['copies']['n']):.1%} |"
                for key, run in judged
            ),
        ]
    base = runs.get(Run(beside, "DDIM", 50, beside=True).key)
    if base is not None:
        below = clearly_below(ddim50["fid"], ddim50["fid_sd"], base["fid"], base["fid_sd"])
        lines += [
            "",
            f"Against `{beside}` under DDIM-50 from the same noise: FID {ddim50['fid']:.2f} ± {ddim50['fid_sd']:.2f} "
            f"against {base['fid']:.2f} ± {base['fid_sd']:.2f} ({'clearly below' if below else 'inside the spreads'}"
            f"), confident {ddim50['confident_fraction']:.1%} against {base['confident_fraction']:.1%}.",
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
