"""Classifier-free guidance (course_lib.guidance) and the class-conditional UNet it drives."""

import pytest
import torch

from course_lib.guidance import Guided, cfg_combine, drop_labels, guided_samples, label_condition
from course_lib.nets.unet import UNet
from course_lib.samplers import ddim_sample
from course_lib.sampling import draw_samples
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
    with pytest.raises(ValueError, match=r"labels must lie in 0..10 \(10: no label\); got 11"):
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


def test_guided_model_runs_under_a_sampler_as_the_cfg_formula_step_by_step():
    """A guided DDIM run equals the run of a model that computes the guided prediction by hand from two separate
    calls (no clipping, so nothing hides a difference), and guidance moves the sample away from the conditional and
    the unconditional runs of the same noise."""
    model, schedule = class_unet(), make_schedule("cosine", 1000)
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    label, null = torch.tensor([4, 4]), torch.tensor([10, 10])

    def by_hand(xt, t):
        uncond = model(xt, t, null)
        return uncond + 3.0 * (model(xt, t, label) - uncond)

    def differ(a, b):  # the largest difference relative to the largest value (x0_hat reaches 1e4 at t = 999)
        return ((a - b).abs().max() / b.abs().max()).item()

    guided, trajectory = ddim_sample(Guided(model, label[:1], null[:1], 3.0), schedule, x_T, 3, record_every=1)
    expected, expected_trajectory = ddim_sample(by_hand, schedule, x_T, 3, record_every=1)
    for (t, _, x0_hat), (t_expected, _, x0_expected) in zip(trajectory, expected_trajectory, strict=True):
        assert t == t_expected and differ(x0_hat, x0_expected) < 1e-5, t  # batched and separate calls round apart
    assert differ(guided, expected) < 1e-5
    conditional, _ = ddim_sample(Guided(model, label, null, 1.0), schedule, x_T, 3)
    unconditional, _ = ddim_sample(Guided(model, label, null, 0.0), schedule, x_T, 3)
    assert differ(guided, conditional) > 0.01 and differ(guided, unconditional) > 0.01


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


def test_a_nan_guidance_scale_is_refused_before_any_sampling():
    for scale in (float("nan"), -1.0):
        with pytest.raises(ValueError, match=f"the guidance scale must be a number >= 0.*got {scale}"):
            Guided(class_unet(), torch.tensor([1]), torch.tensor([10]), scale)
    with pytest.raises(ValueError, match="got nan"):
        guided_samples(
            class_unet(), make_schedule("cosine", 1000), torch.tensor([1]), torch.tensor([10]), float("nan"), 2
        )


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
