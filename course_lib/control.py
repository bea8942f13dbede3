r"""ControlNet: steering a frozen diffusion model with a control image (chapter 13, control and editing).

Taught in notebooks/13_control_and_editing.ipynb. Paper: Zhang, Rao & Agrawala 2023, "Adding Conditional Control
to Text-to-Image Diffusion Models" (ControlNet). img2img / SDEdit, inpainting and classifier guidance, the other
half of the chapter, are in `course_lib.editing`.

The control images are computed from the digits by code (`edge_map`: each digit's outline), so that how well a
sample follows its control is a number (`edge_agreement`), not an impression. The shipped ControlNet on those
outlines, data/controlnet_edges (trained by scripts/train_control.py on the frozen data/unet_mnist_eps), loads with
`load_controlnet("controlnet_edges")`.

ControlNet keeps the trained UNet frozen and trains a copy of its way down (input convolution, time and condition
embedding, the down levels and the middle), initialised with the frozen weights. The copy reads the noisy image
plus an encoding of the control image, and every feature map the frozen decoder reads (each skip and the middle's
output) receives the copy's matching feature map through a 1x1 convolution initialised at zero (Zhang et al. 2023,
eq. 2 with Z the zero convolution):

$$y_c = \mathcal F(x; \Theta) + \mathcal Z\big(\mathcal F(x + \mathcal Z(c; \Theta_{z1}); \Theta_c); \Theta_{z2}\big)$$

At initialisation every zero convolution outputs exactly 0, so the controlled model is the frozen one, bit for
bit, and training starts from it instead of from a random perturbation of it.

Code name -> paper symbol:
    base                    F(.; Theta), the frozen UNet (`nets.unet.UNet`)
    ControlNet.encoder      F(.; Theta_c), the trainable copy: the UNet with its decoder removed
    HintEncoder             the tiny network E(.) that maps the control image c to the first feature map; its last
                            convolution is Z(.; Theta_z1), zero-initialised
    skip_convs, middle_conv Z(.; Theta_z2): one zero 1x1 convolution per skip and one on the middle
    scale                   diffusers' `controlnet_conditioning_scale`: the residuals are multiplied by it
"""

import copy
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import check_images
from course_lib.ddpm import Denoiser
from course_lib.nets.unet import UNet, zero_init
from course_lib.weights import load_card, load_model, load_weights

# --- control images computed from the digits -------------------------------------------------------------------


def edge_map(images: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    r"""The outline of each digit, a morphological edge: the ink dilated by a 3 x 3 square, minus the ink.

    A pixel is ink where its value exceeds `threshold` (0, the middle of [-1, 1]). A pixel is on the outline where
    it is not ink and one of its 8 neighbours is: $E = (I \oplus S_{3\times3}) \setminus I$. A filled square's
    outline is the one-pixel ring just outside it; a stroke gets two thin lines, one on each side.
    Images (B, 1, 28, 28) in [-1, 1]; returns (B, 1, 28, 28) with +1 on the outline and -1 elsewhere, a digit-like
    image that the ControlNet reads as its control.
    """
    check_images(images)
    ink = (images > threshold).to(images.dtype)  # (B, 1, H, W), 1 on the ink
    dilated = F.max_pool2d(ink, 3, stride=1, padding=1)  # 1 where a pixel or a neighbour is ink (padding ignored)
    return 2 * dilated * (1 - ink) - 1


def edge_agreement(samples: torch.Tensor, control: torch.Tensor, tolerance: int = 0) -> torch.Tensor:
    r"""How well each sample's own outline follows its control: the boundary F1 score, per image (B,) in [0, 1].

    A = the outline of the sample (`edge_map(samples)` > 0), C = the control's edge pixels (control > 0).
    A pixel is matched when the other map has an edge within `tolerance` pixels of it (a (2 tol + 1)^2 square):

    $$P = \frac{|\{a \in A \text{ matched in } C\}|}{|A|},\quad R = \frac{|\{c \in C \text{ matched in } A\}|}{|C|},
      \quad F_1 = \frac{2PR}{P + R}$$

    With tolerance 0 this is the Dice overlap $2|A \cap C| / (|A| + |C|)$. It is the boundary F-measure of Martin,
    Fowlkes & Malik 2004 without their one-to-one matching of pixels. Two empty maps agree (1); an empty map
    against a non-empty one scores 0. samples and control: (B, 1, 28, 28) in [-1, 1].
    """
    check_images(control, "control")
    if samples.shape != control.shape:
        raise ValueError(
            f"one control per sample: shapes must match; got {tuple(samples.shape)}, {tuple(control.shape)}"
        )
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an integer number of pixels >= 0; got {tolerance!r}")
    sample_edges = (edge_map(samples) > 0).float()
    control_edges = (control > 0).float()

    def near(edges: torch.Tensor) -> torch.Tensor:  # 1 within `tolerance` pixels of an edge
        return F.max_pool2d(edges, 2 * tolerance + 1, stride=1, padding=tolerance) if tolerance else edges

    n_sample, n_control = sample_edges.sum((1, 2, 3)), control_edges.sum((1, 2, 3))  # (B,)
    precision = (sample_edges * near(control_edges)).sum((1, 2, 3)) / n_sample.clamp(min=1)
    recall = (control_edges * near(sample_edges)).sum((1, 2, 3)) / n_control.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return torch.where((n_sample == 0) & (n_control == 0), torch.ones_like(f1), f1)


# --- the ControlNet ---------------------------------------------------------------------------------------------


class HintEncoder(nn.Module):
    """The control image -> a feature map shaped like the UNet's first one, ending in a zero convolution.

    The layout of diffusers' `ControlNetConditioningEmbedding` (and its parameter names): a 3x3 convolution to
    channels[0], then for each next width a 3x3 convolution and a 3x3 convolution with `stride` to that width,
    SiLU after each, and a zero-initialised 3x3 convolution to out_channels. stride 1 keeps the resolution, for a
    UNet on pixels; stride 2 halves it at every width, as Stable Diffusion's ControlNet goes from a 512 x 512
    image to its 64 x 64 latents (and as a 28 x 28 control would reach chapter 6's 7 x 7 latents).
    """

    def __init__(
        self,
        out_channels: int,  # width of the UNet's first feature map (its channels[0])
        in_channels: int = 1,  # channels of the control image
        channels: tuple[int, ...] = (16, 32),  # widths of the convolutions before the zero one
        stride: int = 1,  # 1 for a UNet on pixels; 2 halves the resolution at each width after the first
    ):
        super().__init__()
        if not channels or stride not in (1, 2):
            raise ValueError(f"need at least one width and stride 1 or 2; got channels={channels}, stride={stride}")
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c, c_next in pairwise(channels):
            self.blocks.append(nn.Conv2d(c, c, 3, padding=1))
            self.blocks.append(nn.Conv2d(c, c_next, 3, padding=1, stride=stride))
        self.conv_out = zero_init(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(control))  # (B, channels[0], H, W)
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)  # (B, out_channels, H / stride^(len(channels) - 1), ...)


def encoder_copy(base: UNet) -> UNet:
    """A trainable copy of the base UNet's way down, with its weights: the base deep-copied, its decoder removed
    (up, norm_out and conv_out set to None, so that they hold no parameters). Its `embed` and `encode` are the
    base's own code, so the two encoders cannot drift apart; its forward, which needs the decoder, is not used."""
    encoder = copy.deepcopy(base).requires_grad_(True)
    encoder.up = encoder.norm_out = encoder.conv_out = None
    return encoder


def skip_channels(base: UNet) -> list[int]:
    """The channels of each skip the base's decoder reads, in the order `UNet.encode` returns them."""
    return [block.conv1.out_channels for level in base.down for block in level.blocks]


class ControlNet(nn.Module):
    """The trainable branch of a ControlNet for one base UNet: controlnet(xt, t, control, cond) -> (skip residuals,
    middle residual), the tensors that `ControlledUNet` adds to the frozen decoder's inputs.

    Built from the base, whose weights it copies (the base itself is not changed): a copy of its way down and
    middle (time and condition embedding included), a `HintEncoder` from the control image to the first feature
    map, and a zero 1x1 convolution on every skip and on the middle. One residual per skip the base's decoder reads
    (diffusers' UNets also keep conv_in's and each downsampler's output as skips, and its ControlNetModel has a
    zero convolution for each of those; the course's UNet reads only its blocks' outputs)."""

    def __init__(
        self,
        base: UNet,  # the frozen UNet to control; its way down is copied, with its weights
        control_channels: int = 1,  # channels of the control image
        hint_channels: tuple[int, ...] = (16, 32),  # widths of the HintEncoder before its zero convolution
        hint_stride: int = 1,  # the HintEncoder's stride (1: the control has the UNet's input size)
    ):
        super().__init__()
        if not isinstance(base, UNet):
            raise TypeError(f"a ControlNet is built from a course_lib.nets.unet.UNet; got {type(base).__name__}")
        c0 = base.conv_in.out_channels
        self.encoder = encoder_copy(base)
        self.hint = HintEncoder(c0, control_channels, hint_channels, hint_stride)
        self.skip_convs = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in skip_channels(base))
        c_last = base.mid2.conv2.out_channels
        self.middle_conv = zero_init(nn.Conv2d(c_last, c_last, 1))

    def forward(self, xt, t, control, cond=None, context_mask=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        # xt: (B, C, H, W); control: (B, control_channels, H, W) (H * 2^k with hint_stride 2); cond as the UNet's
        emb, cross = self.encoder.embed(xt, t, cond, context_mask)  # the copy's own time and condition embedding
        h, hint = self.encoder.conv_in(xt), self.hint(control)  # (B, c0, H, W) each
        if hint.shape != h.shape:
            raise ValueError(
                f"the control {tuple(control.shape)} encodes to {tuple(hint.shape)}, but the UNet's first feature "
                f"map for xt {tuple(xt.shape)} is {tuple(h.shape)}: one control per image, at the image's size"
            )
        h = h + hint  # x + Z(c; Theta_z1)
        h, skips, _ = self.encoder.encode(h, emb, cross)
        skip_residuals = [conv(skip) for conv, skip in zip(self.skip_convs, skips, strict=True)]
        return skip_residuals, self.middle_conv(h)  # Z(F(...; Theta_c); Theta_z2) at every skip and the middle


class ControlledUNet(nn.Module):
    """A frozen base UNet steered by a ControlNet: model(xt, t, control, scale=1.0, cond=None) -> like xt.

    The base runs its way down as usual; the ControlNet's residuals, times `scale`, are added to the skips and the
    middle that the base's decoder reads (`UNet.decode`). The base's parameters are frozen here (requires_grad
    False; its weights are never changed): an optimiser over this model's parameters trains the ControlNet only.
    At initialisation, or at scale 0, the output is the base's exactly. Train it with the simple loss:
    `ddpm.simple_loss(controlled, schedule, x0, generator, cond=control)` calls controlled(xt, t, control).
    """

    def __init__(self, base: UNet, controlnet: ControlNet):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.controlnet = controlnet
        self.prediction_type = getattr(base, "prediction_type", None)

    def forward(self, xt, t, control, scale: float = 1.0, cond=None, context_mask=None) -> torch.Tensor:
        emb, cross = self.base.embed(xt, t, cond, context_mask)
        h, skips, sizes = self.base.encode(self.base.conv_in(xt), emb, cross)  # the frozen way down
        skip_residuals, middle_residual = self.controlnet(xt, t, control, cond, context_mask)
        skip_residuals = [scale * residual for residual in skip_residuals]
        return self.base.decode(h, emb, skips, sizes, cross, skip_residuals, scale * middle_residual)

    def bind(self, control: torch.Tensor, scale: float = 1.0, cond: torch.Tensor | None = None) -> Denoiser:
        """This model with its control (and condition) fixed, as model(xt, t) for any sampler of the course. A
        control (or condition) of batch size 1 serves every sample; the result carries the base's prediction_type."""

        def batch(x: torch.Tensor | None, size: int) -> torch.Tensor | None:
            if x is None or len(x) == size:
                return x
            if len(x) == 1:
                return x.expand(size, *x.shape[1:])
            raise ValueError(f"a control or condition of batch size {len(x)} for a batch of {size}")

        def model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self(xt, t, batch(control, len(xt)), scale, batch(cond, len(xt)))

        model.prediction_type = self.prediction_type
        return model


def controlnet_parameter_count(controlnet: ControlNet, base: UNet) -> dict[str, float]:
    """The ControlNet's size beside its base's: {"controlnet": parameters, "base": parameters, "share": their
    ratio}. The copy of the way down holds most of it; the zero convolutions and the hint encoder are small."""
    n_control = sum(parameter.numel() for parameter in controlnet.parameters())
    n_base = sum(parameter.numel() for parameter in base.parameters())
    return {"controlnet": n_control, "base": n_base, "share": n_control / n_base}


# --- shipped ControlNets ----------------------------------------------------------------------------------------


def controlnet_options(card: dict, name: str) -> dict:
    """The keyword arguments of `ControlNet` besides its base, from a ControlNet card's "controlnet" entry (lists
    back to tuples); raises naming the card and what it lacks."""
    missing = [key for key in ("base", "controlnet") if key not in card]
    if missing:
        raise ValueError(
            f"{name}.json is not a ControlNet card: it lacks {missing} (the base model's name and the ControlNet's "
            f"options, as scripts/train_control.py writes them); its fields: {sorted(card)}"
        )
    return {key: tuple(value) if isinstance(value, list) else value for key, value in card["controlnet"].items()}


def load_controlnet(name: str, device: torch.device | str = "cpu", folder: Path | None = None) -> ControlledUNet:
    """A shipped ControlNet on its frozen base, ready to sample: model(xt, t, control, scale) or model.bind(control).

    The file data/NAME.safetensors holds the ControlNet's weights only (its copy of the way down, the hint encoder,
    the zero convolutions); the card names the base, which is loaded as any shipped model (`weights.load_model`).
    Building the ControlNet copies the base's way down; the trained weights are loaded after that, over the copy
    (building it after loading would throw them away). Both files are checked against the manifest."""
    card = load_card(name, folder)
    options = controlnet_options(card, name)
    base = load_model(card["base"], device, folder)
    controlnet = load_weights(ControlNet(base, **options), name, folder)  # the trained weights over the copy
    return ControlledUNet(base, controlnet).eval()
