"""course_lib.benchmark: the diffusers baseline, FLOP counts, throughput, the sampler family and saved results."""

import pytest
import torch

from course_lib.benchmark import (
    SAMPLERS,
    DiffusersUNet,
    draw_flow_samples,
    draw_samples,
    gflops_per_image,
    load_results,
    ms_per_call,
    parameter_count,
    run_sampler,
    save_results,
    training_images_per_second,
)
from course_lib.ddpm import ddpm_sample
from course_lib.samplers import ddim_sample
from course_lib.schedules import make_schedule
from course_lib.solvers import dpm_solver_sample, euler_sample

SCHEDULE = make_schedule("cosine", 1000)


class TinyDenoiser(torch.nn.Module):
    """One 3x3 conv that ignores t: enough to run every sampler and to count FLOPs by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(xt)


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


def test_training_throughput_is_positive_and_checks_its_arguments():
    assert training_images_per_second(TinyDenoiser(), batch_size=4, steps=2) > 0
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


def test_each_sampler_is_the_course_sampler_with_clipping():
    model, x_T = TinyDenoiser().eval(), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = {
        "DDIM": ddim_sample(model, SCHEDULE, x_T, 10, clip_x0=True)[0],
        "DPM-Solver++(2M)": dpm_solver_sample(model, SCHEDULE, x_T, 10, clip_x0=True)[0],
        "Euler (Karras)": euler_sample(model, SCHEDULE, x_T, 10, clip_x0=True)[0],
    }
    for sampler, x0 in expected.items():
        assert torch.equal(run_sampler(sampler, model, SCHEDULE, x_T, 10), x0), sampler
    ddpm = run_sampler("DDPM", model, SCHEDULE, x_T, 1000, torch.Generator().manual_seed(1))
    assert torch.equal(ddpm, ddpm_sample(model, SCHEDULE, x_T, torch.Generator().manual_seed(1), clip_x0=True)[0])
    assert set(SAMPLERS) == {*expected, "DDPM"}


def test_sampler_errors_name_the_bad_value():
    model, x_T = TinyDenoiser(), torch.randn(1, 1, 28, 28)
    with pytest.raises(ValueError, match="steps=50"):
        run_sampler("DDPM", model, SCHEDULE, x_T, 50)
    with pytest.raises(ValueError, match="'PLMS'"):
        run_sampler("PLMS", model, SCHEDULE, x_T, 50)
    with pytest.raises(ValueError, match="n=0"):
        draw_samples(model, SCHEDULE, "DDIM", 10, n=0)


def test_draw_samples_in_batches_equals_one_batch():
    """x_T comes from one generator batch after batch, so batching changes nothing in a deterministic sampler but
    the rounding of batched convolutions."""
    model = TinyDenoiser().eval()
    one, seconds = draw_samples(model, SCHEDULE, "DDIM", 5, n=5, seed=3, batch_size=5)
    batched, _ = draw_samples(model, SCHEDULE, "DDIM", 5, n=5, seed=3, batch_size=2)
    x_T = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(one, batched, atol=1e-5)
    assert torch.equal(one, ddim_sample(model, SCHEDULE, x_T, 5, clip_x0=True)[0].clamp(-1, 1))
    assert seconds > 0 and one.abs().max() <= 1


def test_flow_samples_start_from_draw_samples_noise_and_take_the_solver_steps():
    """A point mass at 0.5 has the exact velocity (x_t - 0.5) / t: one Euler step from any noise lands on it. A zero
    velocity leaves x_T where it is, so the returned samples are the noise of draw_samples, clamped."""
    point = lambda xt, time_input: (xt - 0.5) / (time_input / 1000).view(-1, 1, 1, 1)  # noqa: E731
    landed, seconds = draw_flow_samples(point, "euler", 1, n=3, seed=2, batch_size=2)
    assert torch.allclose(landed, torch.full((3, 1, 28, 28), 0.5), atol=1e-6) and seconds > 0
    calls = []
    still = lambda xt, time_input: calls.append(len(xt)) or torch.zeros_like(xt)  # noqa: E731
    unmoved, _ = draw_flow_samples(still, "heun", 3, n=5, seed=3, batch_size=5)
    x_T = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    assert torch.equal(unmoved, x_T.clamp(-1, 1)) and len(calls) == 2 * 3 - 1  # Heun: the last step is Euler
    with pytest.raises(ValueError, match="'rk4'"):
        draw_flow_samples(still, "rk4", 3, n=1)


def test_latent_samples_are_not_clipped_and_go_through_the_decoder():
    """A latent model samples (4, 7, 7) without clipping x0_hat; the decoder's output is what gets returned."""
    zero_eps = lambda xt, t: torch.zeros_like(xt)  # noqa: E731  (x0_hat = x_T / sqrt(alpha_bar_T): huge)
    decoder = lambda z0: z0[:, :1].repeat_interleave(4, 2).repeat_interleave(4, 3)  # noqa: E731  (1, 28, 28)
    samples, _ = draw_samples(zero_eps, SCHEDULE, "DDIM", 5, n=3, seed=4, decoder=decoder, shape=(4, 7, 7))
    x_T = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(4))
    z0 = ddim_sample(zero_eps, SCHEDULE, x_T, 5, clip_x0=False)[0]
    assert z0.abs().max() > 1  # unclipped
    assert samples.shape == (3, 1, 28, 28) and torch.equal(samples, decoder(z0).clamp(-1, 1))


def test_results_round_trip_and_missing_results_say_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    save_results("example", {"n": 3, "runs": [{"fid": 1.5}]})
    assert load_results("example") == {"n": 3, "runs": [{"fid": 1.5}]}
    with pytest.raises(FileNotFoundError, match="missing.json is missing; rebuild it with: python scripts/bench.py"):
        load_results("missing")
    (tmp_path / "benchmarks" / "example.json").write_text('{"n": 4}')
    with pytest.raises(ValueError, match="example.json is damaged"):
        load_results("example")
