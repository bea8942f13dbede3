"""Claims checked (course_lib.claims): a contradicted claim fails the run; a gap counts only beyond its spread."""

import pytest

from course_lib.claims import check_claim, clearly_below


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
