"""scripts/bench_comparison.py and bench_transformer.py: runs are measured once per card and n
(`benchmark.measure_new_runs`), and each table shows what it says."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from course_lib import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_comparison  # noqa: E402
import bench_transformer  # noqa: E402


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
        "about": f"objective of {name}",
        "prediction_type": "eps",
        "images_seen": 256_000,
        "wall_minutes": 70.0,
        "training_machine": "test",
        "runs": runs,
    }


@pytest.fixture
def results_store(monkeypatch):
    """benchmark.measure_new_runs' files replaced by a dict; every run's card is "card of NAME"."""
    stored = {}
    monkeypatch.setattr(benchmark, "card_digest", lambda name: f"card of {name}")
    monkeypatch.setattr(benchmark, "results_path", lambda name: SimpleNamespace(exists=lambda: name in stored))
    monkeypatch.setattr(benchmark, "load_results", lambda name: stored[name])
    monkeypatch.setattr(benchmark, "save_results", lambda name, results: stored.update({name: results}))
    return stored


def test_runs_are_measured_once_per_card_and_n(monkeypatch, results_store):
    measured = []
    monkeypatch.setattr(benchmark, "finished_runs", lambda names: ["cmp_eps", "cmp_v"])
    monkeypatch.setattr(bench_comparison, "load_digit_classifier", lambda: None)

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


def test_a_changed_card_is_measured_again(monkeypatch, results_store):
    digests = {"dit_s": "first card"}
    monkeypatch.setattr(benchmark, "card_digest", lambda name: digests[name])
    monkeypatch.setattr(benchmark, "finished_runs", lambda names: ["dit_s"])
    measured = []
    measure = lambda name: measured.append(name) or {"value": len(measured)}  # noqa: E731
    assert benchmark.measure_new_runs("study", ["dit_s"], 10, measure)["runs"]["dit_s"]["value"] == 1
    benchmark.measure_new_runs("study", ["dit_s"], 10, measure)
    digests["dit_s"] = "a continued run's card"
    results = benchmark.measure_new_runs("study", ["dit_s"], 10, measure)
    assert measured == ["dit_s", "dit_s"] and results["runs"]["dit_s"]["card_sha256"] == "a continued run's card"


def fake_transformer_result(name: str, fid: float) -> dict:
    run = dict(fid_sd=0.5, fid_floor=1.0, fid_floor_sd=0.3, confident_fraction=0.9, ms_per_image=2.0)
    return {
        "about": f"about {name}",
        "network": "DiT" if name.startswith("dit") else "UNet",
        "parameters": 330_000,
        "gflops_per_call": 0.0123,
        "training_tflops": 4.56,
        "wall_minutes": 10.0,
        "runs": [
            {"scale": 1.0, "fid": fid, "accuracy": 0.8, **run},
            {"scale": bench_transformer.GUIDED, "fid": fid + 1, "accuracy": 0.95, **run},
        ],
    }


def test_the_transformer_table_shows_each_scale_of_each_finished_run(monkeypatch, results_store):
    monkeypatch.setattr(benchmark, "finished_runs", lambda names: ["latent_unet_flow_class", "dit_s"])
    monkeypatch.setattr(bench_transformer, "load_digit_classifier", lambda: None)
    monkeypatch.setattr(bench_transformer, "measure", lambda name, n, c: fake_transformer_result(name, 3.0))
    lines = bench_transformer.transformer(300)
    row = next(line for line in lines if line.startswith("| `dit_s`"))
    assert "| DiT | 0.33 M | 0.012 | 4.6 | 10 | 2.0 | 3.00 ± 0.50 | 4.00 ± 0.50 | 0.800 / 0.950 | 0.900 |" in row
    assert "(floor 1.00 ± 0.30)" in lines[0]
    assert "Not finished yet: `dit_m`" in lines[-1] and "`dit_l`" in lines[-1]


def test_the_flagship_bench_resumes_a_stopped_sampler_at_its_chunk(monkeypatch, tmp_path):
    import bench_flagship
    import torch

    calls = []

    def fake_draw(model, schedule, sampler, steps, n, seed, sigma_max):
        calls.append((sampler, seed))
        if len(calls) == 3 and stop_at_third:
            raise KeyboardInterrupt  # the session ends while the third chunk is drawn
        value = torch.linspace(-1, 1, 11)[seed // 1000 % 11]
        return torch.full((n, 1, 2, 2), value.item()), 1.0

    monkeypatch.setattr(bench_flagship, "draw_samples", fake_draw)
    monkeypatch.setattr(bench_flagship, "load_models", lambda names: (dict.fromkeys(names), None))
    path = tmp_path / "chunks.pt"
    runs = [bench_flagship.Run(bench_flagship.NAME, "DDIM", 50), bench_flagship.Run("base", "DDPM", 1000, beside=True)]
    n = 2 * bench_flagship.CHUNK + 7
    finished = {}

    def keep(key, samples, seconds):
        finished[key] = (samples, seconds)

    stop_at_third = True
    with pytest.raises(KeyboardInterrupt):
        bench_flagship.draw(runs, n, {"DDIM-50": {}, "base DDPM-1000": {}}, "card", 1, keep, path)
    saved = torch.load(tmp_path / "chunks.pt", weights_only=True)
    assert saved["card_sha256"] == "card" and sorted(saved["chunks"]["DDIM-50"]) == ["0", "1"]
    assert finished == {}  # no run has all its chunks yet
    stop_at_third, calls = False, []
    bench_flagship.draw(runs, n, saved["chunks"], "card", 1, keep, path)
    assert calls == [("DDIM", 2000), ("DDPM", 0), ("DDPM", 1000), ("DDPM", 2000)]  # only the missing chunks
    assert list(finished) == ["DDIM-50", "base DDPM-1000"] and finished["DDIM-50"][1] == 3.0
    everything = torch.load(tmp_path / "chunks.pt", weights_only=True)["chunks"]
    resumed = finished.pop("DDIM-50")[0]
    bench_flagship.draw(runs[:1], n, {"DDIM-50": {}}, "card", 1, keep, path)  # the same run, never stopped
    assert resumed.shape == (n, 1, 2, 2) and torch.allclose(resumed, finished["DDIM-50"][0], atol=1 / 127.5)
    calls, finished = [], {}
    bench_flagship.draw(runs, n, everything, "card", 1, keep, path)
    assert calls == [] and list(finished) == ["DDIM-50", "base DDPM-1000"]  # each scored from its stored chunks


def test_the_flagship_table_reads_each_target_with_its_spread_and_the_eps_model_beside_it():
    import bench_flagship

    def measured(fid, confident):
        return {
            "fid": fid,
            "fid_sd": 0.5,
            "fid_floor": 0.4,
            "fid_floor_sd": 0.3,
            "confident_fraction": confident,
            "seconds": 100.0,
        }

    runs = {run.key: measured(1.4, 0.87) for run in bench_flagship.stage_runs(*bench_flagship.STAGES["flagship"])}
    runs["DDPM-1000"], runs["unet_mnist_eps DDIM-50"] = measured(1.2, 0.9), measured(2.8, 0.85)
    runs["Euler (Karras)-20"] = measured(4.4, 0.75)
    card = {"training": {"status": "finished", "images_seen": 512_000, "images_seen_in_all": 768_000}}
    paired = [
        {
            "a": "DDIM-50",
            "b": "unet_mnist_eps DDIM-50",
            "fid_gap": -0.84,
            "fid_gap_sd": 0.3,
            "confident_gap": 0.021,
            "confident_gap_sd": 0.012,
        }
    ]
    lines = bench_flagship.report({"runs": runs, "n": 1000, "paired": paired}, card)
    text = "\n".join(lines)
    assert "| `unet_mnist_eps` | DDIM | 50 | schedule | 2.80 ± 0.50 | 0.850 ± 0.011 | 100 |" in text
    assert "| `unet_mnist_flow_logit` | Euler (Karras) | 20 | 80.0 | 1.40 ± 0.50 | 0.870 ± 0.011 | 100 |" in text
    assert (
        "| Euler (Karras)-20 FID <= 1.2x DPM-Solver++(2M)-20's | 3.14x (4.40 ± 0.50 against 1.40 ± 0.50) | **no**"
        in text
    )
    assert "| Euler (Karras)-20 (sigma_max 80) FID <= 1.2x DPM-Solver++(2M)-20's | 1.00x" in text
    assert "| DDIM-50 FID <= 3x the floor | 3.50x (1.40 ± 0.50 against 3 x (0.40 ± 0.30)) | **no** |" in text
    assert "| DDIM-50 confident >= 90% | 87.0% ± 1.1% | **no** |" in text
    assert "| DDIM-50 FID <= 1.25x DDPM-1000's | 1.17x (1.40 ± 0.50 against 1.20 ± 0.50) | yes |" in text
    assert "FID 1.40 ± 0.50 against 2.80 ± 0.50 (inside the spreads), confident 87.0% against 85.0%" in lines[-2]
    assert "FID -0.84 ± 0.30 (beyond twice its spread), confident +2.1% ± 1.2% (inside twice its spread)" in lines[-1]
    assert "| DDPM-1000 confident >= 90% | 90.0% ± 0.9% | yes |" in text  # the ancestral sampler is read too
    assert "| DDPM-1000 FID <= 3x the floor | 3.00x (1.20 ± 0.50 against 3 x (0.40 ± 0.30)) | yes |" in text
    assert "largest class" not in text  # no stored samples judged: no table of what the model keeps

    runs["DDPM-1000"]["histogram"] = [0.1] * 8 + [0.05, 0.15]
    runs["DDPM-1000"]["copies"] = {"n": 1000, "median": 9.95, "heldout_median": 10.05, "quantile": 0.05}
    runs["DDPM-1000"]["copies"]["near_share"] = 0.047
    text = "\n".join(bench_flagship.report({"runs": runs, "n": 1000, "paired": []}, card))
    assert "beside the held-out digits' 10.05; share nearer than the held-out digits' 5% quantile" in text
    assert "| DDPM-1000 | 15.0% | 5.0% | 9.95 | 4.7% ± 0.7% |" in text

    # the long run's figure: the flagship beside it, under its own key
    long_runs = {
        run.key: measured(1.2, 0.9) for run in bench_flagship.stage_runs(*bench_flagship.STAGES["flagship_long"])
    }
    assert "unet_mnist_flow_logit DDIM-50" in long_runs and "unet_mnist_eps DDIM-50" not in long_runs
    text = "\n".join(bench_flagship.report({"runs": long_runs, "n": 1000, "paired": []}, card, "flagship_long"))
    assert "Model `unet_mnist_flow_logit_long` (finished;" in text and "`data/benchmarks/flagship_long.json`" in text
    assert "| `unet_mnist_flow_logit` | DDIM | 50 | schedule | 1.20 ± 0.50 | 0.900 ± 0.009 | 100 |" in text


def test_best_solver_picks_the_lowest_fid_at_a_budget_and_names_a_missing_one():
    result = fake_result("cmp_eps", 300, 0.0)  # Euler is best at every budget here
    assert benchmark.best_solver(result, 20)["solver"] == "euler"
    assert benchmark.best_solver(result, 20)["budget"] == 20
    with pytest.raises(ValueError, match="no run at budget 7; measured: \\[10, 20, 50, 199\\]"):
        benchmark.best_solver(result, 7)


def test_the_flagship_bench_keeps_a_run_only_for_the_same_card_and_n_with_its_samples_stored():
    import bench_flagship

    old = {"card_sha256": "card", "n": 1000, "runs": {"DDIM-50": {"fid": 1.4}, "DDIM-100": {"fid": 1.6}}}
    assert bench_flagship.kept_runs(old, "card", 1000, ["DDIM-50"]) == {"DDIM-50": {"fid": 1.4}}  # DDIM-100 redrawn
    assert bench_flagship.kept_runs(old, "card", 1000, {"DDIM-50": 0, "DDIM-100": 0}) == old["runs"]
    assert bench_flagship.kept_runs(old, "other card", 1000, ["DDIM-50", "DDIM-100"]) == {}
    assert bench_flagship.kept_runs(old, "card", 300, ["DDIM-50", "DDIM-100"]) == {}
    assert bench_flagship.kept_runs({}, "card", 1000, ["DDIM-50"]) == {}


def test_every_flagship_ratio_target_is_also_read_sample_for_sample():
    import bench_flagship

    from course_lib.benchmark import FLAGSHIP_RATIO_TARGETS

    pairs = bench_flagship.pairs("base")
    assert pairs[0] == ("DDIM-50", "base DDIM-50")
    assert pairs[1:] == [(key, reference) for key, reference, _ in FLAGSHIP_RATIO_TARGETS]
    keys = {run.key for run in bench_flagship.stage_runs("model", "base")}
    assert {key for pair in pairs for key in pair} <= keys  # every pair's runs are drawn by the figure
