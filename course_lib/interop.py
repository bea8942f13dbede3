r"""From the course to diffusers (chapter 9): our schedule as a scheduler config, our UNet as a diffusers model, the
denoising loop of diffusers' pipelines, and a tiny, randomly initialised Stable Diffusion pipeline built offline;
and (chapter 12) our DiT as diffusers' DiTTransformer2DModel, one block as its BasicTransformerBlock.

Taught in notebooks/09_diffusers.ipynb. The module of course_lib that is built on diffusers (and, for the text
encoder, transformers); the maths and the models never import them (`benchmark` only borrows UNet2DModel as the
baseline to beat).

Schedules. diffusers builds its tables from a `beta_schedule` name or from `trained_betas`. A course schedule made
by `make_schedule(name, T)` with its default parameters goes by name (`schedules.DIFFUSERS_BETA_SCHEDULE`: cosine is
diffusers' "squaredcos_cap_v2", quadratic its "scaled_linear") where the scheduler knows the name (only
DDPMScheduler knows "sigmoid"); any other table (other beta_start / beta_end, betas of one's own) goes as
`trained_betas`. Either way diffusers' `alphas_cumprod` (a float32 cumulative product) equals our alpha_bar
(float64, rounded to float32) to 5e-7; tests/test_interop.py checks every schedule with every scheduler.

The UNet: a wrapper, not a conversion. diffusers' UNet2DModel cannot express the course's UNet for any
configuration, because they differ in structure, not only in sizes:
- skips: UNet2DModel also keeps the outputs of `conv_in` and of every downsampler as skips, and its up blocks have
  `layers_per_block + 1` residual blocks to take them; the course's UNet skips only its blocks' outputs;
- blocks per level: `layers_per_block` is one number for every level; the shipped model has (1, 1, 2);
- upsampling: diffusers' Upsample2D follows the nearest-neighbour interpolation by a 3x3 conv; ours has no conv;
- attention: UNet2DModel fixes the head dimension (`attention_head_dim`), the course the number of heads.
The pieces do match (a ResnetBlock2D with `resnet_time_scale_shift="scale_shift"` is our ResBlock, diffusers'
Attention with its GroupNorm our SelfAttention with qkv split in three, the time embeddings are equal), so a
UNet2DModel could only emulate ours by padding with blocks set to the identity (zero second convs, [I | 0]
shortcuts, identity upsampling kernels): for the shipped configuration 2.75M parameters instead of 1.89M and 2.1x
the FLOPs per forward (measured in chapter 9), weights that do nothing. So `CourseUNet2DModel` wraps the course's
UNet in diffusers' `ModelMixin` and `ConfigMixin`: its config is the UNet's keyword arguments (plus `sample_size`),
its forward returns a `UNet2DOutput`, and `save_pretrained` / `from_pretrained` and every pipeline work with it.

Reloading a pipeline: `pipeline.save_pretrained(folder)` records the UNet in model_index.json as
["course_lib.interop", "CourseUNet2DModel"]. diffusers resolves a library it does not know from `sys.modules` only
(it imports nothing a repository names), so `import course_lib.interop` before `DiffusionPipeline.from_pretrained`.

Timesteps and noise: diffusers' convention is the course's (integer t in 0..T-1). Its pipelines draw x_T from the
generator first and each step's noise after the model call from the same generator, as the course's samplers do.
"""

import collections
import inspect
import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    DDIMScheduler,
    DDPMScheduler,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    ModelMixin,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.unets.unet_2d import UNet2DOutput
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from course_lib.captions import VOCABULARY
from course_lib.checks import check_choice, check_steps
from course_lib.data import IMAGE_SIZE
from course_lib.ddpm import PREDICTION_TYPES
from course_lib.nets.dit import DiT
from course_lib.nets.unet import UNet
from course_lib.sampling import SAMPLERS
from course_lib.schedules import DIFFUSERS_BETA_SCHEDULE, Schedule, make_schedule
from course_lib.weights import load_card, load_weights, model_config

DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
# The diffusers scheduler that computes each sampler of the course's family (course_lib.sampling.SAMPLERS).
SCHEDULERS = dict(
    zip(SAMPLERS, (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler), strict=True)
)
BETA_START, BETA_END = 1e-4, 0.02  # the defaults of linear_betas, quadratic_betas and sigmoid_betas
# The `beta_schedule` names each scheduler knows (diffusers 0.42): only DDPMScheduler has "sigmoid".
KNOWN_NAMES = {kind: ("linear", "scaled_linear", "squaredcos_cap_v2") for kind in SAMPLERS}
KNOWN_NAMES["DDPM"] += ("sigmoid",)

# --- the schedule as a scheduler ------------------------------------------------------------------------------


def scheduler_config(schedule: Schedule, kind: str = "DDPM", prediction_type: str = "eps") -> dict:
    """The part of a diffusers scheduler config that a course schedule decides: T, the betas, the prediction.

    By name when the schedule is `make_schedule(schedule.name, schedule.T)` with default parameters (the betas are
    compared, not only the name) and the scheduler of `kind` knows the name; else `trained_betas` (the float32
    betas, which diffusers stores as float32)."""
    check_choice("kind", kind, SAMPLERS)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    config = {"num_train_timesteps": schedule.T, "prediction_type": DIFFUSERS_PREDICTION[prediction_type]}
    name = DIFFUSERS_BETA_SCHEDULE.get(schedule.name)
    if name in KNOWN_NAMES[kind] and torch.equal(make_schedule(schedule.name, schedule.T).betas, schedule.betas):
        config["beta_schedule"] = name
        if name != "squaredcos_cap_v2":  # the cosine schedule has no beta_start / beta_end
            config.update(beta_start=BETA_START, beta_end=BETA_END)
    else:
        config["trained_betas"] = schedule.betas.tolist()
    return config


def to_diffusers_scheduler(schedule: Schedule, kind: str = "DDIM", prediction_type: str = "eps", clip_x0: bool = False):
    """The diffusers scheduler that computes the course's sampler `kind` (one of `sampling.SAMPLERS`) on `schedule`,
    set as the course runs it (`sampling.run_sampler`): DDPM with the posterior variance, DDIM with "trailing"
    spacing, DPM-Solver++(2M) with "linspace" spacing, Euler on Karras sigmas. clip_x0 clips x0_hat to [-1, 1]:
    `clip_sample` for DDPM and DDIM, thresholding at 1 for DPM-Solver++ (tests/test_samplers.py shows it is a clip);
    diffusers' Euler has no clip, so asking for one raises."""
    config = scheduler_config(schedule, kind, prediction_type)
    if kind == "DDPM":
        config.update(variance_type="fixed_small", clip_sample=clip_x0, clip_sample_range=1.0)
    elif kind == "DDIM":
        config.update(timestep_spacing="trailing", clip_sample=clip_x0, clip_sample_range=1.0, set_alpha_to_one=True)
    elif kind == "DPM-Solver++(2M)":
        config.update(algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace")
        config.update(thresholding=clip_x0, sample_max_value=1.0)
    else:
        if clip_x0:
            raise ValueError("diffusers' EulerDiscreteScheduler cannot clip x0_hat; pass clip_x0=False for Euler")
        config.update(use_karras_sigmas=True)
    return SCHEDULERS[kind](**config)


# --- the UNet as a diffusers model ----------------------------------------------------------------------------


class CourseUNet2DModel(ModelMixin, ConfigMixin):
    """The course's UNet (`course_lib.nets.unet.UNet`, held as `.net`) as a diffusers model, in place of a
    UNet2DModel (the module docstring says why not one): model(sample, timestep).sample is the net's output.

    The config is the UNet's keyword arguments plus `sample_size`, the image side that pipelines draw x_T at.
    `num_classes` makes it class-conditional through `class_labels`, as UNet2DModel's `num_class_embeds`."""

    @register_to_config
    def __init__(
        self,
        sample_size: int = IMAGE_SIZE,  # image height and width that pipelines sample
        in_channels: int = 1,  # the UNet's keyword arguments from here on (see course_lib.nets.unet.UNet)
        channels: tuple[int, ...] = (32, 64, 96),
        blocks: tuple[int, ...] = (1, 1, 2),
        attention: tuple[bool, ...] = (False, False, True),
        heads: int = 4,
        groups: int = 8,
        dropout: float = 0.0,
        num_classes: int | None = None,
    ):
        super().__init__()
        levels = dict(channels=tuple(channels), blocks=tuple(blocks), attention=tuple(attention))
        self.net = UNet(in_channels, **levels, heads=heads, groups=groups, dropout=dropout, num_classes=num_classes)

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None, return_dict=True):
        # sample: (B, C, H, W); timestep: a number, a 0-d tensor (what pipelines pass) or (B,); labels: (B,) or None
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(len(sample)) if t.ndim == 0 else t
        if t.shape != (len(sample),):
            raise ValueError(f"need one timestep or one per example ({len(sample)}); got shape {tuple(t.shape)}")
        output = self.net(sample, t, class_labels)  # (B, C, H, W)
        return UNet2DOutput(sample=output) if return_dict else (output,)


def load_diffusers_unet(name: str = "unet_mnist_eps", folder: Path | None = None) -> CourseUNet2DModel:
    """A shipped course UNet (data/NAME.*, sha256-checked, no pickle) as a `CourseUNet2DModel`, in eval mode."""
    card = load_card(name, folder)
    if card["model"]["class"] != "course_lib.nets.unet.UNet":
        raise ValueError(f"{name} is a {card['model']['class']}; only course_lib.nets.unet.UNet models are wrapped")
    config = model_config(card)
    known = set(inspect.signature(CourseUNet2DModel.__init__).parameters) - {"self", "sample_size"}
    if set(config) - known:
        raise ValueError(f"the card of {name} sets {sorted(set(config) - known)}; CourseUNet2DModel takes {known}")
    model = CourseUNet2DModel(sample_size=IMAGE_SIZE, **config)
    load_weights(model.net, name, folder)
    return model.eval()


@torch.no_grad()
def scheduler_sample(unet, scheduler, x_T: torch.Tensor, steps: int, generator: torch.Generator | None = None):
    """The denoising loop of diffusers' pipelines (StableDiffusionPipeline's, without the text) from a given x_T.

    DDPMPipeline and DDIMPipeline leave out steps 1 and 2, right only for schedulers whose init_noise_sigma is 1 and
    whose scale_model_input does nothing (DDPM, DDIM, DPM-Solver); Euler needs both. `unet` is a diffusers model
    (`unet(x, t).sample`); generator feeds the steps that add noise. Returns the last sample, not clamped."""
    steps = check_steps(steps)
    scheduler.set_timesteps(steps, device=x_T.device)
    # 1. the start at the scheduler's noise level (Euler's variance-exploding state is sigma_max times larger)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        # 2. the network's input at t (Euler divides by sqrt(1 + sigma^2), the others pass x as it is)
        model_input = scheduler.scale_model_input(x, t)
        # 3. the network's prediction, 4. the scheduler's step to the next timestep
        model_output = unet(model_input, t).sample
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample
    return x


# --- a tiny Stable Diffusion, randomly initialised, built offline ---------------------------------------------

TOKENIZER_WORDS = VOCABULARY[2:]  # the words of chapter 7's captions: a, thin, thick, zero..nine, leaning, ...
TOKENS = 8  # the text encoder's sequence: <|startoftext|>, up to 6 tokens, <|endoftext|> (and padding)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def bpe_merges(words) -> list[tuple[str, str]]:
    """Byte-pair encoding learned on `words` (Sennrich et al. 2016), as CLIP's tokenizer applies it: start from
    characters, the last one of a word marked "</w>", and merge the most frequent adjacent pair (the first seen, on a
    tie) until every word is one symbol. Returns the merges in order."""
    corpus = [(*word[:-1], word[-1] + "</w>") for word in dict.fromkeys(words)]
    merges = []
    while any(len(symbols) > 1 for symbols in corpus):
        counts = collections.Counter(pair for symbols in corpus for pair in zip(symbols[:-1], symbols[1:], strict=True))
        best = max(counts, key=counts.get)
        merges.append(best)
        corpus = [_merge_pair(symbols, best) for symbols in corpus]
    return merges


def tiny_tokenizer(words=TOKENIZER_WORDS, length: int = TOKENS) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary is CLIP's two special tokens, the letters a-z (alone and ending a word) and
    the merges `bpe_merges(words)` learns: each of `words` is one token, any other lower-case word a few. Written to
    a temporary folder as vocab.json and merges.txt (CLIP's files) and loaded from there."""
    if not all(word.isalpha() and word.islower() and word.isascii() for word in words):
        bad = [word for word in words if not (word.isalpha() and word.islower() and word.isascii())]
        raise ValueError(f"words must be lower-case ASCII letters only; got {bad}")
    letters = [chr(code) for code in range(ord("a"), ord("z") + 1)]
    merges = bpe_merges(words)
    symbols = ["<|startoftext|>", "<|endoftext|>", *letters, *(letter + "</w>" for letter in letters)]
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(symbols + [a + b for a, b in merges]))}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=length)


# The components' sizes: about 1M parameters in all; a pipeline call of a few steps takes a fraction of a second.
TINY_TEXT_ENCODER = dict(
    hidden_size=32,  # width of the token embeddings: the UNet's cross_attention_dim
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=TOKENS,
    bos_token_id=0,  # <|startoftext|>, as tiny_tokenizer numbers it
    eos_token_id=1,  # <|endoftext|>, which also pads
    pad_token_id=1,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),  # 3 levels: latents are 4x smaller than images on each side
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,
)
TINY_UNET = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TINY_TEXT_ENCODER["hidden_size"],
    attention_head_dim=8,
    norm_num_groups=8,
)


def tiny_stable_diffusion(seed: int = 0, image_size: int = 32) -> StableDiffusionPipeline:
    """Stable Diffusion's pipeline with every component tiny and randomly initialised (seeded, without touching the
    global random state), on the CPU, progress bars off. It shows the anatomy, not pictures:

        tokenizer     `tiny_tokenizer()`: prompt -> (B, 8) token ids
        text_encoder  CLIPTextModel, 2 layers of width 32: ids -> prompt embeddings (B, 8, 32)
        unet          UNet2DConditionModel (32, 64), cross-attention to the embeddings: eps_hat on latents
        vae           AutoencoderKL, 3 levels: images (B, 3, S, S) <-> latents (B, 4, S / 4, S / 4)
        scheduler     DDIM on the course's "quadratic" schedule (diffusers' scaled_linear, Stable Diffusion's kind)
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size % 8 or image_size < 16:
        raise ValueError(f"image_size must be a multiple of 8 (the pipeline asks for it) and >= 16; got {image_size!r}")
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER))
        vae = AutoencoderKL(sample_size=image_size, **TINY_VAE)
        unet = UNet2DConditionModel(sample_size=image_size // 4, **TINY_UNET)
    # Stable Diffusion pipelines ask for steps_offset=1, which "trailing" spacing ignores
    scheduler = to_diffusers_scheduler(make_schedule("quadratic", 1000), "DDIM")
    scheduler = DDIMScheduler.from_config(scheduler.config, steps_offset=1)
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --- the DiT as diffusers' DiTTransformer2DModel (chapter 12) -----------------------------------------------------
#
# How the parity is exact: diffusers' DiT gives every block its own copy of the time and label embedding
# (`norm1.emb`, a CombinedTimestepLabelEmbeddings) and reads block 0's copy again for the final layer; the paper's
# code, and ours, has one. Our one embedding is copied into every block's copy. Two settings of diffusers' DiT differ
# from the paper's code and are set to the paper's: the MLP LayerNorm's eps (`norm_eps=1e-6`, a constructor argument)
# and the spacing of the time sinusoids (`Timesteps(downscale_freq_shift=1)`, frequencies 10000^(-i / (half - 1)),
# where the paper's TimestepEmbedder and `course_lib.nets.embedding.timestep_embedding` use 10000^(-i / half)); that
# parameter-free attribute is set to 0 on each `time_proj` (`paper_time_sinusoids`). Nothing else is changed.


def paper_time_sinusoids(module: torch.nn.Module) -> torch.nn.Module:
    """Every `time_proj` of a diffusers DiT (or block) spaced as the paper's code spaces it (downscale_freq_shift
    0), in place; returns the module."""
    for name, submodule in module.named_modules():
        if name.endswith("time_proj"):
            submodule.downscale_freq_shift = 0
    return module


def dit_block_state(model: DiT, index: int) -> dict[str, torch.Tensor]:
    """Block `index` of our DiT, with the model's time and label embedding, under BasicTransformerBlock's names
    (our fused qkv split into to_q, to_k, to_v), detached copies."""
    if model.class_emb is None:
        raise ValueError("diffusers' DiT blocks embed a class label: the DiT needs num_classes")
    block = model.blocks[index]
    weights, biases = block.qkv.weight.chunk(3), block.qkv.bias.chunk(3)  # q, k, v: rows of the fused layer
    embedding = "norm1.emb."
    state = {
        embedding + "timestep_embedder.linear_1.weight": model.time_mlp[0].weight,
        embedding + "timestep_embedder.linear_1.bias": model.time_mlp[0].bias,
        embedding + "timestep_embedder.linear_2.weight": model.time_mlp[2].weight,
        embedding + "timestep_embedder.linear_2.bias": model.time_mlp[2].bias,
        embedding + "class_embedder.embedding_table.weight": model.class_emb.weight,
        "norm1.linear.weight": block.modulation.weight,
        "norm1.linear.bias": block.modulation.bias,
        **{f"attn1.to_{name}.weight": weight for name, weight in zip("qkv", weights, strict=True)},
        **{f"attn1.to_{name}.bias": bias for name, bias in zip("qkv", biases, strict=True)},
        "attn1.to_out.0.weight": block.proj.weight,
        "attn1.to_out.0.bias": block.proj.bias,
        "ff.net.0.proj.weight": block.mlp[0].weight,
        "ff.net.0.proj.bias": block.mlp[0].bias,
        "ff.net.2.weight": block.mlp[2].weight,
        "ff.net.2.bias": block.mlp[2].bias,
    }
    return {key: value.detach().clone() for key, value in state.items()}


def dit_state(model: DiT) -> dict[str, torch.Tensor]:
    """Our DiT's state dict under diffusers' DiTTransformer2DModel names, detached copies."""
    state = {
        "pos_embed.proj.weight": model.patch_embed.weight,
        "pos_embed.proj.bias": model.patch_embed.bias,
        "proj_out_1.weight": model.final.modulation.weight,
        "proj_out_1.bias": model.final.modulation.bias,
        "proj_out_2.weight": model.final.linear.weight,
        "proj_out_2.bias": model.final.linear.bias,
    }
    state = {key: value.detach().clone() for key, value in state.items()}
    for index in range(len(model.blocks)):
        state.update(
            {f"transformer_blocks.{index}.{key}": value for key, value in dit_block_state(model, index).items()}
        )
    return state


def diffusers_dit(model: DiT | dict, num_classes: int | None = None, paper_time: bool = True) -> DiTTransformer2DModel:
    """diffusers' DiTTransformer2DModel of our DiT's configuration, in eval mode (no random label dropout): given a
    DiT, with its weights and the paper's time sinusoids (paper_time=False leaves diffusers' own spacing, the one
    difference left); given a configuration dict (DiT's keyword arguments) and num_classes, freshly initialised."""
    config = (
        model
        if isinstance(model, dict)
        else dict(
            in_channels=model.in_channels,
            input_size=model.input_size,
            patch_size=model.patch_size,
            width=model.width,
            depth=model.depth,
            heads=model.heads,
        )
    )
    theirs = DiTTransformer2DModel(
        num_attention_heads=config["heads"],
        attention_head_dim=config["width"] // config["heads"],
        in_channels=config["in_channels"],
        out_channels=config["in_channels"],
        num_layers=config["depth"],
        sample_size=config["input_size"],
        patch_size=config["patch_size"],
        num_embeds_ada_norm=num_classes if isinstance(model, dict) else model.num_classes,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_eps=1e-6,
    ).eval()
    if paper_time:
        paper_time_sinusoids(theirs)
    if isinstance(model, DiT):
        # torch's own `to`: ModelMixin.to warns about modules to keep in float32, and this DiT has none
        torch.nn.Module.to(theirs, next(model.parameters()).dtype)
        theirs.load_state_dict(dit_state(model), strict=True)
    return theirs


def diffusers_dit_block(model: DiT, index: int) -> BasicTransformerBlock:
    """Block `index` of our DiT as diffusers' BasicTransformerBlock(norm_type="ada_norm_zero"), with the paper's
    time sinusoids, in eval mode: it embeds (t, labels) itself with our time MLP and label table, so it maps
    (tokens, t, labels) to what our block maps (tokens, c) to."""
    theirs = BasicTransformerBlock(
        model.width,
        model.heads,
        model.width // model.heads,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=model.num_classes,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    theirs = paper_time_sinusoids(theirs).to(next(model.parameters()).dtype).eval()
    theirs.load_state_dict(dit_block_state(model, index), strict=True)
    return theirs
