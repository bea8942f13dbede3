"""Styles for LoRA (course_lib.styles): each moves its measurement by the amount it claims."""

import pytest
import torch

from course_lib.captions import measure_slant, measure_thickness
from course_lib.data import load_digits
from course_lib.styles import balanced_digits, embolden, shear

DIGITS = load_digits("train")[0][:200]


def test_embolden_thickens_every_stroke_and_keeps_the_range():
    bold = embolden(DIGITS)
    assert bold.shape == DIGITS.shape and bold.min() >= -1 and bold.max() <= 1
    assert (measure_thickness(bold) > measure_thickness(DIGITS)).all()
    assert (bold >= DIGITS).all()  # a dilation only adds ink


@pytest.mark.parametrize("amount", [-0.3, 0.2, 0.4])
def test_shear_moves_the_slant_by_its_amount(amount):
    leaning = shear(DIGITS, amount)
    change = measure_slant(leaning) - measure_slant(DIGITS)
    assert change.mean().item() == pytest.approx(amount, abs=0.01)
    assert leaning.min() >= -1 and leaning.max() <= 1
    assert torch.allclose(shear(DIGITS, 0.0), DIGITS, atol=1e-5)


def test_styles_reject_non_digit_shapes():
    with pytest.raises(ValueError, match=r"must be digit images \(N, 1, 28, 28\); got \(3, 28, 28\)"):
        embolden(torch.zeros(3, 28, 28))


def test_balanced_digits_picks_each_class_by_label():
    images, labels = balanced_digits(7, seed=3)
    assert images.shape == (70, 1, 28, 28)
    assert torch.bincount(labels, minlength=10).tolist() == [7] * 10
    assert labels[:10].sort().values.tolist() == list(range(10)), "classes interleave: any prefix is balanced"
    assert len({tuple(row.flatten().tolist()) for row in images}) == 70, "no digit twice"
    with pytest.raises(ValueError, match="per_class must lie in 1..400.*got 401"):
        balanced_digits(401)
