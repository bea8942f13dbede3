r"""Debugging diffusion: the likely cause of a broken set-up, from cheap measurements and inspections.

Taught in chapter 15 (debugging diffusion). The measured checks (data, model, latents, samples, classifier) are in
`course_lib.symptoms`; this module holds those of the pipeline's settings and `diagnose`, which runs them all. Each
`check_*` function looks at one part of what a student has (a model,
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

import math
from dataclasses import dataclass
from itertools import pairwise

import torch

from course_lib.checks import as_integer, check_choice
from course_lib.ddpm import PREDICTION_TYPES, VARIANCE_TYPES
from course_lib.samplers import SPACINGS, spaced_timesteps
from course_lib.sampling import SAMPLERS
from course_lib.schedules import Schedule
from course_lib.solvers import dpm_solver_timesteps, karras_sigmas
from course_lib.symptoms import (
    Finding,
    check_classifier_mode,
    check_data_order,
    check_data_range,
    check_latent_scale,
    check_prediction_type,
    check_sample_classes,
    check_sampling_weights,
    check_timestep_alignment,
    pixel_range,
)

SIGNAL_LEFT = 0.02  # sqrt(alpha_bar) in what a sampler treats as pure noise: EDM's sigma_max 80 is 0.0125 (fine)
NOISE_LEFT = 2 / 127.5  # noise std left in a returned sample: two grey levels of 8-bit pixels on [-1, 1]


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
        mismatch = check_prediction_type(model, schedule, examples, sampler.prediction_type if sampler else None, seed)
        if not mismatch:  # the offset is read from the error against the declared target: meaningless if it is wrong
            findings += check_timestep_alignment(model, schedule, examples, seed)
        findings += mismatch
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
