"""Classifier-free guidance (course_lib.guidance) and the class-conditional UNet it drives."""

import pytest
import torch

from course_lib.benchmark import draw_samples
from course_lib.guidance import Guided, cfg_combine, drop_labels, guided_samples, label_condition
from course_lib.nets.unet import UNet
from course_lib.samplers import ddim_sample
from course_lib.schedules import make_schedule
from course_lib.train import TrainConfig, train

TINY = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)


def class_unet() -> UNet:
    """A class-conditional UNet whose output depends on the label: its zero-initialised layers (the last of every
    residual branch, and the output) randomised, as training would make them."""
    torch.manual_seed(0)
    model = UNet(**TINY, num_classes=10)
    with torch.no_grad():
        for parameter in model.parameters():
            if (parameter == 0).all():
                parameter.normal_(0, 0.1)
    return model.eval()


def test_class_labels_change_the_output_and_bad_labels_raise():
    model = class_unet()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([100, 100])
    three, seven = model(x, t, torch.tensor([3, 3])), model(x, t, torch.tensor([7, 7]))
    assert not torch.allclose(three, seven)
    assert model(x, t, torch.tensor([10, 10])).shape == x.shape  # 10: the null label
    with pytest.raises(ValueError, match="labels must lie in 0..10; got 11"):
        model(x, t, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        model(x, t)
    with pytest.raises(ValueError, match="give one of cond_dim, num_classes and context_dim; got 4, 10, None"):
        UNet(**TINY, num_classes=10, cond_dim=4)


def test_guided_prediction_is_one_batched_pass_of_the_cfg_formula():
    model = class_unet()
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([5, 500, 900])
    labels, null = torch.tensor([1, 2, 3]), torch.tensor([10])
    cond, uncond = model(x, t, labels), model(x, t, torch.full((3,), 10))
    for scale in (0.0, 1.0, 2.5):
        guided = Guided(model, labels, null, scale)(x, t)
        assert torch.allclose(guided, uncond + scale * (cond - uncond), atol=1e-5), scale
    calls = []
    counting = Guided(lambda xt, t, c: calls.append(len(xt)) or torch.zeros_like(xt), labels, null, 3.0)
    counting(x, t)
    assert calls == [6]  # one forward pass of the doubled batch
    assert torch.equal(cfg_combine(torch.zeros(2), torch.ones(2), 3.0), torch.full((2,), 3.0))


def test_guided_model_runs_under_a_sampler():
    model, schedule = class_unet(), make_schedule("cosine", 1000)
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    guided = Guided(model, torch.tensor([4]), torch.tensor([10]), 3.0)
    x0, _ = ddim_sample(guided, schedule, x_T, 3, clip_x0=True)
    assert x0.shape == x_T.shape and x0.abs().max() <= 1


def test_guided_samples_share_noise_across_scales_and_match_a_plain_draw():
    model, schedule = class_unet(), make_schedule("cosine", 1000)
    labels, null = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([10])
    samples, seconds = guided_samples(model, schedule, labels, null, 1.0, 2, seed=3, batch_size=2)
    assert samples.shape == (5, 1, 28, 28) and seconds > 0
    # batch b is draw_samples' noise of seed 3 + b, sampled conditionally at w = 1, the noise re-derived from the
    # clipped x0_hat
    plain = dict(sampler="DDIM", steps=2, use_clipped_model_output=True)
    first, _ = draw_samples(lambda xt, t: model(xt, t, labels[:2]), schedule, n=2, seed=3, **plain)
    last, _ = draw_samples(lambda xt, t: model(xt, t, labels[4:]), schedule, n=1, seed=5, **plain)
    assert torch.allclose(samples[:2], first, atol=1e-6) and torch.allclose(samples[4:], last, atol=1e-6)
    # w = 0 ignores the labels: every label gives the unconditional sample of the same noise
    unconditional, _ = guided_samples(model, schedule, labels, null, 0.0, 2, seed=3, batch_size=5)
    relabelled, _ = guided_samples(model, schedule, labels.flip(0), null, 0.0, 2, seed=3, batch_size=5)
    assert torch.equal(unconditional, relabelled)
    with pytest.raises(ValueError, match="at least one condition and batch_size >= 1; got 0, 2"):
        guided_samples(model, schedule, labels[:0], null, 1.0, 2, batch_size=2)


def test_label_dropout_rate_and_errors():
    labels = torch.arange(10).repeat(1000)
    dropped = drop_labels(labels, 0.1, 10, torch.Generator().manual_seed(0))
    changed = dropped != labels
    assert abs(changed.float().mean().item() - 0.1) < 0.01 and (dropped[changed] == 10).all()
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)
    with pytest.raises(ValueError, match="p=1.5"):
        drop_labels(labels, 1.5, 10)
    with pytest.raises(ValueError, match="got -1"):
        Guided(class_unet(), labels, torch.tensor([10]), -1)
    with pytest.raises(ValueError, match="batch size 3 for a batch of 2"):
        Guided(class_unet(), torch.tensor([1, 2, 3]), torch.tensor([10]), 2.0)(torch.randn(2, 1, 28, 28), torch.ones(2))


class ConvDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, xt, t):
        return self.conv(xt)


class RecordingDenoiser(torch.nn.Module):
    """Predicts zero and records the labels it was trained with."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, xt, t, labels):
        self.seen.append(labels.clone())
        return xt * self.weight


def test_training_with_labels_drops_them_at_the_configured_rate():
    data, labels = torch.randn(64, 1, 4, 4), torch.arange(64) % 10
    model = RecordingDenoiser()
    config = TrainConfig(steps=50, batch_size=64, ema_decay=None)
    condition = label_condition(labels, 0.25, 10)
    train(model, make_schedule("cosine", 100), data, config, progress=False, condition=condition)
    seen = torch.cat(model.seen)
    assert abs((seen == 10).float().mean().item() - 0.25) < 0.03 and seen.max() == 10
    kept = seen != 10
    assert kept.any() and (seen[kept] < 10).all()
    with pytest.raises(ValueError, match="p=1.5"):
        label_condition(labels, 1.5, 10)


def test_a_checkpoint_saved_before_a_config_field_existed_still_resumes(tmp_path):
    data, checkpoint = torch.randn(16, 1, 4, 4), tmp_path / "run.pt"
    config = TrainConfig(steps=4, batch_size=8, ema_decay=None)
    model = ConvDenoiser()
    train(model, make_schedule("cosine", 100), data, config, checkpoint=checkpoint, budget_s=0, progress=False)
    payload = torch.load(checkpoint, weights_only=True)
    del payload["config"]["min_snr_gamma"]  # as if written before that field existed
    torch.save(payload, checkpoint)
    state, _ = train(model, make_schedule("cosine", 100), data, config, checkpoint=checkpoint, progress=False)
    assert state.step == 4
