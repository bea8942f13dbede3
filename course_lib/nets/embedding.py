r"""Sinusoidal timestep embedding (Vaswani et al. 2017, section 3.5; used for t by Ho et al. 2020, appendix B).

Taught in notebooks/03_ddpm.ipynb. Equal to diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=True,
downscale_freq_shift=0)`, the setting of its UNet2DModel.
"""

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    r"""Embed integer timesteps t (B,) as (B, dim) features $[\cos(t\,\omega_i), \sin(t\,\omega_i)]$,
    $\omega_i = \text{max\_period}^{-i / (dim/2)}$ for $i = 0 .. dim/2 - 1$."""
    if dim < 2 or dim % 2:
        raise ValueError(f"the embedding dimension must be even and >= 2; got dim={dim}")
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape (B,); got shape {tuple(t.shape)}")
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * omega[None]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # (B, dim)
