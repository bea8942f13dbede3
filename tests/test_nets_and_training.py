"""Networks and the training loop: embedding parity with diffusers, shapes, and overfitting a tiny data set."""

from dataclasses import replace

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from course_lib.ddpm import ddpm_sample
from course_lib.flow import euler_flow_sample
from course_lib.metrics import mode_proportions
from course_lib.nets.embedding import timestep_embedding
from course_lib.nets.mlp import MLPDenoiser
from course_lib.schedules import make_schedule
from course_lib.toy import bimodal_1d
from course_lib.train import TrainConfig, train, train_denoiser, warmup_cosine


@pytest.mark.parametrize("dim", [2, 32, 64])
def test_timestep_embedding_equals_diffusers(dim):
    t = torch.tensor([0, 1, 17, 500, 999])
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert (timestep_embedding(t, dim) - theirs).abs().max() <= 1e-5


def test_timestep_embedding_rejects_odd_dimensions():
    with pytest.raises(ValueError, match="dim=7"):
        timestep_embedding(torch.tensor([1]), 7)


def test_mlp_keeps_the_shape_of_its_input():
    for data_dim in (1, 2):
        model = MLPDenoiser(data_dim=data_dim, hidden=32, depth=2)
        assert model(torch.randn(5, data_dim), torch.tensor([0, 1, 2, 3, 4])).shape == (5, data_dim)


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def test_training_learns_the_bimodal_data():
    """A few hundred steps on the 1D mixture: the loss falls and DDPM samples find both modes in proportion."""
    torch.manual_seed(0)
    mixture, schedule = bimodal_1d(), make_schedule("linear", 200, beta_end=0.1)
    data = mixture.sample(4000, torch.Generator().manual_seed(0))
    model = MLPDenoiser(data_dim=1, hidden=64, depth=2)
    losses = train_denoiser(model, schedule, data, steps=600, batch_size=256, lr=3e-3, progress=False)
    assert sum(losses[-50:]) / 50 < 0.6 * sum(losses[:50]) / 50
    generator = torch.Generator().manual_seed(1)
    samples, _ = ddpm_sample(model, schedule, torch.randn(2000, 1, generator=generator), generator)
    assert torch.allclose(mode_proportions(samples, mixture.means), mixture.weights.float().double(), atol=0.1)


def test_training_rejects_bad_budgets():
    model = MLPDenoiser(data_dim=1, hidden=8, depth=1)
    with pytest.raises(ValueError, match="steps=0"):
        train_denoiser(model, make_schedule("linear", 10), torch.zeros(4, 1), steps=0)


def test_training_with_the_flow_objective_learns_the_bimodal_data(tmp_path):
    """The same loop with objective="flow": the flow-matching loss falls, Euler samples find both modes, and the
    checkpoint records the objective."""
    torch.manual_seed(0)
    mixture = bimodal_1d()
    data = mixture.sample(4000, torch.Generator().manual_seed(0))
    model = MLPDenoiser(data_dim=1, hidden=64, depth=2)
    config = TrainConfig(steps=600, batch_size=256, lr=3e-3, warmup=20, ema_decay=None, objective="flow")
    state, _ = train(model, None, data, config, checkpoint=tmp_path / "flow.pt", progress=False)
    assert sum(state.losses[-50:]) / 50 < 0.8 * sum(state.losses[:50]) / 50
    samples, _ = euler_flow_sample(model, torch.randn(2000, 1, generator=torch.Generator().manual_seed(1)), 50)
    assert torch.allclose(mode_proportions(samples, mixture.means), mixture.weights.float().double(), atol=0.1)
    with pytest.raises(ValueError, match="objective"):
        train(model, None, data, replace(config, objective="ddpm"), checkpoint=tmp_path / "flow.pt", progress=False)


def test_training_rejects_an_unknown_objective_and_ddpm_without_schedule():
    with pytest.raises(ValueError, match="'score'"):
        TrainConfig(objective="score")
    model = MLPDenoiser(data_dim=1, hidden=8, depth=1)
    with pytest.raises(ValueError, match="schedule"):
        train(model, None, torch.zeros(4, 1), TrainConfig(steps=1), progress=False)
