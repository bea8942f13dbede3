"""course_lib.personalize (chapter 14) and its concept: the bar and its measure, the added word, what each method
trains (and leaves bit for bit), the prior-preservation loss against its formula, resuming, and save -> load."""

import copy
import functools

import pytest
import torch

from course_lib.captions import BAR_THRESHOLD, VOCABULARY, barred_fraction, measure_bar, tokenize
from course_lib.data import load_digits
from course_lib.ddpm import training_target
from course_lib.forward import q_sample
from course_lib.nets.text import TextConditionedUNet
from course_lib.personalize import (
    TOKEN,
    AddedToken,
    add_token,
    class_captions,
    concept_captions,
    concept_examples,
    concept_loss,
    embedding_path,
    load_concept,
    load_token,
    prepare,
    prompt_samples,
    read_token,
    save_concept,
    save_token,
    token_embedding,
    tokenize_concept,
    train_concept,
)
from course_lib.schedules import make_schedule
from course_lib.styles import strike_bar
from course_lib.train import TrainConfig

UNET = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)
SCHEDULE = make_schedule("cosine", 1000)
CONFIG = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup=1, ema_decay=None, checkpoint_every_s=1e9)


def tiny_model() -> TextConditionedUNet:
    """A small caption model whose zero-initialised layers are randomised, so that every input reaches the output
    (at init, a zero output layer would hide the text from the image)."""
    torch.manual_seed(0)
    model = TextConditionedUNet(text=dict(dim=16, layers=1, heads=2), **UNET)
    with torch.no_grad():
        for parameter in model.parameters():
            if (parameter == 0).all():
                parameter.normal_(0, 0.1)
    return model.eval()


@functools.cache
def examples(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`concept_examples(n)`, loaded once per test session (reading the digits takes a second or two)."""
    return concept_examples(n)


def fixed_inputs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    xt = torch.randn(n, 1, 28, 28, generator=generator)
    return xt, torch.randint(0, 1000, (n,), generator=generator), tokenize_concept(concept_captions(torch.arange(n)))


# --- the concept and its measure ----------------------------------------------------------------------------------


def test_the_bar_measure_separates_barred_from_plain_digits_with_margin():
    images, _ = load_digits("heldout")
    plain, barred = measure_bar(images), measure_bar(strike_bar(images))
    assert plain.max() < BAR_THRESHOLD - 0.05, f"a plain digit reads {plain.max():.3f}, near the threshold"
    assert barred.min() > BAR_THRESHOLD + 0.05, f"a barred digit reads {barred.min():.3f}, near the threshold"
    assert barred_fraction(images) == 0.0 and barred_fraction(strike_bar(images)) == 1.0


def test_strike_bar_draws_only_the_bar_and_refuses_other_sizes():
    images, _ = load_digits("heldout")
    barred = strike_bar(images[:8])
    assert barred.shape == (8, 1, 28, 28)
    assert torch.equal(barred[..., :13, :], images[:8, ..., :13, :]) and torch.equal(
        barred[..., 15:, :], images[:8, ..., 15:, :]
    )
    assert (barred[..., 13:15, 2:26] == 1).all()
    with pytest.raises(ValueError, match="28, 28"):
        strike_bar(torch.zeros(1, 1, 32, 32))


def test_concept_examples_are_picked_by_label():
    images, labels = examples(10)
    assert labels.tolist() == list(range(10)) and barred_fraction(images) == 1.0
    assert examples(4)[1].tolist() == [0, 1, 2, 3]
    assert concept_captions(torch.tensor([7])) == [f"a {TOKEN} seven"] and class_captions(torch.tensor([7])) == [
        "a seven"
    ]
    with pytest.raises(ValueError, match="n must lie in"):
        concept_examples(0)


def test_the_concept_vocabulary_keeps_every_ordinary_id():
    captions = ["a thick seven leaning left", "", "a one"]
    assert torch.equal(tokenize_concept(captions), tokenize(captions))
    assert tokenize_concept([f"a {TOKEN} two"])[0, 2].item() == len(VOCABULARY)
    with pytest.raises(ValueError, match="unknown word"):
        tokenize([f"a {TOKEN} two"])
    with pytest.raises(ValueError, match="must start with"):
        tokenize(["a two"], vocabulary=("a", "two"))


# --- the added word -----------------------------------------------------------------------------------------------


def test_add_token_leaves_ordinary_prompts_exactly_as_they_were():
    model = tiny_model()
    xt, t, _ = fixed_inputs()
    ordinary = tokenize(class_captions(torch.arange(4)))
    with torch.no_grad():
        before = model(xt, t, ordinary)
        assert add_token(model, "thick") == len(VOCABULARY)
        after = model(xt, t, ordinary)
    assert torch.equal(before, after)
    table = model.text_encoder.tokens.table.weight
    assert torch.equal(token_embedding(model)[0], table[VOCABULARY.index("thick")])
    with pytest.raises(ValueError, match="already has"):
        add_token(model)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        add_token(tiny_model(), "sks")
    with pytest.raises(ValueError, match="has no word"):
        token_embedding(tiny_model())


def test_a_random_identifier_has_the_tables_mean_row_length():
    model = tiny_model()
    add_token(model, None, seed=5)
    table = model.text_encoder.tokens.table.weight
    assert torch.allclose(token_embedding(model).norm(), table.norm(dim=1).mean())


def trained(method: str, steps: int = 3, **options) -> tuple[TextConditionedUNet, dict]:
    """A tiny model prepared for `method`, its parameters before training, after `steps` steps on 4 barred digits."""
    model = tiny_model()
    count = prepare(model, method)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    x0, labels = examples(4)
    prior = None
    if method != "textual_inversion":
        prior = (torch.randn(6, 1, 28, 28).clamp(-1, 1), tokenize_concept(class_captions(torch.arange(6) % 10)))
    config = TrainConfig(**{**CONFIG.__dict__, "steps": steps})
    train_concept(
        model, SCHEDULE, x0, tokenize_concept(concept_captions(labels)), config, prior, progress=False, **options
    )
    return model, {"before": before, "count": count}


def changed(model, before: dict) -> set[str]:
    return {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}


def test_textual_inversion_trains_one_row_and_leaves_everything_else_bit_for_bit():
    model, run = trained("textual_inversion")
    assert run["count"] == 16  # one row of the 16-wide table
    assert changed(model, run["before"]) == {"text_encoder.tokens.row"}


def test_dreambooth_trains_the_unet_only():
    model, run = trained("dreambooth")
    assert run["count"] == sum(p.numel() for p in model.unet.parameters())
    moved = changed(model, run["before"])
    assert moved and all(name.startswith("unet.") for name in moved), sorted(moved)[:3]


def test_dreambooth_lora_trains_the_adapters_only():
    model, run = trained("dreambooth_lora")
    moved = changed(model, run["before"])
    assert moved and all(".lora_" in name for name in moved), sorted(moved)[:3]
    assert 0 < run["count"] < 0.2 * sum(p.numel() for p in model.unet.parameters())


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight, _ = trained("dreambooth_lora", steps=4)
    checkpoint = tmp_path / "concept.pt"
    _, _ = trained("dreambooth_lora", steps=4, budget_s=0.0, checkpoint=checkpoint)  # stops after one step
    assert torch.load(checkpoint, weights_only=True)["step"] == 1
    resumed, _ = trained("dreambooth_lora", steps=4, checkpoint=checkpoint)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# --- the loss -----------------------------------------------------------------------------------------------------


def test_concept_loss_is_the_prior_preservation_formula():
    model = tiny_model()
    add_token(model)
    x0, labels = examples(4)
    x0, labels = x0[:3], labels[:3]
    tokens = tokenize_concept(concept_captions(labels))
    prior_x0 = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    prior_tokens = tokenize_concept(class_captions(torch.arange(5)))
    weight = 0.7
    with torch.no_grad():
        loss = concept_loss(
            model, SCHEDULE, x0, torch.Generator().manual_seed(2), tokens, prior_x0, prior_tokens, weight
        )
        # by hand: t for all 8 images, then eps for all 8, from the same seed; each term a mean over its own batch
        generator = torch.Generator().manual_seed(2)
        x = torch.cat([x0, prior_x0])
        t = torch.randint(0, SCHEDULE.T, (8,), generator=generator)
        eps = torch.randn(x.shape, generator=generator)
        xt = q_sample(SCHEDULE, x, t, eps)
        concept = (eps[:3] - model(xt[:3], t[:3], tokens)).pow(2).mean()
        prior = (eps[3:] - model(xt[3:], t[3:], prior_tokens)).pow(2).mean()
        pooled = (eps - model(xt, t, torch.cat([tokens, prior_tokens]))).pow(2).mean()
        alone = concept_loss(model, SCHEDULE, x0, torch.Generator().manual_seed(2), tokens)
    expected = concept + weight * prior
    assert torch.allclose(loss, expected, rtol=1e-5), (loss.item(), expected.item())
    assert not torch.allclose(loss, pooled, rtol=1e-3)  # one mean over all 8 images is another loss
    assert torch.equal(training_target(SCHEDULE, x, eps, t, "eps"), eps)  # an eps model's target is eps itself
    # without a prior: the concept term alone, on the concept's own draws of t and eps
    generator = torch.Generator().manual_seed(2)
    t_alone = torch.randint(0, SCHEDULE.T, (3,), generator=generator)
    eps_alone = torch.randn(x0.shape, generator=generator)
    with torch.no_grad():
        by_hand = (eps_alone - model(q_sample(SCHEDULE, x0, t_alone, eps_alone), t_alone, tokens)).pow(2).mean()
    assert torch.allclose(alone, by_hand, rtol=1e-5)


def test_concept_loss_refuses_half_a_prior_and_a_bad_weight():
    model = tiny_model()
    add_token(model)
    x0, tokens = torch.zeros(2, 1, 28, 28), tokenize_concept(["a one", "a two"])
    with pytest.raises(ValueError, match="neither"):
        concept_loss(model, SCHEDULE, x0, None, tokens, prior_x0=x0)
    with pytest.raises(ValueError, match="lambda"):
        concept_loss(model, SCHEDULE, x0, None, tokens, x0, tokens, prior_weight=-1.0)


# --- files --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["textual_inversion", "dreambooth", "dreambooth_lora"])
def test_save_then_load_reproduces_the_model_exactly(tmp_path, method):
    model, _ = trained(method, steps=2)
    path = tmp_path / f"concept_{method}.safetensors"
    files = save_concept(model, method, path)
    loaded = load_concept(tiny_model(), method, path)
    xt, t, tokens = fixed_inputs()
    with torch.no_grad():
        assert torch.equal(model(xt, t, tokens), loaded(xt, t, tokens))
    assert all(file.exists() for file in files)
    if method == "dreambooth_lora":
        assert files[1] == embedding_path(path) == tmp_path / "concept_dreambooth_lora_emb.safetensors"


def test_the_embedding_file_is_learned_embeds_shaped(tmp_path):
    model = tiny_model()
    add_token(model, "a")
    path = save_token(model, tmp_path / "learned_embeds.safetensors")
    assert read_token(path).shape == (1, 16) and path.stat().st_size < 1000
    assert isinstance(load_token(tiny_model(), path).text_encoder.tokens, AddedToken)
    other = copy.deepcopy(model)
    save_concept(other, "dreambooth", tmp_path / "whole.safetensors")
    with pytest.raises(ValueError, match="one tensor named"):
        read_token(tmp_path / "whole.safetensors")


def test_prompt_samples_give_one_digit_per_prompt():
    model = tiny_model()
    add_token(model)
    samples = prompt_samples(model, SCHEDULE, torch.tensor([3, 7]), concept=True, steps=2)
    assert samples.shape == (2, 1, 28, 28) and samples.abs().max() <= 1
