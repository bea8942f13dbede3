"""Claims checked: a sentence of a chapter that states a measured relation is followed by the check that fails the
run when the numbers under it say otherwise.

Used by every chapter. Two kinds of claims:

- about stored results (data/benchmarks/*.json, model cards): always decided, in every profile;
- about live runs: decided in the cpu and gpu profiles; the smoke profile's tiny budgets cannot decide them, and
  there the check says so in one line instead of passing silently.

A score is compared only with its spread beside it: `clearly_below(a, sd_a, b, sd_b)` holds when a is below b by
more than twice the combined standard deviation (about 95% one-sided for independent, roughly normal estimates).
"""

import math

import torch

SPREADS = 2.0  # a gap counts when it exceeds this many combined standard deviations


def clearly_below(a: float, sd_a: float, b: float, sd_b: float, spreads: float = SPREADS) -> bool:
    r"""True when $b - a > k \sqrt{sd_a^2 + sd_b^2}$: a is below b by more than k combined spreads."""
    if min(sd_a, sd_b) < 0 or not all(math.isfinite(v) for v in (a, sd_a, b, sd_b)):
        raise ValueError(f"need finite scores and spreads >= 0; got a={a}, sd_a={sd_a}, b={b}, sd_b={sd_b}")
    return b - a > spreads * math.hypot(sd_a, sd_b)


def fraction_sd(fraction: float, n: int) -> float:
    r"""The spread of a fraction measured on n independent samples (a confident fraction, a class share): the
    binomial standard deviation $\sqrt{p(1 - p)/n}$."""
    if not 0 <= fraction <= 1 or n < 1:
        raise ValueError(f"need a fraction in [0, 1] and n >= 1; got fraction={fraction}, n={n}")
    return math.sqrt(fraction * (1 - fraction) / n)


def paired_fraction_gap(flags_a, flags_b) -> tuple[float, float]:
    """(mean(a) - mean(b), its standard deviation) for two sets of yes/no readings made in pairs (row i of each from
    the same starting noise): the spread of the mean paired difference, std(a - b) / sqrt(n), which leaves out what
    the pairs share. a's fraction is clearly above b's when the gap exceeds twice this spread."""
    a, b = (torch.as_tensor(flags).double().flatten() for flags in (flags_a, flags_b))
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"paired readings need as many rows, at least 2: got {len(a)} and {len(b)}")
    if not all(((flags == 0) | (flags == 1)).all() for flags in (a, b)):
        raise ValueError("readings must be 0 / 1 (or False / True)")
    difference = a - b
    return difference.mean().item(), (difference.std() / math.sqrt(len(difference))).item()


def check_claim(holds: bool, claim: str, evidence: str, decisive: bool = True) -> None:
    """Fail with the claim and the evidence when the numbers contradict the claim; say so when it holds.

    decisive=False (a live claim in the smoke profile): print that the run is too small to decide, and do not fail.
    """
    if not decisive:
        print(f"not decided at this profile's sample sizes (run the cpu profile): {claim} [{evidence}]")
        return
    if not holds:
        raise AssertionError(f"the text says: {claim}; the numbers say otherwise: {evidence}")
    print(f"checked: {claim} [{evidence}]")
