"""Faults found by the reliability review (issue 14): Windows checkouts, damaged adapters and manifests, vague
card and device errors, interrupted writes, a pip install without the data. Each test failed before its fix."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from course_lib import data as data_module
from course_lib.data import data_dir, load_digits, read_manifest, record_sha256
from course_lib.lora import inject_lora, load_lora, lora_layers, mark_only_lora_trainable, merge_lora, save_lora
from course_lib.nets.unet import UNet
from course_lib.profiles import get_device
from course_lib.weights import load_card, load_model, model_config, save_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)
needs_git = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout"
)


def git(*args: str, cwd: Path) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


# Windows checkouts: data files reach users byte for byte


@needs_git
def test_git_never_converts_the_line_endings_of_a_data_file():
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "data").rglob("*") if path.is_file())
    output = git("check-attr", "text", "--", *files, cwd=ROOT)
    converted = [line for line in output.splitlines() if not line.endswith(": text: unset")]
    assert files and not converted, f"add these to .gitattributes as -text: {converted}"


@needs_git
def test_a_clone_with_autocrlf_still_loads_the_shipped_cards(tmp_path):
    """Git for Windows clones with core.autocrlf=true: the cards must keep their bytes, so their sha256 holds."""
    source, clone = tmp_path / "source", tmp_path / "clone"
    (source / "data").mkdir(parents=True)
    for name in ("unet_mnist_flow.json", "SHA256SUMS"):
        shutil.copy(ROOT / "data" / name, source / "data" / name)
    if (ROOT / ".gitattributes").exists():
        shutil.copy(ROOT / ".gitattributes", source / ".gitattributes")
    git("init", "-q", cwd=source)
    git("add", ".", cwd=source)
    git("commit", "-q", "-m", "data", cwd=source)
    git("-c", "core.autocrlf=true", "clone", "-q", str(source), str(clone), cwd=tmp_path)
    assert load_card("unet_mnist_flow", clone / "data")["prediction_type"] == "velocity"


def test_a_card_with_windows_line_endings_is_named_as_such(tmp_path):
    card = (data_dir() / "unet_mnist_flow.json").read_bytes().replace(b"\n", b"\r\n")
    (tmp_path / "unet_mnist_flow.json").write_bytes(card)
    shutil.copy(data_dir() / "SHA256SUMS", tmp_path / "SHA256SUMS")
    with pytest.raises(ValueError, match=r"unet_mnist_flow.json has Windows line endings.*git checkout"):
        load_card("unet_mnist_flow", tmp_path)


# Shipped LoRA adapters: checked against the manifest, validated before the model changes


def digit_unet() -> UNet:
    """The shipped digit UNet's architecture, with random weights: enough to load adapters into."""
    return UNet(**model_config(load_card("unet_mnist_eps")))


@pytest.mark.parametrize("style", ["bold", "slant"])
def test_shipped_adapters_are_in_the_manifest_and_load(style):
    assert f"lora_{style}.safetensors" in read_manifest(data_dir() / "SHA256SUMS")
    assert load_lora(digit_unet(), data_dir() / f"lora_{style}.safetensors", adapter=style) == style


def test_a_shipped_adapter_with_a_flipped_byte_is_refused(tmp_path, monkeypatch):
    model = digit_unet()
    for name in ("lora_bold.safetensors", "SHA256SUMS"):
        shutil.copy(data_dir() / name, tmp_path / name)
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    path = tmp_path / "lora_bold.safetensors"
    damaged = bytearray(path.read_bytes())
    damaged[-100] ^= 0x40
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"lora_bold.safetensors is damaged"):
        load_lora(model, path)
    assert not lora_layers(model)


class Small(nn.Module):
    def __init__(self, head: bool = True, conv_out: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, conv_out, 3, padding=1)
        self.proj = nn.Linear(conv_out, 16)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(16, 4)) if head else nn.Sequential(nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.conv(x).mean((2, 3))))


@pytest.fixture
def adapter_file(tmp_path) -> Path:
    model = Small()
    inject_lora(model, ["conv", "proj", "head.1"], rank=2, alpha=4)
    return save_lora(model, tmp_path / "adapter.safetensors")


@pytest.mark.parametrize(
    "target, match",
    [
        (lambda: Small(head=False), r"adapter.safetensors.*head.1"),  # the last layer is missing
        (lambda: Small(conv_out=6), r"adapter.safetensors.*conv"),  # the shapes differ
        (lambda: UNet(**TINY), r"adapter.safetensors.*conv"),  # another architecture
    ],
)
def test_an_adapter_that_does_not_fit_leaves_the_model_untouched(adapter_file, target, match):
    model = target()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_lora(model, adapter_file)
    assert not lora_layers(model) and model.state_dict().keys() == before.keys()
    assert all(value.requires_grad for value in model.parameters())


def test_a_truncated_adapter_is_named_and_leaves_the_model_untouched(adapter_file):
    adapter_file.write_bytes(adapter_file.read_bytes()[:-50])
    model = Small()
    with pytest.raises(ValueError, match=r"adapter.safetensors is not a readable safetensors file"):
        load_lora(model, adapter_file)
    assert not lora_layers(model)


def test_an_adapter_loads_twice_only_under_two_names(adapter_file):
    model = Small()
    load_lora(model, adapter_file)
    with pytest.raises(ValueError, match=r"adapter.safetensors.*already has an adapter named 'default'"):
        load_lora(model, adapter_file)
    assert load_lora(model, adapter_file, adapter="again") == "again"


def test_backward_through_a_merged_adapter_says_to_unmerge():
    model = Small()
    inject_lora(model, ["conv", "proj"], rank=2, alpha=4)
    mark_only_lora_trainable(model)
    merge_lora(model)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    model.eval()  # inference after a merge may still take gradients with respect to the input
    assert torch.autograd.grad(model(x).sum(), x)[0].shape == x.shape
    model.train()
    with pytest.raises(RuntimeError, match=r"merged.*unmerge_lora\(model\)"):
        model(x).sum().backward()


# A model card's prediction_type


def test_loading_knows_what_a_model_predicts():
    assert load_model("unet_mnist_flow").prediction_type == "velocity"
    assert load_model("unet_mnist_eps").prediction_type == "eps"
    assert load_model("vae_mnist").prediction_type is None  # not a denoiser: its card has no schedule


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"schedule": None}, r"tiny.json has no prediction_type; valid: eps, x0, v, velocity, edm"),
        ({"schedule": None, "prediction_type": "noise"}, r"tiny.json: prediction_type='noise'.*valid: eps, x0"),
    ],
)
def test_a_denoiser_card_must_say_what_it_predicts(tmp_path, extra, match):
    save_weights(UNet(**TINY), "tiny", {"model": {"class": "course_lib.nets.unet.UNet", **TINY}, **extra}, tmp_path)
    with pytest.raises(ValueError, match=match):
        load_model("tiny", folder=tmp_path)


# Vague errors that now name the file or value


def test_a_half_written_manifest_line_names_the_manifest_and_line(tmp_path, monkeypatch):
    shutil.copy(data_dir() / "mnist5k.parquet", tmp_path / "mnist5k.parquet")
    manifest = tmp_path / "SHA256SUMS"
    manifest.write_text((data_dir() / "SHA256SUMS").read_text() + "e5159933eac9\n")
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    lines = len(manifest.read_text().splitlines())
    with pytest.raises(ValueError, match=rf"{manifest}, line {lines}: 'e5159933eac9'"):
        load_digits()


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda text: text[:-20], r"tiny.json is not valid JSON"),
        (lambda text: text.replace('"class"', '"klass"'), r"tiny.json: the \"model\" entry has no \"class\""),
        (lambda text: text.replace('"model"', '"modle"'), r"tiny.json has no \"model\" entry"),
        (lambda text: text.replace('"channels"', '"chanels"'), r"tiny.json: .*'chanels'.*valid: .*channels"),
        (lambda text: text.replace("unet.UNet", "unet.UNett"), r"tiny.json names 'course_lib.nets.unet.UNett'"),
        (lambda text: text.replace("nets.unet", "nets.unnet"), r"tiny.json names 'course_lib.nets.unnet.UNet'"),
    ],
)
def test_a_broken_card_is_named_with_the_bad_field(tmp_path, edit, match):
    card = {"model": {"class": "course_lib.nets.unet.UNet", **TINY}, "prediction_type": "eps", "schedule": None}
    save_weights(UNet(**TINY), "tiny", card, tmp_path)
    path = tmp_path / "tiny.json"
    path.write_text(edit(path.read_text()))
    record_sha256(path)  # an edit made on purpose, recorded: the card's content is what is wrong
    with pytest.raises(ValueError, match=match):
        load_model("tiny", folder=tmp_path)


@pytest.mark.parametrize(
    "value, cuda_count, mps, match",
    [
        ("cuda", 0, False, r"COURSE_DEVICE='cuda' asks for a cuda device.*has none.*valid here: cpu"),
        ("cuda:7", 2, False, r"COURSE_DEVICE='cuda:7'.*has 2.*valid here: cuda, cuda:0, cuda:1, cpu"),
        ("mps", 0, False, r"COURSE_DEVICE='mps' asks for a mps device"),
        ("cuda:", 1, False, r"COURSE_DEVICE='cuda:' is not a device"),
        ("cuda:one", 1, False, r"COURSE_DEVICE='cuda:one' is not a device"),
        ("CPU", 0, False, r"COURSE_DEVICE='CPU' is not a device; valid: cuda, cuda:N, mps, cpu"),
    ],
)
def test_a_device_the_machine_lacks_names_course_device(monkeypatch, value, cuda_count, mps, match):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_count)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setenv("COURSE_DEVICE", value)
    with pytest.raises(ValueError, match=match):
        get_device()


def test_an_available_device_is_returned(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("COURSE_DEVICE", "cuda:1")
    assert get_device() == torch.device("cuda:1")
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")


# Writes of manifests, cards, weights and adapters are atomic


@pytest.fixture
def crash_before_rename(monkeypatch):
    """A kill between writing a file and renaming it into place (os.replace is the rename)."""

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    return lambda: monkeypatch.setattr(os, "replace", crash)


def test_an_interrupted_save_leaves_the_old_files_whole(tmp_path, crash_before_rename):
    card = {"model": {"class": "course_lib.nets.unet.UNet", **TINY}, "prediction_type": "eps", "schedule": None}
    save_weights(UNet(**TINY), "tiny", card, tmp_path)
    model = UNet(**TINY)
    inject_lora(model, ["qkv"], rank=2, alpha=2)
    save_lora(model, tmp_path / "adapter.safetensors")
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    crash_before_rename()
    torch.nn.init.normal_(model.conv_out.weight)
    with pytest.raises(KeyboardInterrupt):
        save_weights(model, "tiny", {**card, "prediction_type": "v"}, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        save_lora(model, tmp_path / "adapter.safetensors")
    with pytest.raises(KeyboardInterrupt):
        record_sha256(tmp_path / "adapter.safetensors")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before  # no temporary file left


# A pip install outside a checkout


def test_a_missing_data_folder_says_how_to_point_at_it(tmp_path, monkeypatch):
    monkeypatch.delenv("COURSE_DATA_DIR", raising=False)
    monkeypatch.setattr(data_module, "__file__", str(tmp_path / "site-packages" / "course_lib" / "data.py"))
    with pytest.raises(FileNotFoundError) as error:
        load_digits()
    message = str(error.value)
    assert "\n" not in message and "set COURSE_DATA_DIR to the data/ folder of a checkout" in message
    assert str(tmp_path / "site-packages" / "data") in message
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"COURSE_DATA_DIR=.*nowhere.* is not a folder"):
        load_card("unet_mnist_eps")
