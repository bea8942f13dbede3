"""Claims checked (course_lib.claims): a contradicted claim fails the run; a gap counts only beyond its spread."""

import math

import pytest
import torch

from course_lib.claims import check_claim, clearly_below, fraction_sd, paired_fraction_gap


def test_a_gap_counts_only_beyond_twice_the_combined_spread():
    assert clearly_below(1.0, 0.1, 1.5, 0.1)  # gap 0.5 > 2 * 0.141
    assert not clearly_below(1.0, 0.2, 1.5, 0.2)  # gap 0.5 < 2 * 0.283
    assert not clearly_below(2.0, 0.0, 1.0, 0.0)  # above is not below
    with pytest.raises(ValueError, match="sd_a=-0.1"):
        clearly_below(1.0, -0.1, 2.0, 0.1)


def test_a_contradicted_claim_fails_and_names_both(capsys):
    with pytest.raises(AssertionError, match="the text says: A beats B; the numbers say otherwise: A 3, B 2"):
        check_claim(False, "A beats B", "A 3, B 2")
    check_claim(True, "A beats B", "A 1, B 2")
    check_claim(False, "A beats B", "A 3, B 2", decisive=False)  # smoke: says so, does not fail
    printed = capsys.readouterr().out
    assert "checked: A beats B" in printed and "not decided" in printed


def test_fraction_sd_is_the_spread_of_a_fraction_over_repeated_draws():
    draws = torch.bernoulli(torch.full((4000, 1000), 0.87), generator=torch.Generator().manual_seed(0)).mean(dim=1)
    assert fraction_sd(0.87, 1000) == pytest.approx(draws.std().item(), rel=0.05)
    assert fraction_sd(0.87, 1000) == pytest.approx(0.01063, abs=1e-5) and fraction_sd(1.0, 50) == 0
    for fraction, n in [(1.2, 10), (-0.1, 10), (0.5, 0)]:
        with pytest.raises(ValueError, match=f"fraction={fraction}, n={n}"):
            fraction_sd(fraction, n)


def test_a_paired_fraction_gap_leaves_out_what_the_pairs_share():
    generator = torch.Generator().manual_seed(0)
    shared = torch.rand(1000, generator=generator) < 0.85  # most samples read the same under both
    flipped = torch.rand(1000, generator=generator) < 0.03
    a, b = shared, shared & ~flipped
    gap, sd = paired_fraction_gap(a, b)
    assert gap == pytest.approx(a.double().mean().item() - b.double().mean().item())
    assert sd < 0.5 * math.hypot(
        fraction_sd(a.double().mean().item(), 1000), fraction_sd(b.double().mean().item(), 1000)
    )
    assert sd == pytest.approx((a.double() - b.double()).std().item() / math.sqrt(1000))
    with pytest.raises(ValueError, match="got 3 and 2"):
        paired_fraction_gap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="0 / 1"):
        paired_fraction_gap([0.5, 1], [1, 0])
