"""Samplers: DDIM (course_lib.samplers), DPM-Solver++(2M) and Euler with Karras sigmas (course_lib.solvers).

Parity: every step equals the matching diffusers scheduler's `step` on identical inputs, over whole runs of 10-20
steps (so that DPM-Solver's multistep history matters), and the timestep lists equal `scheduler.timesteps`.
diffusers computes from its own alpha_bar table, a float32 cumulative product; the course's tables are float32
roundings of float64 computations. Both round 1 - alpha_bar_0 ~ 1e-4 in the fourth digit, but diffusers derives
the VE noise levels from that (the Karras sigma_min, the fractional timesteps), where the course uses its float64
log-SNR: with its own table, diffusers' Karras sigmas differ from ours by 8e-5 relative and its timesteps by 5e-3.
So, as in tests/test_ddpm.py, diffusers gets the exact float64 table that the course's tables are rounded from,
and the tests compare the maths of the steps. `test_runs_with_diffusers_own_tables` shows that whole runs still
agree to 2e-6 without it.

Behaviour: DDIM with eta = 1 on every timestep is DDPM; inversion then sampling gives back the data; with the exact
denoiser of a Gaussian mixture, DDIM-50, DPM-Solver++-20 and Euler-30 reproduce the mixture's mode weights.
"""

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from course_lib.ddpm import ddpm_sample, ddpm_step, split_prediction
from course_lib.metrics import mode_proportions, wasserstein_1d
from course_lib.samplers import ddim_invert, ddim_sample, ddim_step, slerp, spaced_timesteps
from course_lib.schedules import linear_betas, make_schedule
from course_lib.solvers import (
    dpm_solver_first_order_step,
    dpm_solver_sample,
    dpm_solver_second_order_step,
    dpm_solver_timesteps,
    euler_karras_sample,
    euler_karras_step,
    karras_sigmas,
    linspace_sigmas,
    sigma_of_timestep,
    sigma_to_timestep,
)
from course_lib.toy import bimodal_1d

# diffusers turns tensors into numpy arrays in a way numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T = 1000
SCHEDULE = make_schedule("linear", T)
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) / 8**0.5


def fake_model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, smooth stand-in for a trained network: roughly the exact eps of N(0, I) data under the linear
    schedule (so that states stay of order one, as with a real model), plus a nonlinear part that changes with t.
    Takes integer or fractional t."""
    t = t.to(xt.dtype)[:, None]  # (B, 1)
    alpha_bar = torch.exp(-(1e-4 * t + 1e-5 * t**2))  # close to the linear schedule's
    return (1 - alpha_bar).sqrt() * xt + 0.2 * torch.tanh(xt @ _W.to(xt.dtype)) * torch.cos(t / 300)


def with_float64_table(scheduler):
    """The exact table (module docstring); set before `set_timesteps`, which reads it."""
    scheduler.alphas_cumprod = torch.cumprod(1 - linear_betas(T), 0)
    return scheduler


def noise_at_T(seed: int = 1) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))


# --- timestep lists --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_spaced_timesteps_equal_diffusers(spacing):
    for num_train, steps in [(1000, 1), (1000, 7), (1000, 10), (1000, 20), (1000, 48), (1000, 50), (1000, 61),
                             (1000, 333), (1000, 1000), (50, 12), (50, 29)]:  # fmt: skip
        scheduler = DDIMScheduler(num_train_timesteps=num_train, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        theirs = scheduler.timesteps.tolist()
        # for a few steps (61 of 1000, 29 of 50) diffusers' "trailing" overshoots to one more timestep, -1
        assert spaced_timesteps(num_train, steps, spacing) == theirs[:steps], (num_train, steps)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_timesteps_equal_diffusers(spacing):
    for steps in [1, 10, 15, 20, 48, 999]:
        scheduler = DPMSolverMultistepScheduler(timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        assert dpm_solver_timesteps(T, steps, spacing) == scheduler.timesteps.tolist(), steps


def test_karras_sigmas_and_fractional_timesteps_equal_diffusers():
    for steps in [2, 10, 30]:
        scheduler = with_float64_table(EulerDiscreteScheduler(use_karras_sigmas=True))
        scheduler.set_timesteps(steps)
        sigmas = karras_sigmas(SCHEDULE, steps)
        assert torch.allclose(sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
        # t near 999 is a float32 with steps of 6e-5
        assert (sigma_to_timestep(SCHEDULE, sigmas[:-1]).float() - scheduler.timesteps).abs().max() <= 2e-4
        assert torch.allclose(sigma_of_timestep(SCHEDULE, sigma_to_timestep(SCHEDULE, sigmas[:-1])), sigmas[:-1])


def test_capped_karras_sigmas_equal_diffusers_sigma_max():
    """sigma_max caps the top level as diffusers' EulerDiscreteScheduler(sigma_max=...) does (EDM's 80)."""
    scheduler = with_float64_table(EulerDiscreteScheduler(use_karras_sigmas=True, sigma_max=80.0))
    scheduler.set_timesteps(10)
    sigmas = karras_sigmas(SCHEDULE, 10, sigma_max=80.0)
    assert sigmas[0] == 80.0 and torch.allclose(sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    assert (sigma_to_timestep(SCHEDULE, sigmas[:-1]).float() - scheduler.timesteps).abs().max() <= 2e-4
    with pytest.raises(ValueError, match="sigma_max must exceed"):
        karras_sigmas(SCHEDULE, 10, sigma_max=0.001)


# --- DDIM -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_ddim_step_equals_diffusers(spacing, eta, prediction_type):
    """A 20-step run of DDIMScheduler.step, each of its steps repeated by ddim_step on the same inputs and noise.
    diffusers steps from t to t - T // steps whatever the spacing, so ddim_step is given that t_next here.
    Largest difference measured: 7e-6, x0-prediction from t = 50 to 0, where ddim_step uses 1 - alpha_bar_0 from the
    course's float32 table (see the module docstring) and diffusers from the float64 one."""
    scheduler = DDIMScheduler(
        clip_sample=False, timestep_spacing=spacing, prediction_type=DIFFUSERS_PREDICTION[prediction_type]
    )
    scheduler = with_float64_table(scheduler)
    scheduler.set_timesteps(20)
    x, noises = noise_at_T(), torch.Generator().manual_seed(2)
    for t in scheduler.timesteps.tolist():
        model_output, noise = fake_model(x, torch.full((4,), t)), torch.randn(4, 8, generator=noises)
        theirs = scheduler.step(model_output, t, x, eta=eta, variance_noise=noise)
        ours, x0_hat = ddim_step(SCHEDULE, model_output, t, max(t - T // 20, -1), x, noise, eta, prediction_type)
        assert (ours - theirs.prev_sample).abs().max() <= 1e-5, t
        assert torch.allclose(x0_hat, theirs.pred_original_sample, rtol=1e-5, atol=1e-5), t
        x = theirs.prev_sample


def test_ddim_step_with_clipping_equals_diffusers():
    scheduler = with_float64_table(DDIMScheduler(clip_sample=True))
    scheduler.set_timesteps(10)
    x = 3 * noise_at_T()
    for t in scheduler.timesteps.tolist():
        model_output = fake_model(x, torch.full((4,), t))
        theirs = scheduler.step(model_output, t, x).prev_sample
        ours, x0_hat = ddim_step(SCHEDULE, model_output, t, max(t - 100, -1), x, clip_x0=True)
        assert (ours - theirs).abs().max() <= 1e-5 and x0_hat.abs().max() <= 1, t
        x = theirs


def test_ddim_step_with_the_clipped_model_output_equals_diffusers():
    """use_clipped_model_output: the noise re-derived from the clipped x0_hat, as diffusers' option of that name."""
    scheduler = with_float64_table(DDIMScheduler(clip_sample=True))
    scheduler.set_timesteps(10)
    x, changed = 3 * noise_at_T(), False
    for t in scheduler.timesteps.tolist():
        model_output = fake_model(x, torch.full((4,), t))
        theirs = scheduler.step(model_output, t, x, use_clipped_model_output=True).prev_sample
        ours, _ = ddim_step(SCHEDULE, model_output, t, max(t - 100, -1), x, clip_x0=True, use_clipped_model_output=True)
        plain, _ = ddim_step(SCHEDULE, model_output, t, max(t - 100, -1), x, clip_x0=True)
        assert (ours - theirs).abs().max() <= 1e-5, t
        changed |= not torch.allclose(ours, plain)
        x = theirs
    assert changed  # the option did something on this run
    with pytest.raises(ValueError, match="set clip_x0"):
        ddim_step(SCHEDULE, model_output, 500, 400, x, use_clipped_model_output=True)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_sample_equals_a_diffusers_run(spacing, eta):
    """A whole run, noise drawn from the same generator in the same order. With "leading", and "trailing" when the
    steps divide T, diffusers' t - T // steps is the next listed timestep, so the whole runs agree."""
    scheduler = with_float64_table(DDIMScheduler(clip_sample=False, timestep_spacing=spacing))
    scheduler.set_timesteps(20)
    x, noises = noise_at_T(), torch.Generator().manual_seed(3)
    for t in scheduler.timesteps:
        model_output = fake_model(x, t.expand(4))
        x = scheduler.step(model_output, t, x, eta=eta, variance_noise=torch.randn(4, 8, generator=noises)).prev_sample
    ours, trajectory = ddim_sample(
        fake_model, SCHEDULE, noise_at_T(), 20, eta, torch.Generator().manual_seed(3), spacing=spacing, record_every=5
    )
    assert (ours - x).abs().max() <= 1e-5
    assert [t for t, _, _ in trajectory] == scheduler.timesteps.tolist()[4::5]


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_invert_equals_diffusers_inverse_scheduler(spacing):
    scheduler = with_float64_table(DDIMInverseScheduler(clip_sample=False, timestep_spacing=spacing))
    scheduler.set_timesteps(20)
    x = noise_at_T()
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t.expand(4)), t, x).prev_sample
    ours, _ = ddim_invert(fake_model, SCHEDULE, noise_at_T(), 20, spacing=spacing)
    assert (ours - x).abs().max() <= 1e-5


def test_ddim_with_eta_1_on_every_timestep_is_ddpm():
    """s^2 of eq. 16 is then the posterior variance: step by step, and for a whole run with the same noise.
    DDIM builds s^2 from the float32 alpha_bar table, where 1 - alpha_bar_t / alpha_bar_{t-1} = beta_t ~ 1e-4 has
    lost digits; DDPM's posterior variance was computed in float64. Each step differs by at most 6e-6 (at t ~ 10),
    and over 1000 steps the runs drift apart by about 2e-5."""
    for t in [999, 500, 1, 0]:
        inputs = torch.Generator().manual_seed(t)
        xt, model_output, noise = (torch.randn(4, 8, generator=inputs) for _ in range(3))
        ddim, _ = ddim_step(SCHEDULE, model_output, t, t - 1, xt, noise, eta=1.0)
        assert (ddim - ddpm_step(SCHEDULE, model_output, t, xt, noise)[0]).abs().max() <= 1e-5, t
    x_T = torch.randn(16, 8, generator=torch.Generator().manual_seed(4))
    ddim, _ = ddim_sample(fake_model, SCHEDULE, x_T, T, 1.0, torch.Generator().manual_seed(5), spacing="leading")
    ddpm, _ = ddpm_sample(fake_model, SCHEDULE, x_T, torch.Generator().manual_seed(5))
    assert (ddim - ddpm).abs().max() <= 5e-5


# --- DPM-Solver++(2M) and Euler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_dpm_solver_equals_diffusers(spacing, steps, prediction_type):
    """Each step of DPMSolverMultistepScheduler (dpmsolver++, order 2, its defaults) repeated on the same inputs,
    with the order chosen as dpm_solver_sample chooses it; then a whole run of dpm_solver_sample."""
    scheduler = DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing=spacing,
        prediction_type=DIFFUSERS_PREDICTION[prediction_type],
    )
    scheduler = with_float64_table(scheduler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.tolist()
    x, x0_hat_last = noise_at_T(), None
    for i, t in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < steps else -1
        model_output = fake_model(x, torch.full((4,), t))
        theirs = scheduler.step(model_output, t, x).prev_sample
        x0_hat, _ = split_prediction(SCHEDULE, x, t, model_output, prediction_type)
        if x0_hat_last is None or t_next == -1:
            ours = dpm_solver_first_order_step(SCHEDULE, x0_hat, x, t, t_next)
        else:
            ours = dpm_solver_second_order_step(SCHEDULE, x0_hat, x0_hat_last, x, t, timesteps[i - 1], t_next)
        assert (ours - theirs).abs().max() <= 1e-5, t
        x, x0_hat_last = theirs, x0_hat
    whole_run, _ = dpm_solver_sample(fake_model, SCHEDULE, noise_at_T(), steps, prediction_type, spacing)
    assert (whole_run - x).abs().max() <= 1e-5


def test_dpm_solver_with_clipping_equals_diffusers_thresholding():
    """clip_x0 is diffusers' `thresholding=True` with `sample_max_value=1.0`: its dynamic threshold s is clamped to
    [1, 1], so it clips x0_hat to [-1, 1]. diffusers' threshold wants image-shaped tensors: (4, 1, 1, 8) here. The
    clip must be active, or the test proves nothing."""

    def image_model(xt, t):
        return fake_model(xt.reshape(4, 8), t).reshape(xt.shape)

    scheduler = DPMSolverMultistepScheduler(thresholding=True, sample_max_value=1.0)
    scheduler = with_float64_table(scheduler)
    scheduler.set_timesteps(20)
    x_T = 3 * noise_at_T().reshape(4, 1, 1, 8)
    x, clipped_steps = x_T, 0
    for t in scheduler.timesteps:
        model_output = image_model(x, t.expand(4))
        clipped_steps += bool(split_prediction(SCHEDULE, x, t.item(), model_output, "eps")[0].abs().max() > 1)
        x = scheduler.step(model_output, t, x).prev_sample
    ours, _ = dpm_solver_sample(image_model, SCHEDULE, x_T, 20, clip_x0=True)
    assert clipped_steps >= 5
    assert (ours - x).abs().max() <= 1e-5


def test_euler_with_clipping_takes_the_slope_from_the_clipped_estimate():
    """diffusers' Euler has no clip; the course's takes dx/dsigma = (x - clip(D)) / sigma."""
    x, model_output = 5 * noise_at_T(), noise_at_T()
    x_next, x0_hat = euler_karras_step(model_output, x, 3.0, 2.0, clip_x0=True)
    expected_x0 = (x - 3.0 * model_output).clamp(-1, 1)
    assert torch.equal(x0_hat, expected_x0)
    assert torch.allclose(x_next, x - (x - expected_x0) / 3.0)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_euler_karras_equals_diffusers(prediction_type):
    """Each EulerDiscreteScheduler step (use_karras_sigmas=True) repeated on the same inputs; then a whole run of
    euler_karras_sample, whose model inputs (x_t, t) must equal `scale_model_input`'s output and `scheduler.timesteps`.
    The VE state starts at sigma_max ~ 157 times x_T, where float32 steps are 1e-5 apart, so the steps are compared
    relatively (measured: bitwise equal); the model inputs are on the course's scale, x_t = x / sqrt(1 + sigma^2)."""
    scheduler = EulerDiscreteScheduler(use_karras_sigmas=True, prediction_type=DIFFUSERS_PREDICTION[prediction_type])
    scheduler = with_float64_table(scheduler)
    scheduler.set_timesteps(15)
    seen_by_diffusers, seen_by_ours = [], []
    x = noise_at_T() * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, t)
        seen_by_diffusers.append((model_input, t.item()))
        model_output = fake_model(model_input, t.expand(4))
        theirs = scheduler.step(model_output, t, x)
        ours, x0_hat = euler_karras_step(model_output, x, scheduler.sigmas[i], scheduler.sigmas[i + 1], prediction_type)
        assert torch.allclose(ours, theirs.prev_sample, rtol=1e-6, atol=1e-5), t
        assert torch.allclose(x0_hat, theirs.pred_original_sample, rtol=1e-6, atol=1e-5), t
        x = theirs.prev_sample

    def recording_model(xt, t):
        seen_by_ours.append((xt, t[0].item()))
        return fake_model(xt, t)

    whole_run, _ = euler_karras_sample(recording_model, SCHEDULE, noise_at_T(), 15, prediction_type)
    assert (whole_run - x).abs().max() <= 1e-5
    for (ours_xt, ours_t), (their_xt, their_t) in zip(seen_by_ours, seen_by_diffusers, strict=True):
        assert (ours_xt - their_xt).abs().max() <= 1e-5 and abs(ours_t - their_t) <= 2e-4


def test_runs_with_diffusers_own_tables():
    """With diffusers' own float32 alpha_bar table, whole 20-step runs still agree (measured: 4e-7 for DDIM, 1.1e-6
    for DPM-Solver++, 1.7e-6 for Euler)."""
    ddim = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    dpm = DPMSolverMultistepScheduler()
    euler = EulerDiscreteScheduler(use_karras_sigmas=True)
    runs = {}
    for name, scheduler in [("ddim", ddim), ("dpm", dpm), ("euler", euler)]:
        scheduler.set_timesteps(20)
        x = noise_at_T() * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_output = fake_model(scheduler.scale_model_input(x, t), t.expand(4))
            x = scheduler.step(model_output, t, x).prev_sample
        runs[name] = x
    assert (ddim_sample(fake_model, SCHEDULE, noise_at_T(), 20)[0] - runs["ddim"]).abs().max() <= 1e-5
    assert (dpm_solver_sample(fake_model, SCHEDULE, noise_at_T(), 20)[0] - runs["dpm"]).abs().max() <= 1e-5
    assert (euler_karras_sample(fake_model, SCHEDULE, noise_at_T(), 20)[0] - runs["euler"]).abs().max() <= 1e-5


# --- with an exact model: inversion, and the mixture's proportions -------------------------------------------------


def exact_denoiser_at_any_t(mixture):
    """The mixture's exact E[eps | x_t] at integer or fractional t (for Euler), alpha_bar = 1 / (1 + sigma(t)^2)."""

    def model(xt, t):
        sigma = sigma_of_timestep(SCHEDULE, t)[:, None]  # (B, 1)
        return mixture.optimal_eps(xt, 1 / (1 + sigma**2))

    return model


def test_inversion_then_sampling_reconstructs_the_data():
    """Real data -> noise -> data with the exact denoiser. The error is first order in the step (it halves when the
    steps double). It is largest for the few points between the two modes (up to 0.8 with 50 steps): the sampling
    ODE pulls the noise apart there, towards one mode or the other, and so magnifies any error of the inversion."""
    mixture = bimodal_1d()
    x0 = mixture.sample(500, torch.Generator().manual_seed(6)).double()
    model = mixture.optimal_denoiser(SCHEDULE)
    errors = {}
    for steps in [50, 100]:
        x_T, trajectory = ddim_invert(model, SCHEDULE, x0, steps, record_every=steps // 5)
        assert 0.8 < x_T.std().item() < 1.2  # the data has become noise
        reconstruction, _ = ddim_sample(model, SCHEDULE, x_T, steps)
        errors[steps] = (reconstruction - x0).abs()[:, 0]  # (500,)
    assert [t for t, _, _ in trajectory] == [199, 399, 599, 799, 999]
    assert errors[50].median() <= 0.06 and errors[50].quantile(0.99) <= 0.15  # the data spread is about 1.7
    assert errors[100].median() <= 0.6 * errors[50].median()


def test_samplers_with_the_exact_denoiser_recover_the_mixture():
    """The mode weights, and the 1-Wasserstein distance to the mixture, measured at 0.049 (DDIM-50), 0.049
    (DPM-Solver++-20) and 0.085 (Euler-30) against a floor of 0.025 between two real samples; DDIM-10 gives 0.13
    and Euler-5 0.69."""
    mixture = bimodal_1d()
    x_T = torch.randn(2000, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = mixture.sample(20_000, torch.Generator().manual_seed(9))
    model = exact_denoiser_at_any_t(mixture)
    samples = {
        "DDIM-50": ddim_sample(model, SCHEDULE, x_T, 50)[0],
        "DPM-Solver++-20": dpm_solver_sample(model, SCHEDULE, x_T, 20)[0],
        "Euler-30": euler_karras_sample(model, SCHEDULE, x_T, 30)[0],
    }
    for name, x0 in samples.items():
        proportions = mode_proportions(x0, mixture.means)
        assert torch.allclose(proportions, mixture.weights, atol=0.03), (name, proportions)
        assert wasserstein_1d(x0, reference) <= 0.1, name


# --- slerp ----------------------------------------------------------------------------------------------------


def test_slerp_known_values():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-7)
    for weight in [0.25, 0.5, 1 / 3]:
        expected = torch.tensor([math.cos(weight * math.pi / 2), math.sin(weight * math.pi / 2)])
        assert torch.allclose(slerp(a, b, weight), expected, atol=1e-6)
        assert slerp(a, b, weight).norm().item() == pytest.approx(1.0, abs=1e-6)  # the arc keeps the norm
    assert torch.allclose(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: the straight line
    generator = torch.Generator().manual_seed(8)
    noise_a, noise_b = torch.randn(1, 1, 28, 28, generator=generator), torch.randn(1, 1, 28, 28, generator=generator)
    middle = slerp(noise_a, noise_b, 0.5)
    assert middle.shape == noise_a.shape and abs(middle.norm() / noise_a.norm() - 1) < 0.1
    assert ((noise_a + noise_b) / 2).norm() / noise_a.norm() < 0.8  # the straight line loses a third of the norm


# --- bad inputs -----------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    x = torch.zeros(2, 8)
    model = fake_model
    with pytest.raises(ValueError, match=r"steps must be an integer in 1..T \(T=1000\); got steps=0"):
        ddim_sample(model, SCHEDULE, x, 0)
    with pytest.raises(ValueError, match="got steps=1001"):
        spaced_timesteps(T, 1001)
    with pytest.raises(ValueError, match="got steps=2.5"):
        euler_karras_sample(model, SCHEDULE, x, 2.5)
    with pytest.raises(ValueError, match="got steps=0"):
        dpm_solver_sample(model, SCHEDULE, x, 0)
    with pytest.raises(ValueError, match="steps must be <= 999; got 1000"):
        dpm_solver_timesteps(T, 1000)
    with pytest.raises(ValueError, match="unknown spacing 'uniform'; valid: leading, trailing, linspace"):
        ddim_sample(model, SCHEDULE, x, 10, spacing="uniform")
    with pytest.raises(ValueError, match="unknown spacing 'uniform'"):
        dpm_solver_timesteps(T, 10, "uniform")
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\].*got eta=-0.5"):
        ddim_sample(model, SCHEDULE, x, 10, eta=-0.5)
    with pytest.raises(ValueError, match="eta=0.5 adds noise: pass `noise`"):
        ddim_step(SCHEDULE, x, 10, 5, x, eta=0.5)
    with pytest.raises(ValueError, match="shapes must match"):
        ddim_step(SCHEDULE, x, 10, 5, x, torch.zeros(2, 4), eta=0.5)
    with pytest.raises(ValueError, match="shapes must match"):
        ddim_step(SCHEDULE, torch.zeros(2, 4), 10, 5, x)
    with pytest.raises(ValueError, match="t=1000 is out of range"):
        ddim_step(SCHEDULE, x, 1000, 5, x)
    with pytest.raises(ValueError, match="x0-prediction gives no eps_hat at the clean data"):
        ddim_invert(model, SCHEDULE, x, 10, prediction_type="x0")
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon'"):
        dpm_solver_sample(model, SCHEDULE, x, 10, prediction_type="epsilon")
    with pytest.raises(ValueError, match="shapes must match"):
        dpm_solver_second_order_step(SCHEDULE, x, torch.zeros(2, 4), x, 500, 600, 400)
    with pytest.raises(ValueError, match="cannot end at the clean data"):
        dpm_solver_second_order_step(SCHEDULE, x, x, x, 50, 100, -1)
    with pytest.raises(ValueError, match="shapes must match"):
        euler_karras_step(torch.zeros(2, 4), x, 1.0, 0.5)
    with pytest.raises(ValueError, match="rho must be > 0; got rho=0"):
        karras_sigmas(SCHEDULE, 10, rho=0)
    with pytest.raises(ValueError, match="timestep t=1000.5 is outside"):
        sigma_of_timestep(SCHEDULE, torch.tensor([3.0, 1000.5]))
    with pytest.raises(ValueError, match="record_every must be >= 0; got -1"):
        euler_karras_sample(model, SCHEDULE, x, 10, record_every=-1)
    with pytest.raises(ValueError, match=r"weight must lie in \[0, 1\].*got weight=1.5"):
        slerp(x + 1, x - 1, 1.5)
    with pytest.raises(ValueError, match="got weight=nan"):
        slerp(x + 1, x - 1, float("nan"))
    with pytest.raises(ValueError, match="shapes must match"):
        slerp(x, torch.zeros(3, 8), 0.5)
    with pytest.raises(ValueError, match="opposite directions"):
        slerp(x + 1, x - 1, 0.5)
    with pytest.raises(ValueError, match="non-zero"):
        slerp(x, x + 1, 0.5)


def test_ddim_clip_range_clamps_x0_hat_to_plus_minus_r_and_rejects_a_bad_range():
    """clip_x0=r clamps x0_hat to [-r, r] (diffusers' clip_sample_range); True is r = 1."""
    schedule = make_schedule("cosine", 1000)
    generator = torch.Generator().manual_seed(0)
    xt, eps_hat = torch.randn(2, 4, 7, 7, generator=generator) * 3, torch.zeros(2, 4, 7, 7)
    _, x0_hat = ddim_step(schedule, eps_hat, 999, 979, xt, clip_x0=4.5)
    _, unclipped = ddim_step(schedule, eps_hat, 999, 979, xt)
    assert torch.equal(x0_hat, unclipped.clamp(-4.5, 4.5)) and unclipped.abs().max() > 4.5
    _, x0_one = ddim_step(schedule, eps_hat, 999, 979, xt, clip_x0=True)
    assert torch.equal(x0_one, unclipped.clamp(-1, 1))
    with pytest.raises(ValueError, match="-2"):
        ddim_step(schedule, eps_hat, 999, 979, xt, clip_x0=-2)


# --- integers of any kind, models that predict something else, NaN --------------------------------------------


def test_timesteps_and_steps_may_be_numpy_or_tensor_integers():
    x, model_output, noise = noise_at_T(), noise_at_T(2), noise_at_T(3)
    expected = ddim_step(SCHEDULE, model_output, 500, 450, x, noise, 0.5)
    for t, t_next in [(np.int64(500), np.int64(450)), (torch.tensor(500), torch.tensor(450)), (np.int32(500), 450)]:
        ours = ddim_step(SCHEDULE, model_output, t, t_next, x, noise, 0.5)
        assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
    assert torch.equal(
        ddim_step(SCHEDULE, model_output, 20, np.int64(-1), x)[0], ddim_step(SCHEDULE, model_output, 20, -1, x)[0]
    )
    with pytest.raises(TypeError, match=r"t must be one integer timestep in 0..999 \(T=1000\); got t=500.0"):
        ddim_step(SCHEDULE, model_output, 500.0, 450, x)
    assert spaced_timesteps(np.int64(T), torch.tensor(10)) == spaced_timesteps(T, 10)
    for sampler in (ddim_sample, dpm_solver_sample, euler_karras_sample):
        for steps in (np.int64(7), torch.tensor(7)):
            assert torch.equal(
                sampler(fake_model, SCHEDULE, noise_at_T(), steps)[0], sampler(fake_model, SCHEDULE, noise_at_T(), 7)[0]
            )


class VelocityModel(torch.nn.Module):
    """A model whose card said it predicts a flow's velocity, as `weights.load_model` marks it."""

    prediction_type = "velocity"

    def forward(self, xt, t):
        return fake_model(xt, t)


SAMPLE_FUNCTIONS = {
    "DDPM": lambda model, x, **options: ddpm_sample(model, SCHEDULE, x, torch.Generator().manual_seed(0), **options),
    "DDIM": lambda model, x, **options: ddim_sample(model, SCHEDULE, x, 10, **options),
    "DDIM inversion": lambda model, x, **options: ddim_invert(model, SCHEDULE, x, 10, **options),
    "DPM-Solver++(2M)": lambda model, x, **options: dpm_solver_sample(model, SCHEDULE, x, 10, **options),
    "Euler (Karras)": lambda model, x, **options: euler_karras_sample(model, SCHEDULE, x, 10, **options),
}


@pytest.mark.parametrize("name", SAMPLE_FUNCTIONS)
def test_every_sampler_refuses_a_model_that_predicts_something_else(name):
    run = SAMPLE_FUNCTIONS[name]
    with pytest.raises(ValueError, match="the model predicts 'velocity'.*read its output as 'eps'"):
        run(VelocityModel(), noise_at_T())
    v_model = VelocityModel()
    v_model.prediction_type = "v"
    with pytest.raises(ValueError, match="the model predicts 'v'.*read its output as 'x0'"):
        run(v_model, noise_at_T(), prediction_type="x0")
    run(v_model, noise_at_T(), prediction_type="v")  # what it declares: accepted


@pytest.mark.parametrize("name", SAMPLE_FUNCTIONS)
def test_every_sampler_says_where_the_first_nan_appeared(name):
    run, x = SAMPLE_FUNCTIONS[name], noise_at_T()
    start = "x0" if name == "DDIM inversion" else "x_T"
    with pytest.raises(ValueError, match=f"{start} holds 1 NaN or infinite values"):
        run(fake_model, torch.where(torch.arange(32).view(4, 8) == 5, float("nan"), x))
    calls = []

    def nan_at_the_third_call(xt, t):
        calls.append(t[0].item())
        output = fake_model(xt, t)
        return output * float("nan") if len(calls) == 3 else output

    with pytest.raises(FloatingPointError, match=r"the model output at .*step 3 of .* holds 32 NaN") as error:
        run(nan_at_the_third_call, x)
    shown = f"{calls[-1]:.2f}" if name == "Euler (Karras)" else str(calls[-1])
    assert f"t={shown}" in str(error.value)  # the timestep of the call that made it


def test_a_state_that_overflowed_is_told_from_a_model_that_made_nan():
    """An eps_hat of 3e38 is finite in float32, but x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar)
    overflows: the next state is infinite, and a model reading it outputs NaN (inf * 0)."""
    with pytest.raises(FloatingPointError, match=r"the state given to the model at t=\d+ \(DDIM step 2 of 10\)"):
        ddim_sample(lambda xt, t: xt * 0 + 3e38, SCHEDULE, noise_at_T(), 10)


# --- the diffusers configurations users meet ------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_steps_offset_and_set_alpha_to_one_false_equals_diffusers(eta):
    """Stable Diffusion's DDIM config: "leading" spacing, steps_offset=1, set_alpha_to_one=False (the last step ends
    at alpha_bar_0, not at the clean data). A whole 20-step run, noise drawn in the same order."""
    options = dict(clip_sample=False, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    scheduler = with_float64_table(DDIMScheduler(**options))
    scheduler.final_alpha_cumprod = scheduler.alphas_cumprod[0]  # the same table for the last step's target
    scheduler.set_timesteps(20)
    assert spaced_timesteps(T, 20, "leading", steps_offset=1) == scheduler.timesteps.tolist()
    x, noises = noise_at_T(), torch.Generator().manual_seed(3)
    for t in scheduler.timesteps:
        noise = torch.randn(4, 8, generator=noises)
        x = scheduler.step(fake_model(x, t.expand(4)), t, x, eta=eta, variance_noise=noise).prev_sample
    generator = torch.Generator().manual_seed(3)
    sd_options = dict(spacing="leading", steps_offset=1, set_alpha_to_one=False)
    ours, _ = ddim_sample(fake_model, SCHEDULE, noise_at_T(), 20, eta, generator, **sd_options)
    assert (ours - x).abs().max() <= 1e-5
    default, _ = ddim_sample(fake_model, SCHEDULE, noise_at_T(), 20, eta, torch.Generator().manual_seed(3))
    assert (default - x).abs().max() > 1e-3  # the options change the run
    with pytest.raises(ValueError, match="steps_offset=20 puts the first timestep at 1000, past T - 1 = 999"):
        spaced_timesteps(T, 50, "leading", steps_offset=20)
    with pytest.raises(ValueError, match="steps_offset=-1"):
        spaced_timesteps(T, 50, "leading", steps_offset=-1)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_dpm_solver_final_sigmas_type_and_lower_order_final_equal_diffusers(
    steps, final_sigmas_type, lower_order_final
):
    """diffusers' rule for the last step: first order into the clean data, or (with "sigma_min") when
    lower_order_final is set and there are fewer than 15 steps; second order otherwise."""
    options = dict(final_sigmas_type=final_sigmas_type, lower_order_final=lower_order_final)
    scheduler = with_float64_table(DPMSolverMultistepScheduler(**options))
    scheduler.set_timesteps(steps)
    x = noise_at_T()
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t.expand(4)), t, x).prev_sample
    ours, _ = dpm_solver_sample(fake_model, SCHEDULE, noise_at_T(), steps, **options)
    assert (ours - x).abs().max() <= 1e-5
    if final_sigmas_type == "sigma_min":  # the run ends at the noise level of t = 0, not at the clean data
        assert (ours - dpm_solver_sample(fake_model, SCHEDULE, noise_at_T(), steps)[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown final_sigmas_type 'sigma_max'; valid: zero, sigma_min"):
        dpm_solver_sample(fake_model, SCHEDULE, noise_at_T(), steps, final_sigmas_type="sigma_max")


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_plain_euler_equals_diffusers(prediction_type):
    """EulerDiscreteScheduler with its defaults (no Karras sigmas, "linspace" spacing): 15 steps put the timesteps
    between integers, where diffusers interpolates sigma linearly. The noise levels, the network's inputs and a
    whole run agree."""
    scheduler = with_float64_table(EulerDiscreteScheduler(prediction_type=DIFFUSERS_PREDICTION[prediction_type]))
    scheduler.set_timesteps(15)
    sigmas, timesteps = linspace_sigmas(SCHEDULE, 15)
    assert torch.allclose(sigmas.float(), scheduler.sigmas, rtol=1e-6, atol=0)
    assert torch.equal(timesteps, scheduler.timesteps) and timesteps[1] % 1 != 0  # fractional
    seen_by_diffusers, seen_by_ours = [], []
    x = noise_at_T() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        seen_by_diffusers.append((model_input, t.item()))
        x = scheduler.step(fake_model(model_input, t.expand(4)), t, x).prev_sample

    def recording_model(xt, t):
        seen_by_ours.append((xt, t[0].item()))
        return fake_model(xt, t)

    ours, _ = euler_karras_sample(
        recording_model, SCHEDULE, noise_at_T(), 15, prediction_type, sigma_spacing="linspace"
    )
    assert (ours - x).abs().max() <= 1e-5
    for (ours_xt, ours_t), (their_xt, their_t) in zip(seen_by_ours, seen_by_diffusers, strict=True):
        assert (ours_xt - their_xt).abs().max() <= 1e-5 and ours_t == their_t
    karras, _ = euler_karras_sample(fake_model, SCHEDULE, noise_at_T(), 15, prediction_type)
    assert (karras - ours).abs().max() > 1e-3  # other noise levels, another run
