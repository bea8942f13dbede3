"""course_lib.benchmark: the diffusers baseline, FLOP counts, throughput, the time of a call and saved results."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import TinyDenoiser

from course_lib import benchmark
from course_lib.benchmark import (
    DiffusersUNet,
    gflops_per_image,
    load_results,
    ms_per_call,
    parameter_count,
    save_results,
    training_images_per_second,
)


def test_diffusers_baseline_has_the_design_size():
    baseline = DiffusersUNet()
    assert 1.6e6 < parameter_count(baseline) < 1.8e6
    out = baseline(torch.randn(2, 1, 28, 28), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 28, 28)


def test_flops_of_one_conv_equal_the_formula():
    """A 3x3 conv from 1 to 1 channel at 28 x 28: 9 multiply-adds per pixel, 2 FLOPs each, forward; the backward
    pass computes the weight's gradient, as many FLOPs again (the input, a leaf, needs no gradient)."""
    forward = 2 * 9 * 28 * 28 / 1e9
    assert gflops_per_image(TinyDenoiser(), backward=False) == pytest.approx(forward)
    assert gflops_per_image(TinyDenoiser()) == pytest.approx(2 * forward)


def test_training_throughput_times_only_the_timed_steps_and_checks_its_arguments(monkeypatch):
    """Images per second = batch_size * steps / the time between the two clock readings, on a clock that advances
    0.25 s per reading: 4 * 3 / 0.25 = 48. Every step trains (forward, backward, AdamW) on a batch of batch_size,
    two untimed warm-up steps first, so a throughput that skipped the work or timed the warm-up would show here."""
    readings = iter(0.25 * k for k in range(100))
    monkeypatch.setattr(benchmark, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    model, batches = TinyDenoiser(), []
    model.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    before = model.conv.weight.detach().clone()
    assert training_images_per_second(model, batch_size=4, steps=3) == pytest.approx(48.0)
    assert batches == [4] * (2 + 3)  # two warm-up steps, then the three timed ones
    assert not torch.equal(model.conv.weight, before)  # the optimiser stepped
    assert next(readings) == 0.5  # the clock was read twice: once after the warm-up, once at the end
    with pytest.raises(ValueError, match="steps=0"):
        training_images_per_second(TinyDenoiser(), steps=0)


def test_ms_per_call_times_forward_calls_and_checks_its_arguments():
    calls = []
    model = TinyDenoiser()
    model.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    assert ms_per_call(model, (1, 28, 28), batch_size=3, repeats=2) > 0
    assert calls == [(3, 1, 28, 28)] * 3  # one warm-up, two timed
    with pytest.raises(ValueError, match="repeats=0"):
        ms_per_call(model, (1, 28, 28), repeats=0)


def test_results_round_trip_and_missing_results_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    save_results("example", {"n": 3, "runs": [{"fid": 1.5}]})
    assert load_results("example") == {"n": 3, "runs": [{"fid": 1.5}]}
    with pytest.raises(FileNotFoundError, match="missing.json is missing; rebuild it with: python scripts/bench.py"):
        load_results("missing")
    (tmp_path / "benchmarks" / "example.json").write_text('{"n": 4}')
    with pytest.raises(ValueError, match="example.json is damaged"):
        load_results("example")


def test_flagship_targets_judge_the_measured_values_and_leave_out_runs_not_measured():
    def measured(fid, confident):
        return {"fid": fid, "fid_sd": 0.5, "fid_floor": 0.4, "fid_floor_sd": 0.3, "confident_fraction": confident}

    runs = {"DDIM-50": measured(1.2, 0.9), "DPM-Solver++(2M)-20": measured(1.21, 0.88), "DDIM-100": measured(1.0, 0.9)}
    targets = benchmark.flagship_targets(runs, n=1000)
    assert [(target.goal, target.met) for target in targets] == [
        ("DDIM-50 FID <= 3x the floor", True),  # 1.2 = 3 x 0.4: on the line is met
        ("DDIM-50 confident >= 90%", True),
        ("DPM-Solver++(2M)-20 FID <= 1.2x DDIM-100's", False),  # 1.21x
    ]  # DDPM-1000 and the Euler runs are not measured: their targets wait
    assert targets[1].measured == "90.0% ± 0.9%"  # the spread beside the share
    assert targets[2].measured == "1.21x (1.21 ± 0.50 against 1.00 ± 0.50)"
    with pytest.raises(ValueError, match="n must be at least 1; got 0"):
        benchmark.flagship_targets(runs, n=0)
