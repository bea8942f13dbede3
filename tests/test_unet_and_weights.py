"""The UNet (shapes, conditioning hook, zero-initialised output), resumable training, and shipped-weight files."""

import json

import pytest
import torch

from course_lib.data import read_manifest
from course_lib.nets.unet import UNet
from course_lib.schedules import make_schedule
from course_lib.train import TrainConfig, train
from course_lib.weights import load_card, load_model, load_weights, model_config, save_weights

TINY = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)


def randomise_zero_layers(model: UNet) -> UNet:
    """The zero-initialised layers (the output, the last of every residual branch) randomised, as training makes
    them: with them at zero the output is 0 whatever the input, and no test of what it depends on could fail."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if (parameter == 0).all():
                parameter.normal_(0, 0.1)
    return model


def test_unet_shapes_and_conditioning_hook():
    model = randomise_zero_layers(UNet(**TINY, cond_dim=5)).eval()
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 10, 999])
    cond = torch.randn(3, 5)
    assert model(x, t).shape == (3, 1, 28, 28)
    assert model(x, t, cond).shape == (3, 1, 28, 28)
    # the condition reaches the output, per example: changing the condition of example 0 changes only its output
    other = cond.clone()
    other[0] = torch.randn(5)
    with_cond, with_other = model(x, t, cond), model(x, t, other)
    assert (with_cond[0] - with_other[0]).abs().max() > 1e-3
    assert torch.allclose(with_cond[1:], with_other[1:], atol=1e-6)
    assert (model(x, t) - with_cond).abs().max() > 1e-3  # no condition is not the same as this one
    latent = UNet(in_channels=4, channels=(16, 32), blocks=(1, 1), attention=(False, True), groups=4)
    assert latent(torch.randn(2, 4, 8, 8), torch.tensor([1, 2])).shape == (2, 4, 8, 8)
    # odd sizes: 7 x 7 latents go down to 4 x 4 and come back up to the skip's 7 x 7
    three_levels = UNet(in_channels=4, channels=(16, 32, 32), blocks=(1, 1, 1), attention=(False, True, True), groups=4)
    assert three_levels(torch.randn(2, 4, 7, 7), torch.tensor([1, 2])).shape == (2, 4, 7, 7)


def test_unet_starts_as_zero_and_rejects_bad_input():
    model = UNet(**TINY)
    assert model(torch.randn(2, 1, 28, 28), torch.tensor([3, 4])).abs().max() == 0  # zero-initialised output
    with pytest.raises(ValueError, match=r"need images \(B, C, H, W\); got shape \(1, 28, 28\)"):
        model(torch.randn(1, 28, 28), torch.tensor([3]))
    with pytest.raises(ValueError, match="built without cond_dim"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([3, 4]), torch.randn(2, 5))
    with pytest.raises(ValueError, match="one entry per level"):
        UNet(channels=(8, 16), blocks=(1,), attention=(False, True))


def test_training_overfits_one_batch_and_resumes_exactly(tmp_path):
    """Loss falls on a tiny fixed set; a run cut in two by a time budget ends where one uninterrupted run ends."""
    schedule, data = make_schedule("cosine", 100), torch.rand(8, 1, 8, 8) * 2 - 1
    config = TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup=5, ema_decay=0.9)

    torch.manual_seed(0)
    whole = UNet(**TINY)
    state, ema = train(whole, schedule, data, config, progress=False)
    assert sum(state.losses[-10:]) < 0.6 * sum(state.losses[:10])

    torch.manual_seed(0)
    split = UNet(**TINY)
    checkpoint = tmp_path / "run.pt"
    first, _ = train(split, schedule, data, config, budget_s=0.0, checkpoint=checkpoint, progress=False)
    assert first.step == 1  # the budget stopped it after one step
    torch.manual_seed(123)  # a new session: nothing but the checkpoint carries over
    resumed_model = UNet(**TINY)
    second, resumed_ema = train(resumed_model, schedule, data, config, checkpoint=checkpoint, progress=False)
    assert second.step == 60 and second.losses == pytest.approx(state.losses, rel=1e-5)
    for a, b in zip(resumed_ema.model.parameters(), ema.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_resuming_with_another_configuration_is_refused(tmp_path):
    schedule, data = make_schedule("cosine", 100), torch.rand(8, 1, 8, 8)
    checkpoint = tmp_path / "run.pt"
    train(UNet(**TINY), schedule, data, TrainConfig(steps=2, batch_size=4), checkpoint=checkpoint, progress=False)
    with pytest.raises(ValueError, match=r"another configuration.*'lr': \(0.003, 0.01\)"):
        train(UNet(**TINY), schedule, data, TrainConfig(steps=2, batch_size=4, lr=0.01), checkpoint=checkpoint)


def test_weights_round_trip_and_damage_is_caught(tmp_path):
    model = UNet(**TINY)
    torch.nn.init.normal_(model.conv_out.weight)
    save_weights(model, "tiny", {"model": TINY}, folder=tmp_path)
    assert set(read_manifest(tmp_path / "SHA256SUMS")) == {"tiny.safetensors", "tiny.json"}
    assert load_card("tiny", tmp_path) == json.loads(json.dumps({"model": TINY}))
    loaded = load_weights(UNet(**TINY), "tiny", tmp_path)
    assert torch.allclose(loaded.conv_out.weight, model.conv_out.weight, atol=1e-2)  # stored in float16
    with pytest.raises(ValueError, match="does not fit this model"):
        load_weights(UNet(channels=(8, 32), blocks=(1, 1), attention=(False, True), groups=4), "tiny", tmp_path)
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="tiny.safetensors is damaged"):
        load_weights(UNet(**TINY), "tiny", tmp_path)


def test_a_card_names_the_model_to_build(tmp_path):
    model = UNet(**TINY)
    card = {"model": {"class": "course_lib.nets.unet.UNet", **TINY}}
    save_weights(model, "tiny", card, folder=tmp_path)
    assert model_config(load_card("tiny", tmp_path)) == TINY  # lists back to tuples
    loaded = load_model("tiny", folder=tmp_path)
    assert isinstance(loaded, UNet) and not loaded.training
    save_weights(model, "foreign", {"model": {"class": "os.system"}}, folder=tmp_path)
    with pytest.raises(ValueError, match="'os.system'; only course_lib classes"):
        load_model("foreign", folder=tmp_path)


def test_a_larger_model_starts_from_shipped_weights(tmp_path):
    torch.manual_seed(0)
    small = UNet(**TINY)
    torch.nn.init.normal_(small.conv_out.weight)
    save_weights(small, "tiny", {"model": TINY}, folder=tmp_path)
    conditional = UNet(**TINY, num_classes=10)
    with pytest.raises(ValueError, match=r"missing \['class_emb.weight'\]"):
        load_weights(conditional, "tiny", tmp_path)
    load_weights(conditional, "tiny", tmp_path, allow_new=True)
    assert torch.allclose(conditional.conv_out.weight, small.conv_out.weight, atol=1e-2)
    with pytest.raises(ValueError, match="does not fit this model"):  # file tensors the model lacks still raise
        load_weights(UNet(channels=(8,), blocks=(1,), attention=(True,), heads=2, groups=4), "tiny", tmp_path, True)
