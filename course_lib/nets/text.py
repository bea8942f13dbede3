"""A tiny text encoder and the text-conditioned UNet (chapter 7): the pathway of Stable Diffusion's prompts, at a
size a CPU trains with the diffusion model.

Token ids (from `course_lib.captions.tokenize`) -> embeddings plus learned positions -> a small Transformer
encoder (Vaswani et al. 2017; CLIP's text tower is a larger one, trained separately) -> one vector per token, the
"context". The UNet reads the context through cross-attention at its attention levels: queries from the image,
keys and values from the tokens (Rombach et al. 2022, section 3.3). Padding tokens are masked out; every caption
starts with <start>, so there is always a token to attend to.
"""

import torch
from torch import nn

from course_lib.captions import CAPTION_LENGTH, VOCABULARY
from course_lib.nets.unet import UNet


class TextEncoder(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, length: int = CAPTION_LENGTH):
        super().__init__()
        self.length = length
        self.tokens = nn.Embedding(len(VOCABULARY), dim)
        self.positions = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: (B, L) ids, 0 = <pad> -> context (B, L, dim); padded positions are not attended to
        if tokens.ndim != 2 or tokens.shape[1] != self.length:
            raise ValueError(f"need token ids (B, {self.length}); got shape {tuple(tokens.shape)}")
        h = self.tokens(tokens) + self.positions  # (B, L, dim)
        return self.norm(self.encoder(h, src_key_padding_mask=tokens == 0))


class TextConditionedUNet(nn.Module):
    """A UNet with cross-attention and the text encoder trained with it: model(xt, t, tokens)."""

    def __init__(self, text: dict | None = None, **unet):
        super().__init__()
        self.text_encoder = TextEncoder(**(text or {}))
        dim = self.text_encoder.norm.normalized_shape[0]
        self.unet = UNet(**unet, context_dim=dim)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        context = self.text_encoder(tokens)  # (B, L, dim)
        return self.unet(xt, t, context, context_mask=tokens != 0)
