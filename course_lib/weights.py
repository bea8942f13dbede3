"""Shipped weights: safetensors files with a JSON card beside them, checked against data/SHA256SUMS, no pickle.

Every shipped model is `data/NAME.safetensors` (the tensors) plus `data/NAME.json` (the card: how to build the
model, the schedule it was trained with, and the command, machine and time that produced it). Weights are stored
in float16 to keep the files small and loaded back as float32.
"""

import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from course_lib.data import data_dir, record_sha256, verify_file

STORAGE_DTYPE = torch.float16


def save_weights(model: torch.nn.Module, name: str, card: dict, folder: Path | None = None) -> Path:
    """Write NAME.safetensors (float16) and NAME.json, and record both sha256 in the folder's SHA256SUMS."""
    folder = Path(folder) if folder is not None else data_dir()
    tensors = {key: value.detach().to("cpu", STORAGE_DTYPE).contiguous() for key, value in model.state_dict().items()}
    weights_path, card_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    save_file(tensors, weights_path, metadata={"card": f"{name}.json"})
    card_path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    record_sha256(weights_path)
    record_sha256(card_path)
    return weights_path


def load_card(name: str, folder: Path | None = None) -> dict:
    """The JSON card of a shipped model, checked against the manifest."""
    folder = Path(folder) if folder is not None else data_dir()
    path = folder / f"{name}.json"
    verify_file(path, f"the script that trains {name} (data/README.md lists each file with its script)")
    return json.loads(path.read_text())


def load_weights(
    model: torch.nn.Module, name: str, folder: Path | None = None, allow_new: bool = False
) -> torch.nn.Module:
    """Load NAME.safetensors into `model` (float32, on the model's device) after checking its sha256.

    allow_new=True starts a larger model from a shipped one (a conditional UNet from the unconditional one): the
    model may have parameters the file lacks, which keep their initial values; every tensor of the file must still
    fit one of the model's."""
    folder = Path(folder) if folder is not None else data_dir()
    path = folder / f"{name}.safetensors"
    verify_file(path, f"the training script named in data/{name}.json (see data/README.md)")
    tensors = load_file(path)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if allow_new:
        missing = []
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    misshapen = [
        f"{key} {tuple(tensors[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in tensors and tensors[key].shape != value.shape
    ]
    if misshapen:
        raise ValueError(f"{path} does not fit this model (file vs model shapes): {misshapen[:3]}")
    device = next(model.parameters()).device
    loaded = {key: value.to(device, expected[key].dtype) for key, value in tensors.items()}
    model.load_state_dict(loaded, strict=not allow_new)
    return model.eval()


def model_config(card: dict) -> dict:
    """The keyword arguments that build a card's model: its "model" entry without "class", lists as tuples."""
    config = {key: value for key, value in card["model"].items() if key != "class"}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in config.items()}


def load_model(name: str, device: torch.device | str = "cpu", folder: Path | None = None) -> torch.nn.Module:
    """Build the model a card names (a class of course_lib only), load its weights and return it in eval mode."""
    card = load_card(name, folder)
    module_name, _, class_name = card["model"]["class"].rpartition(".")
    if not module_name.startswith("course_lib."):
        raise ValueError(f"the card of {name} names {card['model']['class']!r}; only course_lib classes are built")
    model_class = getattr(importlib.import_module(module_name), class_name)
    return load_weights(model_class(**model_config(card)).to(device), name, folder)
