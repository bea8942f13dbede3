"""Tiny stand-in networks shared by several test files (not a test file: pytest does not collect it)."""

import torch


class TinyDenoiser(torch.nn.Module):
    """One 3x3 conv that ignores t: enough to run every sampler and to count FLOPs by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv(xt)
