"""Measurable styles made from the digits (chapter 8): bold strokes and a slant to the right; and chapter 14's new
concept, a bar struck through the digit.

A LoRA fine-tune teaches the shipped digit model one of these from a few hundred restyled digits; because each
style moves one of the measurements of `course_lib.captions` (stroke thickness, slant, the bar), how far a model has
taken on a style is a number, not an impression.
"""

import torch
import torch.nn.functional as F

from course_lib.checks import check_images
from course_lib.data import load_digits


def embolden(images: torch.Tensor) -> torch.Tensor:
    """Thicker strokes: each pixel takes the brightest of itself and its four neighbours (a dilation by a plus
    shape), which widens a stroke by about two pixels. Images (B, 1, H, W) in [-1, 1], the same shape back."""
    check_images(images)
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    neighbours = [padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]]
    return torch.stack([images, *neighbours]).amax(0)


def shear(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Lean the digits: each row moves right by `amount` pixels per row above the image's middle (bilinear
    resampling; the background stays -1). `course_lib.captions.measure_slant` goes up by about `amount`."""
    check_images(images)
    B, _, H, W = images.shape
    # output (x, y) in [-1, 1] reads input x - amount * (-y) * (H / W): rows above the middle (y < 0) move right
    theta = torch.tensor([[1.0, amount * H / W, 0.0], [0.0, 1.0, 0.0]], dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta.expand(B, 2, 3), list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, padding_mode="zeros", align_corners=False) - 1


BAR_ROWS = (13, 15)  # the rows the bar covers (the middle two of 28), as a slice: start, stop
BAR_COLUMNS = (2, 26)  # the columns it spans: 24 of 28, wider than the 20 x 20 box an MNIST digit is drawn in


def strike_bar(images: torch.Tensor) -> torch.Tensor:
    """Chapter 14's new concept, "barred" digits: a horizontal bar of full ink, two pixels high, struck through the
    middle of the image (rows BAR_ROWS, columns BAR_COLUMNS) over the digit. The bar is wider than any digit's
    strokes, so `course_lib.captions.measure_bar` tells it from a digit's own horizontal strokes. Images
    (B, 1, H, W) in [-1, 1], the same shape back."""
    check_images(images)  # (B, 1, 28, 28): the bar is placed for the course's digits
    barred = images.clone()
    barred[..., slice(*BAR_ROWS), slice(*BAR_COLUMNS)] = 1.0  # full ink
    return barred


def balanced_digits(per_class: int, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """per_class digits of every class from a split, picked by label with a seeded permutation: (images, labels),
    classes interleaved. Style data are chosen so, never as "the first n digits" (the shipped adapters were once
    trained on the first 500 of a label-sorted file: 400 zeros and 100 ones)."""
    images, labels = load_digits(split)
    if not 1 <= per_class <= int(torch.bincount(labels).min()):
        raise ValueError(
            f"per_class must lie in 1..{int(torch.bincount(labels).min())} for split {split!r}; got {per_class}"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = [(labels == digit).nonzero().flatten() for digit in range(10)]
    chosen = [rows[torch.randperm(len(rows), generator=generator)[:per_class]] for rows in chosen]
    index = torch.stack(chosen, dim=1).flatten()  # (per_class * 10,): 0, 1, ..., 9, 0, 1, ...
    return images[index], labels[index]
