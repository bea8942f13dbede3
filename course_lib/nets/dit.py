r"""A diffusion transformer, DiT, written from scratch (chapter 12).

Taught in chapter 12 (A diffusion transformer). Paper: Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers" (section 3.2 and figures 3-4: patchify, DiT blocks with adaLN-Zero, the decoder); the patches and
the fixed 2D sin-cos positions come from ViT (Dosovitskiy et al. 2021) and MAE (He et al. 2022).

The image (or latent grid) is cut into p x p patches; each patch, flattened to p*p*C numbers, becomes one token of
width d, and a stack of transformer blocks mixes the (I / p)^2 tokens by self-attention. Time and label enter
every block through its LayerNorms: a conditioning vector c = time embedding + label embedding regresses, per
block, a shift beta, a scale gamma (applied as 1 + scale) and a gate alpha for the attention and for the MLP
(adaLN-Zero). The gates start at zero, so every block starts as the identity, and the final layer starts at zero,
so a fresh DiT outputs 0, as the course UNet's zero-initialised output layer does.

Code name -> paper symbol (Peebles & Xie 2023, section 3.2):
    input_size, patch_size     I, p
    width, depth               d (hidden size), N blocks (DiT-S: d = 384, N = 12; DiT-XL: d = 1152, N = 28)
    grid_size                  I / p; the number of tokens is the paper's T = (I / p)^2, written N in the shape
                               comments (B, N, D), where D is d
    c                          the conditioning vector: the sum of the embeddings of t and of the label y
    shift, scale, gate         beta, gamma (as 1 + scale), alpha of adaLN-Zero; one set for attention, one for MLP

Called like the course UNet: forward(xt, t, cond) returns a tensor shaped like xt; t is a float time input (B,)
(flow matching passes t * 1000), cond is labels (B,) when built with `num_classes` (label `num_classes` is the
"no label" of classifier-free guidance), and None for an unconditional DiT. What the output means (a velocity, an
eps) is set by the card that loads it, not by the network.

Equal to diffusers' `DiTTransformer2DModel` on the same weights (tests/test_dit.py), but for two settings where
diffusers' DiT departs from the paper's code: its time sinusoids are spaced with `downscale_freq_shift=1` (the
paper's and the course's use 0) and its MLP LayerNorm has eps 1e-5 (`norm_eps`; the paper's code 1e-6).
"""

import torch
import torch.nn.functional as F
from torch import nn

from course_lib.checks import check_labels
from course_lib.nets.embedding import timestep_embedding


def sincos_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    r"""Fixed 2D sin-cos positions of a grid_size x grid_size grid of tokens, (grid_size^2, dim), float32, rows of
    the grid first (MAE's and DiT's `get_2d_sincos_pos_embed`, computed here in float64 as a pure function).

    The token at row y and column x gets $[\sin(x\,\omega_i), \cos(x\,\omega_i), \sin(y\,\omega_i),
    \cos(y\,\omega_i)]$ (each a block of dim / 4), $\omega_i = 10000^{-i / (dim / 4)}$, i = 0 .. dim/4 - 1: the
    first half of the vector encodes the column, the second half the row (MAE's code calls them h and w)."""
    if dim < 4 or dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4 (sin and cos for each axis); got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    y, x = torch.meshgrid(*[torch.arange(grid_size, dtype=torch.float64)] * 2, indexing="ij")  # (g, g) each
    angles_x, angles_y = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega  # (g^2, dim/4) each
    return torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1).float()  # (g^2, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r"""adaLN's $\gamma \odot x + \beta$ with $\gamma = 1 + \text{scale}$: a zero scale and shift leave x as it is."""
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """LayerNorm -> modulate -> multi-head self-attention -> gate, plus the input; then the same around the MLP.
    The six vectors (shift, scale, gate for each half) come from c by SiLU -> Linear, zero-initialised."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.modulation = nn.Linear(width, 6 * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * width, width)
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, heads, N, D/h)
        attended = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(attended.transpose(1, 2).reshape(B, N, D))  # (B, N, D)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (B, N, D) tokens; c: (B, D) the conditioning vector
        modulation = self.modulation(F.silu(c))[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa * self.attention(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, N, D)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (B, N, D)


class FinalLayer(nn.Module):
    """LayerNorm -> modulate (shift and scale from c) -> Linear to p*p*C numbers per token; all zero-initialised."""

    def __init__(self, width: int, patch_numbers: int):
        super().__init__()
        self.modulation = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_numbers)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(F.silu(c))[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p * p * C)


class DiT(nn.Module):
    def __init__(
        self,
        in_channels: int = 4,  # channels of the input (4 for the course's latents, 1 for digits)
        input_size: int = 7,  # height and width of the input (7 for latents, 28 for digits): I
        patch_size: int = 1,  # side of a square patch, a divisor of input_size: p
        width: int = 128,  # width of every token: d
        depth: int = 4,  # number of DiT blocks: N
        heads: int = 4,  # attention heads (a divisor of width)
        mlp_ratio: int = 4,  # hidden width of each block's MLP, in multiples of width
        num_classes: int | None = None,  # class labels 0..num_classes-1, and num_classes for "no label"
        time_dim: int = 256,  # size of the sinusoidal time features fed to the time MLP (the paper's 256)
    ):
        super().__init__()
        if input_size % patch_size:
            divisors = [p for p in range(1, input_size + 1) if input_size % p == 0]
            raise ValueError(
                f"patch_size={patch_size} does not divide input_size={input_size}: the patches would not tile the "
                f"{input_size} x {input_size} input (diffusers' PatchEmbed drops the last {input_size % patch_size} "
                f"rows and columns silently); valid patch sizes: {divisors}"
            )
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.in_channels, self.input_size, self.patch_size = in_channels, input_size, patch_size
        self.width, self.depth, self.heads, self.mlp_ratio = width, depth, heads, mlp_ratio
        self.grid_size = input_size // patch_size
        self.time_dim = time_dim
        self.num_classes = num_classes
        self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed(width, self.grid_size)[None], persistent=False)  # (1, N, D)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.class_emb = nn.Embedding(num_classes + 1, width) if num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(width, patch_size * patch_size * in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialisation (its code, `DiT.initialize_weights`): Xavier-uniform Linear layers with zero
        bias, the patch embedding like a Linear, N(0, 0.02^2) label and time-MLP weights; then adaLN-Zero: every
        modulation layer and the final Linear at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.width, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        if self.class_emb is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        for layer in [block.modulation for block in self.blocks] + [self.final.modulation, self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, xt: torch.Tensor) -> torch.Tensor:
        """(B, C, I, I) -> (B, N, D): each p x p patch, flattened to p*p*C numbers, through one Linear map (a
        Conv2d with kernel = stride = p applies it to every patch), plus the fixed positions."""
        tokens = self.patch_embed(xt).flatten(2).transpose(1, 2)  # (B, N, D), rows of the grid first
        return tokens + self.pos_embed.to(tokens.dtype)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, I, I): each token's numbers back into its p x p patch (patch row, column, channel
        order, as the paper's code and diffusers' read them)."""
        B, g, p, C = len(x), self.grid_size, self.patch_size, self.in_channels
        x = x.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, grid row, p, grid column, p)
        return x.reshape(B, C, g * p, g * p)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        # xt: (B, C, I, I); t: (B,) float time inputs (0..1000); cond: labels (B,) with num_classes, else None
        self.check_input(xt, t)
        c = self.time_mlp(timestep_embedding(t, self.time_dim).to(xt.dtype))  # (B, D), in the input's dtype
        c = c + self.condition_embedding(cond, len(xt))  # (B, D)
        x = self.patchify(xt)  # (B, N, D)
        for block in self.blocks:
            x = block(x, c)  # (B, N, D)
        return self.unpatchify(self.final(x, c))  # (B, C, I, I)

    def check_input(self, xt: torch.Tensor, t: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if xt.ndim != 4 or tuple(xt.shape[1:]) != expected:
            raise ValueError(
                f"this DiT was built for inputs (B, {', '.join(map(str, expected))}) (in_channels, input_size, "
                f"input_size); got shape {tuple(xt.shape)}"
            )
        if t.shape != (len(xt),):
            raise ValueError(f"t must hold one time per example, shape ({len(xt)},); got shape {tuple(t.shape)}")

    def condition_embedding(self, cond: torch.Tensor | None, batch_size: int) -> torch.Tensor | float:
        """What `cond` adds to the time embedding: a label's learned vector, or 0 for an unconditional DiT."""
        if self.class_emb is None:
            if cond is not None:
                raise ValueError("this DiT was built without num_classes, so it takes no condition; pass cond=None")
            return 0.0
        check_labels(cond, self.num_classes, batch_size, "this DiT")
        return self.class_emb(cond)  # (B, D)


def dit_gflops(model: DiT, backward: bool = True) -> float:
    r"""FLOPs of one input through `model`, forward plus backward unless backward=False, counted by hand with the
    convention of torch's FlopCounterMode (and `benchmark.gflops_per_image`): matrix products only, a multiply-add
    counts 2; LayerNorm, softmax, activations, biases, sums and the label lookup are not counted.

    With N tokens, width d, MLP ratio r, P = p*p*C numbers per patch and F sinusoidal time features, the forward is
    $2NPd$ (patches) + $2(Fd + d^2)$ (time MLP) + per block $12d^2$ (modulation) + $(6 + 2 + 4r)Nd^2$ (q, k, v,
    output projection, MLP) + $4N^2 d$ (the products $QK^\top$ and $AV$, whatever the heads) + $4d^2 + 2NdP$ (final
    layer). The backward doubles every product except the two whose input needs no gradient (the patch
    embedding of xt and the time MLP's first layer), which only compute their weights' gradient.

    Why by hand: on CPU, FlopCounterMode counts nothing for `scaled_dot_product_attention` (torch's fused CPU kernel
    has no FLOP formula), so it would leave out the attention products; under the MATH backend it counts them, and
    the tests check this function against it."""
    N, d, r = model.grid_size**2, model.width, model.mlp_ratio
    P, time_features = model.patch_size**2 * model.in_channels, model.time_dim
    first = 2 * N * P * d + 2 * time_features * d  # layers whose input needs no gradient
    block = 12 * d**2 + (6 + 2 + 4 * r) * N * d**2 + 4 * N**2 * d
    forward = first + 2 * d**2 + model.depth * block + 4 * d**2 + 2 * N * d * P
    total = 3 * forward - first if backward else forward
    return total / 1e9
