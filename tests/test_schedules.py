"""Schedules: known values, identities, parity with diffusers' DDPMScheduler, and the bad inputs that must raise."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from course_lib.schedules import (
    DIFFUSERS_BETA_SCHEDULE,
    SCHEDULE_NAMES,
    cosine_betas,
    gather,
    make_schedule,
    schedule_from_betas,
)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("T", [1000, 50])
def test_tables_equal_diffusers(name, T):
    ours = make_schedule(name, T)
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_BETA_SCHEDULE[name])
    assert (ours.betas - theirs.betas).abs().max() <= 1e-5
    assert (ours.alphas - theirs.alphas).abs().max() <= 1e-5
    assert (ours.alpha_bar - theirs.alphas_cumprod).abs().max() <= 1e-5


def test_known_values_of_the_linear_schedule():
    s = make_schedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_{T-1} = prod (1 - beta_t), computed here by its logarithm in closed form of the arithmetic sequence
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert s.alpha_bar[-1].item() == pytest.approx(torch.log1p(-betas).sum().exp().item(), rel=1e-5)
    assert s.alpha_bar[-1].item() == pytest.approx(4.036e-5, rel=1e-3)


def test_cosine_alpha_bar_follows_its_formula():
    T, s = 1000, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)])
    ours = make_schedule("cosine", T).alpha_bar
    # the clip at beta = 0.999 only touches the last step
    assert (ours[:-1] - expected[:-1].float()).abs().max() < 1e-5


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_identities(name):
    s = make_schedule(name, 200)
    betas = s.betas.double()  # rebuild the tables in float64: 1 - alpha_bar near t = 0 needs the precision
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(s.alphas, 1 - s.betas)
    assert torch.allclose(s.alpha_bar.double(), alpha_bar, rtol=1e-6)
    assert s.alpha_bar_prev[0] == 1 and torch.equal(s.alpha_bar_prev[1:], s.alpha_bar[:-1])
    assert torch.allclose(s.snr.double(), alpha_bar / (1 - alpha_bar), rtol=1e-4)
    assert torch.allclose(s.log_snr.double(), (alpha_bar / (1 - alpha_bar)).log(), atol=1e-4)
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all(), "alpha_bar must fall with t"
    # posterior at t = 0 returns x0 exactly: coefficients 1 and 0, variance 0
    assert s.posterior_coef_x0[0] == pytest.approx(1.0) and s.posterior_coef_xt[0] == 0 and s.posterior_variance[0] == 0
    assert s.betas.dtype == torch.float32


def test_gather_broadcasts_and_follows_the_data():
    s = make_schedule("linear", 10)
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float64)
    values = gather(s.alpha_bar, torch.tensor([0, 5, 9]), x)
    assert values.shape == (3, 1, 1, 1) and values.dtype == torch.float64
    assert values[1].item() == pytest.approx(s.alpha_bar[5].item())
    assert gather(s.betas, 4, x).shape == (1, 1, 1, 1)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: make_schedule("cosinus", 100), "unknown schedule 'cosinus'"),
        (lambda: make_schedule("linear", 0), "T=0"),
        (lambda: make_schedule("linear", 10.5), "T=10.5"),
        (lambda: make_schedule("linear", 10, beta_start=0.0), "beta_start=0.0"),
        (lambda: make_schedule("quadratic", 10, beta_end=1.5), "beta_end=1.5"),
        (lambda: cosine_betas(10, max_beta=1.0), "max_beta=1.0"),
        (lambda: schedule_from_betas(torch.tensor([0.1, 0.0, 0.2])), r"beta\[1\]=0.0"),
        (lambda: schedule_from_betas(torch.tensor([0.1, 1.5])), r"beta\[1\]=1.5"),
        (lambda: schedule_from_betas(torch.tensor([1.0, 0.5])), r"beta\[0\]=1.0"),
        (lambda: schedule_from_betas(torch.tensor([-0.1, 0.5])), r"beta\[0\]=-0.1"),
    ],
)
def test_bad_schedules_raise_and_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_timesteps_raise_and_name_the_value():
    s = make_schedule("linear", 10)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t=10 is out of range; valid: 0..9"):
        gather(s.betas, torch.tensor([3, 10]), x)
    with pytest.raises(ValueError, match="t=-1"):
        gather(s.betas, -1, x)
    with pytest.raises(TypeError, match="integer tensor"):
        gather(s.betas, torch.tensor([0.5, 1.0]), x)
    with pytest.raises(ValueError, match="3 timesteps for a batch of 2"):
        gather(s.betas, torch.tensor([1, 2, 3]), x)


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic"])
def test_zero_terminal_snr_equals_diffusers(name):
    """Lin et al. 2024, Algorithm 1, against diffusers' rescale_betas_zero_snr=True on the same betas."""
    ours = make_schedule(name, 1000, zero_terminal_snr=True)
    theirs = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=DIFFUSERS_BETA_SCHEDULE[name], rescale_betas_zero_snr=True
    )
    assert (ours.alpha_bar.double() - theirs.alphas_cumprod.double()).abs().max() <= 1e-6
    assert ours.alpha_bar[-1] == 0 and ours.snr[-1] == 0 and ours.betas[-1] == 1
    assert torch.isclose(ours.alpha_bar[0], make_schedule(name, 1000).alpha_bar[0]), "t = 0 must not move"


def test_a_beta_of_one_is_allowed_only_at_the_last_step():
    betas = torch.full((10,), 0.1, dtype=torch.float64)
    betas[4] = 1.0
    with pytest.raises(ValueError, match=r"beta\[4\]=1.0"):
        schedule_from_betas(betas)


@pytest.mark.parametrize("T", [np.int64(50), np.int32(50), torch.tensor(50)], ids=repr)
def test_numpy_and_tensor_integers_are_accepted_for_T(T):
    """The same tables as for the int 50 (a 0-d tensor T must not turn the float64 maths into float32)."""
    for name in SCHEDULE_NAMES:
        schedule = make_schedule(name, T)
        assert type(schedule.T) is int and torch.equal(schedule.betas, make_schedule(name, 50).betas), name


def test_one_timestep_may_be_any_integer_and_a_float_is_refused_by_value():
    s, x = make_schedule("linear", 10), torch.zeros(2, 3)
    for t in (np.int64(4), torch.tensor(4), np.int32(4)):
        assert torch.equal(gather(s.betas, t, x), gather(s.betas, 4, x))
    for t, shown in [(2.5, "t=2.5"), (2.0, "t=2.0"), (True, "t=True")]:
        with pytest.raises(TypeError, match=f"a timestep must be an integer in 0..9 .*got {shown}"):
            gather(s.betas, t, x)
    with pytest.raises(ValueError, match="T=True"):
        make_schedule("linear", True)
