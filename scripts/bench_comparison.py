"""Chapter 11's equal-budget comparison for scripts/bench.py: every finished run of `course_lib.recipes.COMPARISON`
sampled through one frame (`course_lib.frame`), written into docs/benchmarks.md and data/benchmarks/comparison.json:

    python scripts/bench.py comparison --samples 300 --threads 1

For each finished run: FID ± spread and confident fraction of Euler, Heun and DPM-Solver++(2M) at 10, 20 and 50
network calls (Heun makes 2N - 1 calls: the odd count at or below each budget), the best of the three at each
budget, and a many-step reference (Heun, REFERENCE_CALLS calls); all from the same noise, x0_hat clipped to
[-1, 1], on EDM's levels from sigma = 80 down to the model's lowest. A run already measured at the same n, with the
same card, is kept, not measured again: the runs finish one by one across sessions (about 25 minutes per run at
n = 300 on one thread).
"""

from course_lib.benchmark import best_solver, floor_note, measure_new_runs, waiting_lines
from course_lib.frame import ODE_SOLVERS, denoiser, solver_steps
from course_lib.metrics import load_digit_classifier, sample_scores
from course_lib.recipes import COMPARISON, RECIPES
from course_lib.sampling import draw_ode_samples
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model

CALLS = (10, 20, 50)
REFERENCE_CALLS = 199  # Heun on 100 levels
SOLVER_NAMES = {"euler": "Euler", "heun": "Heun", "dpmpp_2m": "DPM-Solver++(2M)"}


def calls_made(solver: str, budget: int) -> int:
    """The network calls a solver makes within a budget (Heun: 2N - 1 for N levels)."""
    steps = solver_steps(solver, budget)
    return 2 * steps - 1 if solver == "heun" else steps


def measure(name: str, n: int, classifier) -> dict:
    """One run's samples at every solver and budget, and its reference."""
    card = load_card(name)
    model = load_model(name)
    schedule = make_schedule(**card["schedule"]) if card["schedule"] else None
    d = denoiser(model, schedule=schedule)
    runs = []
    for budget in (*CALLS, REFERENCE_CALLS):
        for solver in ODE_SOLVERS if budget != REFERENCE_CALLS else ("heun",):
            samples, seconds = draw_ode_samples(d, solver, budget, n)
            scores = sample_scores(classifier, samples)
            runs.append({"solver": solver, "budget": budget, "calls": calls_made(solver, budget), "seconds": seconds})
            runs[-1].update(scores)
            print(f"{name}, {SOLVER_NAMES[solver]} {runs[-1]['calls']} calls: FID {scores['fid']:.2f}", flush=True)
    training = card["training"]
    return {
        "about": card["about"],
        "prediction_type": card["prediction_type"],
        "images_seen": training["images_seen"],
        "wall_minutes": training["wall_minutes"],
        "training_machine": training["machine"],
        "runs": runs,
    }


def comparison(n: int) -> list[str]:
    """Measure each finished run not yet measured (at this n, with this card), then write the table of all."""
    classifier = load_digit_classifier()
    measured = measure_new_runs("comparison", COMPARISON, n, lambda name: measure(name, n, classifier))["runs"]
    rows = []
    for name in COMPARISON:
        if name not in measured:
            continue
        result = measured[name]
        cells = []
        for budget in CALLS:
            run = best_solver(result, budget)
            cells.append(f"{run['fid']:.2f} ± {run['fid_sd']:.2f} ({SOLVER_NAMES[run['solver']]}, {run['calls']})")
        reference, at_20 = best_solver(result, REFERENCE_CALLS), best_solver(result, 20)
        cells.append(f"{reference['fid']:.2f} ± {reference['fid_sd']:.2f}")
        cells += [f"{at_20['confident_fraction']:.3f}", f"{result['images_seen']:,d}", f"{result['wall_minutes']:.0f}"]
        rows.append(f"| `{name}` | {result['about']} | {' | '.join(cells)} |")
    lines = [
        f"Each finished run of the comparison (same UNet, seed and 256,000 training images), sampled through "
        f"`course_lib.frame`: {n} samples per solver and budget from the same noise, x0_hat clipped to [-1, 1], EDM's "
        "levels from sigma = 80; FID against held-out digits with its bootstrap spread"
        + floor_note(measured)
        + "; each budget shows the best of Euler, Heun and DPM-Solver++(2M), with its calls; the reference is Heun "
        f"with {REFERENCE_CALLS} calls. Every solver's row is in `data/benchmarks/comparison.json`.",
        "",
        "| run | objective | FID, 10 calls | FID, 20 calls | FID, 50 calls | FID, reference | confident (20 calls) "
        "| training images | wall min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    return lines + waiting_lines({name: RECIPES[name].about for name in COMPARISON}, measured)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()  # --help prints the above and stops
    parser.error("this file holds a figure for scripts/bench.py: run `python scripts/bench.py comparison`")
