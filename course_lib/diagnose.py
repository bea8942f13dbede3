r"""Debugging diffusion: the likely cause of a broken set-up, from cheap measurements and inspections.

Taught in chapter 15 (debugging diffusion). Each `check_*` function looks at one part of what a student has (a model,
a schedule, training data, a sampler's settings, samples, an evaluation classifier, a latent autoencoder, a training
configuration) and returns zero or more `Finding(cause, evidence, fix)`; `diagnose` runs every check whose inputs it
is given, and `report` prints the findings. Nothing is changed: models are called under no_grad in the mode they are
in, a classifier is measured on a copy, and bad arguments raise with the value.

Each threshold was set between the numbers of the healthy shipped set-up and of the broken one, with margin on both
sides; every check's docstring gives both, as printed by `OMP_NUM_THREADS=1 .venv/bin/pytest -q -s
tests/test_diagnose.py` (the healthy tests print the healthy numbers, each break's report the broken ones; the first
128 held-out digits, seed 0). Papers: Ho et al. 2020 (sigma_t^2 = beta_t or beta_tilde_t), Salimans &
Ho 2022 (v), Lin et al. 2024 (leading spacing, terminal SNR), Rombach et al. 2022 (the latent scaling factor).
"""

import copy
import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from course_lib.checks import as_integer, check_choice
from course_lib.ddpm import PREDICTION_TYPES, VARIANCE_TYPES, prediction_targets, training_target
from course_lib.forward import q_sample
from course_lib.metrics import class_histogram
from course_lib.samplers import SPACINGS, spaced_timesteps
from course_lib.sampling import SAMPLERS
from course_lib.schedules import Schedule, gather
from course_lib.solvers import dpm_solver_timesteps, karras_sigmas

SIGNAL_LEFT = 0.02  # sqrt(alpha_bar) in what a sampler treats as pure noise: EDM's sigma_max 80 is 0.0125 (fine)
NOISE_LEFT = 2 / 127.5  # noise std left in a returned sample: two grey levels of 8-bit pixels on [-1, 1]
LATENT_STD_RANGE = (0.8, 1.25)  # the std of scaled latents (diffusion expects about 1)
NOISE_BAND = (0.04, 0.12)  # the noise std of the timesteps where an offset is measured
OFFSET_LIMIT = 0.5  # |estimated timestep offset| beyond which the model is called with the wrong t


@dataclass(frozen=True)
class Finding:
    cause: str  # the likely cause, in a few words
    evidence: str  # the numbers that point at it
    fix: str  # what to change


@dataclass(frozen=True)
class SamplerSettings:
    """What a sampling loop will do, as the checks read it (nothing here runs a sampler)."""

    sampler: str = "DDIM"  # one of sampling.SAMPLERS, or "custom": a hand-written loop over `timesteps`
    steps: int = 50  # model calls (DDPM: T)
    spacing: str | None = None  # None: the sampler's default (DDIM "trailing", DPM-Solver++(2M) "linspace")
    steps_offset: int = 0  # diffusers' option of that name ("leading" spacing only)
    prediction_type: str = "eps"  # what the loop reads the model's output as
    variance_type: str = "fixed_small"  # the noise DDPM's step adds: beta_tilde_t or beta_t
    sigma_max: float | None = None  # Euler (Karras): the top noise level (None: the schedule's)
    timesteps: tuple[int, ...] | None = None  # "custom": the timesteps the loop calls the model at, noisiest first
    final_timestep: int = -1  # the noise level of the returned sample: -1 the clean data; 0 e.g. DDIM with
    #                           diffusers' set_alpha_to_one=False; a hand-written loop may stop higher

    def __post_init__(self):
        check_choice("sampler", self.sampler, (*SAMPLERS, "custom"))
        check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        if self.spacing is not None:
            check_choice("spacing", self.spacing, SPACINGS)
        if (self.sampler == "custom") != (self.timesteps is not None):
            raise ValueError(
                f"timesteps go with sampler='custom' (and only); got sampler={self.sampler!r}, "
                f"timesteps={self.timesteps!r}"
            )
        if as_integer(self.final_timestep) is None or self.final_timestep < -1:
            raise ValueError(
                f"final_timestep must be an integer >= -1 (-1: the clean data); got {self.final_timestep!r}"
            )
        if self.timesteps is not None:
            ts = [as_integer(t) for t in self.timesteps]
            if not ts or None in ts or min(ts) < 0 or any(a <= b for a, b in pairwise(ts)):
                raise ValueError(f"timesteps must be integers >= 0, strictly decreasing; got {self.timesteps!r}")
            if self.final_timestep >= ts[-1]:
                raise ValueError(f"final_timestep={self.final_timestep} must lie below the last timestep {ts[-1]}")


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
    t statistic 0.5..1.3) an offset cannot be seen, and no finding is made."""
    m = timestep_offset(model, schedule, x0, seed)
    if m["curvature_t"] < 4 or abs(m["offset"]) <= OFFSET_LIMIT:
        return []
    called, shifts = -round(m["offset"]), len(m["relative"]) // 2
    curve = ", ".join(f"{100 * value:+.2f}%" for value in m["relative"])
    return [
        Finding(
            f"an off-by-one timestep: the model is called with t {called:+d}",
            f"MSE told t-{shifts}..t+{shifts} (probe t {m['probe'][0]}..{m['probe'][-1]}), relative to t: {curve}; "
            f"lowest near t {m['offset']:+.2f} (healthy: +0.2, limit {OFFSET_LIMIT})",
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


def check_ema(train_config=None, checkpoint: dict | None = None, card: dict | None = None):
    """No EMA: `TrainConfig.ema_decay=None` (or a card's training record of it), or a checkpoint saved without an
    EMA (`train.save_checkpoint` writes "ema": None). Inspection; the shipped cards record ema_decay 0.999."""
    findings, fix = [], "train with TrainConfig(ema_decay=0.999) and sample with the EMA weights (`ema.model`)"
    sources = [
        ("the training configuration", train_config),
        ("the card's training record", (card or {}).get("training")),
    ]
    for where, config in sources:
        if config is None:
            continue
        decay = (
            config.get("ema_decay", "absent") if isinstance(config, dict) else getattr(config, "ema_decay", "absent")
        )
        if decay is None:
            findings.append(
                Finding("no EMA: the weights are the last optimiser step's", f"{where} has ema_decay=None", fix)
            )
    if checkpoint is not None and not isinstance(checkpoint, dict):
        raise TypeError(f"checkpoint must be the dict torch.load returns; got a {type(checkpoint).__name__}")
    if checkpoint is not None and checkpoint.get("ema", "absent") is None:
        findings.append(
            Finding("no EMA: the weights are the last optimiser step's", "the checkpoint's 'ema' is None", fix)
        )
    return findings


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


def sampler_ends(settings: SamplerSettings, schedule: Schedule) -> tuple[float, float, int | None]:
    """(sqrt(alpha_bar) where the sampler starts from pure noise, the noise std of what it returns, its first t)."""
    alpha_bar = schedule.alpha_bar.double()
    if settings.sampler == "Euler (Karras)":
        sigma = karras_sigmas(schedule, settings.steps, sigma_max=settings.sigma_max)[0].item()
        return 1 / math.sqrt(1 + sigma**2), 0.0, None
    if settings.sampler == "custom":
        timesteps = list(settings.timesteps)
    elif settings.sampler == "DDPM":
        timesteps = list(range(schedule.T - 1, -1, -1))
    elif settings.sampler == "DDIM":
        timesteps = spaced_timesteps(schedule.T, settings.steps, settings.spacing or "trailing", settings.steps_offset)
    else:
        timesteps = dpm_solver_timesteps(schedule.T, settings.steps, settings.spacing or "linspace")
    if timesteps[0] > schedule.T - 1:
        raise ValueError(f"the sampler's first timestep {timesteps[0]} is past T - 1 = {schedule.T - 1}")
    final = settings.final_timestep
    left = 0.0 if final == -1 else (1 - alpha_bar[final]).sqrt().item()
    return alpha_bar[timesteps[0]].sqrt().item(), left, timesteps[0]


def check_sampler_timesteps(settings: SamplerSettings, schedule: Schedule):
    """A first step that is not pure noise, or a last one that leaves noise in the sample.

    Inspection of the timesteps the sampler visits with the schedule. Start: sqrt(alpha_bar) at the first one, the
    trace of the digit the model expects in x_T and pure noise lacks; limit 0.02 (cosine, T = 1000: "trailing" or
    "linspace" start at 999, 4.9e-5; "leading" at 980 for 50 steps, 0.030, at 950 for 20, 0.076; Euler capped at
    sigma 80, 0.0125). Lin et al. 2024 found "leading" harmful; on the shipped model it did not show in FID
    (`metrics.sample_scores` of 200 `ddim_sample` samples, clip_x0=True, x_T seeded 0: 50 steps 6.1 +- 2.2 leading,
    6.3 +- 2.2 trailing; 20 steps 8.5 +- 2.6 and 9.4 +- 2.6): the mismatch is real, its cost here within spread.
    End: the noise std left in the returned sample; limit two grey levels, 0.0157 (clean data: 0; stopping at
    t = 0's level, cosine: 0.0064; a loop that stops at t = 19: 0.042)."""
    signal, left, first = sampler_ends(settings, schedule)
    findings = []
    if signal > SIGNAL_LEFT:
        where = f"t={first}" if first is not None else "its top noise level"
        findings.append(
            Finding(
                f"a first sampling step that is not pure noise ({settings.spacing or settings.sampler})",
                f"the sampler starts at {where} of T={schedule.T}, where sqrt(alpha_bar) = "
                f"{signal:.3g} (limit {SIGNAL_LEFT}; t = T-1: {schedule.alpha_bar[-1].sqrt():.2g})",
                'use "trailing" (or "linspace") spacing, which starts at t = T-1',
            )
        )
    if left > NOISE_LEFT:
        findings.append(
            Finding(
                "a last sampling step that never reaches the clean data",
                f"the sample is returned at t={settings.final_timestep}, with noise std {left:.3g} "
                f"(limit {NOISE_LEFT:.3g})",
                "end with a step to the clean data (t = -1), as "
                "`ddim_sample` does; in a DDPM loop, run the step at t = 0 too",
            )
        )
    return findings


# --- 8. the evaluation classifier ---------------------------------------------------------------------------------

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


def check_schedule(schedule: Schedule, card: dict | None = None):
    """T too small / terminal SNR too high: x_{T-1} still holds the digit, so the sampler's pure noise is not what the
    model saw there. Limit: sqrt(alpha_bar_{T-1}) > 0.02, as for a sampler's first step (cosine T = 1000: 4.9e-5;
    linear T = 1000: 0.0064; linear T = 100: 0.60; T = 50: 0.78). Also an inspection: the schedule against the one
    the card records (name, T)."""
    findings, signal = [], schedule.alpha_bar[-1].double().sqrt().item()
    if signal > SIGNAL_LEFT:
        findings.append(
            Finding(
                "T too small: the last timestep is not pure noise (terminal SNR too high)",
                f"T={schedule.T} ({schedule.name}): sqrt(alpha_bar_(T-1)) = {signal:.3g}, SNR "
                f"{schedule.snr[-1]:.3g} (limit {SIGNAL_LEFT})",
                "use T=1000 (or the cosine schedule, or make_schedule(..., zero_terminal_snr=True) with a v model)",
            )
        )
    recorded = (card or {}).get("schedule")
    if recorded and (recorded.get("name") != schedule.name or recorded.get("T") != schedule.T):
        findings.append(
            Finding(
                "the schedule is not the one the model was trained with",
                f"given {schedule.name!r}, T={schedule.T}; the card says {recorded}",
                f"make_schedule({recorded.get('name')!r}, {recorded.get('T')})",
            )
        )
    return findings


@torch.no_grad()
def added_noise_std(step, schedule: Schedule, t: int) -> float:
    """The std a DDPM step `step(model_output, t, xt, noise)` adds per unit of noise at t: the step run with noise z
    and with zero noise on the same inputs, (x(z) - x(0)) / z as a ratio of norms."""
    generator = torch.Generator().manual_seed(t)
    xt, output, z = (torch.randn(2, 1, 28, 28, generator=generator) for _ in range(3))
    with_noise, without = (step(output, t, xt, noise) for noise in (z, torch.zeros_like(z)))
    with_noise, without = (x[0] if isinstance(x, tuple) else x for x in (with_noise, without))
    return ((with_noise - without).norm() / z.norm()).item()


def check_posterior_variance(schedule: Schedule, step=None, variance_type: str | None = None, card: dict | None = None):
    """The wrong posterior variance: the noise a DDPM step adds is neither sigma_t^2 = beta_tilde_t ("fixed_small")
    nor beta_t ("fixed_large"), or not the one the sampler's settings (or a card that records one) say.

    Measured with `added_noise_std` at t = 1, 2, 5, 10 (where beta_tilde / beta is 0.47..0.93 on the cosine
    schedule) and at t = 0 (no noise): `ddpm_step` matches its variance_type to float32 precision; a step that
    adds beta_tilde_t as the std (no square root) adds 2e-5 x beta_tilde_t at t = 1. A match within 5% counts."""
    findings = []
    recorded = (card or {}).get("variance_type") or ((card or {}).get("training") or {}).get("variance_type")
    if recorded and variance_type and recorded != variance_type:
        findings.append(
            Finding(
                "the wrong posterior variance: the sampler's is not the model's",
                f"the card records variance_type={recorded!r}; the sampler uses {variance_type!r}",
                f"sample with variance_type={recorded!r}",
            )
        )
    if step is None:
        return findings
    probe = [t for t in (1, 2, 5, 10) if t < schedule.T]
    variances = torch.tensor([added_noise_std(step, schedule, t) ** 2 for t in probe], dtype=torch.float64)
    tables = {"fixed_small": schedule.posterior_variance, "fixed_large": schedule.betas}
    matches = [kind for kind, table in tables.items() if (variances / table[probe].double()).log().abs().max() < 0.05]
    shown = ", ".join(
        f"t={t}: {v:.3g} (beta_tilde {schedule.posterior_variance[t]:.3g}, beta {schedule.betas[t]:.3g})"
        for t, v in zip(probe, variances.tolist(), strict=True)
    )
    if not matches:
        findings.append(
            Finding(
                "the wrong posterior variance: the step adds neither beta_tilde_t nor beta_t",
                f"added noise variance {shown}",
                "add sqrt(variance) * z with variance "
                "schedule.posterior_variance[t] (fixed_small) or schedule.betas[t] (fixed_large)",
            )
        )
    elif variance_type is not None and variance_type not in matches:
        findings.append(
            Finding(
                f"the wrong posterior variance: the step adds {matches[0]}, the sampler says {variance_type}",
                f"added noise variance {shown}",
                "make the two agree",
            )
        )
    at_zero = added_noise_std(step, schedule, 0)
    if at_zero > 1e-6:
        findings.append(
            Finding(
                "the last DDPM step adds noise",
                f"noise std {at_zero:.3g} added at t = 0",
                "add no noise at t = 0: its result is the sample",
            )
        )
    return findings


# --- everything at once -------------------------------------------------------------------------------------------


def diagnose(
    *,
    model=None,  # the denoiser as the sampler calls it: model(xt, t)
    schedule: Schedule | None = None,  # the schedule the pipeline uses
    card: dict | None = None,  # the model's card (`weights.load_card`)
    data: torch.Tensor | None = None,  # training digits (N, 1, 28, 28), as the training script takes them
    labels: torch.Tensor | None = None,  # their labels
    heldout: torch.Tensor | None = None,  # digits to measure the model on (default: data)
    sampler: SamplerSettings | None = None,  # what the sampling loop does
    step=None,  # a DDPM step, step(model_output, t, xt, noise) -> x_{t-1} (or a tuple starting with it)
    samples: torch.Tensor | None = None,  # generated digits (N, 1, 28, 28)
    classifier: torch.nn.Module | None = None,  # the evaluation classifier
    vae: torch.nn.Module | None = None,  # the latent autoencoder
    scaling_factor: float | None = None,  # what the pipeline multiplies the VAE's latents by (1.0: nothing)
    latents: torch.Tensor | None = None,  # the latents the latent model is trained on
    train_config=None,  # a TrainConfig (or a dict of its fields)
    checkpoint: dict | None = None,  # a training checkpoint as `torch.load` returns it
    ema_model: torch.nn.Module | None = None,  # the EMA weights, when `model` may be the raw ones
    n: int = 128,  # examples to measure on, and the prefix of the data a fine-tune takes
    seed: int = 0,
) -> list[Finding]:
    """Run every check whose inputs are given and return their findings (an empty list: nothing found).

    The model is measured on the first n of `heldout` (else `data`), not on digits outside [-1, 1] (that finding
    comes first); with latents (given, or the digits through the VAE times `scaling_factor`) on those instead. A
    classifier in training mode is reported and not used.
    """
    examples = heldout if heldout is not None else data if data is not None else latents
    needs = {"model": (model, schedule, examples), "sampler": (sampler, schedule), "step": (step, schedule)}
    for name, (given, *required) in {**needs, "ema_model": (ema_model, model)}.items():
        if given is not None and any(r is None for r in required):
            wanted = {"model": "schedule= and digits (heldout=, data= or latents=)", "ema_model": "model="}
            raise ValueError(f"{name}= is checked with {wanted.get(name, 'schedule=')}; it was given without")
    if vae is not None and scaling_factor is None:
        raise ValueError("vae= needs scaling_factor=, what the pipeline multiplies its latents by (1.0 for nothing)")
    findings, digits = [], None
    for name, images in (("training data", data), ("held-out digits", heldout)):
        if images is not None:
            pixel_model = model if latents is None and vae is None else None
            findings += check_data_range(images, pixel_model, schedule if pixel_model else None, seed, name)
    if heldout is not None or data is not None:
        digits = (heldout if heldout is not None else data)[:n]
        examples = digits if pixel_range(digits)[0] == "[-1, 1]" else None  # no measuring on misread digits
    if latents is None and vae is not None and digits is not None:
        with torch.no_grad():
            latents = vae.encode(digits.to(next(vae.parameters()).device)).mode().cpu() * scaling_factor
    if latents is not None:
        examples = latents[:n]
        findings += check_latent_scale(latents, scaling_factor, card)
    if model is not None and examples is not None:
        findings += check_timestep_alignment(model, schedule, examples, seed)
        findings += check_prediction_type(model, schedule, examples, sampler.prediction_type if sampler else None, seed)
    findings += check_ema(train_config, checkpoint, card)
    if ema_model is not None:
        findings += check_sampling_weights(model, ema_model, schedule, examples)
    classifier_ok = False
    if classifier is not None:
        mode_findings = check_classifier_mode(classifier, digits)
        findings, classifier_ok = findings + mode_findings, not mode_findings
    if data is not None and (labels is not None or classifier_ok):
        findings += check_data_order(data, labels, classifier if classifier_ok else None, n)
    if samples is not None:
        findings += check_data_range(samples, name="samples")
        findings += check_sample_classes(samples, classifier) if classifier_ok else []
    if sampler is not None:
        findings += check_sampler_timesteps(sampler, schedule)
    if schedule is not None:
        findings += check_schedule(schedule, card)
    if step is not None or (sampler is not None and card is not None):
        findings += check_posterior_variance(schedule, step, sampler.variance_type if sampler else None, card)
    return findings


def report(findings: list[Finding]) -> None:
    """Print the findings, numbered: cause, evidence, fix."""
    if not findings:
        print("no findings: nothing the checks look for is wrong with what was given")
    for number, finding in enumerate(findings, start=1):
        print(f"{number}. {finding.cause}\n   evidence: {finding.evidence}\n   fix: {finding.fix}")
