"""Figures the notebooks share: image grids, strips of the reverse process, loss curves.

Plain matplotlib; every function draws on the axes it is given (or a new figure) and returns them.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

from course_lib.data import to_pixels


def image_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2) -> np.ndarray:
    """Images (N, 1, H, W) in [-1, 1] as one uint8 array (rows * (H + pad), nrow * (W + pad)) for imshow."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"need single-channel images (N, 1, H, W); got shape {tuple(images.shape)}")
    pixels = to_pixels(images)[:, 0].numpy()  # (N, H, W)
    n, height, width = pixels.shape
    rows = -(-n // nrow)
    grid = np.zeros((rows * (height + pad) + pad, nrow * (width + pad) + pad), dtype=np.uint8)
    for i, image in enumerate(pixels):
        top, left = pad + (i // nrow) * (height + pad), pad + (i % nrow) * (width + pad)
        grid[top : top + height, left : left + width] = image
    return grid


CELL_INCHES = 0.9  # each digit's side in a new figure: at 110 dpi, about 100 screen pixels, enough to see a stroke


def show_images(images: torch.Tensor, nrow: int = 8, title: str | None = None, ax=None, figsize=None):
    """Draw `image_grid(images, nrow)` in grey on ax (a new figure of `figsize`, or CELL_INCHES per digit, if None)."""
    if ax is None:
        rows = -(-len(images) // nrow)
        _, ax = plt.subplots(figsize=figsize or (nrow * CELL_INCHES, rows * CELL_INCHES + 0.4))
    ax.imshow(image_grid(images, nrow), cmap="gray", vmin=0, vmax=255)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


def show_strip(images: list[torch.Tensor], labels: list[str], title: str | None = None):
    """One row of single images (1, H, W) or (1, 1, H, W) with a label under each: e.g. x_t over t."""
    fig, axes = plt.subplots(1, len(images), figsize=(1.3 * len(images), 1.7))
    for ax, image, label in zip(np.atleast_1d(axes), images, labels, strict=True):
        ax.imshow(to_pixels(image.reshape(image.shape[-2:])).numpy(), cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return axes


def plot_losses(losses: list[float], window: int = 50, ax=None, label: str | None = None):
    """The loss of every step (faint) and its running mean over `window` steps, on a log scale."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    values = np.asarray(losses)
    line = ax.plot(values, alpha=0.25)[0]
    if len(values) >= window:
        running = np.convolve(values, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window - 1, len(values)), running, color=line.get_color(), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if label:
        ax.legend()
    return ax
