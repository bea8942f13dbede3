"""scripts/train_control.py: chapter 13's ControlNet and noisy classifier train resumably and export what they should.

With tiny models and a few steps in tmp_path: a resumed ControlNet run ends exactly where an uninterrupted one does
(so the trained copy is never overwritten by the base's weights again); a checkpoint of another configuration, other
data or another base is refused by name; the export holds the ControlNet's weights only and `load_controlnet` puts it
back on its base with the trained model's output, bit for bit; the classifier's card holds accuracies computed from
the exported weights.
"""

import functools
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from course_lib.control import ControlledUNet, ControlNet, edge_map, load_controlnet
from course_lib.data import load_digits, read_manifest
from course_lib.editing import noisy_class_accuracy
from course_lib.nets.classifier import NoisyDigitClassifier
from course_lib.nets.unet import UNet
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model, save_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_control  # noqa: E402

TINY = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)
SCHEDULE = dict(name="cosine", T=1000)
CONTROLNET = replace(
    train_control.CONTROLNET,
    name="tiny_controlnet",
    model=dict(control_channels=1, hint_channels=(4,), hint_stride=1),
    config=replace(train_control.CONTROLNET.config, steps=5, batch_size=4, warmup=1, checkpoint_every_s=1e9),
)
CLASSIFIER = replace(
    train_control.NOISY_CLASSIFIER,
    name="tiny_noisy_classifier",
    model=dict(channels=(4, 8), n_classes=10, time_dim=8, groups=2),
    config=replace(train_control.NOISY_CLASSIFIER.config, steps=6, batch_size=8, warmup=1, checkpoint_every_s=1e9),
)


@functools.cache
def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits(name)


def digits(name: str = "train", n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n digits of a split (class-balanced: two of each for n = 20), each split read once."""
    images, labels = split(name)
    return images[:n], labels[:n]


def tiny_base(folder: Path, name: str = "tiny_base") -> UNet:
    """A tiny UNet shipped to `folder` with a card, and loaded back from it as the real base is (float16 values).
    Every weight is drawn at random, the zero-initialised output convolutions too: a fresh UNet's output is 0 and
    would pass no gradient back to a ControlNet."""
    base, generator = UNet(**TINY), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    card = {"model": {"class": "course_lib.nets.unet.UNet", **TINY}, "schedule": SCHEDULE, "prediction_type": "eps"}
    save_weights(base, name, card, folder=folder)
    return load_model(name, folder=folder)


def controlnet_state(controlled: ControlledUNet) -> dict:
    return {key: value.clone() for key, value in controlled.controlnet.state_dict().items()}


def train_tiny_controlnet(base, checkpoint, run=CONTROLNET, images=None, budget_s=None):
    images = digits()[0] if images is None else images
    return train_control.train_controlnet(run, base, SCHEDULE, images, checkpoint, budget_s, progress=False)


def test_a_resumed_controlnet_run_ends_where_an_uninterrupted_one_does(tmp_path):
    base = tiny_base(tmp_path)
    base_before = {key: value.clone() for key, value in base.state_dict().items()}
    whole, state = train_tiny_controlnet(base, tmp_path / "whole.pt")
    assert state.step == CONTROLNET.config.steps
    # the same run stopped after every step (budget 0: one step a call) three times, then resumed to the end
    for step in (1, 2, 3):
        _, state = train_tiny_controlnet(base, tmp_path / "parts.pt", budget_s=0)
        assert state.step == step
    saved = torch.load(tmp_path / "parts.pt", weights_only=True)["model"]
    copy = {
        key.removeprefix("controlnet.encoder."): v for key, v in saved.items() if key.startswith("controlnet.encoder.")
    }
    copy_moved = [key for key, value in copy.items() if not torch.equal(value, base_before[key])]
    assert copy_moved, "after 3 steps the trained copy must differ from the base, or a re-copy would go unseen"
    parts, state = train_tiny_controlnet(base, tmp_path / "parts.pt")
    assert state.step == CONTROLNET.config.steps
    expected = controlnet_state(whole)
    assert all(torch.equal(value, expected[key]) for key, value in controlnet_state(parts).items())
    # the frozen base was never changed
    assert all(torch.equal(value, base_before[key]) for key, value in base.state_dict().items())


def test_a_checkpoint_of_another_config_data_or_base_is_refused(tmp_path):
    base, checkpoint = tiny_base(tmp_path), tmp_path / "run.pt"
    train_tiny_controlnet(base, checkpoint, budget_s=0)
    faster = replace(CONTROLNET, config=replace(CONTROLNET.config, lr=5e-3))
    with pytest.raises(ValueError, match=r"another configuration.*'lr': \(0.001, 0.005\)"):
        train_tiny_controlnet(base, checkpoint, run=faster)
    with pytest.raises(ValueError, match="another schedule or other data.*data"):
        train_tiny_controlnet(base, checkpoint, images=digits()[0].flip(-1))
    other_base = tiny_base(tmp_path, "other_base")
    with torch.no_grad():
        other_base.mid1.conv1.weight.add_(0.5)
    with pytest.raises(ValueError, match=r"other weights of the base \(1 of its .* tensors differ, e.g. mid1"):
        train_tiny_controlnet(other_base, checkpoint)
    with pytest.raises(ValueError, match="other weights of the base"):
        train_control.export_controlnet(
            CONTROLNET, other_base, "other_base", SCHEDULE, checkpoint, edge_map(digits()[0])
        )


def test_the_export_holds_only_the_controlnet_and_loads_back_on_its_base_exactly(tmp_path):
    base, checkpoint = tiny_base(tmp_path), tmp_path / "run.pt"
    train_tiny_controlnet(base, checkpoint)
    heldout, heldout_labels = digits("heldout", 4)
    controls = edge_map(heldout)
    path = train_control.export_controlnet(
        CONTROLNET, base, "tiny_base", SCHEDULE, checkpoint, (controls, heldout_labels), folder=tmp_path, sample_steps=2
    )
    # the file: the ControlNet's tensors, none of the base's
    with safe_open(path, "pt") as weights:
        keys = set(weights.keys())
    assert keys == set(ControlNet(base, **CONTROLNET.model).state_dict())
    assert not any(key.startswith("base.") for key in keys)
    assert {"tiny_controlnet.safetensors", "tiny_controlnet.json"} <= set(read_manifest(tmp_path / "SHA256SUMS"))
    card = load_card("tiny_controlnet", tmp_path)
    assert card["base"] == "tiny_base" and card["training"]["status"] == "finished"
    assert card["parameters"]["base"] == sum(p.numel() for p in base.parameters())
    following = card["follows_control"]
    assert set(following) == {"controlnet", "base", "how"} and 0 <= following["controlnet"]["edge_f1"] <= 1
    # loaded back on its base, it is the trained model (the checkpoint's EMA weights, as stored in float16)
    loaded = load_controlnet("tiny_controlnet", folder=tmp_path)
    trained = train_control.build_controlled(CONTROLNET, base)
    trained.load_state_dict(torch.load(checkpoint, weights_only=True)["ema"])
    trained.controlnet.load_state_dict(train_control.as_shipped(trained.controlnet.state_dict()))
    xt = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 300, 600, 999])
    with torch.no_grad():
        output = loaded(xt, t, controls)
        assert torch.equal(output, trained.eval()(xt, t, controls))
        assert not torch.equal(output, base(xt, t))  # the ControlNet does something
    with pytest.raises(ValueError, match=r"tiny_base.json is not a ControlNet card: it lacks \['base', 'controlnet'\]"):
        load_controlnet("tiny_base", folder=tmp_path)


def test_the_classifier_resumes_saves_on_interrupt_and_refuses_other_labels(tmp_path, monkeypatch):
    images, labels = digits()
    run = train_control.train_noisy_classifier
    whole, state = run(CLASSIFIER, SCHEDULE, images, labels, tmp_path / "whole.pt", progress=False)
    assert state.step == CLASSIFIER.config.steps
    for step in (1, 2):
        _, state = run(CLASSIFIER, SCHEDULE, images, labels, tmp_path / "parts.pt", budget_s=0, progress=False)
        assert state.step == step
    parts, _ = run(CLASSIFIER, SCHEDULE, images, labels, tmp_path / "parts.pt", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), parts.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="another schedule or other data.*labels"):
        run(CLASSIFIER, SCHEDULE, images, labels.roll(1), tmp_path / "parts.pt", progress=False)
    # an interrupt (SIGTERM raises KeyboardInterrupt in the script) during step 3 keeps steps 1 and 2
    loss, calls = train_control.noisy_classifier_loss, []

    def interrupted_at_the_third_call(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args)

    monkeypatch.setattr(train_control, "noisy_classifier_loss", interrupted_at_the_third_call)
    with pytest.raises(KeyboardInterrupt):
        run(CLASSIFIER, SCHEDULE, images, labels, tmp_path / "stopped.pt", progress=False)
    assert torch.load(tmp_path / "stopped.pt", weights_only=True)["step"] == 2


def test_the_classifier_card_holds_the_accuracies_of_the_exported_weights(tmp_path):
    train_control.train_noisy_classifier(CLASSIFIER, SCHEDULE, *digits(), tmp_path / "run.pt", progress=False)
    heldout = digits("heldout", 30)
    train_control.export_noisy_classifier(CLASSIFIER, SCHEDULE, tmp_path / "run.pt", heldout, folder=tmp_path)
    card = load_card("tiny_noisy_classifier", tmp_path)
    classifier = load_model("tiny_noisy_classifier", folder=tmp_path)  # a plain shipped model, not a denoiser
    assert isinstance(classifier, NoisyDigitClassifier) and classifier.prediction_type is None
    generator = torch.Generator().manual_seed(0)
    schedule = make_schedule(**SCHEDULE)
    measured = noisy_class_accuracy(classifier, schedule, *heldout, train_control.ACCURACY_TIMESTEPS, generator)
    assert card["heldout_accuracy"]["by_t"] == {str(t): round(value, 4) for t, value in measured.items()}
    assert list(card["heldout_accuracy"]["by_t"]) == ["0", "250", "500", "750"] and card["heldout_accuracy"]["n"] == 30
    rows = train_control.status([CLASSIFIER], tmp_path, {CLASSIFIER.name: tmp_path / "run.pt"})
    assert "| `tiny_noisy_classifier` | 6 / 6 |" in rows[-1]
    (tmp_path / "run.pt").unlink()  # a finished run's checkpoint removed: its card says where it stands
    assert "| 6 / 6 |" in train_control.status([CLASSIFIER], tmp_path, {CLASSIFIER.name: tmp_path / "run.pt"})[-1]


def test_noisy_class_accuracy_counts_right_answers_at_each_noise_level():
    """A stand-in classifier that answers 0 below t = 500 and 1 from there on: 15 zeros and 5 ones score 0.75 at
    low noise and 0.25 at high noise, whatever the noise draws."""

    class Answers(torch.nn.Module):
        def forward(self, xt, t):  # logits (B, 10) with the argmax at 0 or 1
            return torch.nn.functional.one_hot((t >= 500).long(), 10).float() + 0 * xt.mean((1, 2, 3))[:, None]

    images, labels = digits()[0], torch.tensor([0] * 15 + [1] * 5)
    accuracy = noisy_class_accuracy(Answers().eval(), make_schedule(**SCHEDULE), images, labels, (0, 499, 500, 999))
    assert accuracy == {0: 0.75, 499: 0.75, 500: 0.25, 999: 0.25}
    with pytest.raises(ValueError, match="training mode"):
        noisy_class_accuracy(Answers().train(), make_schedule(**SCHEDULE), images, labels, (0,))
    with pytest.raises(ValueError, match=r"one label per image: images \(20, 1, 28, 28\), labels \(5,\)"):
        noisy_class_accuracy(Answers().eval(), make_schedule(**SCHEDULE), images, labels[:5], (0,))
    with pytest.raises(ValueError, match="t=1000 is out of range"):
        noisy_class_accuracy(Answers().eval(), make_schedule(**SCHEDULE), images, labels, (1000,))
