"""A UNet written from scratch, lean enough to train on a laptop CPU (chapter 4).

Taught in notebooks/04_unet.ipynb. Papers: Ronneberger et al. 2015 (U-Net); Ho et al. 2020, appendix B (the DDPM
UNet: residual blocks, GroupNorm, sinusoidal time embedding, self-attention at low resolution); Dhariwal & Nichol
2021 (scale-and-shift time conditioning, "AdaGN"); Goyal et al. 2017 and fastai (zero-initialised residual
outputs, so every block starts as the identity).

Where the compute goes: a 3x3 convolution from c to c channels at H x W costs 9 c^2 H W multiply-adds, so doubling
the channels at every halving of the resolution keeps each convolution's cost equal across levels while the
parameters grow fourfold. This UNet therefore keeps few blocks at 28 x 28 and puts its capacity at 14 x 14 and
7 x 7, with attention only at 7 x 7 (49 positions).

The model knows nothing of schedules: forward(xt, t, cond) returns a tensor shaped like xt. `cond` is the hook for
chapter 7, added to the time embedding: class labels (B,) when the UNet is built with `num_classes` (label
`num_classes` is the "no label" of classifier-free guidance), or a (B, cond_dim) vector when built with
`cond_dim` (a text embedding, say).
"""

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import check_labels
from course_lib.nets.embedding import timestep_embedding


def zero_init(module: nn.Module) -> nn.Module:
    """Set a layer's weights and bias to zero, so that the residual branch it ends starts as a no-op."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then the time embedding as a scale and shift, -> SiLU -> conv; plus a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # x: (B, c_in, H, W), emb: (B, emb_dim)
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, c_out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))  # (B, c_out, H, W)
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H x W positions, as a residual block (Vaswani et al. 2017)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C / heads)
        attended = attended.transpose(1, 2).reshape(B, H * W, C)  # (B, HW, C)
        return x + self.out(attended).transpose(1, 2).reshape(B, C, H, W)


class CrossAttention(nn.Module):
    """Attention from the H x W positions (queries) to a sequence of context vectors (keys and values), as a
    residual block: how a text prompt reaches the image (Rombach et al. 2022, section 3.3)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C, H, W); context: (B, L, context_dim); mask: (B, L), True where a token may be attended to
        B, C, H, W = x.shape
        split = lambda h: h.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2)  # noqa: E731
        q = split(self.q(self.norm(x).flatten(2).transpose(1, 2)))  # (B, heads, HW, C / heads)
        k, v = (split(h) for h in self.kv(context).chunk(2, dim=-1))  # (B, heads, L, C / heads) each
        attn_mask = mask[:, None, None, :] if mask is not None else None  # (B, 1, 1, L)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, HW, C / heads)
        attended = attended.transpose(1, 2).reshape(B, H * W, C)
        return x + self.out(attended).transpose(1, 2).reshape(B, C, H, W)


class Level(nn.Module):
    """The residual blocks of one resolution level, each followed by self-attention where the level has it."""

    def __init__(
        self,
        c_ins: list[int],
        c: int,
        emb_dim: int,
        attend: bool,
        heads: int,
        groups: int,
        dropout: float,
        context_dim: int | None = None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(c_in, c, emb_dim, groups, dropout) for c_in in c_ins)
        self.attention = nn.ModuleList(SelfAttention(c, heads, groups) if attend else nn.Identity() for _ in c_ins)
        if attend and context_dim:  # cross-attention after each self-attention (no parameters otherwise)
            self.cross = nn.ModuleList(CrossAttention(c, context_dim, heads, groups) for _ in c_ins)
        else:
            self.cross = None

    def forward(self, h, emb, skips_in=None, skips_out=None, context=None, context_mask=None):
        """Run the level's blocks; take a skip before each block (up path) or keep each output (down path)."""
        for index, (block, attention) in enumerate(zip(self.blocks, self.attention, strict=True)):
            if skips_in is not None:
                h = torch.cat([h, skips_in.pop()], dim=1)
            h = attention(block(h, emb))
            if self.cross is not None:
                h = self.cross[index](h, context, context_mask)
            if skips_out is not None:
                skips_out.append(h)
        return h


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,  # image channels (1 for digits, 4 for a latent grid)
        channels: tuple[int, ...] = (32, 64, 96),  # width of each resolution level, from full resolution down
        blocks: tuple[int, ...] = (1, 1, 2),  # residual blocks per level on the way down (and up)
        attention: tuple[bool, ...] = (False, False, True),  # self-attention after the blocks of a level
        heads: int = 4,  # attention heads
        groups: int = 8,  # GroupNorm groups
        dropout: float = 0.0,  # dropout inside the residual blocks
        cond_dim: int | None = None,  # size of an optional conditioning vector added to the time embedding
        num_classes: int | None = None,  # class labels 0..num_classes-1, and num_classes for "no label"
        context_dim: int | None = None,  # size of the context vectors read by cross-attention (text tokens)
    ):
        super().__init__()
        if not len(channels) == len(blocks) == len(attention):
            raise ValueError(
                f"channels, blocks and attention need one entry per level; got {channels}, {blocks}, {attention}"
            )
        emb_dim = 4 * channels[0]
        self.levels = len(channels)
        self.time_dim = channels[0]
        self.time_mlp = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if sum(bool(option) for option in (cond_dim, num_classes, context_dim)) > 1:
            raise ValueError(
                f"give one of cond_dim, num_classes and context_dim; got {cond_dim}, {num_classes}, {context_dim}"
            )
        if context_dim and not any(attention):
            raise ValueError("cross-attention sits at the attention levels: context_dim needs attention somewhere")
        self.context_dim = context_dim
        self.cond_proj = nn.Linear(cond_dim, emb_dim) if cond_dim else None
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        # Down: each level's blocks, then a stride-2 convolution (except after the last level).
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        c_prev, skip_channels = channels[0], []
        for level, (c, n_blocks, attend) in enumerate(zip(channels, blocks, attention, strict=True)):
            c_ins = [c_prev] + [c] * (n_blocks - 1)
            self.down.append(Level(c_ins, c, emb_dim, attend, heads, groups, dropout, context_dim))
            skip_channels += [c] * n_blocks
            if level < self.levels - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            c_prev = c

        self.mid1 = ResBlock(c_prev, c_prev, emb_dim, groups, dropout)
        self.mid_attention = SelfAttention(c_prev, heads, groups)
        self.mid_cross = CrossAttention(c_prev, context_dim, heads, groups) if context_dim else None
        self.mid2 = ResBlock(c_prev, c_prev, emb_dim, groups, dropout)

        # Up, lowest resolution first: every block takes the matching skip, concatenated on the channels.
        # Upsampling is nearest-neighbour only: the next block's first convolution changes the width anyway,
        # which saves a full-resolution convolution per level.
        self.up = nn.ModuleList()
        for level in reversed(range(self.levels)):
            c, n_blocks = channels[level], blocks[level]
            c_ins = []
            for _ in range(n_blocks):
                c_ins.append(c_prev + skip_channels.pop())
                c_prev = c
            self.up.append(Level(c_ins, c, emb_dim, attention[level], heads, groups, dropout, context_dim))

        self.norm_out = nn.GroupNorm(min(groups, channels[0]), channels[0])
        self.conv_out = zero_init(nn.Conv2d(channels[0], in_channels, 3, padding=1))

    def forward(
        self,
        xt: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # xt: (B, in_channels, H, W), any H and W (odd ones too: 7 x 7 latents); t: (B,); cond: see below.
        # cond is labels (B,) with num_classes, a vector (B, cond_dim) with cond_dim, or a context (B, L, context_dim)
        # with context_dim, whose padded tokens context_mask (B, L) marks False.
        emb, cross = self.embed(xt, t, cond, context_mask)
        h, skips, sizes = self.encode(self.conv_in(xt), emb, cross)  # conv_in: (B, c0, H, W)
        return self.decode(h, emb, skips, sizes, cross)  # (B, in_channels, H, W)

    # forward in three parts, so that a ControlNet (course_lib.control, chapter 13) runs a copy of the way down and
    # adds its outputs to the skips and the middle that `decode` reads; forward itself is unchanged by the split.

    def embed(self, xt, t, cond=None, context_mask=None) -> tuple[torch.Tensor, dict]:
        """The time embedding plus the condition's, (B, emb_dim), and the cross-attention's inputs (a dict of
        context and context_mask, both None without context_dim)."""
        if xt.ndim != 4:
            raise ValueError(f"need images (B, C, H, W); got shape {tuple(xt.shape)}")
        emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(xt.dtype))  # (B, emb_dim), in the input's dtype
        context = self.check_context(cond) if self.context_dim else None
        emb = emb if self.context_dim else emb + self.condition_embedding(cond)
        return emb, dict(context=context, context_mask=context_mask)

    def encode(self, h, emb, cross) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Size]]:
        """The way down and the middle, from the first feature map h = conv_in(xt) (B, c0, H, W): returns the
        middle's output, the skips (every down block's output, in order) and the sizes before each downsampling."""
        skips, sizes = [], []
        for index, level in enumerate(self.down):
            h = level(h, emb, skips_out=skips, **cross)
            if index < self.levels - 1:
                sizes.append(h.shape[-2:])
                h = self.downsample[index](h)  # (B, c, ceil(H / 2), ceil(W / 2))
        h = self.mid_attention(self.mid1(h, emb))  # (B, c_last, H / 2^(levels-1), ...)
        if self.mid_cross is not None:
            h = self.mid_cross(h, cross["context"], cross["context_mask"])
        return self.mid2(h, emb), skips, sizes

    def decode(self, h, emb, skips, sizes, cross, skip_residuals=None, middle_residual=None) -> torch.Tensor:
        """The way up from the middle's output h, every block taking its skip (the lists given are not changed).

        A ControlNet's outputs are added where the decoder reads: middle_residual (shaped like h) to h, and
        skip_residuals[i] (one per skip, shaped like it) to skips[i], as diffusers' UNet2DConditionModel adds
        `mid_block_additional_residual` and `down_block_additional_residuals`. None adds nothing."""
        if middle_residual is not None:
            h = h + middle_residual
        if skip_residuals is not None:
            if len(skip_residuals) != len(skips):
                raise ValueError(f"need one residual per skip ({len(skips)}); got {len(skip_residuals)}")
            skips = [skip + residual for skip, residual in zip(skips, skip_residuals, strict=True)]
        skips, sizes = list(skips), list(sizes)  # popped below
        for index, level in enumerate(self.up):
            h = level(h, emb, skips_in=skips, **cross)
            if index < self.levels - 1:
                h = F.interpolate(h, size=sizes.pop(), mode="nearest")  # (B, c, 2 H, 2 W): the skip's size
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, in_channels, H, W)

    def check_context(self, context: torch.Tensor | None) -> torch.Tensor:
        if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"this UNet reads a context (B, L, {self.context_dim}) by cross-attention; got {got}")
        return context

    def condition_embedding(self, cond: torch.Tensor | None) -> torch.Tensor | float:
        """What `cond` adds to the time embedding: a label's learned vector, a projected vector, or 0 for none."""
        if self.class_emb is not None:
            check_labels(cond, self.num_classes, len(cond) if cond is not None and cond.ndim else -1, "this UNet")
            return self.class_emb(cond)  # (B, emb_dim)
        if cond is None:
            return 0.0
        if self.cond_proj is None:
            raise ValueError("this UNet was built without cond_dim or num_classes, so it takes no condition")
        return self.cond_proj(cond)  # (B, emb_dim)
