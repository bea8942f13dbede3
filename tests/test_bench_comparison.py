"""scripts/bench_comparison.py: runs are measured once per card and n, and the table shows each budget's best."""

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_comparison  # noqa: E402


def fake_result(name: str, n: int, fid_shift: float) -> dict:
    runs = []
    for budget in (*bench_comparison.CALLS, bench_comparison.REFERENCE_CALLS):
        for i, solver in enumerate(("euler", "heun", "dpmpp_2m")):
            fid = 10.0 / budget + i * 0.1 + fid_shift  # Euler best at every budget here
            runs.append(
                {
                    "solver": solver,
                    "budget": budget,
                    "calls": bench_comparison.calls_made(solver, budget),
                    "fid": fid,
                    "fid_sd": 0.5,
                    "fid_floor": 1.0,
                    "fid_floor_sd": 0.3,
                    "confident_fraction": 0.9,
                }
            )
    return {
        "card_sha256": f"card of {name}",
        "about": f"objective of {name}",
        "prediction_type": "eps",
        "images_seen": 256_000,
        "wall_minutes": 70.0,
        "training_machine": "test",
        "n": n,
        "runs": runs,
    }


def test_runs_are_measured_once_per_card_and_n(monkeypatch):
    stored, measured = {}, []
    monkeypatch.setattr(bench_comparison, "finished_runs", lambda: ["cmp_eps", "cmp_v"])
    monkeypatch.setattr(bench_comparison, "card_digest", lambda name: f"card of {name}")
    monkeypatch.setattr(bench_comparison, "load_digit_classifier", lambda: None)
    monkeypatch.setattr(bench_comparison, "results_path", lambda name: SimpleNamespace(exists=lambda: bool(stored)))
    monkeypatch.setattr(bench_comparison, "load_results", lambda name: stored["comparison"])
    monkeypatch.setattr(bench_comparison, "save_results", lambda name, results: stored.update({name: results}))

    def measure(name, n, classifier):
        measured.append((name, n))
        return fake_result(name, n, 0.0 if name == "cmp_eps" else 1.0)

    monkeypatch.setattr(bench_comparison, "measure", measure)
    lines = bench_comparison.comparison(300)
    assert measured == [("cmp_eps", 300), ("cmp_v", 300)]
    bench_comparison.comparison(300)
    assert len(measured) == 2  # both kept
    bench_comparison.comparison(500)
    assert len(measured) == 4  # another n: measured again
    row = next(line for line in lines if line.startswith("| `cmp_eps`"))
    assert "1.00 ± 0.50 (Euler, 10)" in row and "0.05 ± 0.50 (Euler, 199)" not in row
    assert "Not finished yet: `cmp_flow`" in "\n".join(lines)


def test_heun_makes_an_odd_number_of_calls_within_the_budget():
    assert [bench_comparison.calls_made("heun", b) for b in (10, 20, 50, 199)] == [9, 19, 49, 199]
    assert bench_comparison.calls_made("dpmpp_2m", 20) == 20
