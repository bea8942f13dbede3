"""EDM preconditioning (course_lib.edm): the scalings against diffusers' EDMEulerScheduler, their defining
properties (unit-variance input and target), the loss against its weighted-denoiser form, and sigma_data measured."""

import math

import pytest
import torch
from diffusers import EDMEulerScheduler

from course_lib.data import load_digits
from course_lib.edm import (
    P_MEAN,
    P_STD,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    c_in,
    c_out,
    c_skip,
    denoise,
    edm_loss,
    noise_input,
    sample_sigmas,
)
from course_lib.profiles import randn_like

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)


def test_the_scalings_equal_diffusers():
    scheduler = EDMEulerScheduler(sigma_data=SIGMA_DATA, prediction_type="epsilon")
    x, raw = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    sigma = SIGMAS.reshape(-1, 1, 1, 1)
    assert torch.allclose(scheduler.precondition_inputs(x, sigma), c_in(sigma) * x)
    assert torch.allclose(scheduler.precondition_outputs(x, raw, sigma), c_skip(sigma) * x + c_out(sigma) * raw)
    # diffusers feeds ln(sigma) / 4; ours is the affine map of it that spans 0..1000 (module docstring)
    c_noise = scheduler.precondition_noise(SIGMAS)
    low, high = 0.25 * math.log(SIGMA_MIN), 0.25 * math.log(SIGMA_MAX)
    assert torch.allclose(noise_input(SIGMAS), 1000 * (c_noise - low) / (high - low))


def test_input_and_target_have_unit_variance_at_every_sigma():
    """Karras et al. 2022, appendix B.6: c_in and c_out are chosen so that, for data of variance sigma_data^2,
    the network's input c_in (y + sigma n) and its target (y - c_skip x) / c_out both have unit variance."""
    generator = torch.Generator().manual_seed(0)
    y = SIGMA_DATA * torch.randn(200_000, generator=generator, dtype=torch.float64)
    n = torch.randn(200_000, generator=generator, dtype=torch.float64)
    for sigma in SIGMAS.tolist():
        x = y + sigma * n
        assert (c_in(torch.tensor(sigma)) * x).var().item() == pytest.approx(1, abs=0.01)
        target = (y - c_skip(torch.tensor(sigma)) * x) / c_out(torch.tensor(sigma))
        assert target.var().item() == pytest.approx(1, abs=0.01)


def test_sigma_data_is_the_standard_deviation_of_the_train_digits():
    assert load_digits("train")[0].std().item() == pytest.approx(SIGMA_DATA, abs=0.005)


def test_noise_input_spans_the_time_range_and_sigmas_follow_the_log_normal():
    assert noise_input(torch.tensor([SIGMA_MIN, SIGMA_MAX])).tolist() == pytest.approx([0, 1000], abs=1e-3)
    log_sigma = sample_sigmas(100_000, torch.Generator().manual_seed(0)).log()
    assert log_sigma.mean().item() == pytest.approx(P_MEAN, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(P_STD, abs=0.02)


def test_the_loss_equals_the_weighted_denoiser_loss():
    """eq. 8 with lambda = 1 / c_out^2 on D(x; sigma), computed here directly, equals edm_loss on F's output."""
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.Unflatten(1, (1, 4, 4)))

    def F(x, time_input):  # the raw network ignores time here: enough to compare the two forms
        return network(x)

    x0 = torch.randn(8, 1, 4, 4)
    ours = edm_loss(F, x0, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    sigma = sample_sigmas(8, generator)  # the same draws, in the same order
    x = x0 + sigma.reshape(-1, 1, 1, 1) * randn_like(x0, generator)
    weight = 1 / c_out(sigma.reshape(-1, 1, 1, 1)) ** 2
    direct = (weight * (denoise(F, x, sigma) - x0) ** 2).mean()
    assert ours.item() == pytest.approx(direct.item(), rel=1e-5)


def test_bad_sigmas_are_refused_by_value():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"sigma must be > 0.*-1.0"):
        denoise(lambda x, t: x, x, torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="one per example"):
        denoise(lambda x, t: x, x, torch.ones(3))
