r"""LoRA, low-rank adapters, written from scratch (chapter 8). Paper: Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models".

A frozen layer with weight $W$ (out x in) gets a trainable update of rank r, added to its output:

$$h = W x + \sum_{a} s_a\,\frac{\alpha_a}{r_a}\,B_a A_a\,x,\qquad A_a \in \mathbb R^{r_a \times in},\;
  B_a \in \mathbb R^{out \times r_a}$$

one term per adapter a, with alpha / r the adapter's fixed scaling and s_a a user scale (0 switches it off, 1 is
as trained). A starts random (Kaiming-uniform, as nn.Linear) and B at zero, so an injected model starts exactly
as the original. For a Conv2d, A is a conv with the layer's kernel, stride and padding into r channels and B a
1x1 conv out of them; the update to the kernel is $\Delta W[o, i] = \sum_k B[o, k]\,A[k, i]$.

The parameter names follow peft's (`base_layer`, `lora_A.<adapter>`, `lora_B.<adapter>`), so adapters move
between the two; tests/test_lora.py checks outputs and merged weights against peft.

    inject_lora(model, ["qkv", "conv1"], rank=4, alpha=4)     wrap every Linear / Conv2d with those names
    mark_only_lora_trainable(model)                          freeze the rest (returns the trainable count)
    set_lora_scale(model, 0.5)                               s for every adapter (or one, by name)
    merge_lora(model) / unmerge_lora(model)                  fold the update into W and back
    save_lora(model, path) / load_lora(model, path)          the adapter weights only, safetensors
"""

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

DEFAULT_ADAPTER = "default"


class LoRALayer(nn.Module):
    """A frozen nn.Linear or nn.Conv2d (`base_layer`) with any number of named low-rank adapters beside it."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not isinstance(base_layer, nn.Linear | nn.Conv2d):
            raise TypeError(f"LoRA wraps nn.Linear and nn.Conv2d layers; got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_A, self.lora_B = nn.ModuleDict(), nn.ModuleDict()
        self.scaling: dict[str, float] = {}  # alpha / r, fixed per adapter
        self.scale: dict[str, float] = {}  # the user's multiplier s, per adapter
        self.merged: dict[str, float] = {}  # adapter -> the total factor its update was merged with
        base_layer.requires_grad_(False)

    def add_adapter(self, name: str, rank: int, alpha: float) -> None:
        if name in self.lora_A:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer; got rank={rank!r}")
        base = self.base_layer
        if isinstance(base, nn.Linear):
            A = nn.Linear(base.in_features, rank, bias=False)
            B = nn.Linear(rank, base.out_features, bias=False)
        else:
            if base.groups != 1:
                raise ValueError(f"grouped convolutions (groups={base.groups}) are not supported")
            geometry = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
            A = nn.Conv2d(base.in_channels, rank, base.kernel_size, **geometry, bias=False)
            B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))  # as nn.Linear / peft
        nn.init.zeros_(B.weight)
        weight = base.weight
        self.lora_A[name], self.lora_B[name] = A.to(weight), B.to(weight)
        self.scaling[name], self.scale[name] = alpha / rank, 1.0

    def delta_weight(self, name: str) -> torch.Tensor:
        """B A, shaped like the base weight, times alpha / r (not times the user scale)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if isinstance(self.base_layer, nn.Linear):
            delta = B @ A  # (out, in)
        else:
            delta = torch.einsum("ok,kihw->oihw", B[:, :, 0, 0], A)  # (out, in, kh, kw)
        return delta * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        for name in self.lora_A:
            if name not in self.merged and self.scale[name] != 0:
                out = out + self.lora_B[name](self.lora_A[name](x)) * (self.scaling[name] * self.scale[name])
        return out

    def merge(self) -> None:
        """Add every unmerged adapter's update s * alpha / r * B A into the base weight."""
        with torch.no_grad():
            for name in self.lora_A:
                if name not in self.merged:
                    self.base_layer.weight += self.delta_weight(name) * self.scale[name]
                    self.merged[name] = self.scale[name]

    def unmerge(self) -> None:
        """Take every merged update back out of the base weight (exactly what merge added, up to rounding)."""
        with torch.no_grad():
            for name, factor in list(self.merged.items()):
                self.base_layer.weight -= self.delta_weight(name) * factor
                del self.merged[name]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALayer)}


def matches(module_name: str, targets: list[str]) -> bool:
    """peft's rule for target_modules given as names: the full name, or its last dotted parts, equals a target."""
    return any(module_name == target or module_name.endswith("." + target) for target in targets)


def add_lora(model: nn.Module, name: str, rank: int, alpha: float, adapter: str = DEFAULT_ADAPTER) -> None:
    """Give the layer called `name` an adapter, wrapping it in a LoRALayer first unless it already is one."""
    module = model.get_submodule(name)
    if not isinstance(module, LoRALayer):
        if not isinstance(module, nn.Linear | nn.Conv2d):
            raise TypeError(f"{name} is a {type(module).__name__}; LoRA wraps nn.Linear and nn.Conv2d only")
        parent_name, _, child = name.rpartition(".")
        module = LoRALayer(module)
        setattr(model.get_submodule(parent_name), child, module)
    module.add_adapter(adapter, rank, alpha)


def inject_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, adapter: str = DEFAULT_ADAPTER
) -> list[str]:
    """Give every nn.Linear / nn.Conv2d whose name matches `targets` (peft's rule, `matches`) an adapter, and return
    their names. Raises if nothing matches, naming the targets."""
    if isinstance(targets, str):
        raise TypeError(f"targets must be a list of module names; got the string {targets!r}")
    names = [name for name, _ in model.named_modules() if matches(name, targets) and not name.endswith(".base_layer")]
    if not names:
        raise ValueError(f"no module of the model matches the targets {targets}")
    for name in names:
        add_lora(model, name, rank, alpha, adapter)
    return names


def mark_only_lora_trainable(model: nn.Module) -> int:
    """Freeze every parameter but the adapters'; returns the number of trainable parameters."""
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_lora_scale(model: nn.Module, scale: float, adapter: str | None = None) -> None:
    """Set the user scale s of one adapter (or of all) in every LoRA layer; merged layers must be unmerged first."""
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("unmerge_lora(model) before changing a scale: merged weights hold the old one")
    for layer in layers.values():
        for name in layer.scale:
            if adapter is None or name == adapter:
                layer.scale[name] = float(scale)


def merge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def lora_state_dict(model: nn.Module, adapter: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """The weights of one adapter, keyed by their names in the model."""
    marker_a, marker_b = f".lora_A.{adapter}.", f".lora_B.{adapter}."
    state = {key: value for key, value in model.state_dict().items() if marker_a in key or marker_b in key}
    if not state:
        raise ValueError(f"the model has no adapter named {adapter!r}")
    return state


def save_lora(
    model: nn.Module, path: Path | str, adapter: str = DEFAULT_ADAPTER, dtype: torch.dtype | None = None
) -> Path:
    """Write one adapter's weights (and its alpha / r per layer) to a safetensors file; nothing else. dtype
    (float16, say, as the course's shipped weights) converts them; `load_lora` converts back to the layer's."""
    path = Path(path)
    state = {
        key: value.detach().to("cpu", dtype or value.dtype).contiguous()
        for key, value in lora_state_dict(model, adapter).items()
    }
    config = {name: layer.scaling[adapter] for name, layer in lora_layers(model).items() if adapter in layer.scaling}
    save_file(state, path, metadata={"adapter": adapter, "scaling": json.dumps(config)})
    return path


def load_lora(model: nn.Module, path: Path | str, adapter: str | None = None) -> str:
    """Inject the adapter stored at `path` into `model` (built as before, without it) and load its weights.
    Returns the adapter's name (the stored one unless `adapter` renames it)."""
    path = Path(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
        if "scaling" not in metadata:
            raise ValueError(f"{path} is not a LoRA adapter file written by save_lora (no scaling metadata)")
        stored = metadata["adapter"]
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    name = adapter or stored
    scalings = json.loads(metadata["scaling"])
    for layer_name, scaling in scalings.items():
        rank = tensors[f"{layer_name}.lora_A.{stored}.weight"].shape[0]
        add_lora(model, layer_name, rank, scaling * rank, name)
    layers = lora_layers(model)
    with torch.no_grad():
        for key, value in tensors.items():
            layer_name, _, rest = key.partition(".lora_")
            part = "lora_A" if rest.startswith("A.") else "lora_B"
            getattr(layers[layer_name], part)[name].weight.copy_(value)  # copy_ converts the dtype
    return name
