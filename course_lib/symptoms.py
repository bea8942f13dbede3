r"""What a diffusion set-up shows when measured: the data's range, the timestep the model fits, the target its output
fits, the latents' spread, the class shares of a data prefix or of samples, and an evaluation classifier's mode.

Taught in chapter 15 (debugging diffusion); `course_lib.diagnose` runs these checks with the pipeline's own (the
sampler's timesteps, the schedule, the posterior variance, EMA) and reports them. Each check returns zero or more
`Finding(cause, evidence, fix)`; nothing is changed (models are called under no_grad in the mode they are in, a
classifier is measured on a copy), and bad arguments raise with the value.

Each threshold was set between the numbers of the healthy shipped set-up and of the broken one, with margin on both
sides; every check's docstring gives both, as printed by `OMP_NUM_THREADS=1 .venv/bin/pytest -q -s
tests/test_diagnose.py` (the first 128 held-out digits, seed 0). Papers: Salimans & Ho 2022 (v), Rombach et al. 2022
(the latent scaling factor).
"""

import copy
import math
from dataclasses import dataclass

import torch

from course_lib.ddpm import PREDICTION_TYPES, prediction_targets, training_target
from course_lib.forward import q_sample
from course_lib.metrics import class_histogram
from course_lib.schedules import Schedule, gather

LATENT_STD_RANGE = (0.8, 1.25)  # the std of scaled latents (diffusion expects about 1)
NOISE_BAND = (0.04, 0.12)  # the noise std of the timesteps where an offset is measured
OFFSET_LIMIT = 0.5  # |estimated timestep offset| beyond which the model is called with the wrong t


@dataclass(frozen=True)
class Finding:
    cause: str  # the likely cause, in a few words
    evidence: str  # the numbers that point at it
    fix: str  # what to change


def _mse_per_example(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).flatten(1).mean(1)  # (B,)


def _noised(schedule: Schedule, x0: torch.Tensor, t_values: list[int], seed: int):
    """x0 noised to the timesteps t_values, one per example in turn: (xt, t, eps), with seeded noise."""
    t = torch.tensor(t_values)[torch.arange(len(x0)) % len(t_values)].to(x0.device)  # (B,)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
    return q_sample(schedule, x0, t, eps), t, eps


def _check_examples(x0: torch.Tensor, name: str = "x0") -> None:
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or len(x0) < 8:
        shape = tuple(x0.shape) if isinstance(x0, torch.Tensor) else type(x0).__name__
        raise ValueError(f"{name} must be a batch of at least 8 examples (N, ...); got {shape}")


# --- 1. the data's range ------------------------------------------------------------------------------------------


def pixel_range(images: torch.Tensor) -> tuple[str | None, float, float, float]:
    """(the range the values look like, min, max, mean): "[-1, 1]", "[0, 1]", "[0, 255]" or None (something else)."""
    low, high, mean = images.min().item(), images.max().item(), images.float().mean().item()
    if -1.5 <= low <= -0.5 and 0.5 <= high <= 1.5:
        return "[-1, 1]", low, high, mean
    if -0.01 <= low and high <= 1.01:
        return "[0, 1]", low, high, mean
    if -0.01 <= low and 2 < high <= 255.5:
        return "[0, 255]", low, high, mean
    return None, low, high, mean


def check_data_range(
    images: torch.Tensor, model=None, schedule: Schedule | None = None, seed: int = 0, name: str = "training data"
):
    """Digits must lie in [-1, 1] (background -1): the course's models are trained and measured on such; samples in
    [0, 1] (name="samples") betray a model trained on [0, 1] data.

    Inspection of min / max / mean; given a model and its schedule, also its MSE (`target_errors`) on the first 64
    as given against the same mapped to [-1, 1]. Measured: held-out digits min -1, max 1, mean -0.74, MSE 0.039;
    the same in [0, 1]: min 0, max 1, mean 0.13, MSE 0.71 (18x); 64 DDIM-10 samples of the shipped model: -1, 1."""
    _check_examples(images, name)
    guess, low, high, mean = pixel_range(images)
    if guess == "[-1, 1]":
        return []
    evidence = f"{name} min {low:.3g}, max {high:.3g}, mean {mean:.3g} (digits in [-1, 1]: -1, 1, -0.74)"
    to_unit = {"[0, 1]": ("x * 2 - 1", lambda x: x * 2 - 1), "[0, 255]": ("x / 127.5 - 1", lambda x: x / 127.5 - 1)}
    fix, rescale = to_unit.get(guess, ("x rescaled to [-1, 1]", None))
    if model is not None and schedule is not None and rescale is not None:
        errors = [
            target_errors(model, schedule, x, seed)[_declared(model) or "eps"]
            for x in (images[:64], rescale(images[:64]))
        ]
        evidence += f"; the model's MSE on them {errors[0]:.3g}, mapped to [-1, 1] {errors[1]:.3g}"
    if name == "samples":
        fix = f"the model was trained on data in {guess}: train on digits in [-1, 1] (`data.load_digits`)"
    else:
        fix = f"train and measure on {fix}"
    return [Finding(f"{name} in {guess or 'an unexpected range'} instead of [-1, 1]", evidence, fix)]


# --- 2-3. what the model is told and what it predicts -------------------------------------------------------------


def _declared(model) -> str | None:
    return getattr(model, "prediction_type", None)


@torch.no_grad()
def timestep_offset(model, schedule: Schedule, x0: torch.Tensor, seed: int = 0, shifts: int = 2) -> dict:
    r"""Where, around the t it is called with, the model fits noised examples best.

    x0 is noised at up to 8 probe timesteps where the noise std $\sqrt{1 - \bar\alpha_t}$ lies in NOISE_BAND
    (cosine, T = 1000: t = 18..60); the model is called there with t + k for k = -shifts..shifts, and its MSE
    against its training target, relative to k = 0, is fitted per example by a parabola $a k^2 + b k + c$. Returns
    the offset $-b / 2a$ of the mean fit, the curvature's t statistic (mean a over its standard error), the probe
    timesteps and the mean relative MSE at each k.

    The eps-MSE is lowest near, not exactly at, the t a model was trained for: the shipped model's own offset drifts
    with the noise level, +0.55..+0.81 at t = 4..18, +0.03..+0.31 at 18..60, -0.23..-0.45 at 31..108, -0.63..-0.97
    at 56..168 (4 sets of 64 held-out digits each); the band is where it is smallest.
    """
    _check_examples(x0)
    if schedule.T < 2 * shifts + 2:
        raise ValueError(f"a schedule of T={schedule.T} is too short to shift t by up to {shifts}")
    noise_std = (1 - schedule.alpha_bar.double()).sqrt()
    candidates = [t for t in range(shifts, schedule.T - shifts) if NOISE_BAND[0] <= noise_std[t] <= NOISE_BAND[1]]
    probe = candidates[:: max(1, len(candidates) // 8)][:8] or [shifts]
    xt, t, eps = _noised(schedule, x0, probe, seed)
    target = training_target(schedule, x0, eps, t, _declared(model) or "eps")
    ks = torch.arange(-shifts, shifts + 1, dtype=torch.float64)
    errors = torch.stack([_mse_per_example(model(xt, t + int(k)), target).double() for k in ks])  # (K, B)
    relative = (errors - errors[shifts]) / errors[shifts].mean()  # (K, B)
    design = torch.stack([ks**2, ks, torch.ones_like(ks)], dim=1)  # (K, 3)
    a, b, _ = torch.linalg.lstsq(design, relative).solution  # (B,) each: a parabola per example
    return {
        "offset": (-b.mean() / (2 * a.mean())).item(),
        "curvature_t": (a.mean() / (a.std() / len(a) ** 0.5)).item(),
        "probe": probe,
        "relative": relative.mean(1).tolist(),
    }


def check_timestep_alignment(model, schedule: Schedule, x0: torch.Tensor, seed: int = 0):
    """An off-by-one timestep: the model is called with t + 1 or t - 1 (a 1-based loop, an index for a timestep).

    `timestep_offset` estimates where the model, as called, fits noised held-out digits best; only a clearly curved
    fit (curvature t statistic > 4) is read; limit |offset| > 0.5. Measured on the first 128 held-out digits:
    healthy +0.17 (t statistic 12.8), called with t + 1: -0.88, with t - 1: +1.14; on 4 sets of 128 digits
    +0.17..+0.27, -0.75..-0.88 and +1.13..+1.25. On 64 digits the healthy offset spread to +0.06..+0.33 and t + 1 to
    -0.69..-0.99: use 128 (the default n of `diagnose`). Where the error barely changes with t (the latent model:
    t statistic 0.5..1.3) an offset cannot be seen, and no finding is made.

    Limitation, measured in session 7: the estimate carries a bias of its own that differs between models trained
    on the same clock and called correctly: unet_mnist_eps +0.17, cmp_v +0.20, cmp_eps +0.80 (the last over the
    limit). So the finding is a lead, not a proof: compare with the same weights called directly by a course
    sampler (an offset that moves by about 1 between the two calls is the bug). `diagnose` skips this check when
    the output fits another target than the declared one, where the error against the declared target says nothing
    about t."""
    m = timestep_offset(model, schedule, x0, seed)
    if m["curvature_t"] < 4 or abs(m["offset"]) <= OFFSET_LIMIT:
        return []
    called, shifts = -round(m["offset"]), len(m["relative"]) // 2
    curve = ", ".join(f"{100 * value:+.2f}%" for value in m["relative"])
    return [
        Finding(
            f"an off-by-one timestep: the model is called with t {called:+d}",
            f"MSE told t-{shifts}..t+{shifts} (probe t {m['probe'][0]}..{m['probe'][-1]}), relative to t: {curve}; "
            f"lowest near t {m['offset']:+.2f} (limit {OFFSET_LIMIT}; healthy models measured +0.17 to +0.80, so "
            "compare with the same weights called directly)",
            "call the model with the same 0-based t (0..T-1) that indexes the schedule's tables",
        )
    ]


@torch.no_grad()
def target_errors(model, schedule: Schedule, x0: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """The model's MSE against each target (eps, x0, v) on x0 noised at t = 0.1, 0.3, 0.5, 0.7, 0.9 of T."""
    _check_examples(x0)
    xt, t, eps = _noised(schedule, x0, [int(f * schedule.T) for f in (0.1, 0.3, 0.5, 0.7, 0.9)], seed)
    alpha_bar_t = gather(schedule.alpha_bar, t, x0)
    targets = prediction_targets(x0, eps, alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt())
    output = model(xt, t)
    return {kind: _mse_per_example(output, targets[kind]).mean().item() for kind in PREDICTION_TYPES}


def check_prediction_type(model, schedule: Schedule, x0: torch.Tensor, read_as: str | None = None, seed: int = 0):
    """Weights trained for one target read as another (v as eps, or the reverse).

    Inspection: the model's `prediction_type` (its card's, set by `weights.load_model`) against what the sampler
    reads (`read_as`). Measurement (`target_errors`): the target the output is closest to, against the one it is
    said to predict; a finding when the closest is not the declared one and at least 2x closer. Measured: the
    shipped eps model MSE 0.037 to eps, 0.75 to v, 1.83 to x0 (declared best by 20x); its output turned into v and
    declared eps: 0.105 to v, 0.68 to eps (declared 6.4x worse); the latent model 0.115 to eps, 0.98 to v."""
    declared, findings = _declared(model), []
    if declared is not None and read_as is not None and declared != read_as:
        findings.append(
            Finding(
                "a prediction-type mismatch: the sampler reads the output as another target",
                f"the model's card says prediction_type={declared!r}; the sampler is told {read_as!r}",
                f"sample with prediction_type={declared!r}",
            )
        )
    said = declared or read_as or "eps"
    errors = target_errors(model, schedule, x0, seed)
    best = min(errors, key=errors.get)
    if best != said and errors[said] > 2 * errors[best]:
        shown = ", ".join(f"{kind} {value:.3g}" for kind, value in errors.items())
        findings.append(
            Finding(
                f"a prediction-type mismatch: the weights predict {best}, read as {said}",
                f"MSE of the output against each target on noised digits: {shown}",
                f"set prediction_type={best!r} (on the model, its card and the sampler)",
            )
        )
    return findings


# --- 4. latents ---------------------------------------------------------------------------------------------------


def card_scaling_factor(card: dict | None) -> float | None:
    """The latent scaling factor a card records: a latent model's ["latents"]["scaling_factor"], a VAE's own."""
    if not card:
        return None
    return (card.get("latents") or {}).get("scaling_factor", card.get("scaling_factor"))


def check_latent_scale(latents: torch.Tensor, scaling_factor: float | None = None, card: dict | None = None):
    """A forgotten (or doubled) latent scaling factor: the latents a latent model diffuses must have std about 1.

    Measured on 128 held-out digits through data/vae_mnist: std 0.993 scaled by the card's 1.517, 0.654 unscaled,
    1.51 scaled twice; limits 0.8..1.25. Also an inspection: the factor used against the card's (more than 5% apart)."""
    _check_examples(latents, "latents")
    std, findings, recorded = latents.float().std().item(), [], card_scaling_factor(card)
    low, high = LATENT_STD_RANGE
    if not low <= std <= high:
        if recorded is not None and abs(math.log(std * recorded)) < abs(math.log(std / recorded)):
            fix = f"multiply the latents by the card's scaling_factor {recorded:.4g} (and divide before decoding)"
        elif recorded is not None:
            fix = f"scale the latents by scaling_factor {recorded:.4g} once, not twice"
        else:
            fix = f"multiply the latents by 1 / their std on the training data ({1 / std:.4g}; `vae.latent_scale`)"
        findings.append(
            Finding(
                "a forgotten latent scaling factor: the latents' std is far from 1",
                f"latent std {std:.3g} (limits {low}..{high}); card scaling_factor {recorded}",
                fix,
            )
        )
    if scaling_factor is not None and recorded is not None and abs(scaling_factor / recorded - 1) > 0.05:
        findings.append(
            Finding(
                "the wrong latent scaling factor",
                f"used {scaling_factor:.4g}; the card says {recorded:.4g}",
                f"use scaling_factor={recorded:.4g}, the one the model was trained with",
            )
        )
    return findings


# --- 5. EMA -------------------------------------------------------------------------------------------------------


def check_sampling_weights(model, ema_model, schedule: Schedule | None = None, x0: torch.Tensor | None = None):
    """Sampling with the raw weights although an EMA of them exists: `model` (what the sampler is given) differs
    from `ema_model`. Inspection of the parameters; given a schedule and digits, each one's MSE as evidence (the
    shipped EMA weights against the same plus 1% noise standing in for raw ones: 0.039 against 0.061)."""
    sampled, averaged = model.state_dict(), ema_model.state_dict()
    if sampled.keys() != averaged.keys() or any(sampled[k].shape != averaged[k].shape for k in sampled):
        raise ValueError(f"model and ema_model are different networks: {len(sampled)} and {len(averaged)} tensors")
    gap = max((sampled[k].float() - averaged[k].float()).abs().max().item() for k in sampled)
    if gap == 0:
        return []
    evidence = f"the largest parameter difference between the sampled model and the EMA is {gap:.3g}"
    if schedule is not None and x0 is not None:
        raw, ema = (target_errors(m, schedule, x0)[_declared(m) or "eps"] for m in (model, ema_model))
        evidence += f"; MSE on noised digits: sampled {raw:.4g}, EMA {ema:.4g}"
    return [
        Finding(
            "no EMA at sampling: the raw weights are sampled, not the EMA's",
            evidence,
            "sample with the EMA weights (`ema.model`, as train() returns it)",
        )
    ]


# --- 6. class balance ---------------------------------------------------------------------------------------------


def _lopsided(histogram: torch.Tensor, n: int, times_uniform: float = 2) -> bool:
    """The largest class share exceeds `times_uniform` x uniform and four binomial standard deviations above it."""
    uniform = 1 / len(histogram)
    return histogram.max().item() > max(times_uniform * uniform, uniform + 4 * math.sqrt(uniform * (1 - uniform) / n))


def _shares(histogram: torch.Tensor) -> str:
    return ", ".join(f"{c}: {share:.2f}" for c, share in enumerate(histogram.tolist()) if share > 0)


def check_data_order(images: torch.Tensor, labels: torch.Tensor | None = None, classifier=None, n: int = 64):
    """Label-ordered data: the first n examples (what a fine-tune on "the first n digits" takes) are one or two
    classes. Class shares from `labels` or, without them, the classifier's reading; limit max(2 / 10, 0.1 + 4
    binomial sd): 0.206 at n = 128, 0.25 at 64. Measured: the first 128 shipped train digits, largest share 0.10
    (first 64: 0.11); sorted by label: 1.00, by labels or by the classifier."""
    if labels is None and classifier is None:
        raise ValueError("check_data_order needs labels or a classifier to read the classes")
    n = min(n, len(images))
    if labels is not None:
        histogram = torch.bincount(torch.as_tensor(labels)[:n].cpu(), minlength=10).double() / n
    else:
        histogram = class_histogram(classifier, images[:n])
    if not _lopsided(histogram, n):
        return []
    return [
        Finding(
            "label-ordered data: the first examples are one or two classes",
            f"class shares of the first {n} examples: {_shares(histogram)}",
            "shuffle the data (or pick examples by label) before taking the first n",
        )
    ]


def check_sample_classes(samples: torch.Tensor, classifier):
    """Samples of one or two classes, as a fine-tune on label-ordered data gives. A generator's class mix is not
    exactly uniform, so the limit is 3x uniform (0.30 for digits). Measured: 64 DDIM-10 samples of the shipped model,
    largest share 0.20 (limit at n = 64: 0.30); held-out zeros and ones standing in for a collapsed fine-tune's
    samples: 0.54."""
    histogram = class_histogram(classifier, samples)
    if not _lopsided(histogram, len(samples), times_uniform=3):
        return []
    return [
        Finding(
            "samples of one or two classes: a fine-tune on label-ordered data (or collapse)",
            f"class shares of {len(samples)} samples: {_shares(histogram)}",
            "check the fine-tune's data order (`check_data_order`); shuffle before taking a subset",
        )
    ]


# --- 7. the timesteps a sampler visits ----------------------------------------------------------------------------


_STOCHASTIC = (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def check_classifier_mode(classifier: torch.nn.Module, images: torch.Tensor | None = None):
    """The evaluation classifier left in training mode: dropout active, batch statistics for BatchNorm. Inspection of
    `.training` on it and on its dropout / BatchNorm layers; given digits, the largest change of a class
    probability against an eval-mode copy (measured on 64 held-out digits: up to 0.12 in training mode)."""
    names = [
        name or "(the classifier)"
        for name, module in classifier.named_modules()
        if module.training and (name == "" or isinstance(module, _STOCHASTIC))
    ]
    if not names:
        return []
    evidence = f"in training mode: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
    if images is not None:
        probe = images[:64].to(next(classifier.parameters()).device)
        as_is, evaluated = copy.deepcopy(classifier), copy.deepcopy(classifier).eval()  # copies: BatchNorm would learn
        change = (as_is(probe).softmax(1) - evaluated(probe).softmax(1)).abs().max().item()
        evidence += f"; class probabilities move by up to {change:.2f} against eval mode"
    return [
        Finding(
            "the evaluation classifier is in training mode",
            evidence,
            "call classifier.eval() before scoring (checks that read digits with it were skipped)",
        )
    ]


# --- 9-10. the schedule and the posterior variance ----------------------------------------------------------------
