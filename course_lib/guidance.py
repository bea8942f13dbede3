r"""Classifier-free guidance (chapter 7). Paper: Ho & Salimans 2021, "Classifier-Free Diffusion Guidance".

One network learns both the conditional $\epsilon(x_t, t, c)$ and the unconditional $\epsilon(x_t, t, \varnothing)$:
during training the condition is replaced by the null condition $\varnothing$ with probability p (about 10%).
At sampling time the two predictions are extrapolated with a guidance scale w:

$$\hat\epsilon = \epsilon(x_t, t, \varnothing) + w\,\big(\epsilon(x_t, t, c) - \epsilon(x_t, t, \varnothing)\big)$$

w = 0 is the unconditional model, w = 1 the conditional one, w > 1 pushes samples towards what the condition
makes likelier than no condition. This is diffusers' convention (`guidance_scale`: `noise_pred_uncond +
guidance_scale * (noise_pred_text - noise_pred_uncond)`); the paper's w is diffusers' minus one.

For class labels 0..K-1 the null condition is the label K (`nets.unet.UNet(num_classes=K)`).
"""

from collections.abc import Callable

import torch

from course_lib.captions import caption, tokenize
from course_lib.ddpm import Denoiser
from course_lib.sampling import IMAGE_SHAPE, draw_flow_samples, draw_samples
from course_lib.schedules import Schedule


def check_probability(name: str, p: float) -> None:
    if not 0 <= p <= 1:
        raise ValueError(f"{name} must lie in [0, 1]; got {name}={p}")


def drop_labels(labels: torch.Tensor, p: float, null_label: int, generator: torch.Generator | None = None):
    """Each label replaced by `null_label` with probability p (condition dropout for classifier-free guidance).
    The draw happens on the generator's device (the CPU for a CPU generator), so a seed gives the same drops
    everywhere."""
    check_probability("p", p)
    draw_device = generator.device if generator is not None else labels.device
    dropped = (torch.rand(labels.shape, generator=generator, device=draw_device) < p).to(labels.device)
    return torch.where(dropped, torch.full_like(labels, null_label), labels)


def label_condition(labels: torch.Tensor, p: float, null_label: int):
    """The `condition` of `course_lib.train.train` for class labels (N,): the minibatch's labels, each dropped to
    `null_label` with probability p."""
    check_probability("p", p)

    def condition(index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return drop_labels(labels[index], p, null_label, generator)

    return condition


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond): the guided prediction (module docstring)."""
    return uncond + scale * (cond - uncond)


class Guided:
    """A conditional model and a condition, guided at `scale`, as a plain model(xt, t) for any sampler.

    The conditional and unconditional predictions come from one batched forward pass (the batch doubled), as
    diffusers' pipelines do; at scale 1 only the conditional pass runs and at scale 0 only the unconditional one.
    `cond` is (B, ...) for a batch of B, or one condition of batch size 1 for every sample; `null` likewise.
    The guided model predicts what the model predicts: it carries the model's `prediction_type`, if it has one, so
    that a sampler can refuse a mismatch through the wrapper.
    """

    def __init__(self, model: Denoiser, cond: torch.Tensor, null: torch.Tensor, scale: float):
        if not scale >= 0:  # NaN fails this too
            raise ValueError(
                f"the guidance scale must be a number >= 0 (0: unconditional, 1: conditional); got {scale}"
            )
        self.model, self.cond, self.null, self.scale = model, cond, null, scale
        self.prediction_type = getattr(model, "prediction_type", None)

    def _batch(self, condition: torch.Tensor, size: int) -> torch.Tensor:
        if len(condition) == size:
            return condition
        if len(condition) == 1:
            return condition.expand(size, *condition.shape[1:])
        raise ValueError(f"a condition of batch size {len(condition)} for a batch of {size}")

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, null = self._batch(self.cond, len(xt)), self._batch(self.null, len(xt))
        if self.scale == 1:
            return self.model(xt, t, cond)
        if self.scale == 0:
            return self.model(xt, t, null)
        both = self.model(torch.cat([xt, xt]), torch.cat([t, t]), torch.cat([null, cond]))  # (2B, ...)
        uncond_pred, cond_pred = both.chunk(2)
        return cfg_combine(uncond_pred, cond_pred, self.scale)


def guided_samples(
    model: Denoiser,
    schedule: Schedule,
    conditions: torch.Tensor,
    null: torch.Tensor,
    scale: float,
    steps: int,
    seed: int = 0,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    use_clipped_model_output: bool = True,
) -> tuple[torch.Tensor, float]:
    """One guided DDIM sample per condition (labels (N,), or token rows (N, L)), `steps` calls each, in batches;
    returns the samples (on the CPU, clamped to [-1, 1]) and the sampling time in seconds.

    Batch b starts from `sampling.draw_samples`' noise with seed `seed + b`, so two scales (or two prompts) with the
    same seed start from the same x_T, and a guided sample differs from its unguided twin only by the guidance.

    x0_hat is clipped to [-1, 1] and, by default, the noise re-derived from the clipped x0_hat
    (`samplers.ddim_step`'s use_clipped_model_output): with the noise as guided, the class model's samples at w = 3
    read as the wrong digit far more often than with it re-derived (chapter 7 measures both on the shipped model)."""

    def draw(guided: Guided, n: int, seed: int) -> tuple[torch.Tensor, float]:
        options = dict(use_clipped_model_output=use_clipped_model_output, seed=seed, batch_size=n, device=device)
        return draw_samples(guided, schedule, "DDIM", steps, n, **options)

    return _guided_in_batches(model, conditions, null, scale, seed, batch_size, device, draw)


def _guided_in_batches(model, conditions, null, scale, seed, batch_size, device, draw) -> tuple[torch.Tensor, float]:
    """The batching of `guided_samples` and `guided_flow_samples`: batch b of the conditions, guided at `scale`,
    drawn by draw(guided, n, seed + b) -> (x0, seconds); returns all samples and the total time."""
    if len(conditions) < 1 or batch_size < 1:
        raise ValueError(f"need at least one condition and batch_size >= 1; got {len(conditions)}, {batch_size}")
    samples, seconds = [], 0.0
    for batch, start in enumerate(range(0, len(conditions), batch_size)):
        chunk = conditions[start : start + batch_size].to(device)
        x0, spent = draw(Guided(model, chunk, null.to(device), scale), len(chunk), seed + batch)
        samples.append(x0)
        seconds += spent
    return torch.cat(samples), seconds


def guided_flow_samples(
    model: Callable[..., torch.Tensor],
    conditions: torch.Tensor,
    null: torch.Tensor,
    scale: float,
    solver: str,
    steps: int,
    seed: int = 0,
    batch_size: int = 50,
    device: torch.device | str = "cpu",
    shape: tuple[int, ...] = IMAGE_SHAPE,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float]:
    """`guided_samples` for a conditional velocity model (chapters 10 and 12): one sample per condition, guided at
    `scale`, with the flow's Euler or Heun solver of `steps` steps (`sampling.draw_flow_samples`: Euler makes
    `steps` calls of the guided model, each one or two network passes), in batches seeded like `guided_samples`;
    a latent model samples x_T of `shape` and `decoder` turns its samples into digits. Returns the samples (CPU,
    clamped to [-1, 1]) and the sampling time in seconds, the decoder's included."""

    def draw(guided: Guided, n: int, seed: int) -> tuple[torch.Tensor, float]:
        options = dict(seed=seed, batch_size=n, device=device, shape=shape, decoder=decoder)
        return draw_flow_samples(guided, solver, steps, n, **options)

    return _guided_in_batches(model, conditions, null, scale, seed, batch_size, device, draw)


def caption_samples(
    model: Denoiser,
    schedule: Schedule,
    digits: torch.Tensor,
    words: dict[str, str],
    negative: str = "",
    scale: float = 3.0,
    steps: int = 20,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """`guided_samples` of a caption model for the prompts `captions.caption(digit, **words)`, one per digit in
    `digits` ("a thick seven" for words={"thickness": "thick"}), with the caption `negative` in place of the empty
    one (a negative prompt; "" for plain guidance). Returns the samples only."""
    prompts = tokenize([caption(digit, **words) for digit in digits.tolist()])
    return guided_samples(model, schedule, prompts, tokenize([negative]), scale, steps, device=device)[0]
