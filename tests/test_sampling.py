"""course_lib.sampling: the sampler family by name, batched and timed drawing, and the refusals every sampler
shares (a model that predicts something else, NaN in the noise or in a model output)."""

import numpy as np
import pytest
import torch
from tiny_models import TinyDenoiser

from course_lib.ddpm import ddpm_sample
from course_lib.samplers import ddim_sample
from course_lib.sampling import SAMPLERS, draw_flow_samples, draw_samples, run_sampler
from course_lib.schedules import make_schedule
from course_lib.solvers import dpm_solver_sample, euler_karras_sample

SCHEDULE = make_schedule("cosine", 1000)


def test_each_sampler_is_the_course_sampler_with_clipping():
    model, x_T = TinyDenoiser().eval(), torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = {
        "DDIM": ddim_sample(model, SCHEDULE, x_T, 10, clip_x0=True)[0],
        "DPM-Solver++(2M)": dpm_solver_sample(model, SCHEDULE, x_T, 10, clip_x0=True)[0],
        "Euler (Karras)": euler_karras_sample(model, SCHEDULE, x_T, 10, clip_x0=True)[0],
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


class Declares(TinyDenoiser):
    """TinyDenoiser with the `prediction_type` that `weights.load_model` sets from a model's card."""

    def __init__(self, prediction_type: str):
        super().__init__()
        self.prediction_type = prediction_type


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_velocity_model_is_refused_by_every_sampler_of_the_family(sampler):
    steps = SCHEDULE.T if sampler == "DDPM" else 10
    with pytest.raises(ValueError, match="the model predicts 'velocity'.*read its output as 'eps'"):
        run_sampler(sampler, Declares("velocity"), SCHEDULE, torch.randn(1, 1, 28, 28), steps)
    with pytest.raises(ValueError, match="the model predicts 'velocity'.*read its output as 'eps'"):
        draw_samples(Declares("velocity"), SCHEDULE, sampler, steps, n=1)


def test_a_declared_prediction_type_is_sampled_as_declared_and_survives_guidance():
    """A v-model sampled with prediction_type="v" is the sampler's own run; wrapped for guidance it is still a
    v-model, so the wrapper cannot smuggle it past the check; a flow sampler refuses an eps model."""
    from course_lib.guidance import Guided

    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    model = Declares("v").eval()
    ours = run_sampler("DDIM", model, SCHEDULE, x_T, 5, prediction_type="v")
    assert torch.equal(ours, ddim_sample(model, SCHEDULE, x_T, 5, prediction_type="v", clip_x0=True)[0])
    assert not torch.equal(ours, ddim_sample(TinyDenoiser().eval(), SCHEDULE, x_T, 5, clip_x0=True)[0])

    class Conditional(Declares):
        def forward(self, xt, t, cond):
            return self.conv(xt)

    guided = Guided(Conditional("velocity"), torch.tensor([1]), torch.tensor([0]), 3.0)
    with pytest.raises(ValueError, match="the model predicts 'velocity'"):
        draw_samples(guided, SCHEDULE, "DDIM", 5, n=1, use_clipped_model_output=True)
    with pytest.raises(ValueError, match="the model predicts 'eps'.*read its output as 'velocity'"):
        draw_flow_samples(Declares("eps"), "euler", 3, n=1)


def test_steps_may_be_numpy_or_tensor_integers():
    model = TinyDenoiser().eval()
    expected, _ = draw_samples(model, SCHEDULE, "DPM-Solver++(2M)", 4, n=2, seed=1)
    for steps in (np.int64(4), torch.tensor(4)):
        assert torch.equal(draw_samples(model, SCHEDULE, "DPM-Solver++(2M)", steps, n=2, seed=1)[0], expected)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_nan_from_the_model_is_reported_by_every_sampler_of_the_family(sampler):
    steps = SCHEDULE.T if sampler == "DDPM" else 10
    nan_model = lambda xt, t: torch.full_like(xt, float("nan"))  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"the model output at .*step 1 of"):
        draw_samples(nan_model, SCHEDULE, sampler, steps, n=1)
