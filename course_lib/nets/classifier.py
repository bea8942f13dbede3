"""A small CNN that recognises digits: the judge of generated samples (chapters 4 on).

Trained on the train split only by scripts/train_classifier.py and shipped as data/digit_classifier.*; loaded by
`course_lib.metrics.load_digit_classifier`. It serves two purposes:

- its logits say which digit a sample shows and how sure it is (confident fraction, class accuracy of a
  class-conditional model);
- its penultimate layer is the feature space of the course's FID and KID, as fastai's course measured
  Fashion-MNIST samples with a classifier of its own instead of Inception-v3 (Heusel et al. 2017 use Inception's
  pool3 features; on 28 x 28 digits a network trained on digits sees what matters).

Trained with outlier exposure (Hendrycks et al. 2019): on noise, random blobs and overlaid digits its output is
close to uniform, so "confident" means "looks like one clear digit", not merely "is an image".

Three convolution stages at 28 x 28, 14 x 14 and 7 x 7 keep it cheap on a CPU: the channels double while the
positions fall fourfold, so every c -> c convolution costs the same 9 c^2 H W multiply-adds; with two convolutions
per stage, about 29M multiply-adds per image in all.

`NoisyDigitClassifier` (chapter 13) is the other kind: it reads noised digits x_t at any timestep t, as classifier
guidance needs (Dhariwal & Nichol 2021, section 4), and is trained by `course_lib.editing.noisy_classifier_loss`
(shipped as data/noisy_classifier.* by scripts/train_control.py, its held-out accuracy at several t in its card).
"""

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.nets.embedding import timestep_embedding


def conv_stage(c_in: int, c_out: int, convs: int) -> nn.Sequential:
    """`convs` times 3x3 conv -> BatchNorm -> ReLU (the first changes the width from c_in to c_out)."""
    layers = []
    for index in range(convs):
        layers += [nn.Conv2d(c_in if index == 0 else c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DigitClassifier(nn.Module):
    def __init__(
        self,
        channels: tuple[int, ...] = (32, 64, 128),  # width of each convolution stage; a 2x2 max-pool between them
        convs: int = 2,  # 3x3 convolutions per stage
        feature_dim: int = 128,  # F: size of the penultimate layer, the feature space of FID and KID
        n_classes: int = 10,  # number of digit classes
        dropout: float = 0.3,  # dropout before the last layer (training only)
    ):
        super().__init__()
        if not (channels and min(channels) >= 1 and convs >= 1 and feature_dim >= 1 and n_classes >= 2):
            raise ValueError(
                f"need positive channels, convs >= 1, feature_dim >= 1 and n_classes >= 2; got channels={channels}, "
                f"convs={convs}, feature_dim={feature_dim}, n_classes={n_classes}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1); got {dropout}")
        stages, c_prev = [], 1
        for index, c in enumerate(channels):
            if index > 0:
                stages.append(nn.MaxPool2d(2))  # (B, c_prev, H / 2, W / 2)
            stages.append(conv_stage(c_prev, c, convs))
            c_prev = c
        self.body = nn.Sequential(*stages)
        self.to_features = nn.Sequential(nn.Linear(c_prev, feature_dim, bias=False), nn.BatchNorm1d(feature_dim))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate layer (B, F): after its nonlinearity, before dropout and the last linear layer."""
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"need images (B, 1, H, W); got shape {tuple(x.shape)}")
        h = self.body(x)  # (B, c_last, H / 4, W / 4)
        h = h.mean(dim=(2, 3))  # (B, c_last): global average pool
        return torch.relu(self.to_features(h))  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, 28, 28) in [-1, 1]
        return self.head(self.dropout(self.features(x)))  # (B, n_classes) logits


class NoisyDigitClassifier(nn.Module):
    """classifier(xt, t) -> logits (B, n_classes) for digits noised to timestep t: the p_phi(y | x_t, t) of
    classifier guidance (Dhariwal & Nichol 2021 use the UNet's way down with its time embedding; this is a small
    CNN). One 3x3 convolution per stage, a 2x2 max-pool between stages; t enters through the course's sinusoidal
    embedding (`nets.embedding.timestep_embedding`) and an MLP, as a per-channel shift after each GroupNorm.
    GroupNorm, not BatchNorm: a guidance gradient needs examples that do not depend on each other."""

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64),  # width of each stage; a 2x2 max-pool between them
        n_classes: int = 10,  # number of digit classes
        time_dim: int = 32,  # size of the sinusoidal timestep embedding (the MLP widens it fourfold)
        groups: int = 8,  # GroupNorm groups
    ):
        super().__init__()
        if not (channels and min(channels) >= 1 and n_classes >= 2 and time_dim >= 2 and time_dim % 2 == 0):
            raise ValueError(
                f"need positive channels, n_classes >= 2 and an even time_dim >= 2; got channels={channels}, "
                f"n_classes={n_classes}, time_dim={time_dim}"
            )
        emb_dim = 4 * time_dim
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        c_ins = (1, *channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c, 3, padding=1) for c_in, c in zip(c_ins, channels, strict=True))
        self.norms = nn.ModuleList(nn.GroupNorm(min(groups, c), c) for c in channels)
        self.shifts = nn.ModuleList(nn.Linear(emb_dim, c) for c in channels)
        self.head = nn.Linear(channels[-1], n_classes)

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # xt: (B, 1, 28, 28), t: (B,) integer timesteps
        if xt.ndim != 4 or xt.shape[1] != 1:
            raise ValueError(f"need images (B, 1, H, W); got shape {tuple(xt.shape)}")
        emb = F.silu(self.time_mlp(timestep_embedding(t, self.time_dim).to(xt.dtype)))  # (B, emb_dim)
        h = xt
        for index, (conv, norm, shift) in enumerate(zip(self.convs, self.norms, self.shifts, strict=True)):
            if index > 0:
                h = F.max_pool2d(h, 2)  # (B, c_prev, H / 2, W / 2)
            h = F.silu(norm(conv(h)) + shift(emb)[:, :, None, None])  # (B, c, H, W)
        return self.head(h.mean(dim=(2, 3)))  # (B, n_classes): global average pool, then logits
