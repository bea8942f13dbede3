"""Shipped weights: safetensors files with a JSON card beside them, checked against data/SHA256SUMS, no pickle.

Every shipped model is `data/NAME.safetensors` (the tensors) plus `data/NAME.json` (the card: how to build the
model, the schedule it was trained with, and the command, machine and time that produced it). Weights are stored
in float16 to keep the files small and loaded back as float32.
"""

import importlib
import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from course_lib.data import data_dir, record_sha256, verify_file, write_atomic

STORAGE_DTYPE = torch.float16
PREDICTION_TYPES = ("eps", "x0", "v", "velocity", "edm")  # what a card's denoiser may predict


def save_weights(model: torch.nn.Module, name: str, card: dict, folder: Path | None = None) -> Path:
    """Write NAME.safetensors (float16) and NAME.json, and record both sha256 in the folder's SHA256SUMS.
    Each file is replaced whole (`write_atomic`): a kill mid-save leaves the old file, never half of one."""
    folder = Path(folder) if folder is not None else data_dir()
    tensors = {key: value.detach().to("cpu", STORAGE_DTYPE).contiguous() for key, value in model.state_dict().items()}
    weights_path, card_path = folder / f"{name}.safetensors", folder / f"{name}.json"
    write_atomic(weights_path, save(tensors, metadata={"card": f"{name}.json"}))
    write_atomic(card_path, (json.dumps(card, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    record_sha256(weights_path)
    record_sha256(card_path)
    return weights_path


def load_card(name: str, folder: Path | None = None) -> dict:
    """The JSON card of a shipped model, checked against the manifest."""
    folder = Path(folder) if folder is not None else data_dir()
    path = folder / f"{name}.json"
    verify_file(path, f"the script that trains {name} (data/README.md lists each file with its script)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path} holds a JSON {type(card).__name__}; a card is a JSON object")
    return card


def images_seen_in_all(name: str, folder: Path | None = None) -> int:
    """The training images behind a shipped model: its card's `images_seen`, plus, through `training.init_from`,
    those of the model it was trained from, and so on down the chain (cards exported since issue 15 also record
    the sum as `images_seen_in_all`; the tests hold them to this count)."""
    training = load_card(name, folder)["training"]
    start = training.get("init_from")  # "data/NAME.safetensors (...)"
    own = training["images_seen"]
    return own + images_seen_in_all(Path(start.split()[0]).stem, folder) if start else own


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


def card_class(card: dict, path: Path) -> type:
    """The course_lib class that a card's "model" entry names; raises naming the card file and the bad field."""
    if not isinstance(card.get("model"), dict):
        raise ValueError(f'{path} has no "model" entry (the class and its arguments); its fields: {sorted(card)}')
    if "class" not in card["model"]:
        fields = sorted(card["model"])
        raise ValueError(f'{path}: the "model" entry has no "class" (say "course_lib.nets.unet.UNet"); it has {fields}')
    qualified = card["model"]["class"]
    module_name, _, class_name = str(qualified).rpartition(".")
    if not module_name.startswith("course_lib."):
        raise ValueError(f"{path} names {qualified!r}; only course_lib classes are built")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise ValueError(f"{path} names {qualified!r}, which course_lib does not have") from None


def build_model(model_class: type, card: dict, path: Path) -> torch.nn.Module:
    """model_class(**model_config(card)); raises naming the card and any field the class does not take."""
    config = model_config(card)
    parameters = inspect.signature(model_class).parameters.values()
    arguments = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(config) - set(arguments))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in parameters):
        valid = ", ".join(arguments)
        raise ValueError(f"{path}: {unknown} are not arguments of {model_class.__name__}; valid: {valid}")
    try:
        return model_class(**config)
    except (TypeError, ValueError) as error:
        raise ValueError(f'{path}: its "model" entry does not build a {model_class.__name__}: {error}') from error


def card_prediction_type(card: dict, path: Path) -> str | None:
    """What the card's denoiser predicts ("prediction_type"); None for a model whose card has no "schedule" (the
    digit classifier, the VAE): those are not denoisers."""
    if "prediction_type" not in card:
        if "schedule" in card:
            raise ValueError(f"{path} has no prediction_type; valid: {', '.join(PREDICTION_TYPES)}")
        return None
    value = card["prediction_type"]
    if value not in PREDICTION_TYPES:
        raise ValueError(
            f"{path}: prediction_type={value!r} is not one of the course's; valid: {', '.join(PREDICTION_TYPES)}"
        )
    return value


def load_model(name: str, device: torch.device | str = "cpu", folder: Path | None = None) -> torch.nn.Module:
    """Build the model a card names (a class of course_lib only), load its weights and return it in eval mode.

    The model's `prediction_type` attribute says what it predicts, from its card ("eps", "x0", "v", "velocity",
    "edm"; None for a model that is not a denoiser), so that samplers can refuse a mismatch."""
    card = load_card(name, folder)
    path = (Path(folder) if folder is not None else data_dir()) / f"{name}.json"
    prediction_type = card_prediction_type(card, path)
    model = build_model(card_class(card, path), card, path)
    model = load_weights(model.to(device), name, folder)
    model.prediction_type = prediction_type
    return model
