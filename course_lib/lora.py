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

Training needs the adapters unmerged: in training mode, a backward pass through an adapter that is merged but
still trainable raises (its A and B would get no gradient), saying to unmerge first.
"""

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import nn

from course_lib.data import is_shipped, verify_file, write_atomic

DEFAULT_ADAPTER = "default"


MERGED_BACKWARD = (
    "backward through a LoRA adapter merged into its layer's weight: merge_lora folded B A into W, so A and B get "
    "no gradient; call unmerge_lora(model) before training (merge only for inference), or freeze the merged adapter"
)


class RefuseBackward(torch.autograd.Function):
    """The identity on a layer's output, whose backward raises MERGED_BACKWARD (the weights only tie it to them)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(MERGED_BACKWARD)


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
        if not is_finite_number(alpha):
            raise ValueError(f"alpha must be a finite number; got alpha={alpha!r}")
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
        if self.merged and self.training and torch.is_grad_enabled():
            adapters = [module for name in self.merged for module in (self.lora_A[name], self.lora_B[name])]
            trainable = [module.weight for module in adapters if module.weight.requires_grad]
            out = RefuseBackward.apply(out, *trainable) if trainable else out
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
    if not is_finite_number(scale):
        raise ValueError(f"scale must be a finite number (0: the adapter off, 1: as trained); got scale={scale!r}")
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
    (float16, say, as the course's shipped weights) converts them; `load_lora` converts back to the layer's.
    The file is replaced whole (`write_atomic`): a kill mid-write leaves the old one."""
    path = Path(path)
    state = {
        key: value.detach().to("cpu", dtype or value.dtype).contiguous()
        for key, value in lora_state_dict(model, adapter).items()
    }
    config = {name: layer.scaling[adapter] for name, layer in lora_layers(model).items() if adapter in layer.scaling}
    write_atomic(path, save(state, metadata={"adapter": adapter, "scaling": json.dumps(config)}))
    return path


def is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_lora_file(path: Path) -> tuple[str, dict[str, float], dict[str, torch.Tensor]]:
    """(stored adapter name, {layer name: alpha / r}, tensors) of a file written by save_lora; raises naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file (cut short?): {error}") from None
    if "scaling" not in metadata or "adapter" not in metadata:
        raise ValueError(f"{path} is not a LoRA adapter file written by save_lora (no scaling metadata)")
    try:
        scalings = json.loads(metadata["scaling"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its scaling metadata is not valid JSON: {error}") from None
    bad = {name: value for name, value in scalings.items() if not is_finite_number(value)}
    if bad:
        raise ValueError(f"{path}: alpha / r must be finite numbers; got {bad}")
    return metadata["adapter"], scalings, tensors


def adapter_shapes(base: nn.Linear | nn.Conv2d, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B in a rank-r adapter of `base`, as LoRALayer.add_adapter makes them."""
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)


def check_lora_layer(
    model: nn.Module, path: Path, layer_name: str, A: torch.Tensor, B: torch.Tensor, adapter: str
) -> int:
    """Check that the file's A and B fit the model's layer `layer_name` without changing the model; returns the rank."""
    try:
        module = model.get_submodule(layer_name)
    except AttributeError:
        raise ValueError(f"{path} has an adapter for {layer_name!r}, which this model lacks (another model?)") from None
    if isinstance(module, LoRALayer):
        if adapter in module.lora_A:
            raise ValueError(f"{path}: {layer_name} already has an adapter named {adapter!r}; pass adapter=NEW_NAME")
        module = module.base_layer
    if not isinstance(module, nn.Linear | nn.Conv2d) or getattr(module, "groups", 1) != 1:
        raise ValueError(f"{path} has an adapter for {layer_name}, a {type(module).__name__}: not a layer LoRA wraps")
    rank = A.shape[0] if A.ndim else 0
    expected = adapter_shapes(module, rank)
    if rank < 1 or (tuple(A.shape), tuple(B.shape)) != expected:
        raise ValueError(
            f"{path} does not fit {layer_name}: A {tuple(A.shape)}, B {tuple(B.shape)}; "
            f"this layer takes A {expected[0]}, B {expected[1]} at rank {rank}"
        )
    return rank


def load_lora(model: nn.Module, path: Path | str, adapter: str | None = None) -> str:
    """Inject the adapter stored at `path` into `model` (built as before, without it) and load its weights.
    Returns the adapter's name (the stored one unless `adapter` renames it).

    A shipped adapter (a file in the data folder) is checked against data/SHA256SUMS first. Every layer of the file
    is checked against the model before any is changed, so a file that does not fit leaves the model as it was."""
    path = Path(path)
    if is_shipped(path):
        verify_file(path, "python scripts/train_lora.py --style STYLE (data/README.md names each adapter's command)")
    stored, scalings, tensors = read_lora_file(path)
    name = adapter or stored
    keys = {layer: (f"{layer}.lora_A.{stored}.weight", f"{layer}.lora_B.{stored}.weight") for layer in scalings}
    missing = sorted(key for pair in keys.values() for key in pair if key not in tensors)
    unexpected = sorted(set(tensors) - {key for pair in keys.values() for key in pair})
    if missing or unexpected:
        raise ValueError(f"{path} is inconsistent: missing tensors {missing[:3]}, unexpected {unexpected[:3]}")
    ranks = {
        layer: check_lora_layer(model, path, layer, tensors[a], tensors[b], name) for layer, (a, b) in keys.items()
    }
    for layer, scaling in scalings.items():
        add_lora(model, layer, ranks[layer], scaling * ranks[layer], name)
    with torch.no_grad():
        for layer, (a, b) in keys.items():
            module = model.get_submodule(layer)
            module.lora_A[name].weight.copy_(tensors[a])  # copy_ converts the dtype
            module.lora_B[name].weight.copy_(tensors[b])
    return name
