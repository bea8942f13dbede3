"""The forward process: closed form equals diffusers' add_noise and, in distribution, the iterated chain."""

import pytest
import torch
from diffusers import DDPMScheduler

from course_lib.forward import q_sample, q_step, run_chain
from course_lib.schedules import DIFFUSERS_BETA_SCHEDULE, make_schedule


@pytest.mark.parametrize("name", ["linear", "cosine", "quadratic"])
def test_q_sample_equals_diffusers_add_noise(name):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 1, 6, 6, generator=generator)
    eps = torch.randn(8, 1, 6, 6, generator=generator)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    theirs = DDPMScheduler(beta_schedule=DIFFUSERS_BETA_SCHEDULE[name]).add_noise(x0, eps, t)
    assert (q_sample(make_schedule(name), x0, t, eps) - theirs).abs().max() <= 1e-5


def test_closed_form_matches_the_chain_in_distribution():
    """Run the Markov chain on 20,000 copies of two starting points: at every t its mean and variance are the
    closed form's sqrt(alpha_bar_t) x0 and 1 - alpha_bar_t, within Monte Carlo error."""
    schedule = make_schedule("linear", 200, beta_start=1e-3, beta_end=0.05)
    x0 = torch.tensor([-1.5, 2.0]).repeat(20_000, 1).double()  # (N, 2)
    states = run_chain(schedule, x0, torch.Generator().manual_seed(0))  # (T, N, 2)
    assert states.shape == (200, 20_000, 2)
    alpha_bar = schedule.alpha_bar.double()[:, None]  # (T, 1)
    mean_error = states.mean(1) - alpha_bar.sqrt() * torch.tensor([-1.5, 2.0], dtype=torch.float64)
    variance_ratio = states.var(1) / (1 - alpha_bar)
    assert mean_error.abs().max() < 0.03  # the standard error is at most 1 / sqrt(20,000) ~ 0.007
    assert (variance_ratio - 1).abs().max() < 0.06


def test_one_step_of_the_chain_is_the_closed_form_at_t0():
    schedule = make_schedule("cosine", 100)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=generator), torch.randn(5, 3, generator=generator)
    # sqrt(1 - beta_0) and sqrt(alpha_bar_0) are the same number, rounded through different float32 paths
    assert torch.allclose(q_step(schedule, x0, 0, eps), q_sample(schedule, x0, 0, eps), atol=1e-6)


def test_mismatched_shapes_raise():
    schedule = make_schedule("linear", 10)
    with pytest.raises(ValueError, match=r"shapes must match; got \{'x0': \(4, 2\), 'eps': \(4, 3\)\}"):
        q_sample(schedule, torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="shapes must match"):
        q_step(schedule, torch.zeros(4, 2), 3, torch.zeros(2, 4))
