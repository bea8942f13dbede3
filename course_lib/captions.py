"""Captions for digits, made from what can be measured in them (chapter 7): "a thick seven leaning right".

Three attributes, each one a caption can ask for and a measurement can check:
- the digit: its label (and, for a generated image, what the shipped classifier reads);
- the slant: the shear of the ink, from image moments (Morpho-MNIST's measure, Castro et al. 2019): how far x moves
  per row going up, 0 for an upright digit, > 0 leaning right;
- the stroke thickness: ink area over half the ink's boundary (for a stroke of width w and length L, the area is
  w L and the boundary 2 L), in pixels.

Chapter 14's new concept, a bar struck through the digit (`course_lib.styles.strike_bar`), has its measure here too
(`measure_bar`, `BAR_THRESHOLD`), and `tokenize` takes a larger vocabulary for the word a fine-tune adds.

The word for each attribute comes from fixed thresholds on the measurement (SLANT_WORDS, THICKNESS_WORDS), so a
prompt's claim can be checked on the samples it produces. A tiny word-level tokenizer turns captions into token
ids for the text encoder (`course_lib.nets.text`); every caption starts with "<start>", so even the empty caption
("no condition", for classifier-free guidance) has a token to attend to.
"""

import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SLANT_LEFT, SLANT_RIGHT = 0.0, 0.3  # slant below: "leaning left"; above: "leaning right"; between: "upright"
THIN, THICK = 1.7, 2.2  # thickness (pixels) below: "thin"; above: "thick"; between: no word
VOCABULARY = ("<pad>", "<start>", "a", "thin", "thick", *DIGIT_WORDS, "leaning", "left", "right", "upright")
THICKNESS_CHOICES = ("thin", "", "thick")  # the words thickness_word gives ("": neither)
SLANT_CHOICES = ("leaning left", "upright", "leaning right")
CAPTION_LENGTH = 6  # tokens: <start> a thick seven leaning right


def _ink_weights(images: torch.Tensor) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"need single-channel images (B, 1, H, W) in [-1, 1]; got shape {tuple(images.shape)}")
    return ((images + 1) / 2).clamp(0, 1)[:, 0]  # (B, H, W), ink in [0, 1]


def measure_slant(images: torch.Tensor) -> torch.Tensor:
    r"""The shear of each image's ink, $-\mu_{11} / \mu_{02}$ (image rows grow downwards): (B,), 0 is upright,
    > 0 leans right. Blank images give 0."""
    w = _ink_weights(images)
    H, W = w.shape[-2:]
    rows = torch.arange(H, dtype=w.dtype, device=w.device)[:, None]  # y, growing downwards
    cols = torch.arange(W, dtype=w.dtype, device=w.device)[None, :]
    mass = w.sum((1, 2)).clamp(min=1e-6)  # (B,)
    cy, cx = (w * rows).sum((1, 2)) / mass, (w * cols).sum((1, 2)) / mass
    dy, dx = rows - cy[:, None, None], cols - cx[:, None, None]  # (B, H, W)
    mu11, mu02 = (w * dx * dy).sum((1, 2)) / mass, (w * dy * dy).sum((1, 2)) / mass
    return -mu11 / mu02.clamp(min=1e-6)


def measure_thickness(images: torch.Tensor) -> torch.Tensor:
    """Stroke width in pixels: 2 x ink area / perimeter, with ink = pixels above the middle grey and the perimeter
    = the number of sides between an ink pixel and a non-ink one. A stroke of width w and length L has area w L and
    perimeter 2 (w + L), so this is w (1 - w / L + ...). (B,); blank images give 0."""
    ink = (_ink_weights(images) > 0.5).float()[:, None]  # (B, 1, H, W)
    padded = F.pad(ink, (1, 1, 1, 1), value=0.0)
    neighbours = [padded[..., :-2, 1:-1], padded[..., 2:, 1:-1], padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]]
    perimeter = sum((ink * (1 - neighbour)).sum((1, 2, 3)) for neighbour in neighbours)
    return 2 * ink.sum((1, 2, 3)) / perimeter.clamp(min=1)


# The bar of chapter 14 (`styles.strike_bar`: rows 13-14, columns 2-25). Its measure: the best-covered row of a band
# around the middle, as the fraction of those 24 columns that hold ink. Measured on all 5,000 digits of
# data/mnist5k.parquet: plain digits median 0.42, 99th percentile 0.79, largest 0.83 (a digit spans at most 20 of
# the 24 columns); every barred digit 1.0. The threshold sits between, 0.07 above the largest plain digit.
BAR_BAND = (9, 20)  # rows searched for the bar (the bar's own rows 13-14, and four on either side)
BAR_SPAN = (2, 26)  # columns of the bar
BAR_THRESHOLD = 0.9  # a row at least this covered reads as a bar


def measure_bar(images: torch.Tensor) -> torch.Tensor:
    r"""How strongly each image shows chapter 14's bar: (B,) in [0, 1], the largest fraction of ink pixels (above
    the middle grey) in one row of BAR_BAND over the columns BAR_SPAN,
    $\max_{r} \frac{1}{|S|} \sum_{c \in S} [\text{ink}_{r,c} > 0.5]$. A plain digit stays below 0.84 (its strokes
    fit a 20-pixel box), a barred one gives 1; `BAR_THRESHOLD` (0.9) splits them (values in the comment above)."""
    ink = _ink_weights(images) > 0.5  # (B, H, W)
    band = ink[:, slice(*BAR_BAND), slice(*BAR_SPAN)].float()  # (B, rows, columns)
    return band.mean(2).amax(1)


def barred_fraction(images: torch.Tensor) -> float:
    """The fraction of images whose bar measure reaches BAR_THRESHOLD: how often the concept appears."""
    return (measure_bar(images) >= BAR_THRESHOLD).double().mean().item()


def slant_word(slant: float) -> str:
    if slant < SLANT_LEFT:
        return "leaning left"
    return "leaning right" if slant > SLANT_RIGHT else "upright"


def thickness_word(thickness: float) -> str:
    if thickness < THIN:
        return "thin"
    return "thick" if thickness > THICK else ""


def word_agreement(images: torch.Tensor, thickness: str | None = None, slant: str | None = None) -> float:
    """The fraction of images whose measured thickness word (and / or slant word) is the one asked for: how well
    samples obey a prompt's attribute words. Pass the words as in `caption` ("thick", "leaning right", ...)."""
    if thickness is None and slant is None:
        raise ValueError("ask for a thickness word, a slant word or both")
    for name, word, words in (("thickness", thickness, THICKNESS_CHOICES), ("slant", slant, SLANT_CHOICES)):
        if word is not None and word not in words:
            raise ValueError(f"{name}={word!r} is not a {name} word; valid: {', '.join(map(repr, words))}")
    agree = torch.ones(len(images), dtype=torch.bool)
    if thickness is not None:
        agree &= torch.tensor([thickness_word(value) == thickness for value in measure_thickness(images).tolist()])
    if slant is not None:
        agree &= torch.tensor([slant_word(value) == slant for value in measure_slant(images).tolist()])
    return agree.double().mean().item()


def caption(digit: int | None, thickness: str = "", slant: str = "") -> str:
    """ "a [thin|thick] DIGIT [leaning left|upright|leaning right]"; any part may be left out ("" for none)."""
    words = ["a", thickness, DIGIT_WORDS[digit] if digit is not None else "", slant]
    return " ".join(word for word in words if word) if any(words[1:]) else ""


def describe(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """The full caption of each image: its label's word, and the words of its measured thickness and slant."""
    slants, thicknesses = measure_slant(images).tolist(), measure_thickness(images).tolist()
    return [
        caption(label, thickness_word(thickness), slant_word(slant))
        for label, slant, thickness in zip(labels.tolist(), slants, thicknesses, strict=True)
    ]


def tokenize(
    captions: list[str], length: int = CAPTION_LENGTH, vocabulary: tuple[str, ...] = VOCABULARY
) -> torch.Tensor:
    """Token ids (B, length): <start>, the caption's words, then <pad>. Unknown words and long captions raise.
    `vocabulary`: VOCABULARY, or VOCABULARY followed by the words a fine-tune added (chapter 14's "<bar>")."""
    if tuple(vocabulary[: len(VOCABULARY)]) != VOCABULARY:
        raise ValueError(f"a vocabulary must start with the course's VOCABULARY {VOCABULARY}; got {vocabulary}")
    ids = []
    for text in captions:
        words = ["<start>", *text.split()]
        unknown = [word for word in words if word not in vocabulary]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r} in caption {text!r}; the vocabulary is {vocabulary[2:]}")
        if len(words) > length:
            raise ValueError(f"caption {text!r} has {len(words) - 1} words; at most {length - 1} fit")
        ids.append([vocabulary.index(word) for word in words] + [0] * (length - len(words)))
    return torch.tensor(ids, dtype=torch.long)


def caption_parts(images: torch.Tensor, labels: torch.Tensor) -> list[tuple[int, str, str]]:
    """(digit, thickness word, slant word) of each image, measured once before training."""
    slants, thicknesses = measure_slant(images).tolist(), measure_thickness(images).tolist()
    return [
        (label, thickness_word(thickness), slant_word(slant))
        for label, slant, thickness in zip(labels.tolist(), slants, thicknesses, strict=True)
    ]


def random_captions(
    parts: list[tuple[int, str, str]],
    generator: torch.Generator,
    drop_part: float = 0.3,
    drop_all: float = 0.1,
) -> list[str]:
    """Training captions: each of a caption's three parts left out with probability drop_part, and the whole
    caption with probability drop_all (the empty caption, for classifier-free guidance). Partial captions
    ("a thick seven", "leaning left") teach the model each attribute on its own, which negative prompts need."""
    for name, p in (("drop_part", drop_part), ("drop_all", drop_all)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must lie in [0, 1]; got {name}={p}")
    keep = torch.rand(len(parts), 3, generator=generator) >= drop_part  # (B, 3): digit, thickness, slant
    empty = torch.rand(len(parts), generator=generator) < drop_all
    captions = []
    for (digit, thickness, slant), (keep_digit, keep_thickness, keep_slant), drop in zip(
        parts, keep.tolist(), empty.tolist(), strict=True
    ):
        if drop:
            captions.append("")
        else:
            captions.append(
                caption(digit if keep_digit else None, thickness if keep_thickness else "", slant if keep_slant else "")
            )
    return captions
