# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %%
# Colab set-up: fetch the course and install it beside Colab's own torch. Outside Colab this does nothing.
# Run again, it changes nothing: it clones and installs once, and always ends in the course's notebooks/ folder.
import sys

if "google.colab" in sys.modules:
    import os
    import subprocess

    repo = "https://github.com/diffusion-course/diffusion-course"  # a fork: python scripts/retarget.py OWNER/REPO
    course = "/content/diffusion-course"
    if not os.path.isdir(course):
        subprocess.run(["git", "clone", "--depth", "1", repo, course], check=True)
    if subprocess.run([sys.executable, "-m", "pip", "show", "-q", "course-lib"], capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", course], check=True)
    os.chdir(f"{course}/notebooks")
    if course not in sys.path:
        sys.path.insert(0, course)


# %% [markdown]
# # Chapter 14: A new concept from a few examples
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/14_new_concept.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F14_new_concept.ipynb)
#
# Chapter 7's caption model draws what its 17 words can say, "a thick seven leaning right" or "a thin two", and
# nothing else: every one of its words was in its training captions. How do you teach such a model something new
# from ten pictures, without the data it was trained on and without breaking what it already does? Three answers,
# from the cheapest to the most thorough:
#
# - **Textual inversion** (Gal et al. 2022) adds one word and learns only that word's embedding, a row of 64
#   numbers. The model is frozen; it cannot forget anything, and it can only learn what its frozen layers can
#   already draw when handed the right vector.
# - **DreamBooth** (Ruiz et al. 2022) binds a new word to the concept by fine-tuning the whole UNet, with a
#   **prior-preservation** loss that keeps the model drawing ordinary digits for ordinary prompts.
# - **DreamBooth with LoRA** does the same with chapter 8's low-rank adapters: a few percent of the weights.
#
# The concept is one the model has never seen, made by code so that it can be measured: a bar struck through the
# digit. Each method is judged by what it must change (does "a <bar> seven" draw a barred seven?) and by what it
# must keep (do "a seven" and the other ordinary prompts still draw what they drew: the digit, the class
# histogram, FID beside its spread), with what it costs (parameters trained, file size, time).
#
# By the end of this chapter you can:
#
# 1. make a concept by code, measure it, and show that the measure separates it from ordinary digits with margin;
# 2. add a word to a text encoder as one new row of its embedding table, train that row alone, and show that
#    nothing else moved, bit for bit;
# 3. write DreamBooth's prior-preservation loss by hand, check it against the library, and say why it keeps
#    ordinary prompts working;
# 4. count what DreamBooth-LoRA trains and stores, and compare the three methods in one table of what each
#    learnt, forgot and cost;
# 5. load a textual-inversion embedding and DreamBooth-LoRA weights into a diffusers pipeline, and check that
#    what was loaded is what was saved.

# %%
import copy
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import diffusers
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import transformers
from diffusers import StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from course_lib.captions import BAR_THRESHOLD, VOCABULARY, barred_fraction, measure_bar, tokenize
from course_lib.claims import check_claim, clearly_below
from course_lib.data import data_dir, load_digits, verify_file
from course_lib.forward import q_sample
from course_lib.guidance import guided_samples
from course_lib.interop import tiny_stable_diffusion
from course_lib.lora import lora_layers
from course_lib.metrics import class_accuracy, load_digit_classifier
from course_lib.personalize import (
    BASE,
    LORA_RANK,
    LORA_TARGETS,
    METHODS,
    TOKEN,
    add_token,
    class_captions,
    concept_captions,
    concept_examples,
    concept_loss,
    load_concept,
    prepare,
    prompt_samples,
    read_token,
    save_concept,
    save_token,
    token_embedding,
    tokenize_concept,
    train_concept,
)
from course_lib.plotting import plot_losses, show_images
from course_lib.profiles import get_device, get_profile
from course_lib.schedules import make_schedule
from course_lib.styles import strike_bar
from course_lib.train import TrainConfig
from course_lib.weights import STORAGE_DTYPE, load_card, load_model

profile = get_profile()
device = get_device()
decisive = profile.name != "smoke"  # live claims are decided in the cpu and gpu profiles
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110
diffusers.utils.logging.set_verbosity_error()  # keep warnings and progress bars out of the outputs
diffusers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()
steps, n, live_steps = profile.sample_steps, profile.style_samples, profile.lora_train_steps
print(f"profile: {profile.name} | device: {device} | DDIM steps: {steps} | digits per measurement: {n}", end=" | ")
print(f"live training steps: {live_steps}")
classifier = load_digit_classifier(device)
base_card = load_card(BASE)
base = load_model(BASE, device)
schedule = make_schedule(**base_card["schedule"])
print(f"base model: {BASE}, {sum(p.numel() for p in base.parameters()):,} parameters, {base_card['schedule']}")

# %% [markdown]
# ## 1. A concept made by code, and its measure
#
# The concept: a horizontal bar of full ink, two pixels high, struck through the middle of the digit
# (`styles.strike_bar`: rows 13-14, columns 2-25). It is wider than any digit: MNIST draws each digit inside a
# 20 x 20 box, and the bar spans 24 columns. One held-out digit of each class, picked by label, plain and barred:

# %%
heldout, heldout_labels = load_digits("heldout")  # (1000, 1, 28, 28), (1000,)


def by_label(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first per_class digits of each class, the classes interleaved: 0, 1, ..., 9, 0, 1, ..."""
    return torch.stack([(labels == digit).nonzero()[:per_class, 0] for digit in range(10)], 1).flatten()


one_each = heldout[by_label(heldout_labels, 1)]  # a zero, a one, ..., a nine
show_images(torch.cat([one_each, strike_bar(one_each)]), nrow=10, title="held-out digits, plain and barred")
plt.show()

# %% [markdown]
# Its measure must say "barred" for every barred digit and "plain" for every plain one, with room to spare, so
# that a sample that half draws a bar is not counted. Take the ink (the pixels above the middle grey), and in each
# row of a band around the middle (rows 9-19, wide enough for a bar drawn a little too high or too low) the
# fraction of the bar's 24 columns that hold ink; the measure is the best-covered row:
#
# $$m(x) = \max_{r \in \{9..19\}} \frac{1}{24} \sum_{c=2}^{25} \big[\tfrac{x_{r,c} + 1}{2} > 0.5\big]$$
#
# A digit's own strokes cover at most the 20 columns of its box, about 0.83 of the bar's width; a bar covers all
# 24. By hand, against `captions.measure_bar`, on every held-out digit, plain and barred:


# %%
# NBVAL_CHECK_OUTPUT
def bar_measure_by_hand(images: torch.Tensor) -> torch.Tensor:
    ink = (images[:, 0] + 1) / 2 > 0.5  # (B, 28, 28): above the middle grey
    rows = ink[:, 9:20, 2:26].float().mean(2)  # (B, 11): each row's coverage of the bar's columns
    return rows.amax(1)  # (B,): the best-covered row


plain, barred = measure_bar(heldout), measure_bar(strike_bar(heldout))
print(
    "measure_bar equals the measure by hand:",
    torch.equal(plain, bar_measure_by_hand(heldout)) and torch.equal(barred, bar_measure_by_hand(strike_bar(heldout))),
)
check_claim(
    bool(plain.max() < BAR_THRESHOLD - 0.05 and barred.min() > BAR_THRESHOLD + 0.05),
    f"every plain held-out digit reads more than 0.05 below the threshold {BAR_THRESHOLD}, every barred one more "
    "than 0.05 above it",
    f"{len(heldout)} digits: plain at most {plain.max():.3f}, barred at least {barred.min():.3f}",
)

# %% [markdown]
# The distribution, and the plain digits that come closest to the threshold, those with the longest horizontal
# strokes:

# %%
fig, ax = plt.subplots(figsize=(6, 2.6))
bins = ((torch.arange(26) - 0.5) / 24).numpy()  # the measure takes the values k / 24: one bin each
ax.hist(plain.numpy(), bins=bins, label="plain held-out digits")
ax.hist(barred.numpy(), bins=bins, label="the same, barred")
ax.axvline(BAR_THRESHOLD, color="gray", ls=":", label=f"threshold {BAR_THRESHOLD}")
ax.set(xlabel="bar measure m(x)", ylabel="digits")
ax.legend()
plt.tight_layout()
plt.show()
closest = plain.argsort(descending=True)[:10]
show_images(heldout[closest], nrow=10, title="the plain digits with the highest bar measure")
plt.show()
print("their measures:", ", ".join(f"{v:.2f}" for v in plain[closest]), "| digits:", heldout_labels[closest].tolist())

# %% [markdown]
# **The model has never seen it.** It has no word for it: its tokenizer refuses the word. And its samples for the
# ordinary prompts "a zero" ... "a nine" (`personalize.prompt_samples`: guided DDIM at chapter 7's scale 3, `n / 10`
# of each digit, picked by label) should hardly ever read as barred. A poor sample can (the smoke profile's 3-step
# samples are blobs, and one of them once covered a row of the band), so the check allows 2%. These samples serve
# twice: DreamBooth's prior preservation, in section 3, trains on exactly such images.

# %%
try:
    tokenize([f"a {TOKEN} seven"])
except ValueError as error:
    print(f"ValueError: {error}")
digits = torch.arange(n) % 10  # the digit asked of each sample: n / 10 of each
base_plain = prompt_samples(base, schedule, digits, concept=False, steps=steps, device=device)
show_images(base_plain[:20], nrow=10, title="the base model: 'a zero' ... 'a nine'")
plt.show()
print(
    f"barred: {barred_fraction(base_plain):.0%} of {n}; read as the digit asked for: "
    f"{class_accuracy(classifier, base_plain, digits):.0%}"
)
check_claim(
    barred_fraction(base_plain) <= 0.02,
    "at most 2% of the base model's samples for ordinary prompts read as barred",
    f"{barred_fraction(base_plain):.1%} of {n}, largest bar measure {measure_bar(base_plain).max():.2f}",
    decisive,
)

# %% [markdown]
# The few examples every method learns from: ten barred train digits, one of each class, picked by label
# (`personalize.concept_examples`), each captioned "a <bar> DIGIT" (`concept_captions`). Both papers used 3-5
# images of one subject; here the concept has to be told apart from ten different digits, and one example of each
# shows the bar on every one of them.

# %%
examples, example_labels = concept_examples(10)
concept_tokens = tokenize_concept(concept_captions(example_labels))
show_images(examples, nrow=10, title="the ten examples of the concept")
plt.show()
print(concept_captions(example_labels)[:3], "...")

# %% [markdown]
# ## 2. Textual inversion: one new row of the embedding table
#
# The text encoder's first layer is a table $E \in \mathbb R^{V \times d}$, one row per word ($V = 19$ with
# `<pad>` and `<start>`, $d = 64$); a caption's ids pick rows, and everything after the table (the encoder's
# layers, the UNet's cross-attention) sees only those vectors. A new word is a new row $v_*$ appended to the
# table, $E' = [E;\, v_*]$, with id $V$. Textual inversion finds the row that makes the frozen model denoise the
# examples best (Gal et al. 2022, eq. 2):
#
# $$v_* = \arg\min_v\ \mathbb E_{x_0, t, \epsilon}\,\big\lVert \epsilon - \epsilon_\theta\big(x_t, t,
#     c_\theta(\text{"a } v \text{ seven"})\big) \big\rVert^2$$
#
# with $\theta$ (UNet and text encoder) and $E$ frozen. By hand, the lookup with one appended row against the
# library's `AddedToken`; and adding the word changes nothing for ordinary prompts, bit for bit. These checks run
# on a CPU copy, so that they print the same on every machine:

# %%
# NBVAL_CHECK_OUTPUT
cpu_base = load_model(BASE)
table = cpu_base.text_encoder.tokens.weight  # (V, d): one row per word of VOCABULARY
ids = tokenize_concept([f"a {TOKEN} seven", "a seven"])  # (2, 6)
xt = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
t = torch.tensor([5, 250, 600, 990])
ordinary = tokenize_concept(class_captions(torch.tensor([0, 3, 7, 9])))
with torch.no_grad():
    before = cpu_base(xt, t, ordinary)
    token_id = add_token(cpu_base, "thick")  # the new row starts as the word "thick"
    after = cpu_base(xt, t, ordinary)
    by_hand = F.embedding(ids, torch.cat([table, table[VOCABULARY.index("thick")][None]]))  # (2, 6, d)
    library = cpu_base.text_encoder.tokens(ids)
print(f"ids of 'a {TOKEN} seven' and 'a seven': {ids.tolist()}; {TOKEN} is id {token_id} = V = {len(VOCABULARY)}")
print("AddedToken is the lookup in the table with one row appended:", torch.equal(library, by_hand))
print("ordinary prompts give the same output after adding the word, bit for bit:", torch.equal(before, after))

# %% [markdown]
# The new row starts as the embedding of a word that says something about the concept (diffusers' textual
# inversion script calls it the `initializer_token`): "thick", as the bar adds ink. `personalize.prepare(model,
# "textual_inversion")` adds the word and makes its row, and nothing else, trainable. The row lives in its own
# parameter beside the frozen table, so "only the row trains" holds by construction.
#
# A short live run, the examples and their captions, `profile.lora_train_steps` steps at the shipped run's
# settings (batch 16, learning rate $5 \times 10^{-3}$, warm-up and cosine decay; `scripts/train_concept.py` ran
# 3,000 steps). The loss of single steps is too noisy to read (each draws its own $t$ and $\epsilon$), so the
# objective is also measured on fixed draws, the same for every model: `fixed_loss`.


# %%
def fixed_loss(model: torch.nn.Module, x0: torch.Tensor, tokens: torch.Tensor, repeats: int = 8) -> float:
    """`concept_loss` on all of x0 with `repeats` fixed draws of t and eps (seeded: the same for every model)."""
    generator = torch.Generator().manual_seed(20)
    with torch.no_grad():
        losses = [concept_loss(model, schedule, x0.to(device), generator, tokens) for _ in range(repeats)]
    return torch.stack(losses).mean().item()


ti_model = load_model(BASE, device)
ti_trainable = prepare(ti_model, "textual_inversion")
ti_start = {name: value.clone() for name, value in ti_model.state_dict().items()}
ti_loss_before = fixed_loss(ti_model, examples, concept_tokens)
ti_config = TrainConfig(steps=live_steps, batch_size=16, lr=5e-3, warmup=live_steps // 10, ema_decay=None)
began = time.perf_counter()
ti_state = train_concept(ti_model, schedule, examples, concept_tokens, ti_config, progress=False)
ti_seconds = time.perf_counter() - began
ti_loss_after = fixed_loss(ti_model, examples, concept_tokens)
print(f"{ti_trainable} parameters trained, {live_steps} steps in {ti_seconds:.0f} s")
print(f"loss on fixed draws: {ti_loss_before:.4f} at the start -> {ti_loss_after:.4f}")
plot_losses(ti_state.losses, window=max(1, live_steps // 10))
plt.title("textual inversion, live: the loss of each step")
plt.show()

# %% [markdown]
# What moved? Every tensor of the model, compared with its value before training:

# %%
# NBVAL_CHECK_OUTPUT
moved = {name for name, value in ti_model.state_dict().items() if not torch.equal(value, ti_start[name])}
print(f"trainable parameters: {ti_trainable} (one row of the {table.shape[1]}-wide table)")
print("the only tensor that changed is the new row:", moved == {"text_encoder.tokens.row"})
print(f"everything else ({len(ti_start) - 1} tensors) is bit for bit as it was:", len(moved) == 1)

# %%
distance = (token_embedding(ti_model).detach().cpu() - table[VOCABULARY.index("thick")]).norm().item()
print(f"the row moved {distance:.3f} from 'thick' (whose length is {table[VOCABULARY.index('thick')].norm():.3f})")
check_claim(
    ti_loss_after < ti_loss_before,
    "the live run lowers the loss on fixed draws of t and eps",
    f"{ti_loss_before:.4f} -> {ti_loss_after:.4f} after {live_steps} steps "
    f"({ti_loss_after / ti_loss_before - 1:+.1%}; the DreamBooth runs of section 3 can be set beside it)",
    decisive,
)

# %% [markdown]
# So ordinary prompts, which never read the new row, get exactly what they got before: the same outputs, and so
# the same samples from the same noise. Checked on the CPU, sample for sample:

# %%
ti_cpu = copy.deepcopy(ti_model).cpu()
ten = torch.arange(10)
with torch.no_grad():
    same_output = torch.equal(ti_cpu(xt, t, ordinary), load_model(BASE)(xt, t, ordinary))
same_samples = torch.equal(
    prompt_samples(ti_cpu, schedule, ten, concept=False, steps=steps),
    prompt_samples(load_model(BASE), schedule, ten, concept=False, steps=steps),
)
check_claim(
    same_output and same_samples,
    "after textual inversion, ordinary prompts give the base model's outputs and samples, bit for bit",
    f"outputs equal: {same_output}; samples of 'a zero' ... 'a nine' equal: {same_samples}",
)
ti_live = prompt_samples(ti_model, schedule, ten, concept=True, steps=steps, device=device)
show_images(ti_live, nrow=10, title=f"after {live_steps} live steps: 'a {TOKEN} zero' ... 'a {TOKEN} nine'")
plt.show()
print(f"barred: {barred_fraction(ti_live):.0%} of 10 (a short run; section 5 judges the shipped one)")

# %% [markdown]
# The price of that guarantee: the frozen model can only draw what some vector in its input space makes it draw.
# If no row of 64 numbers makes this UNet strike a bar through a digit, textual inversion cannot find one, however
# long it trains. The next two methods change the UNet itself.
#
# ## 3. DreamBooth: fine-tune the UNet, and keep the prior
#
# DreamBooth binds a word to the concept by training the UNet on the examples, captioned with a word that means
# nothing yet: the paper borrows a rare token ("a [V] dog", with [V] = "sks"); our vocabulary has no rare word, every
# one of its 17 words means something, so the identifier is a new word with a random embedding of the table's mean
# row length, frozen (`add_token(model, None)`). Fine-tuning every weight on ten pictures has two dangers: the model
# forgets what ordinary prompts meant (the paper's *language drift*: "a seven" starts to draw barred sevens, since it
# differs from "a <bar> seven" by one word), and it loses variety. The **prior-preservation loss** (Ruiz et al.
# 2022, eq. 2) adds a second term on class images $x'$ that the frozen model drew for the class prompt before
# training:
#
# $$L = \mathbb E\,\big\lVert \epsilon - \epsilon_\theta(x_t, t, c) \big\rVert^2
#     + \lambda\,\mathbb E\,\big\lVert \epsilon' - \epsilon_\theta(x'_{t'}, t', c_{pr}) \big\rVert^2$$
#
# with $c$ = "a <bar> seven", $c_{pr}$ = "a seven", $\lambda = 1$ in the paper and in diffusers. The class images are
# the base model's own samples for the ordinary prompts, those of section 1. Each term is a mean over its own batch.
# By hand on a fixed batch (three examples and five class images, $\lambda = 0.7$ so that a wrong weight shows),
# against `personalize.concept_loss`, which runs one forward pass on both batches concatenated, as diffusers'
# `train_dreambooth.py` does:

# %%
# NBVAL_CHECK_OUTPUT
db_cpu = load_model(BASE)
add_token(db_cpu)  # the identifier: a random vector, seeded
x0, tokens = examples[:3], concept_tokens[:3]  # (3, 1, 28, 28), "a <bar> zero" ... "a <bar> two"
prior_x0, prior_tokens = base_plain[:5], tokenize_concept(class_captions(digits[:5]))  # "a zero" ... "a four"
weight = 0.7
with torch.no_grad():
    loss = concept_loss(db_cpu, schedule, x0, torch.Generator().manual_seed(21), tokens, prior_x0, prior_tokens, weight)
    generator = torch.Generator().manual_seed(21)  # t for all 8 images, then eps for all 8, as concept_loss draws
    x = torch.cat([x0, prior_x0])  # (8, 1, 28, 28)
    t8 = torch.randint(0, schedule.T, (8,), generator=generator)
    eps = torch.randn(x.shape, generator=generator)
    eps_hat = db_cpu(q_sample(schedule, x, t8, eps), t8, torch.cat([tokens, prior_tokens]))
    concept_term = (eps[:3] - eps_hat[:3]).pow(2).mean()  # the examples, "a <bar> DIGIT"
    prior_term = (eps[3:] - eps_hat[3:]).pow(2).mean()  # the class images, "a DIGIT"
    pooled = (eps - eps_hat).pow(2).mean()  # one mean over all 8: not the paper's loss
print("concept_loss = concept term + lambda * prior term:", torch.allclose(loss, concept_term + weight * prior_term))
print("and not one mean over all eight images:", not torch.allclose(loss, pooled, rtol=1e-3))

# %% [markdown]
# Why does the second term stop the forgetting? The UNet's weights serve every prompt. The first term alone does
# not care whether a change that draws bars for "a <bar> seven" also draws them for "a seven", and as the two
# captions differ by one word, most changes do both; nothing in it costs anything when "a seven" drifts. The
# second term makes that drift cost: its targets are what the model did before training, on the prompts it must
# keep, so a step that changes "a seven" raises it. Textual inversion needs no such term: ordinary prompts never
# read the new row, so their outputs cannot move (exercise 1 shows it through the gradient).
#
# A small live illustration: two short DreamBooth runs from the same start, the same examples and steps, one with
# the concept term alone and one with prior preservation, at ten times the shipped run's learning rate so that a
# few steps move the model visibly. What each forgot is read on real held-out digits with their ordinary
# captions, as the loss on fixed draws: the denoising error of "a seven" on real sevens.

# %%
held_rows = by_label(heldout_labels, max(1, n // 10))  # n / 10 held-out digits of each class, picked by label
held, held_labels = heldout[held_rows], heldout_labels[held_rows]
held_tokens = tokenize_concept(class_captions(held_labels))
prior = (base_plain, tokenize_concept(class_captions(digits)))
db_config = TrainConfig(steps=live_steps, batch_size=8, lr=5e-4, warmup=live_steps // 10, ema_decay=None)
start_model = load_model(BASE, device)
prepare(start_model, "dreambooth")
runs = {"start": dict(concept=fixed_loss(start_model, examples, concept_tokens))}
runs["start"]["ordinary"] = fixed_loss(start_model, held, held_tokens, repeats=2)
for name, use_prior in [("concept term alone", False), ("with prior preservation", True)]:
    model = load_model(BASE, device)
    prepare(model, "dreambooth")  # the same identifier (seed 0) for both runs
    began = time.perf_counter()
    train_concept(model, schedule, examples, concept_tokens, db_config, prior if use_prior else None, progress=False)
    runs[name] = dict(seconds=time.perf_counter() - began, concept=fixed_loss(model, examples, concept_tokens))
    runs[name]["ordinary"] = fixed_loss(model, held, held_tokens, repeats=2)
for name, run in runs.items():
    took = f" ({live_steps} steps in {run['seconds']:.0f} s)" if "seconds" in run else ""
    print(f"{name:24s} concept loss {run['concept']:.4f} | ordinary prompts on real digits {run['ordinary']:.4f}{took}")

# %%
alone, kept = runs["concept term alone"], runs["with prior preservation"]
check_claim(
    alone["concept"] < runs["start"]["concept"] and kept["concept"] < runs["start"]["concept"],
    "both runs lower the loss on the examples",
    f"start {runs['start']['concept']:.4f}, alone {alone['concept']:.4f}, with the prior {kept['concept']:.4f}",
    decisive,
)
check_claim(
    kept["ordinary"] < alone["ordinary"],
    "with prior preservation the loss of ordinary prompts on real digits ends lower than with the concept term alone",
    f"start {runs['start']['ordinary']:.4f}, alone {alone['ordinary']:.4f}, with the prior {kept['ordinary']:.4f}",
    decisive,
)

# %% [markdown]
# ## 4. DreamBooth with LoRA: which parameters train, and what is stored
#
# The same loss, with the UNet frozen and chapter 8's rank-4 adapters beside its attention projections (`qkv` and
# `out` of self-attention; `q`, `kv` and `out` of the cross-attention that reads the caption) and the second
# convolution of every residual block (`conv2`). `prepare(model, "dreambooth_lora")` adds the identifier and the
# adapters, and makes only the adapters trainable. Which layers, and how many numbers:

# %%
# NBVAL_CHECK_OUTPUT
lora_model = load_model(BASE)
lora_trainable = prepare(lora_model, "dreambooth_lora")
wrapped = lora_layers(lora_model.unet)
kinds = Counter(name.rsplit(".", 1)[-1] for name in wrapped)
for kind in LORA_TARGETS:
    layers = [layer for name, layer in wrapped.items() if name.rsplit(".", 1)[-1] == kind]
    count = sum(p.numel() for layer in layers for p in [*layer.lora_A.parameters(), *layer.lora_B.parameters()])
    print(f"{kind:5s} {kinds[kind]:2d} layers, {count:>6,} adapter parameters")
unet_size = sum(p.numel() for p in load_model(BASE).unet.parameters())
print(f"rank {LORA_RANK}: {lora_trainable:,} trainable, {lora_trainable / unet_size:.1%} of the UNet's {unet_size:,}")
with torch.no_grad():
    fresh_lora_is_base = torch.equal(lora_model(xt, t, ordinary), load_model(BASE)(xt, t, ordinary))
print("fresh adapters (B = 0) leave ordinary prompts unchanged, bit for bit:", fresh_lora_is_base)

# %% [markdown]
# What each method writes (`personalize.save_concept`): textual inversion the row alone, in the layout of diffusers'
# `learned_embeds.safetensors` ({"<bar>": a (1, 64) tensor}); DreamBooth the whole model; DreamBooth-LoRA the
# adapters, and beside them the identifier's embedding, since the word is part of what the adapters were trained
# with (diffusers' advanced DreamBooth-LoRA script likewise writes the new tokens' embeddings to a second
# `*_emb.safetensors`). A freshly prepared model has the same tensors as a trained one, so its files have the
# trained files' sizes; saved as `scripts/train_concept.py --export` saves them (float16, the embeddings float32):

# %%
files = {}
with tempfile.TemporaryDirectory() as folder:
    for method in METHODS:
        model = load_model(BASE)
        trained_count = prepare(model, method)
        dtype = None if method == "textual_inversion" else STORAGE_DTYPE
        written = save_concept(model, method, Path(folder) / f"concept_{method}.safetensors", dtype=dtype)
        files[method] = dict(
            parameters=trained_count,
            names=[file.name for file in written],
            bytes=sum(file.stat().st_size for file in written),
        )
model_size = sum(p.numel() for p in load_model(BASE).parameters())
print(f"{'method':18s} {'trained':>10s} {'share':>7s} {'bytes':>10s}  files")
for method, row in files.items():
    print(
        f"{method:18s} {row['parameters']:>10,} {row['parameters'] / model_size:>7.3%} {row['bytes']:>10,}  "
        f"{', '.join(row['names'])}"
    )

# %%
# NBVAL_CHECK_OUTPUT
sizes = {method: row["bytes"] for method, row in files.items()}
check_claim(
    sizes["textual_inversion"] < 1_000 < sizes["dreambooth_lora"] < sizes["dreambooth"] / 10,
    "textual inversion stores under a kilobyte; DreamBooth-LoRA's files are under a tenth of DreamBooth's model",
    f"bytes: {sizes}",
)

# %% [markdown]
# ## 5. The three methods, trained and judged
#
# `scripts/train_concept.py` trained each method on the ten examples (textual inversion 3,000 steps at batch 16;
# DreamBooth and DreamBooth-LoRA 2,000 steps at batch 8 plus 8 class images, 200 class images drawn once by the
# frozen model), exported what it trained (`--export`), and judged it (`--judge`): 300 samples for "a <bar> DIGIT"
# and 300 for the ordinary "a DIGIT", 30 of each digit, before and after, all from the same noise (DDIM-20,
# guidance 3). Each card holds how it was trained and the judged numbers; the samples are stored beside them for
# the grids. What each card says:

# %%
cards = {method: load_card(f"concept_{method}") for method in METHODS}
for method, card in cards.items():
    training = card["training"]
    print(
        f"{method:18s} {training['status']}: {training['steps_done']:,} steps of batch {training['batch_size']} "
        f"at lr {training['lr']:g} in {training['wall_minutes']} min, "
        f"{card['trainable_parameters']:,} parameters trained, {card['file_bytes']:,} bytes "
        f"({', '.join(card['files'])})"
    )
print(
    f"on {cards['dreambooth']['training']['machine']}; DreamBooth's prior: {cards['dreambooth']['training']['prior']}"
)
fig, ax = plt.subplots(figsize=(6, 3))
for method, card in cards.items():
    curve = card["training"]["loss_curve"]
    ax.plot(
        [curve["steps_per_point"] * (i + 1) for i in range(len(curve["mean_loss"]))], curve["mean_loss"], label=method
    )
ax.set(xlabel="step", ylabel="mean loss", yscale="log", title="the shipped runs' losses")
ax.legend()
plt.show()

# %%
check_claim(
    all(
        cards[m]["trainable_parameters"] == files[m]["parameters"] and cards[m]["file_bytes"] == files[m]["bytes"]
        for m in METHODS
    ),
    "each shipped file holds what section 4 counted: the same parameters trained, the same bytes",
    ", ".join(f"{m}: {cards[m]['trainable_parameters']:,} / {cards[m]['file_bytes']:,} B" for m in METHODS),
)

# %% [markdown]
# Side by side. The concept columns read the samples for "a <bar> DIGIT": how often the bar appears
# (`barred_fraction`) and how often the digit is still the one asked for. The forgetting columns read the samples
# for the ordinary prompts, before -> after, on the same noise: digit accuracy, the largest class share (0.10 is
# balanced), the confident fraction, FID against held-out digits with its bootstrap spread, and how often an
# ordinary prompt now draws the bar.

# %%
judged = {method: card["judged"] for method, card in cards.items()}
reference = judged["dreambooth"]["reference"]
print(f"'a {TOKEN} DIGIT':  {'method':18s} {'trained':>9s} {'kB':>8s} {'min':>5s} {'barred':>7s} {'digit':>6s}")
for method, j in judged.items():
    card, asked_j = cards[method], j["concept_prompt"]
    print(
        f"{'':17s} {method:18s} {card['trainable_parameters']:>9,} {card['file_bytes'] / 1e3:>8,.1f} "
        f"{card['training']['wall_minutes']:>5} {asked_j['barred_fraction']:>7.1%} {asked_j['digit_accuracy']:>6.1%}"
    )
print(f"'a DIGIT', before -> after: {'method':18s} {'digit':>15s} {'largest class':>15s} {'confident':>15s}", end=" ")
print(f"{'FID ± sd':>27s} {'barred':>15s}")
for method, j in judged.items():
    plain_j = j["ordinary_prompt"]
    after, before = plain_j["kept"]["model"], plain_j["kept"]["base"]
    print(
        f"{'':27s} {method:18s} {plain_j['digit_accuracy_before']:>6.1%} -> {plain_j['digit_accuracy_after']:.1%} "
        f"{before['largest_class_share']:>6.1%} -> {after['largest_class_share']:.1%} "
        f"{before['confident_fraction']:>6.1%} -> {after['confident_fraction']:.1%} "
        f"{before['fid']:>5.2f} ± {before['fid_sd']:.2f} -> {after['fid']:.2f} ± {after['fid_sd']:.2f} "
        f"{plain_j['barred_fraction_before']:>6.1%} -> {plain_j['barred_fraction_after']:.1%}"
    )
print(
    f"real held-out digits: barred ones read as their digit {reference['barred_digit_accuracy']:.1%}, plain ones "
    f"{reference['plain_digit_accuracy']:.1%}; plain ones read as barred {reference['plain_barred_fraction']:.1%}"
)
print(f"n = {judged['dreambooth']['n']} per prompt set; {judged['dreambooth']['sampling']}")

# %% [markdown]
# The samples themselves. Each column is one digit (the samples ask for 0, 1, ..., 9 in turn); for each method the
# first four rows of "a <bar> DIGIT", then the ordinary prompts after training. The base model's samples for the
# ordinary prompts, from the same noise, are in the first panel: every method's "after" can be compared with them
# sample for sample.

# %%
stored = {}
for method in METHODS:
    path = data_dir() / "benchmarks" / f"concept_{method}_samples.safetensors"
    verify_file(path, f"python scripts/train_concept.py --method {method} --judge")
    stored[method] = {name: images.float() for name, images in load_file(path).items()}
fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
show_images(stored["dreambooth"]["base"][:40], nrow=10, ax=axes[0], title="base\n'a DIGIT'")
for ax, method in zip(axes[1:], METHODS, strict=True):
    grid = torch.cat([stored[method]["concept"][:40], stored[method]["ordinary"][:40]])
    show_images(grid, nrow=10, ax=ax, title=f"{method}\n'a {TOKEN} DIGIT' (top), 'a DIGIT' (bottom)")
plt.tight_layout()
plt.show()

# %% [markdown]
# What the ordinary prompts draw, as the digit classifier reads it, before and after each method (a model that
# forgot would pile its samples onto a few classes):

# %%
fig, ax = plt.subplots(figsize=(8, 2.8))
width = 0.2
histograms = {"base": judged["dreambooth"]["ordinary_prompt"]["kept"]["base"]["histogram"]}
histograms.update({method: j["ordinary_prompt"]["kept"]["model"]["histogram"] for method, j in judged.items()})
for i, (name, histogram) in enumerate(histograms.items()):
    ax.bar(torch.arange(10) + (i - 1.5) * width, histogram, width=width, label=name)
ax.axhline(0.1, color="gray", ls=":")
ax.set(xticks=range(10), xlabel="digit read by the classifier", ylabel="share of samples", title="'a DIGIT'")
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What the numbers say (each sentence is checked below it against the cards):

# %%
asked = {m: j["concept_prompt"] for m, j in judged.items()}
plain_after = {m: j["ordinary_prompt"] for m, j in judged.items()}
check_claim(
    plain_after["textual_inversion"]["identical_to_base"],
    "textual inversion's samples for ordinary prompts are the base model's, bit for bit",
    f"identical_to_base: {plain_after['textual_inversion']['identical_to_base']}",
)
check_claim(
    asked["dreambooth_lora"]["barred_fraction"] >= 0.95 and 0.4 <= asked["dreambooth"]["barred_fraction"] <= 0.6,
    f"for 'a {TOKEN} DIGIT' DreamBooth-LoRA draws the bar in nearly every sample (95% or more), full DreamBooth in "
    "about half (40-60%)",
    ", ".join(f"{m}: {a['barred_fraction']:.1%}" for m, a in asked.items()),
)
check_claim(
    asked["textual_inversion"]["barred_fraction"]
    < min(asked[m]["barred_fraction"] for m in ("dreambooth", "dreambooth_lora")),
    "textual inversion draws the bar less often than either method that trains the UNet",
    ", ".join(f"{m}: {a['barred_fraction']:.1%}" for m, a in asked.items()),
)
check_claim(
    all(a["digit_accuracy"] > reference["barred_digit_accuracy"] - 0.1 for a in asked.values()),
    "the concept's samples still read as the digit asked for, within 10 points of real barred digits",
    f"real barred digits {reference['barred_digit_accuracy']:.1%}; "
    + ", ".join(f"{m}: {a['digit_accuracy']:.1%}" for m, a in asked.items()),
)

# %%
leaks = {m: p["barred_fraction_after"] for m, p in plain_after.items()}
check_claim(
    max(leaks["textual_inversion"], leaks["dreambooth_lora"]) <= 0.01
    and leaks["dreambooth"] > 3 * max(leaks["dreambooth_lora"], 1 / judged["dreambooth"]["n"]),
    "after textual inversion or DreamBooth-LoRA, ordinary prompts draw the bar in at most 1% of samples; after full "
    "DreamBooth, prior preservation notwithstanding, in several times as many",
    ", ".join(f"{m}: {leak:.1%}" for m, leak in leaks.items()) + f" (n = {judged['dreambooth']['n']})",
)
check_claim(
    all(abs(p["digit_accuracy_after"] - p["digit_accuracy_before"]) <= 0.05 for p in plain_after.values()),
    "each method keeps the digit accuracy of ordinary prompts within 5 points of the base model's",
    ", ".join(
        f"{m}: {p['digit_accuracy_before']:.1%} -> {p['digit_accuracy_after']:.1%}" for m, p in plain_after.items()
    ),
)


def clearly_worse(kept: dict) -> bool:
    """Is the model's FID above its base's by more than twice their combined spread?"""
    return clearly_below(kept["base"]["fid"], kept["base"]["fid_sd"], kept["model"]["fid"], kept["model"]["fid_sd"])


check_claim(
    not any(clearly_worse(p["kept"]) for p in plain_after.values()),
    "no method's FID on ordinary prompts is clearly above the base model's",
    ", ".join(
        f"{m}: {p['kept']['model']['fid']:.2f} ± {p['kept']['model']['fid_sd']:.2f} "
        f"(base {p['kept']['base']['fid']:.2f} ± {p['kept']['base']['fid_sd']:.2f})"
        for m, p in plain_after.items()
    ),
)
check_claim(
    all(torch.equal(stored[m]["base"], stored["dreambooth"]["base"]) for m in METHODS),
    "the three judgements compared with the very same base samples",
    "the stored 'base' samples of the three methods",
)

# %% [markdown]
# So textual inversion, as section 2 warned, drew the bar far less often than either method that trains the UNet
# (its rate is printed above, beside theirs), and its ordinary prompts are untouched. Both methods that train the
# UNet learnt the bar; DreamBooth-LoRA more completely, and with less leaking into ordinary prompts, than full
# DreamBooth. These runs do not say why: the two differ in what they train and also in their learning rate (5e-5
# for every weight, 1e-3 for the adapters, each the usual order for its kind), and one run of each cannot separate
# the two causes; a run that changes one of them at a time would.

# %%
rates = {m: cards[m]["training"]["lr"] for m in ("dreambooth", "dreambooth_lora")}
check_claim(
    rates == {"dreambooth": 5e-5, "dreambooth_lora": 1e-3},
    "full DreamBooth trained at lr 5e-5, DreamBooth-LoRA at 1e-3",
    f"the cards: {rates}",
)

# %% [markdown]
# Live, the shipped files loaded into fresh base models (`load_concept`), one sample per digit and prompt, the
# same noise for every method. Besides "a <bar> DIGIT": does the word combine with the words the model already
# knows? Nothing trained it to: the examples were all captioned "a <bar> DIGIT".

# %%
concept_models = {
    method: load_concept(load_model(BASE, device), method, data_dir() / f"concept_{method}.safetensors")
    for method in METHODS
}
prompts = [f"a {TOKEN} {{}}", f"a thick {TOKEN} {{}}", f"a {TOKEN} {{}} leaning right"]
words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
words = words[: min(10, profile.grid_images // len(prompts))]  # a grid of len(prompts) rows: all ten in cpu and gpu
live = {}
for method, model in concept_models.items():
    for prompt in prompts:
        prompt_tokens = tokenize_concept([prompt.format(word) for word in words])
        live[method, prompt] = guided_samples(
            model, schedule, prompt_tokens, tokenize_concept([""]), 3.0, steps, seed=30, device=device
        )[0]
fig, axes = plt.subplots(1, 3, figsize=(15, 2.8))
for ax, method in zip(axes, METHODS, strict=True):
    show_images(torch.cat([live[method, p] for p in prompts]), nrow=len(words), ax=ax, title=method)
plt.tight_layout()
plt.show()
print("rows: " + " / ".join(repr(p.format("DIGIT")) for p in prompts))
for method in METHODS:
    print(
        f"{method:18s} barred: "
        + " | ".join(f"{p.format('DIGIT')!r} {barred_fraction(live[method, p]):.0%}" for p in prompts)
    )

# %% [markdown]
# ## 6. In diffusers: a textual-inversion embedding, and DreamBooth-LoRA weights
#
# diffusers loads both kinds of file into a Stable Diffusion pipeline: `load_textual_inversion` adds a word to the
# tokenizer and its row to the text encoder's embedding table, and `load_lora_weights` puts adapters into the UNet.
# On chapter 9's tiny, randomly initialised pipeline (`tiny_stable_diffusion`), offline.
#
# First, an embedding belongs to the text encoder it was trained for: a row of our caption model's 64-wide table,
# in the very layout diffusers reads (`save_token`; the shipped `data/concept_textual_inversion.safetensors` is such
# a file), does not fit the tiny pipeline's 32-wide CLIP text encoder, and diffusers says so:

# %%
sd = tiny_stable_diffusion(seed=0)
folder = Path(tempfile.mkdtemp())
ours = load_model(BASE)
add_token(ours, "thick")
our_file = save_token(ours, folder / "learned_embeds.safetensors")
print(f"{our_file.name}: {dict((k, tuple(v.shape)) for k, v in load_file(our_file).items())}")
try:
    sd.load_textual_inversion(our_file)
except ValueError as error:
    print(f"ValueError: {str(error).splitlines()[0][:90]} ...")
print("the tiny text encoder's table:", tuple(sd.text_encoder.get_input_embeddings().weight.shape))

# %% [markdown]
# So the demonstration uses a row of the tiny encoder's own width. Before loading, the tokenizer has no word
# "<bar>": CLIP's byte-pair encoding splits it into pieces, and the angle brackets, which it has never seen, become
# the unknown token. The file holds {"<bar>": a (1, 32) tensor}, here the embedding of the tiny encoder's word
# "thick", exactly: the course's `read_token` reads it too, as the layout is the same.

# %%
# NBVAL_CHECK_OUTPUT
tokenizer, encoder = sd.tokenizer, sd.text_encoder
prompt = f"a {TOKEN} seven"
print("before:", tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids))
sd_table = encoder.get_input_embeddings().weight.detach().clone()  # (97, 32)
thick_row = sd_table[tokenizer.convert_tokens_to_ids("thick</w>")][None]  # (1, 32)
sd_file = folder / "tiny_learned_embeds.safetensors"
save_file({TOKEN: thick_row.contiguous()}, sd_file)
print("read_token reads diffusers' layout:", torch.equal(read_token(sd_file), thick_row))
sd.load_textual_inversion(sd_file)
new_id = tokenizer.convert_tokens_to_ids(TOKEN)
loaded_table = encoder.get_input_embeddings().weight
print("after: ", tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids), f"({TOKEN} is id {new_id})")
print(f"the new id is the old vocabulary size, {len(sd_table)}:", new_id == len(sd_table))
print("its row is the loaded row, bit for bit:", torch.equal(loaded_table[new_id], thick_row[0]))
print("every other row is as it was, bit for bit:", torch.equal(loaded_table[: len(sd_table)], sd_table))

# %% [markdown]
# A word is nothing but its row: with the row of "thick", "a <bar> seven" gives the pipeline exactly what "a thick
# seven" gives, from the same noise. A trained embedding is a row found by gradient descent instead.

# %%
# NBVAL_CHECK_OUTPUT
sd_call = dict(guidance_scale=4.0, num_inference_steps=profile.step_counts[0], output_type="pt")


def draw(pipe, prompts):
    return pipe(prompts, generator=torch.Generator().manual_seed(10), **sd_call).images


as_word = draw(sd, [f"a {TOKEN} seven"])
print(
    "'a <bar> seven' draws what 'a thick seven' draws, bit for bit:", torch.equal(as_word, draw(sd, ["a thick seven"]))
)
sd.unload_textual_inversion(TOKEN)
print("unloaded: the table has its old size again:", encoder.get_input_embeddings().weight.shape[0] == len(sd_table))

# %% [markdown]
# **DreamBooth-LoRA.** Its result is two files: the UNet's adapters, and the identifier's embedding. Below, a
# pipeline stands in for one after training: the identifier is a random row of the table's mean length (our
# `add_token(model, None)`), loaded from a state dict, and peft adapters with random weights sit on the UNet's
# attention projections (the default initialisation, $B = 0$, would change nothing). It saves the adapters with
# `save_lora_weights`, as diffusers' `train_dreambooth_lora.py` does, and the embedding beside them. A fresh
# pipeline loads both:

# %%
trained = tiny_stable_diffusion(seed=0)
g = torch.Generator().manual_seed(11)
identifier = torch.randn(1, sd_table.shape[1], generator=g)
identifier = identifier / identifier.norm() * sd_table.norm(dim=1).mean()  # (1, 32), the mean row length
trained.load_textual_inversion({TOKEN: identifier})  # a state dict in the learned_embeds layout
lora_config = LoraConfig(
    r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(12)
    trained.unet.add_adapter(lora_config, adapter_name="bar")
lora_state = get_peft_model_state_dict(trained.unet, adapter_name="bar")
lora_folder = folder / "dreambooth_lora"
StableDiffusionPipeline.save_lora_weights(lora_folder, unet_lora_layers=lora_state)
save_file({TOKEN: identifier}, lora_folder / "pytorch_lora_weights_emb.safetensors")
for file in sorted(lora_folder.iterdir()):
    print(f"{file.name}: {file.stat().st_size:,} bytes")

# %%
# NBVAL_CHECK_OUTPUT
fresh = tiny_stable_diffusion(seed=0)
plain_images = draw(fresh, [f"a {TOKEN} seven", "a seven"])
fresh.load_lora_weights(lora_folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="bar")
fresh.load_textual_inversion(lora_folder / "pytorch_lora_weights_emb.safetensors")
loaded_state = get_peft_model_state_dict(fresh.unet, adapter_name="bar")
print(f"{len(lora_state)} adapter tensors saved; the same names loaded:", set(loaded_state) == set(lora_state))
print("each equal to the saved one, bit for bit:", all(torch.equal(loaded_state[k], lora_state[k]) for k in lora_state))
row = fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer.convert_tokens_to_ids(TOKEN)]
print("the identifier's row is the saved one:", torch.equal(row, identifier[0]))
with_lora = draw(fresh, [f"a {TOKEN} seven", "a seven"])
print(
    "the pipeline draws what the trained one draws:",
    torch.equal(with_lora, draw(trained, [f"a {TOKEN} seven", "a seven"])),
)
print("and not what it drew before loading:", bool((with_lora - plain_images).abs().max() > 1e-3))
fresh.unload_lora_weights()
fresh.unload_textual_inversion(TOKEN)
print("unloaded, the base pipeline again:", torch.equal(draw(fresh, [f"a {TOKEN} seven", "a seven"]), plain_images))
shutil.rmtree(folder)

# %% [markdown]
# (Before loading, "<bar>" was pieces and unknown tokens; the last line compares the same prompt, so the same
# pieces, before and after unloading.) Our DreamBooth-LoRA file is a course LoRA file on the course's UNet, so it
# loads with `course_lib.lora.load_lora`, not into a `UNet2DConditionModel`; the layout of its two parts, adapters
# plus an embedding file beside them, is diffusers'. Full DreamBooth needs no loader at all: its result is a whole
# model, saved and loaded like any other (chapter 9).

# %% [markdown]
# ## Recap
#
# - A concept made by code can be measured: the bar spans more columns than any digit's strokes, so the best
#   covered row of the middle band separates barred from plain digits with margin on every held-out digit.
# - Textual inversion appends one row $v_*$ to the frozen embedding table and trains it alone on $\lVert \epsilon -
#   \epsilon_\theta(x_t, t, c(v_*)) \rVert^2$: 64 numbers, a file of a few hundred bytes, and ordinary prompts keep
#   their outputs bit for bit (checked); it can only find what the frozen model can already draw.
# - DreamBooth fine-tunes the UNet on the examples captioned with an identifier word, plus $\lambda$ times the same
#   loss on the base model's own samples for the class prompts; the second term makes drift on ordinary prompts
#   cost, which the concept term alone does not. DreamBooth-LoRA trains rank-4 adapters instead of every weight.
# - Each method is judged by what it changes (the bar under "a <bar> DIGIT") and what it keeps (digit accuracy,
#   class histogram, FID ± spread on ordinary prompts, on the same noise as the base), beside what it costs.
# - diffusers' `load_textual_inversion` is the same construction: a new token id and one new row, every other row
#   untouched; `load_lora_weights` puts the adapters into the UNet, and a DreamBooth-LoRA result is both files.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** Why textual inversion cannot forget: write `row_gradient(model, captions)`, the gradient of the
# new row under `concept_loss` on the ten examples with the given captions (one per example), and show that it is
# exactly zero for the ordinary captions "a DIGIT" and not zero for "a <bar> DIGIT".


# %% tags=["solution", "hide-input"]
def row_gradient(model: torch.nn.Module, captions: list[str]) -> torch.Tensor:
    ### BEGIN SOLUTION
    row = token_embedding(model)
    row.grad = None
    loss = concept_loss(model, schedule, examples, torch.Generator().manual_seed(40), tokenize_concept(captions))
    loss.backward()
    return row.grad.clone()
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
exercise_model = load_model(BASE)
prepare(exercise_model, "textual_inversion")
ordinary_gradient = row_gradient(exercise_model, class_captions(example_labels))
concept_gradient = row_gradient(exercise_model, concept_captions(example_labels))
assert ordinary_gradient.shape == (1, 64), f"one gradient per number of the row; got {tuple(ordinary_gradient.shape)}"
assert torch.equal(ordinary_gradient, torch.zeros(1, 64)), "ordinary captions never read the row: zero gradient"
assert concept_gradient.abs().max() > 0, "the concept's captions read the row: its gradient is not zero"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** diffusers also loads an embedding of several vectors for one word: a (k, d) tensor becomes the
# tokens "<bar>", "<bar>_1", ..., "<bar>_{k-1}", and the pipeline rewrites each prompt with `maybe_convert_prompt`
# so that the word stands for all k. Write `expand_prompt(prompt, token, k)` that does the rewriting, and check it
# against the pipeline after loading a (3, 32) embedding.


# %% tags=["solution", "hide-input"]
def expand_prompt(prompt: str, token: str, k: int) -> str:
    ### BEGIN SOLUTION
    return prompt.replace(token, " ".join([token] + [f"{token}_{i}" for i in range(1, k)]))
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
multi = tiny_stable_diffusion(seed=0)
multi.load_textual_inversion({TOKEN: torch.randn(3, 32, generator=torch.Generator().manual_seed(13))})
for text in [f"a {TOKEN} seven", "a seven", f"a thick {TOKEN} two"]:
    theirs = multi.maybe_convert_prompt(text, multi.tokenizer)
    assert expand_prompt(text, TOKEN, 3) == theirs, f"{expand_prompt(text, TOKEN, 3)!r}, diffusers: {theirs!r}"
assert len(multi.tokenizer) == len(sd_table) + 3, "three vectors, three new tokens"
print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** How many numbers does DreamBooth-LoRA train? A rank-$r$ adapter on `nn.Linear(in, out)` has
# $r\,(in + out)$, on `nn.Conv2d(c_in, c_out, k)` it has $r\,(c_{in} k^2 + c_{out})$ (chapter 8). Write
# `lora_parameters(unet, targets, r)` from the shapes of the base UNet's layers whose names end in one of `targets`
# (peft's rule), and check it against section 4's count.


# %% tags=["solution", "hide-input"]
def lora_parameters(unet: torch.nn.Module, targets: list[str], r: int) -> int:
    ### BEGIN SOLUTION
    total = 0
    for name, layer in unet.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(layer, torch.nn.Linear):
            total += r * (layer.in_features + layer.out_features)
        elif isinstance(layer, torch.nn.Conv2d):
            total += r * (layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] + layer.out_channels)
    return total
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
counted = lora_parameters(load_model(BASE).unet, LORA_TARGETS, LORA_RANK)
assert counted == lora_trainable, f"{counted} by the formula, {lora_trainable} trained by DreamBooth-LoRA"
print("exercise 3: correct")
