r"""A small KL-regularised autoencoder for latent diffusion (chapter 6). Papers: Kingma & Welling 2014 (the VAE);
Rombach et al. 2022, section 3 and appendix G (the autoencoder of latent diffusion, "KL-reg", with a tiny KL
weight so that the latents stay close to the data and the decoder stays sharp).

Digits (B, 1, 28, 28) become latents (B, 4, 7, 7): 196 numbers instead of 784. The encoder outputs a diagonal
Gaussian per image (mean and log-variance); training samples from it with the reparameterisation trick, and the
diffusion model later uses its mean. `latent_scale` is Stable Diffusion's `scaling_factor`: one over the standard
deviation of the latents on the training data, so that the diffusion model sees latents of unit variance.

Parity: `DiagonalGaussian` computes what diffusers' `DiagonalGaussianDistribution` computes (sample, mode, KL);
tests/test_vae.py checks it.
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a skip (a 1x1 conv when the width changes): a ResBlock without
    the time embedding."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class DiagonalGaussian:
    """N(mean, exp(logvar)) per element, from the encoder's (B, 2C, H, W) output split on the channels."""

    def __init__(self, parameters: torch.Tensor):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as diffusers, so that exp() stays finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise: the reparameterisation trick (gradients flow into mean and std)."""
        draw_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=draw_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        r"""KL(N(mean, var) || N(0, I)) per image, summed over the latent's elements:
        $\frac12 \sum (\mu^2 + \sigma^2 - 1 - \log\sigma^2)$. Shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class VAE(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        channels: tuple[int, ...] = (32, 64),  # width at full resolution, then after each halving
        latent_channels: int = 4,
        groups: int = 8,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.downsamplings = len(channels)
        # encoder: full resolution -> halved len(channels) times -> (mean, logvar)
        encoder: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1)]
        c_prev = channels[0]
        for c in channels:
            encoder += [ConvBlock(c_prev, c, groups), nn.Conv2d(c, c, 3, stride=2, padding=1)]
            c_prev = c
        encoder += [ConvBlock(c_prev, c_prev, groups), nn.GroupNorm(min(groups, c_prev), c_prev), nn.SiLU()]
        encoder.append(nn.Conv2d(c_prev, 2 * latent_channels, 3, padding=1))
        self.encoder = nn.Sequential(*encoder)
        # decoder: the mirror image, with nearest-neighbour upsampling
        decoder: list[nn.Module] = [nn.Conv2d(latent_channels, c_prev, 3, padding=1), ConvBlock(c_prev, c_prev, groups)]
        for c in reversed(channels):
            decoder += [ConvBlock(c_prev, c, groups), nn.Upsample(scale_factor=2, mode="nearest")]
            c_prev = c
        decoder += [ConvBlock(c_prev, c_prev, groups), nn.GroupNorm(min(groups, c_prev), c_prev), nn.SiLU()]
        decoder.append(nn.Conv2d(c_prev, in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        # x: (B, in_channels, H, W) with H, W divisible by 2^downsamplings -> latents (B, latent_channels, H/4, W/4)
        size = 2**self.downsamplings
        if x.ndim != 4 or x.shape[-1] % size or x.shape[-2] % size:
            raise ValueError(f"need (B, C, H, W) with H and W divisible by {size}; got shape {tuple(x.shape)}")
        return DiagonalGaussian(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"need latents (B, {self.latent_channels}, h, w); got shape {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """(reconstruction from a sampled latent, the encoder's distribution), for training."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def vae_loss(x: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian, kl_weight: float):
    """Per-image squared error summed over pixels, plus kl_weight times the KL, averaged over the batch.
    Returns (loss, reconstruction term, KL term), the last two detached for logging."""
    if kl_weight < 0:
        raise ValueError(f"kl_weight must be >= 0; got kl_weight={kl_weight}")
    reconstruction_error = (reconstruction - x).pow(2).sum(dim=(1, 2, 3)).mean()
    kl = posterior.kl().mean()
    return reconstruction_error + kl_weight * kl, reconstruction_error.detach(), kl.detach()


@torch.no_grad()
def latent_scale(vae: VAE, images: torch.Tensor, batch_size: int = 500) -> float:
    """1 / std of the latent means over `images`: Stable Diffusion's `scaling_factor`, computed on our data."""
    device = next(vae.parameters()).device
    means = [vae.encode(images[i : i + batch_size].to(device)).mode() for i in range(0, len(images), batch_size)]
    return 1.0 / torch.cat(means).flatten().std().item()


@torch.no_grad()
def encode_latents(vae: VAE, images: torch.Tensor, scaling_factor: float, batch_size: int = 500) -> torch.Tensor:
    """What a latent diffusion model trains on: each image's latent mean times the scaling factor, (B, C, h, w),
    encoded in batches of `batch_size` on the VAE's device (returned there)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    device = next(vae.parameters()).device
    means = [vae.encode(images[i : i + batch_size].to(device)).mode() for i in range(0, len(images), batch_size)]
    return torch.cat(means) * scaling_factor


def latent_decoder(vae: VAE, scaling_factor: float):
    """z0 -> images: the decoder applied to the unscaled latents, z0 / scaling_factor (what samplers take as
    `decoder` for a latent model)."""
    return lambda z0: vae.decode(z0 / scaling_factor)
