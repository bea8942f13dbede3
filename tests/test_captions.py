"""Captions from measured attributes (course_lib.captions), the text encoder and cross-attention (nets.text)."""

import pytest
import torch

from course_lib.captions import (
    caption,
    caption_parts,
    describe,
    measure_slant,
    measure_thickness,
    random_captions,
    tokenize,
    word_agreement,
)
from course_lib.data import load_digits
from course_lib.guidance import Guided, caption_samples, guided_samples
from course_lib.nets.text import TextConditionedUNet, TextEncoder
from course_lib.samplers import ddim_sample
from course_lib.schedules import make_schedule

UNET = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)


def bar(width: int, shear: float = 0.0, length: int = 20) -> torch.Tensor:
    """A bar of ink `width` pixels wide and `length` rows long, its rows shifted right by `shear` per row up."""
    image = -torch.ones(1, 1, 28, 28)
    for row in range(4, 4 + length):
        left = round(12 + shear * (14 - row))
        image[0, 0, row, left : left + width] = 1
    return image


def test_slant_is_the_shear_of_the_ink():
    assert measure_slant(bar(3)).item() == pytest.approx(0.0, abs=1e-6)
    assert measure_slant(bar(3, shear=0.4)).item() == pytest.approx(0.4, abs=0.03)
    assert measure_slant(bar(3, shear=-0.3)).item() == pytest.approx(-0.3, abs=0.03)
    assert measure_slant(-torch.ones(1, 1, 28, 28)).item() == 0  # blank


def test_word_agreement_counts_the_images_whose_measured_words_match():
    # widths 1 and 4: thickness 0.95 ("thin") and 3.33 ("thick"); shear 0.4 leans right, 0 is upright
    images = torch.cat([bar(1), bar(4), bar(4, shear=0.4), bar(1, shear=0.4)])
    assert word_agreement(images, thickness="thick") == 0.5
    assert word_agreement(images, slant="leaning right") == 0.5
    assert word_agreement(images, thickness="thick", slant="leaning right") == 0.25
    assert word_agreement(images, thickness="thin", slant="upright") == 0.25
    with pytest.raises(ValueError, match="thickness='bold' is not a thickness word"):
        word_agreement(images, thickness="bold")
    with pytest.raises(ValueError, match="ask for a thickness word, a slant word or both"):
        word_agreement(images)


def test_thickness_grows_with_the_stroke_width():
    for width in (1, 2, 3, 4, 5):  # 2 w L / (2 (w + L)) with L = 20
        assert measure_thickness(bar(width)).item() == pytest.approx(width * 20 / (width + 20), rel=1e-6)


def test_every_word_describes_a_fair_share_of_the_digits():
    images, labels = load_digits("train")
    captions = describe(images, labels)
    assert captions[0].startswith("a ") and captions[0].split()[-1] in ("left", "right", "upright")
    for word in ("thin", "thick", "left", "right", "upright"):
        share = sum(word in text.split() for text in captions) / len(captions)
        assert 0.15 < share < 0.6, (word, share)


def test_captions_and_tokens():
    assert caption(7, "thick", "leaning right") == "a thick seven leaning right"
    assert caption(None, "", "upright") == "a upright" and caption(None) == ""
    tokens = tokenize(["a thick seven leaning right", ""])
    assert tokens.shape == (2, 6) and tokens[1].tolist() == [1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="unknown word 'bold'"):
        tokenize(["a bold seven"])
    with pytest.raises(ValueError, match="has 6 words; at most 5 fit"):
        tokenize(["a thick seven leaning right right"])


def test_training_captions_drop_parts_and_whole_captions():
    parts = [(3, "thin", "upright")] * 4000
    captions = random_captions(parts, torch.Generator().manual_seed(0), drop_part=0.3, drop_all=0.1)
    empty = sum(text == "" for text in captions) / len(captions)
    thin = sum("thin" in text for text in captions) / len(captions)
    # empty: dropped whole, or all three parts dropped
    assert abs(empty - (0.1 + 0.9 * 0.3**3)) < 0.02 and abs(thin - 0.9 * 0.7) < 0.03
    images, labels = load_digits("heldout")
    assert len(caption_parts(images[:5], labels[:5])) == 5
    with pytest.raises(ValueError, match="drop_all=2"):
        random_captions(parts, torch.Generator(), drop_all=2)


def randomise_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised layers make every condition look the same at init; training would change them."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if (parameter == 0).all():
                parameter.normal_(0, 0.1)
    return model.eval()


def test_text_encoder_ignores_padding():
    torch.manual_seed(0)
    encoder = TextEncoder(dim=16, layers=1, heads=2).eval()
    tokens = tokenize(["a thin two", "a thick seven leaning right"])
    before = encoder(tokens)
    with torch.no_grad():
        encoder.tokens.weight[0] += 5.0  # the <pad> embedding
    after = encoder(tokens)
    assert torch.allclose(before[0, :4], after[0, :4], atol=1e-5)  # the real tokens of the padded caption
    with pytest.raises(ValueError, match=r"need token ids \(B, 6\)"):
        encoder(tokens[:, :4])


def test_prompts_reach_the_image_through_cross_attention():
    torch.manual_seed(0)
    model = randomise_zero_layers(TextConditionedUNet(text=dict(dim=16, layers=1, heads=2), **UNET))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([300, 300])
    seven, two = model(x, t, tokenize(["a seven"] * 2)), model(x, t, tokenize(["a two"] * 2))
    assert seven.shape == x.shape and not torch.allclose(seven, two)
    with pytest.raises(ValueError, match=r"reads a context \(B, L, 16\)"):
        model.unet(x, t, torch.randn(2, 6, 8))
    # classifier-free guidance with the empty caption as "no condition", and a negative prompt in its place
    schedule, x_T = make_schedule("cosine", 1000), torch.randn(2, 1, 28, 28)
    for null in ([""], ["a thick"]):
        guided = Guided(model, tokenize(["a thin seven"]), tokenize(null), 3.0)
        assert ddim_sample(guided, schedule, x_T, 2, clip_x0=True)[0].shape == x_T.shape


def test_caption_samples_are_guided_samples_of_the_tokenized_prompts():
    model = randomise_zero_layers(TextConditionedUNet(text=dict(dim=16, layers=1, heads=2), **UNET))
    schedule, digits = make_schedule("cosine", 1000), torch.tensor([7, 2])
    ours = caption_samples(model, schedule, digits, {"thickness": "thick"}, negative="leaning left", steps=2)
    prompts = tokenize(["a thick seven", "a thick two"])
    expected, _ = guided_samples(model, schedule, prompts, tokenize(["leaning left"]), 3.0, 2)
    assert torch.equal(ours, expected)
