"""Flow matching and rectified flow (course_lib.flow).

Known values come from two data distributions whose exact velocity is closed form (`gaussian_velocity`):
a point mass at mu, whose ODE paths are straight (one Euler step is exact, the loss is zero, the straightness is
zero), and N(mu, s^2), whose ODE carries x1 to mu + s x1 along a curved path of straightness s (2 - pi / 2).
Parity: the Euler step, the time grid and whole Euler and Heun runs equal diffusers' FlowMatchEulerDiscreteScheduler
and FlowMatchHeunDiscreteScheduler on identical inputs (num_train_timesteps=1000, shift 1 and 3).
"""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from course_lib.flow import (
    TIME_SCALE,
    euler_flow_sample,
    euler_flow_step,
    flow_loss,
    heun_flow_sample,
    interpolate,
    reflow_loss,
    sample_times,
    shift_times,
    split_velocity,
    time_grid,
)
from course_lib.nets.mlp import MLPDenoiser
from course_lib.nets.unet import UNet
from course_lib.reflow import path_from_trajectory, reflow_pairs, straightness

# diffusers turns tensors into numpy arrays in a way numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

MU, S = 0.7, 0.5
_W = torch.randn(8, 8, generator=torch.Generator().manual_seed(0)) / 8**0.5


def noise(shape=(4, 8), seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def fake_model(xt: torch.Tensor, time_input: torch.Tensor) -> torch.Tensor:
    """A fixed, smooth stand-in for a trained velocity network, nonlinear in x and in the time input (0..1000)."""
    t = time_input.to(xt.dtype)[:, None] / TIME_SCALE  # (B, 1)
    return 0.9 * xt - 0.5 + 0.3 * torch.tanh(xt @ _W.to(xt.dtype)) * torch.cos(3 * t)


class Counting:
    """A model that counts its calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, xt, time_input):
        self.calls += 1
        return self.model(xt, time_input)


def gaussian_velocity(mu: float, s: float):
    """The exact velocity E[eps - x0 | x_t = x] for data x0 ~ N(mu, s^2) per coordinate (jointly Gaussian):
    v(x, t) = -mu + (t - (1 - t) s^2) / ((1 - t)^2 s^2 + t^2) (x - (1 - t) mu). Its ODE carries x1 along
    x_t = (1 - t) mu + sqrt((1 - t)^2 s^2 + t^2) x1 to mu + s x1. s = 0 is a point mass at mu: v = (x - mu) / t."""

    def model(xt, time_input):
        t = (time_input / TIME_SCALE).to(xt.dtype)[:, None]
        return -mu + (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (xt - (1 - t) * mu)

    return model


def straight_velocity(mu: float, s: float):
    """The velocity of the straight coupling (x1, mu + s x1) that reflow gives for N(mu, s^2) data: x_t determines
    x1 = (x_t - (1 - t) mu) / ((1 - t) s + t), and v = x1 - x0 = (1 - s) x1 - mu."""

    def model(xt, time_input):
        t = (time_input / TIME_SCALE).to(xt.dtype)[:, None]
        return (1 - s) * (xt - (1 - t) * mu) / ((1 - t) * s + t) - mu

    return model


# --- the path, the loss ----------------------------------------------------------------------------------------


def test_interpolate_and_split_velocity_invert_each_other_and_equal_diffusers():
    x0, eps, t = noise(seed=2, dtype=torch.float64), noise(seed=3, dtype=torch.float64), torch.rand(4).double()
    xt = interpolate(x0, eps, t)
    x0_hat, eps_hat = split_velocity(xt, t, eps - x0)
    assert torch.allclose(x0_hat, x0, atol=1e-12) and torch.allclose(eps_hat, eps, atol=1e-12)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=TIME_SCALE)
    index = torch.tensor([999, 500, 10, 0])  # sigma = 0.001, 0.5, 0.99, 1
    sigmas = scheduler.sigmas[index]
    x0, eps = x0.float(), eps.float()
    theirs = scheduler.scale_noise(x0, scheduler.timesteps[index], eps)
    assert (interpolate(x0, eps, sigmas) - theirs).abs().max() <= 1e-6


@pytest.mark.parametrize("time_sampling", ["uniform", "logit_normal"])
def test_loss_is_zero_for_the_exact_velocity_of_a_point_mass(time_sampling):
    x0 = torch.full((64, 3), MU, dtype=torch.float64)
    loss = flow_loss(gaussian_velocity(MU, 0.0), x0, torch.Generator().manual_seed(0), time_sampling=time_sampling)
    assert loss.item() < 1e-20
    # any other velocity pays: the constant -mu misses the noise part eps entirely (loss about E[eps^2] = 1)
    assert flow_loss(lambda xt, t: torch.full_like(xt, -MU), x0, torch.Generator().manual_seed(0)).item() > 0.5


def test_loss_is_seeded_and_pairs_are_kept_when_given():
    x0 = noise(seed=4)
    losses = [flow_loss(fake_model, x0, torch.Generator().manual_seed(seed)).item() for seed in (0, 0, 1)]
    assert losses[0] == losses[1] != losses[2]
    # with eps given, only t is drawn: a model that sees only x_t and t can be exact on fixed straight pairs
    x1 = noise(seed=5, dtype=torch.float64)
    pairs = torch.stack([x1, MU + S * x1], dim=1)  # (B, 2, D)
    assert reflow_loss(straight_velocity(MU, S), pairs, torch.Generator().manual_seed(0)).item() < 1e-20
    assert flow_loss(straight_velocity(MU, S), MU + S * x1, torch.Generator().manual_seed(0)).item() > 0.1


def test_logit_normal_times_have_the_asked_logit_mean_and_std():
    t = sample_times(20_000, torch.Generator().manual_seed(0), "logit_normal", logit_mean=0.5, logit_std=0.8)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.8) < 0.03
    uniform = sample_times(20_000, torch.Generator().manual_seed(0))
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean().item() - 0.5) < 0.01


def test_overfit_one_batch():
    """A tiny MLP on one fixed batch (the same t and eps at every step): the loss falls far below its start."""
    torch.manual_seed(0)
    model = MLPDenoiser(data_dim=2, hidden=64, depth=2, time_dim=16)
    x0 = noise((16, 2), seed=6)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = flow_loss(model, x0, torch.Generator().manual_seed(0), time_sampling="logit_normal")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_the_course_unet_takes_the_flow_time_input_and_labels():
    model = UNet(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4, num_classes=10)
    x0, labels = noise((2, 1, 8, 8), seed=7), torch.tensor([3, 10])
    loss = flow_loss(model, x0, torch.Generator().manual_seed(0), cond=labels)
    loss.backward()
    sample, trajectory = euler_flow_sample(model, noise((2, 1, 8, 8), seed=8), 3, cond=labels, record_every=1)
    assert sample.shape == (2, 1, 8, 8) and [t for t, _, _ in trajectory] == pytest.approx([1, 2 / 3, 1 / 3])


# --- the time grid and the samplers ---------------------------------------------------------------------------


def test_time_grid():
    assert time_grid(1).tolist() == [1.0, 0.0]
    assert torch.allclose(time_grid(4), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64))
    shifted = time_grid(4, shift=3.0)
    assert torch.allclose(shifted, 3 * time_grid(4) / (1 + 2 * time_grid(4)))
    assert shifted[0] == 1 and shifted[-1] == 0 and (shifted[1:] < shifted[:-1]).all()
    assert torch.allclose(shift_times(shift_times(time_grid(5), 3.0), 1 / 3), time_grid(5))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_time_grid_equals_diffusers(shift):
    for steps in [1, 2, 4, 10, 28, 50]:
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=TIME_SCALE, shift=shift)
        scheduler.set_timesteps(steps)
        ours = time_grid(steps, shift, spacing="diffusers")
        assert torch.allclose(ours.float(), scheduler.sigmas, rtol=1e-6, atol=0), steps
        assert torch.allclose((ours[:-1] * TIME_SCALE).float(), scheduler.timesteps, rtol=1e-6, atol=0), steps


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_flow_step_equals_diffusers(shift):
    """Each step of a 20-step diffusers run, repeated by euler_flow_step on the same inputs."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=TIME_SCALE, shift=shift)
    scheduler.set_timesteps(20)
    x = noise()
    for i, t in enumerate(scheduler.timesteps):
        v_hat = fake_model(x, t.expand(4))
        theirs = scheduler.step(v_hat, t, x).prev_sample
        ours = euler_flow_step(v_hat, x, scheduler.sigmas[i], scheduler.sigmas[i + 1])
        assert (ours - theirs).abs().max() <= 1e-5, i
        x = theirs


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_and_heun_runs_equal_diffusers(shift):
    for sampler, scheduler_class in [(euler_flow_sample, FlowMatchEulerDiscreteScheduler),
                                     (heun_flow_sample, FlowMatchHeunDiscreteScheduler)]:  # fmt: skip
        scheduler = scheduler_class(num_train_timesteps=TIME_SCALE, shift=shift)
        scheduler.set_timesteps(12)
        x = noise()
        for t in scheduler.timesteps:
            x = scheduler.step(fake_model(x, t.expand(4)), t, x).prev_sample
        model = Counting(fake_model)
        ours, _ = sampler(model, noise(), 12, shift=shift, spacing="diffusers")
        assert (ours - x).abs().max() <= 1e-5, sampler.__name__
        assert model.calls == len(scheduler.timesteps) == (12 if sampler is euler_flow_sample else 2 * 12 - 1)


def test_point_mass_one_euler_step_lands_on_it_and_every_grid_stays_exact():
    x1, point_mass = noise(dtype=torch.float64), gaussian_velocity(MU, 0.0)
    one_step, _ = euler_flow_sample(point_mass, x1, 1)
    assert torch.allclose(one_step, torch.full_like(x1, MU), atol=1e-12, rtol=0)
    for sampler in (euler_flow_sample, heun_flow_sample):
        sample, _ = sampler(point_mass, x1, 7, shift=3.0)
        assert torch.allclose(sample, torch.full_like(x1, MU), atol=1e-12, rtol=0)


def test_gaussian_one_euler_step_gives_the_data_mean():
    """v(x, 1) = x - E[x0] for any data, so one Euler step from t = 1 lands every noise on the mean."""
    one_step, _ = euler_flow_sample(gaussian_velocity(MU, S), noise(dtype=torch.float64), 1)
    assert torch.allclose(one_step, torch.full_like(one_step, MU), atol=1e-12, rtol=0)


def test_samplers_converge_to_the_gaussian_ode_solution_at_their_order():
    x1 = noise((256, 2), dtype=torch.float64)
    exact = MU + S * x1
    model = gaussian_velocity(MU, S)

    def error(sampler, steps):
        return (sampler(model, x1, steps)[0] - exact).abs().max().item()

    euler_ratio = error(euler_flow_sample, 20) / error(euler_flow_sample, 40)
    heun_ratio = error(heun_flow_sample, 20) / error(heun_flow_sample, 40)
    assert 1.8 < euler_ratio < 2.2 and 3.5 < heun_ratio < 4.5, (euler_ratio, heun_ratio)
    # measured: Euler-50 is off by 5e-2, Heun-50 (99 calls) by 1.2e-3, most of it from its last step, an Euler one
    assert error(heun_flow_sample, 50) < error(euler_flow_sample, 100) / 20


def test_trajectory_records_counting_back_from_the_last_step():
    sample, trajectory = euler_flow_sample(fake_model, noise(), 10, record_every=3)
    assert [round(t, 6) for t, _, _ in trajectory] == [1.0, 0.7, 0.4, 0.1]
    t, xt, x0_hat = trajectory[-1]
    assert torch.allclose(x0_hat, xt - t * fake_model(xt, torch.full((4,), t * TIME_SCALE)), atol=1e-6)
    assert euler_flow_sample(fake_model, noise(), 10)[1] == []
    assert torch.equal(sample, euler_flow_sample(fake_model, noise(), 10)[0])  # deterministic


# --- reflow and straightness ----------------------------------------------------------------------------------


def test_straightness_known_values():
    x1 = noise((512, 2), dtype=torch.float64)
    # a point mass: the Euler path is the straight line itself
    sample, trajectory = euler_flow_sample(gaussian_velocity(MU, 0.0), x1, 10, shift=3.0, record_every=1)
    assert straightness(*path_from_trajectory(trajectory, sample)).max() < 1e-20
    # N(mu, s^2): on the exact path (1 - t) mu + sigma_t x1, sigma_t = sqrt((1 - t)^2 s^2 + t^2), the deviation
    # (x1 - x0) - dx/dt is (1 - s - sigma_t') x1, and int_0^1 sigma_t'^2 dt = 1 + s^2 - s pi / 2, so that
    # S = (1 + s^2 - s pi / 2 - (1 - s)^2) mean(x1^2) = s (2 - pi / 2) mean(x1^2)
    times = torch.linspace(1, 0, 2001, dtype=torch.float64)
    sigma_t = ((1 - times) ** 2 * S**2 + times**2).sqrt()[:, None, None]
    path = (1 - times)[:, None, None] * MU + sigma_t * x1
    expected = S * (2 - math.pi / 2) * x1.pow(2).mean(1)
    assert torch.allclose(straightness(times, path), expected, rtol=1e-5)
    assert torch.allclose(straightness(times.flip(0), path.flip(0)), expected, rtol=1e-5)  # either direction
    # and Euler's path with 400 steps of the exact velocity comes close to it
    sample, trajectory = euler_flow_sample(gaussian_velocity(MU, S), x1, 400, record_every=1)
    measured = straightness(*path_from_trajectory(trajectory, sample)).mean()
    assert abs(measured / expected.mean() - 1) < 0.01


def test_reflow_straightens_the_gaussian_flow():
    """Pairs from the exact Gaussian ODE are (x1, mu + s x1); the flow trained on them (here: its exact velocity)
    is straight, so one Euler step reproduces the whole ODE's map."""
    x1 = noise((64, 2), dtype=torch.float64)
    pair_noise, pair_sample = reflow_pairs(gaussian_velocity(MU, S), x1, steps=200)
    assert pair_noise is x1 and (pair_sample - (MU + S * x1)).abs().max() < 1e-4
    batched = reflow_pairs(gaussian_velocity(MU, S), x1, steps=200, batch_size=10)[1]
    assert torch.allclose(batched, pair_sample, atol=1e-12)
    assert reflow_loss(straight_velocity(MU, S), torch.stack([pair_noise, pair_sample], 1)).item() < 1e-8
    one_step, trajectory = euler_flow_sample(straight_velocity(MU, S), x1, 1, record_every=1)
    assert torch.allclose(one_step, MU + S * x1, atol=1e-12)
    sample, trajectory = euler_flow_sample(straight_velocity(MU, S), x1, 10, record_every=1)
    assert straightness(*path_from_trajectory(trajectory, sample)).max() < 1e-20


def test_reflow_pairs_pass_the_condition_in_batches():
    seen = []

    def conditional(xt, time_input, cond):
        seen.append(cond.tolist())
        return fake_model(xt, time_input) * cond[:, None]

    x1, cond = noise((5, 8)), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    _, whole = reflow_pairs(conditional, x1, 2, cond=cond, solver="euler")
    seen.clear()
    _, batched = reflow_pairs(conditional, x1, 2, cond=cond, solver="euler", batch_size=2)
    assert seen[0] == [1.0, 2.0] and seen[-1] == [5.0] and torch.allclose(whole, batched, atol=1e-6)


# --- bad inputs -----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_value():
    x = noise()
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"steps={steps!r}"):
            euler_flow_sample(fake_model, x, steps)
    for shift in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"shift={shift!r}"):
            heun_flow_sample(fake_model, x, 4, shift=shift)
    with pytest.raises(ValueError, match="'normal'"):
        flow_loss(fake_model, x, time_sampling="normal")
    with pytest.raises(ValueError, match="'ddim'"):
        time_grid(4, spacing="ddim")
    with pytest.raises(ValueError, match="'rk4'"):
        reflow_pairs(fake_model, x, 4, solver="rk4")
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 7\)"):
        flow_loss(fake_model, x, eps=noise((4, 7)))
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 1\)"):
        euler_flow_sample(lambda xt, t: xt[:, :1], x, 2)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        interpolate(x, x, torch.rand(3))
    with pytest.raises(ValueError, match=r"\(4, 3, 8\)"):
        reflow_loss(fake_model, torch.stack([x, x, x], 1))
    with pytest.raises(ValueError, match="record_every must be >= 0; got -1"):
        euler_flow_sample(fake_model, x, 2, record_every=-1)
    with pytest.raises(ValueError, match="monotonic"):
        straightness(torch.tensor([1.0, 0.5, 0.7]), torch.zeros(3, 4, 8))
    with pytest.raises(ValueError, match="logit_std=0"):
        sample_times(4, time_sampling="logit_normal", logit_std=0)


def test_flow_samplers_refuse_an_eps_model_and_say_where_nan_appeared():
    class EpsModel(torch.nn.Module):
        prediction_type = "eps"  # as `weights.load_model` marks a DDPM model

        def forward(self, xt, time_input):
            return fake_model(xt, time_input)

    x = noise()
    for sampler in (euler_flow_sample, heun_flow_sample):
        with pytest.raises(ValueError, match="the model predicts 'eps'.*read its output as 'velocity'"):
            sampler(EpsModel(), x, 4)
        with pytest.raises(ValueError, match="x1 holds 1 NaN or infinite values"):
            sampler(fake_model, torch.where(torch.arange(32).view(4, 8) == 3, float("inf"), x), 4)
    calls = []

    def nan_at_the_fourth_call(xt, time_input):
        calls.append(time_input[0].item() / TIME_SCALE)
        return fake_model(xt, time_input) * (float("nan") if len(calls) == 4 else 1.0)

    with pytest.raises(FloatingPointError, match=r"the model output at t=0.5000 \(Heun's corrector of step 2 of 4\)"):
        heun_flow_sample(nan_at_the_fourth_call, x, 4)  # calls: t = 1, 0.75 (corrector), 0.75, 0.5 (corrector)
    assert calls[-1] == pytest.approx(0.5)
    calls.clear()
    with pytest.raises(FloatingPointError, match=r"the model output at t=0.4000 \(step 4 of 5\)"):
        euler_flow_sample(nan_at_the_fourth_call, x, 5, spacing="uniform", shift=1.0)  # t = 1, 0.8, 0.6, 0.4 ...


def test_flow_steps_may_be_numpy_or_tensor_integers():
    for steps in (np.int64(6), torch.tensor(6)):
        assert torch.equal(
            euler_flow_sample(fake_model, noise(), steps)[0], euler_flow_sample(fake_model, noise(), 6)[0]
        )
        assert torch.equal(time_grid(steps), time_grid(6))
