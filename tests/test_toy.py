"""Toy distributions: exact densities integrate to one, scores match autograd, the noised marginal is exact."""

import pytest
import torch

from course_lib.forward import q_sample
from course_lib.metrics import mode_proportions, sliced_wasserstein, wasserstein_1d
from course_lib.schedules import make_schedule
from course_lib.toy import GaussianMixture, bimodal_1d, moons, ring_2d, swiss_roll


def test_density_integrates_to_one():
    grid = torch.linspace(-8, 8, 20_001, dtype=torch.float64)[:, None]
    density = bimodal_1d().log_prob(grid).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-6)


def test_score_equals_autograd():
    mixture = ring_2d()
    x = torch.randn(50, 2, dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(mixture.log_prob(x).sum(), x)
    assert torch.allclose(mixture.score(x.detach()), gradient, atol=1e-10)


def test_noised_mixture_is_the_law_of_q_sample():
    mixture, schedule = bimodal_1d(), make_schedule("linear", 1000)
    generator = torch.Generator().manual_seed(0)
    x0 = mixture.sample(50_000, generator)
    t = 300
    xt = q_sample(schedule, x0, t, torch.randn(x0.shape, generator=generator))
    exact = mixture.noised(schedule.alpha_bar[t].item()).sample(50_000, generator)
    assert wasserstein_1d(xt, exact) < 0.02


def test_optimal_eps_is_minus_scaled_score_of_the_noised_mixture():
    mixture = ring_2d()
    xt = torch.randn(20, 2, dtype=torch.float64)
    alpha_bar_t = 0.4
    expected = -((1 - alpha_bar_t) ** 0.5) * mixture.noised(alpha_bar_t).score(xt)
    assert torch.allclose(mixture.optimal_eps(xt, alpha_bar_t), expected, atol=1e-10)
    per_row = mixture.optimal_eps(xt, torch.full((20, 1), alpha_bar_t))
    assert torch.allclose(per_row, expected, atol=1e-10)


def test_2d_sets_have_the_asked_shape_and_spread():
    generator = torch.Generator().manual_seed(0)
    for points in (moons(1000, generator), swiss_roll(1000, generator), ring_2d().sample(1000, generator)):
        assert points.shape == (1000, 2) and 0.3 < points.std().item() < 2.5


def test_distances_known_values():
    a = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    assert wasserstein_1d(a, a + 0.5) == pytest.approx(0.5, abs=1e-6)
    assert wasserstein_1d(a, torch.cat([a, a]) + 0.25) == pytest.approx(0.25, abs=1e-3)
    points = torch.randn(2000, 2)
    shift = torch.tensor([3.0, 4.0])
    # projecting a shift of length 5 on random unit directions gives 5 * E|cos| = 5 * 2 / pi in 2D
    assert sliced_wasserstein(points, points + shift, 2000) == pytest.approx(5 * 2 / torch.pi, rel=0.05)
    proportions = mode_proportions(torch.tensor([[-2.1], [1.4], [1.6], [1.0]]), torch.tensor([[-2.0], [1.5]]))
    assert proportions.tolist() == [0.25, 0.75]


def test_bad_mixtures_raise():
    with pytest.raises(ValueError, match="weights >= 0 summing to 1"):
        GaussianMixture([[0.0], [1.0]], [1.0, 1.0], [0.5, 0.6])
    with pytest.raises(ValueError, match="need means"):
        GaussianMixture([0.0, 1.0], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="alpha_bar_t must lie in"):
        bimodal_1d().noised(0.0)
