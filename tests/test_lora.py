"""course_lib.lora against peft: the same adapter weights give the same outputs, merged weights equal
`merge_and_unload`, and the rest of the API (scales, several adapters, merge / unmerge, save / load) behaves."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from course_lib.lora import (
    LoRALayer,
    inject_lora,
    load_lora,
    lora_layers,
    mark_only_lora_trainable,
    merge_lora,
    save_lora,
    set_lora_scale,
    unmerge_lora,
)
from course_lib.nets.unet import UNet

TARGETS = ["conv", "proj", "head.1"]


class Small(nn.Module):
    """A conv, a linear and a nested linear: the kinds of layer LoRA wraps in the course UNet."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))  # (B, 8)
        return self.head(self.proj(h))


def make_pair(rank: int = 4, alpha: float = 8.0):
    """The same base model with course and peft adapters, the course's given peft's initial adapter weights."""
    torch.manual_seed(0)
    base = Small()
    ours = copy.deepcopy(base)
    inject_lora(ours, TARGETS, rank, alpha)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    their_state = {key.removeprefix("base_model.model."): value for key, value in theirs.state_dict().items()}
    assert set(ours.state_dict()) == set(their_state)  # same names: base_layer, lora_A.default, lora_B.default
    ours.load_state_dict(their_state)
    return base, ours, theirs


def randomise_B(*models: nn.Module) -> None:
    """B starts at zero; give it the same random values in every model so the adapters do something."""
    generator = torch.Generator().manual_seed(1)
    names = sorted(name for name, _ in models[0].named_parameters() if ".lora_B." in name)
    for name in names:
        value = None
        for model in models:
            parameter = dict(model.named_parameters())[name if model is models[0] else f"base_model.model.{name}"]
            value = torch.randn(parameter.shape, generator=generator) if value is None else value
            with torch.no_grad():
                parameter.copy_(value)


def test_injected_model_starts_as_the_original_and_as_peft():
    base, ours, theirs = make_pair()
    x = torch.randn(5, 3, 6, 6)
    assert torch.equal(ours(x), base(x))
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_same_adapter_weights_give_peft_outputs_and_merged_weights():
    base, ours, theirs = make_pair()
    randomise_B(ours, theirs)
    x = torch.randn(5, 3, 6, 6)
    assert not torch.allclose(ours(x), base(x), atol=1e-3)  # the adapters are active
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)
    merged_theirs = theirs.merge_and_unload()
    merge_lora(ours)
    for name in ("conv", "proj", "head.1"):
        layer = ours.get_submodule(name)
        assert torch.allclose(layer.base_layer.weight, merged_theirs.get_submodule(name).weight, atol=1e-6), name
    assert torch.allclose(ours(x), merged_theirs(x), atol=1e-5)


def test_merge_changes_no_output_and_unmerge_restores_the_weights():
    base, ours, _ = make_pair()
    randomise_B(ours)
    x = torch.randn(5, 3, 6, 6)
    before = ours(x)
    merge_lora(ours)
    assert torch.allclose(ours(x), before, atol=1e-5)
    unmerge_lora(ours)
    for name in ("conv", "proj", "head.1"):
        assert torch.allclose(ours.get_submodule(name).base_layer.weight, base.get_submodule(name).weight, atol=1e-6)
    assert torch.allclose(ours(x), before, atol=1e-6)


def test_scale_multiplies_the_update_and_two_adapters_add():
    base, ours, _ = make_pair()
    randomise_B(ours)
    x = torch.randn(5, 3, 6, 6)
    layer = ours.proj
    h = torch.randn(5, 8)
    update = layer(h) - layer.base_layer(h)
    set_lora_scale(ours, 0.5)
    assert torch.allclose(layer(h) - layer.base_layer(h), 0.5 * update, atol=1e-6)
    set_lora_scale(ours, 0.0)
    assert torch.equal(ours(x), base(x))
    # a second adapter on the same layers: each alone, then both, whose updates add on every layer
    set_lora_scale(ours, 1.0)
    inject_lora(ours, ["proj"], rank=2, alpha=2, adapter="second")
    nn.init.normal_(ours.proj.lora_B["second"].weight)
    set_lora_scale(ours, 0.0, adapter="default")
    second = ours.proj(h) - ours.proj.base_layer(h)
    set_lora_scale(ours, 1.0, adapter="default")
    assert torch.allclose(ours.proj(h) - ours.proj.base_layer(h), update + second, atol=1e-5)
    merge_lora(ours)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        set_lora_scale(ours, 0.5)


def test_only_adapters_train_and_only_adapters_are_saved(tmp_path):
    torch.manual_seed(0)
    unet = UNet()
    full = sum(p.numel() for p in unet.parameters())
    names = inject_lora(unet, ["qkv", "out", "conv1", "conv2"], rank=2, alpha=2)
    assert all(isinstance(unet.get_submodule(name), LoRALayer) for name in names) and len(names) >= 10
    trainable = mark_only_lora_trainable(unet)
    assert 0 < trainable / full < 0.03
    for layer in lora_layers(unet).values():
        nn.init.normal_(next(iter(layer.lora_B.values())).weight, std=0.01)
    path = save_lora(unet, tmp_path / "adapter.safetensors")
    assert path.stat().st_size < 0.05 * full * 4
    half = save_lora(unet, tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    xt, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 500])
    torch.manual_seed(0)
    fresh = UNet()
    assert load_lora(fresh, path) == "default"
    fresh.load_state_dict(unet.state_dict())  # the same base weights, so the outputs must agree
    assert torch.allclose(fresh(xt, t), unet(xt, t), atol=1e-6)


def test_loading_restores_the_adapter_weights_into_a_fresh_model(tmp_path):
    _, ours, _ = make_pair(rank=3, alpha=6.0)
    randomise_B(ours)
    save_lora(ours, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = Small()
    load_lora(fresh, tmp_path / "a.safetensors", adapter="style")
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(fresh(x), ours(x), atol=1e-6)
    assert fresh.proj.scaling["style"] == pytest.approx(2.0) and fresh.proj.lora_A["style"].weight.shape[0] == 3


def test_bad_inputs_raise_clear_errors():
    model = Small()
    with pytest.raises(ValueError, match=r"no module of the model matches the targets \['qkv'\]"):
        inject_lora(model, ["qkv"], rank=4, alpha=4)
    with pytest.raises(TypeError, match="the string 'proj'"):
        inject_lora(model, "proj", rank=4, alpha=4)
    with pytest.raises(TypeError, match="head is a Sequential"):
        inject_lora(model, ["head"], rank=4, alpha=4)
    with pytest.raises(ValueError, match="rank=0"):
        inject_lora(model, ["proj"], rank=0, alpha=4)
    inject_lora(model, ["proj"], rank=2, alpha=4)
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        inject_lora(model, ["proj"], rank=2, alpha=4)


def test_a_nan_alpha_or_scale_is_refused_by_value():
    layer = LoRALayer(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="alpha=nan"):
        layer.add_adapter("default", rank=2, alpha=float("nan"))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_lora(model, ["0"], rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="scale=nan"):
        set_lora_scale(model, float("nan"))


def test_the_recommended_scale_is_the_largest_that_meets_the_targets(tmp_path, monkeypatch):
    """scripts/train_lora.py writes into the adapter's card the largest measured scale whose FID stays within 1.5x
    the base's and whose style reach (when a full fine-tune was measured) is >= 90%; None when none does."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_lora

    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(train_lora, "data_dir", lambda: tmp_path)
    (tmp_path / "lora_bold.json").write_text(json.dumps({"base": "unet_mnist_eps"}))
    run = lambda scale, ratio, reach: {"scale": scale, "kept": {"fid_ratio": ratio}, "reach": reach}  # noqa: E731
    results = {"full": 3.6, "runs": [run(0.5, 0.8, 0.6), run(0.85, 1.3, 0.91), run(1.0, 1.7, 1.02)]}
    train_lora.recommend_scale("bold", results)
    card = json.loads((tmp_path / "lora_bold.json").read_text())
    assert card["recommended_scale"]["scale"] == 0.85 and card["base"] == "unet_mnist_eps"
    assert "lora_bold.json" in (tmp_path / "SHA256SUMS").read_text()
    results["runs"][1]["reach"] = 0.89  # now no scale meets both targets
    train_lora.recommend_scale("bold", results)
    assert json.loads((tmp_path / "lora_bold.json").read_text())["recommended_scale"]["scale"] is None


def test_a_fine_tune_reports_the_config_it_trained_with():
    """The adapter's card records the run's own config: a --steps run must not be carded as the recipe's steps."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_lora

    _, run = train_lora.fine_tune("bold", lora=True, steps=1)
    assert run["config"]["steps"] == 1 and run["config"]["warmup"] == 1
    assert run["config"]["lr"] == train_lora.LORA_CONFIG.lr and train_lora.LORA_CONFIG.steps != 1
