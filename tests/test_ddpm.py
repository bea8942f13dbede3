"""DDPM maths: the posterior against Gaussian conditioning, the parameterisations, DDPMScheduler.step parity, and
the ancestral sampler driven by the exact optimal denoiser of a Gaussian mixture."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from course_lib.ddpm import (
    ddpm_sample,
    ddpm_step,
    eps_from_v,
    posterior,
    simple_loss,
    split_output,
    split_prediction,
    training_target,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from course_lib.forward import q_sample
from course_lib.metrics import mode_proportions
from course_lib.schedules import DIFFUSERS_BETA_SCHEDULE, cosine_betas, linear_betas, make_schedule
from course_lib.toy import bimodal_1d

DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def test_posterior_equals_gaussian_conditioning():
    """(x_{t-1}, x_t) given x0 is jointly Gaussian; conditioning it on x_t by the textbook formula gives the same
    mean and variance as Ho et al.'s eq. 7, at every t."""
    schedule = make_schedule("cosine", 300)
    t = torch.arange(300)
    x0, xt = torch.full((300,), 0.7, dtype=torch.float64), torch.linspace(-2, 2, 300, dtype=torch.float64)
    alpha = 1 - cosine_betas(300)  # the reference is built in float64 from the betas alone
    alpha_bar = torch.cumprod(alpha, 0)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    covariance = alpha.sqrt() * (1 - alpha_bar_prev)  # Cov(x_{t-1}, x_t | x0)
    mean = alpha_bar_prev.sqrt() * x0 + covariance / (1 - alpha_bar) * (xt - alpha_bar.sqrt() * x0)
    variance = (1 - alpha_bar_prev) - covariance**2 / (1 - alpha_bar)
    ours_mean, ours_variance = posterior(schedule, x0, xt, t)
    assert torch.allclose(ours_mean, mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours_variance, variance, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_parameterisations_round_trip(prediction_type):
    schedule = make_schedule("linear", 1000)
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(16, 2, generator=generator).double(), torch.randn(16, 2, generator=generator).double()
    t = torch.randint(0, 1000, (16,), generator=generator)
    xt = q_sample(schedule, x0, t, eps)
    target = training_target(schedule, x0, eps, t, prediction_type)
    x0_hat, eps_hat = split_prediction(schedule, xt, t, target, prediction_type)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_v_identities():
    schedule = make_schedule("cosine", 100)
    x0, eps, t = torch.randn(8, 3).double(), torch.randn(8, 3).double(), torch.arange(0, 80, 10)
    xt = q_sample(schedule, x0, t, eps)
    v = v_from_x0_eps(schedule, x0, eps, t)
    assert torch.allclose(x0_from_v(schedule, xt, t, v), x0, atol=1e-6)
    assert torch.allclose(eps_from_v(schedule, xt, t, v), eps, atol=1e-6)
    assert torch.allclose(x0_from_eps(schedule, xt, t, eps), x0, atol=1e-4)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip_x0", [False, True])
def test_step_equals_diffusers(variance_type, prediction_type, clip_x0):
    """Same alpha_bar table, model output, x_t and noise: our step and DDPMScheduler.step agree to 1e-5.

    diffusers recomputes beta_t as 1 - alpha_bar_t / alpha_bar_{t-1} from its float32 table, which loses about four
    digits at small t (beta_1 ~ 1e-4); so both get the same float64 alpha_bar table here, and the test compares the
    maths of the step. `test_step_with_diffusers_own_table` measures what that float32 rounding costs.
    """
    schedule = make_schedule("linear", 1000)
    scheduler = DDPMScheduler(
        variance_type=variance_type,
        prediction_type=DIFFUSERS_PREDICTION[prediction_type],
        clip_sample=clip_x0,
        beta_schedule=DIFFUSERS_BETA_SCHEDULE["linear"],
    )
    scheduler.alphas_cumprod = torch.cumprod(1 - linear_betas(1000), 0)
    for t in [999, 500, 37, 1, 0]:
        xt, model_output, noise = _step_inputs(t)
        theirs = scheduler.step(model_output, t, xt, generator=torch.Generator().manual_seed(123))
        ours, x0_hat = ddpm_step(schedule, model_output, t, xt, noise, prediction_type, variance_type, clip_x0)
        assert (ours - theirs.prev_sample).abs().max() <= 1e-5, f"t={t}"
        # x0_hat is xt / sqrt(alpha_bar_t) ~ 150 at t = 999: compare it to float32 precision, relatively
        assert torch.allclose(x0_hat, theirs.pred_original_sample, rtol=1e-5, atol=1e-5), f"t={t}"


def test_step_with_diffusers_own_table():
    """With diffusers' own float32 table the two steps still agree to 3e-4 at worst (at t = 1, see above)."""
    schedule, scheduler = make_schedule("linear", 1000), DDPMScheduler(clip_sample=False)
    for t in [999, 500, 37, 1, 0]:
        xt, model_output, noise = _step_inputs(t)
        theirs = scheduler.step(model_output, t, xt, generator=torch.Generator().manual_seed(123)).prev_sample
        assert (ddpm_step(schedule, model_output, t, xt, noise)[0] - theirs).abs().max() <= 3e-4, f"t={t}"


def _step_inputs(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t and a model output seeded by t, and the noise diffusers draws from a generator seeded with 123."""
    inputs = torch.Generator().manual_seed(t)
    xt, model_output = torch.randn(4, 1, 8, 8, generator=inputs), torch.randn(4, 1, 8, 8, generator=inputs)
    return xt, model_output, torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(123))


def test_step_rejects_bad_input():
    schedule = make_schedule("linear", 10)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown variance_type 'learned'"):
        ddpm_step(schedule, x, 5, x, x, variance_type="learned")
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon'"):
        ddpm_step(schedule, x, 5, x, x, prediction_type="epsilon")
    with pytest.raises(ValueError, match="t=10 is out of range"):
        ddpm_step(schedule, x, 10, x, x)
    with pytest.raises(ValueError, match="shapes must match"):
        ddpm_step(schedule, x, 5, x, torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"t must be one integer timestep in 0..9 \(T=10\); got t=5.0"):
        ddpm_step(schedule, x, 5.0, x, x)


def test_step_takes_t_as_any_integer():
    schedule, generator = make_schedule("cosine", 10), torch.Generator().manual_seed(0)
    xt, model_output, noise = (torch.randn(2, 3, generator=generator) for _ in range(3))
    for t in (0, 5):
        expected = ddpm_step(schedule, model_output, t, xt, noise)
        for same_t in (np.int64(t), np.int32(t), torch.tensor(t)):
            ours = ddpm_step(schedule, model_output, same_t, xt, noise)
            assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True)), same_t
    x_prev, x0_hat = ddpm_step(schedule, model_output, np.int64(0), xt, noise)
    assert torch.equal(x_prev, posterior(schedule, x0_hat, xt, 0)[0])  # t = 0 recognised: no noise added


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_one_set_of_converters_serves_the_course_state_and_the_ve_state(prediction_type):
    """split_output on EDM's variance-exploding state x = x_t / sqrt(alpha_bar) (signal 1, noise sigma) gives the
    x0_hat and eps_hat that split_prediction gives on the course's x_t, and for v it is diffusers' Euler formula."""
    schedule, generator = make_schedule("cosine", 1000), torch.Generator().manual_seed(3)
    xt, model_output = torch.randn(4, 6, generator=generator).double(), torch.randn(4, 6, generator=generator).double()
    for t in (0, 300, 900):
        alpha_bar = schedule.alpha_bar.double()[t]
        sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
        x0_vp, eps_vp = split_output(xt, model_output, prediction_type, alpha_bar.sqrt(), (1 - alpha_bar).sqrt())
        x0_ve, eps_ve = split_output(xt / alpha_bar.sqrt(), model_output, prediction_type, 1, sigma)
        assert torch.allclose(x0_ve, x0_vp, atol=1e-9) and torch.allclose(eps_ve, eps_vp, atol=1e-9), t
        if prediction_type == "v":
            x = xt / alpha_bar.sqrt()
            diffusers_x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
            assert torch.allclose(x0_ve, diffusers_x0, atol=1e-9)


def test_simple_loss_is_zero_for_the_true_noise():
    """A model that returns exactly the noise that was added (recovered from x_t and the known x0) has loss 0."""
    schedule = make_schedule("linear", 100)
    x0 = torch.randn(32, 2).double()

    def oracle(xt, t):
        alpha_bar_t = schedule.alpha_bar.double()[t][:, None]
        return (xt - alpha_bar_t.sqrt() * x0) / (1 - alpha_bar_t).sqrt()

    assert simple_loss(oracle, schedule, x0, torch.Generator().manual_seed(0)).item() < 1e-12


def test_ancestral_sampler_with_the_optimal_denoiser_recovers_the_mixture():
    """With the exact E[eps | x_t] of a Gaussian mixture, DDPM sampling reproduces the mixture's mode weights."""
    mixture, schedule = bimodal_1d(), make_schedule("linear", 1000)
    generator = torch.Generator().manual_seed(0)
    x_T = torch.randn(4000, 1, generator=generator, dtype=torch.float64)
    samples, trajectory = ddpm_sample(mixture.optimal_denoiser(schedule), schedule, x_T, generator, record_every=250)
    proportions = mode_proportions(samples, mixture.means)
    assert torch.allclose(proportions, mixture.weights, atol=0.03), proportions
    assert [t for t, _, _ in trajectory] == [750, 500, 250, 0]
