r"""A new concept from a few examples (chapter 14): textual inversion, DreamBooth, and DreamBooth with LoRA.

Papers: Gal et al. 2022, "An Image is Worth One Word" (textual inversion); Ruiz et al. 2022, "DreamBooth"; Hu et al.
2021, "LoRA" (the adapters of chapter 8, `course_lib.lora`). The concept is one the caption model `unet_mnist_text`
has never seen, made by code so that it can be measured: a bar struck through the digit (`styles.strike_bar`,
measured by `captions.measure_bar`). A few barred digits (10 by default, one of each class, picked by label) are
captioned "a <bar> seven", with a new word `TOKEN` appended to the vocabulary (`CONCEPT_VOCABULARY`), and:

- textual inversion learns only the new word's embedding, one row of 64 numbers; every weight of the model stays
  as it was, bit for bit, so ordinary prompts give exactly what they gave;
- DreamBooth fine-tunes the UNet with the prior-preservation loss (`concept_loss`), the new word a fixed random
  vector (the course's vocabulary has no rare word to borrow, as the paper borrows "sks");
- DreamBooth-LoRA: the same loss, with only rank-r adapters of the UNet trainable.

The new row sits beside the frozen table in a separate parameter (`AddedToken`), so "only that row trains" holds
by construction, not by masking gradients (diffusers' textual-inversion script trains the whole table and copies
the other rows back after each step). Files: the embedding as {token: (1, dim)} in safetensors, the format of
diffusers' `learned_embeds.safetensors` (`save_token` / `load_token`); DreamBooth's whole model; DreamBooth-LoRA's
adapters as a course LoRA file beside the identifier's embedding file (diffusers' advanced DreamBooth-LoRA script
likewise writes the new tokens' embeddings to a second `*_emb.safetensors`). `load_concept` rebuilds each.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from course_lib.captions import DIGIT_WORDS, VOCABULARY, caption, tokenize
from course_lib.checks import check_choice
from course_lib.data import is_shipped, verify_file, write_atomic
from course_lib.ddpm import training_target
from course_lib.forward import q_sample
from course_lib.guidance import guided_samples
from course_lib.lora import inject_lora, load_lora, mark_only_lora_trainable, save_lora
from course_lib.profiles import randn_like
from course_lib.schedules import Schedule
from course_lib.styles import balanced_digits, strike_bar
from course_lib.train import TrainConfig, TrainState, train

BASE = "unet_mnist_text"
TOKEN = "<bar>"  # the new word (diffusers' textual inversion calls it the placeholder token)
CONCEPT_VOCABULARY = (*VOCABULARY, TOKEN)
METHODS = ("textual_inversion", "dreambooth", "dreambooth_lora")
LORA_TARGETS, LORA_RANK, LORA_ALPHA = ["q", "kv", "out", "qkv", "conv2"], 4, 4.0  # cross- and self-attention, convs


def concept_examples(n: int = 10, split: str = "train", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n barred digits and their labels: `styles.balanced_digits` (classes interleaved 0..9, 0..9, ...), the first n,
    so that any n is as balanced as it can be (n = 10: one of each digit)."""
    if not 1 <= n <= 500:
        raise ValueError(f"n must lie in 1..500 (the few examples of a concept); got n={n}")
    images, labels = balanced_digits(math.ceil(n / 10), split, seed)
    return strike_bar(images[:n]), labels[:n]


def concept_captions(labels: torch.Tensor) -> list[str]:
    """ "a <bar> DIGIT" for each label: the prompt that asks for the concept (DreamBooth's "a [V] dog")."""
    return [f"a {TOKEN} {DIGIT_WORDS[label]}" for label in labels.tolist()]


def class_captions(labels: torch.Tensor) -> list[str]:
    """ "a DIGIT" for each label: the ordinary prompt, DreamBooth's class prompt ("a dog")."""
    return [caption(label) for label in labels.tolist()]


def tokenize_concept(captions: list[str]) -> torch.Tensor:
    """Token ids (B, L) in CONCEPT_VOCABULARY: ordinary captions get the same ids as `captions.tokenize`."""
    return tokenize(captions, vocabulary=CONCEPT_VOCABULARY)


class AddedToken(nn.Module):
    """An embedding table (V, dim) kept as it was, and one new row (1, dim) beside it: ids 0..V-1 read the table, id
    V reads the new row. Training the new row alone cannot change the table, which is frozen."""

    def __init__(self, table: nn.Embedding, row: torch.Tensor):
        super().__init__()
        if row.shape != (1, table.embedding_dim):
            raise ValueError(f"the new row must have shape (1, {table.embedding_dim}); got {tuple(row.shape)}")
        self.table = table.requires_grad_(False)
        self.row = nn.Parameter(row.detach().clone().to(table.weight))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, torch.cat([self.table.weight, self.row]))  # (B, L) -> (B, L, dim)


def add_token(model: nn.Module, init: str | torch.Tensor | None = None, seed: int = 0) -> int:
    """Give a caption model (`nets.text.TextConditionedUNet`) the word TOKEN, and return its id.

    Its embedding starts as `init`: a word of the vocabulary (textual inversion starts from a word that says
    something of the concept, diffusers' `initializer_token`), a (1, dim) tensor, or None for a random vector
    (seeded) whose length is the table's mean row length (DreamBooth's identifier: a word with no meaning yet)."""
    encoder = model.text_encoder
    if isinstance(encoder.tokens, AddedToken):
        raise ValueError(f"this model already has the word {TOKEN!r}: add it once")
    table = encoder.tokens.weight  # (V, dim)
    if isinstance(init, str):
        if init not in VOCABULARY[2:]:
            raise ValueError(f"init word {init!r} is not in the vocabulary {VOCABULARY[2:]}")
        row = table[VOCABULARY.index(init)][None]
    elif init is None:
        row = torch.randn(1, table.shape[1], generator=torch.Generator().manual_seed(seed))
        row = row / row.norm() * table.norm(dim=1).mean()
    else:
        row = init
    encoder.tokens = AddedToken(encoder.tokens, row)
    return len(VOCABULARY)


def token_embedding(model: nn.Module) -> torch.Tensor:
    """The new word's embedding (1, dim); raises if the model has none (`add_token` first)."""
    if not isinstance(model.text_encoder.tokens, AddedToken):
        raise ValueError(f"this model has no word {TOKEN!r}: call add_token(model) first")
    return model.text_encoder.tokens.row


def prepare(model: nn.Module, method: str, init_word: str = "thick", seed: int = 0) -> int:
    """Add TOKEN to a freshly loaded caption model and make trainable what `method` trains; returns that count.
    textual_inversion: the new row only (started from `init_word`); dreambooth: the UNet (the text encoder and the
    random identifier frozen); dreambooth_lora: rank-4 adapters of the UNet's attention and second convolutions."""
    check_choice("method", method, METHODS)
    add_token(model, init_word if method == "textual_inversion" else None, seed)
    model.requires_grad_(False)
    if method == "textual_inversion":
        token_embedding(model).requires_grad_(True)
    elif method == "dreambooth":
        model.unet.requires_grad_(True)
    else:
        inject_lora(model.unet, LORA_TARGETS, LORA_RANK, LORA_ALPHA)
        mark_only_lora_trainable(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def concept_loss(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    generator: torch.Generator | None,
    tokens: torch.Tensor,
    prior_x0: torch.Tensor | None = None,
    prior_tokens: torch.Tensor | None = None,
    prior_weight: float = 1.0,
    prediction_type: str = "eps",
) -> torch.Tensor:
    r"""The loss on the concept's examples, plus DreamBooth's prior preservation (Ruiz et al. 2022, eq. 2):

    $$L = \mathbb E\,\lVert \epsilon - \epsilon_\theta(x_t, t, c) \rVert^2
        + \lambda\,\mathbb E\,\lVert \epsilon' - \epsilon_\theta(x'_{t'}, t', c_{pr}) \rVert^2$$

    x0 (B, ...) the concept's examples with their captions `tokens` (c: "a <bar> seven"); prior_x0 (P, ...) images
    the frozen model drew for the class prompts `prior_tokens` (c_pr: "a seven") before training; lambda =
    prior_weight. Each term is a mean over its own batch. Without prior_x0 it is the first term alone, the loss of
    textual inversion (Gal et al. 2022, eq. 2). As diffusers' train_dreambooth.py, one forward pass on both batches
    concatenated (t, then eps, drawn for the B + P images in that order), split afterwards.

    code -> symbol: x0, prior_x0 -> $x_0, x'_0$; tokens, prior_tokens -> $c, c_{pr}$; prior_weight -> $\lambda$
    """
    if (prior_x0 is None) != (prior_tokens is None):
        raise ValueError("give both prior_x0 and prior_tokens (prior preservation) or neither (concept term only)")
    if not math.isfinite(prior_weight) or prior_weight < 0:
        raise ValueError(f"prior_weight (lambda) must be a finite number >= 0; got {prior_weight}")
    B = len(x0)
    x = x0 if prior_x0 is None else torch.cat([x0, prior_x0])  # (B + P, C, H, W)
    cond = tokens if prior_tokens is None else torch.cat([tokens, prior_tokens])  # (B + P, L)
    if len(cond) != len(x):
        raise ValueError(f"one caption per image: {len(x)} images, {len(cond)} captions")
    t = torch.randint(0, schedule.T, (len(x),), generator=generator).to(x.device)  # (B + P,)
    eps = randn_like(x, generator)
    target = training_target(schedule, x, eps, t, prediction_type)
    prediction = model(q_sample(schedule, x, t, eps), t, cond.to(x.device))
    loss = F.mse_loss(prediction[:B], target[:B])
    if prior_x0 is not None:
        loss = loss + prior_weight * F.mse_loss(prediction[B:], target[B:])
    return loss


def train_concept(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    tokens: torch.Tensor,
    config: TrainConfig,
    prior: tuple[torch.Tensor, torch.Tensor] | None = None,
    prior_weight: float = 1.0,
    budget_s: float | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> TrainState:
    """Train what `prepare` left trainable on the examples x0 (N, ...) and their captions `tokens` (N, L), with
    prior preservation when `prior` = (class images, their captions) is given: `concept_loss` on config.batch_size
    examples and as many prior images, drawn with replacement, in `course_lib.train.train`'s loop (AdamW, warm-up and
    cosine decay, gradient clipping, checkpoints: resumes from `checkpoint` if it exists, saves every
    config.checkpoint_every_s and at the end, stops after budget_s seconds of this call); no EMA (diffusers'
    scripts for these methods keep none, and the runs are a few hundred steps)."""
    if config.ema_decay is not None:
        raise ValueError(f"train_concept keeps no EMA: set ema_decay=None; got {config.ema_decay}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("nothing to train: call prepare(model, method) first")
    device = next(model.parameters()).device

    def step_loss(net: nn.Module, generator: torch.Generator) -> torch.Tensor:
        # a minibatch of examples, and one of prior images, drawn with replacement
        index = torch.randint(0, len(x0), (config.batch_size,), generator=generator)
        batch = dict(x0=x0[index].to(device), tokens=tokens[index])
        if prior is not None:
            prior_index = torch.randint(0, len(prior[0]), (config.batch_size,), generator=generator)
            batch.update(prior_x0=prior[0][prior_index].to(device), prior_tokens=prior[1][prior_index])
        return concept_loss(net, schedule, generator=generator, prior_weight=prior_weight, **batch)

    identifying = x0 if prior is None else torch.cat([x0, prior[0]])  # what the checkpoint records it trained on
    state, _ = train(model, schedule, identifying, config, budget_s, checkpoint, progress, step_loss=step_loss)
    return state


# --- files ---------------------------------------------------------------------------------------------------------


def save_token(model: nn.Module, path: Path | str) -> Path:
    """The new word's embedding as {TOKEN: (1, dim) float32} in safetensors, the layout of diffusers'
    learned_embeds.safetensors (`load_textual_inversion` reads such a file), written whole (`write_atomic`)."""
    path = Path(path)
    write_atomic(path, save({TOKEN: token_embedding(model).detach().to("cpu", torch.float32).contiguous()}))
    return path


def read_token(path: Path | str) -> torch.Tensor:
    """The (1, dim) embedding of TOKEN stored at `path` (a shipped file is checked against data/SHA256SUMS)."""
    path = Path(path)
    if is_shipped(path):
        verify_file(path, "python scripts/train_concept.py --method METHOD --export")
    with safe_open(path, "pt") as f:
        if list(f.keys()) != [TOKEN]:
            raise ValueError(f"{path} holds {list(f.keys())}; an embedding file holds one tensor named {TOKEN!r}")
        return f.get_tensor(TOKEN)


def load_token(model: nn.Module, path: Path | str) -> nn.Module:
    """Add TOKEN to a caption model with the embedding stored at `path`; returns the model."""
    add_token(model, read_token(path))
    return model


def save_concept(model: nn.Module, method: str, path: Path | str, dtype: torch.dtype | None = None) -> list[Path]:
    """Write what `method` trained: the embedding (textual inversion), the whole model (DreamBooth), or the adapters
    plus the identifier's embedding beside them as PATH_emb.safetensors (DreamBooth-LoRA). dtype (float16, as the
    course's shipped weights) converts the model's and the adapters' tensors; the embedding stays float32.
    Returns the files written."""
    check_choice("method", method, METHODS)
    path = Path(path)
    if method == "textual_inversion":
        return [save_token(model, path)]
    if method == "dreambooth":
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
        write_atomic(path, save(state, metadata={"base": BASE, "token": TOKEN}))
        return [path]
    return [save_lora(model.unet, path, dtype=dtype), save_token(model, embedding_path(path))]


def embedding_path(path: Path | str) -> Path:
    """Where DreamBooth-LoRA's identifier embedding lies beside its adapter file: NAME_emb.safetensors."""
    path = Path(path)
    return path.with_name(f"{path.stem}_emb{path.suffix}")


def load_concept(model: nn.Module, method: str, path: Path | str) -> nn.Module:
    """Give a freshly loaded base caption model what `save_concept` wrote for `method`; returns it in eval mode."""
    check_choice("method", method, METHODS)
    path = Path(path)
    if method == "textual_inversion":
        return load_token(model, path).eval()
    if method == "dreambooth_lora":
        load_token(model, embedding_path(path))
        load_lora(model.unet, path)
        return model.eval()
    if is_shipped(path):
        verify_file(path, "python scripts/train_concept.py --method dreambooth --export")
    add_token(model, torch.zeros(1, model.text_encoder.tokens.embedding_dim))
    with safe_open(path, "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    expected = model.state_dict()
    if set(state) != set(expected):
        raise ValueError(
            f"{path} does not fit a caption model with {TOKEN!r}: {sorted(set(state) ^ set(expected))[:3]}"
        )
    model.load_state_dict({key: value.to(expected[key]) for key, value in state.items()})
    return model.eval()


# --- sampling ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def prompt_samples(
    model: nn.Module,
    schedule: Schedule,
    digits: torch.Tensor,
    concept: bool,
    scale: float = 3.0,
    steps: int = 20,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One guided DDIM sample per digit for "a <bar> DIGIT" (concept=True) or the ordinary "a DIGIT", against the
    empty caption (`guidance.guided_samples`: the same seed gives the same noise, so the two prompts, and a model
    before and after a fine-tune, are compared sample for sample)."""
    captions = concept_captions(digits) if concept else class_captions(digits)
    return guided_samples(
        model, schedule, tokenize_concept(captions), tokenize_concept([""]), scale, steps, seed, device=device
    )[0]
