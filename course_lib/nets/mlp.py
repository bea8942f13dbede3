"""A small MLP denoiser for 1D and 2D data (chapter 3): residual blocks of width `hidden`, conditioned on t.

Taught in notebooks/03_ddpm.ipynb. It outputs a tensor shaped like its input (eps, x0 or v: it does not know which,
nor anything of the schedule).
"""

import torch
from torch import nn

from course_lib.nets.embedding import timestep_embedding


class MLPDenoiser(nn.Module):
    def __init__(
        self,
        data_dim: int = 2,  # D: 1 for the 1D mixture, 2 for the 2D sets
        hidden: int = 256,  # width of every hidden layer
        depth: int = 3,  # number of residual blocks
        time_dim: int = 64,  # size of the sinusoidal timestep embedding
    ):
        super().__init__()
        if data_dim < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"need data_dim >= 1, hidden >= 1, depth >= 0; got {data_dim}, {hidden}, {depth}")
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(data_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.output = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, data_dim))

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # xt: (B, D), t: (B,) integers
        h = self.input(xt) + self.time_mlp(timestep_embedding(t, self.time_dim).to(xt.dtype))  # (B, hidden)
        for block in self.blocks:
            h = h + block(h)  # (B, hidden)
        return self.output(h)  # (B, D)
