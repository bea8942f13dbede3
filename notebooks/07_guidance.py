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
# # Chapter 7: Conditioning and classifier-free guidance
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/07_guidance.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F07_guidance.ipynb)
#
# An unconditional model draws some digit. To ask for a seven, the network needs the request as an input, and
# the sampler a way to insist on it. This chapter adds class labels to the UNet, trains it with the label
# sometimes hidden, and steers sampling with classifier-free guidance (Ho & Salimans 2021); then it replaces the
# label by a caption, "a thick seven leaning right", read by a small text encoder through cross-attention: the
# pathway of Stable Diffusion's prompts, at a size this CPU trains.
#
# By the end of this chapter you can:
#
# 1. add a condition to a UNet (a label embedding beside the time embedding) and train with condition dropout;
# 2. derive classifier-free guidance from Bayes' rule and implement it as one batched forward pass, and sample
#    with it correctly when $\hat x_0$ is clipped;
# 3. measure what the guidance scale does to accuracy and diversity;
# 4. condition on text through cross-attention, and check that every word of a prompt does what it says;
# 5. use a negative prompt, and say why it works.

# %%
import math

import matplotlib.pyplot as plt
import torch

from course_lib.benchmark import load_results
from course_lib.captions import caption, describe, measure_slant, measure_thickness, word_agreement
from course_lib.data import load_digits
from course_lib.guidance import Guided, caption_samples, cfg_combine, guided_samples
from course_lib.metrics import class_accuracy, class_spread, load_digit_classifier
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110
print(f"profile: {profile.name} | device: {device} | DDIM steps: {profile.sample_steps}")
print(f"digits sampled per guidance scale: {profile.style_samples}")
classifier = load_digit_classifier(device)

# %% [markdown]
# ## 1. Guidance from Bayes' rule
#
# The score of the conditional distribution splits: $\nabla \log p(x_t \mid c) = \nabla \log p(x_t) +
# \nabla \log p(c \mid x_t)$. Classifier guidance (Dhariwal & Nichol 2021) trains a classifier on noisy images for
# the second term and scales it by $w$. Classifier-free guidance needs no classifier: with
# $\epsilon = -\sigma_t \nabla\log p$, the classifier's term is $-(\epsilon(x_t, c) - \epsilon(x_t, \varnothing)) /
# \sigma_t$, so the guided prediction
#
# $$\hat\epsilon_w = \epsilon(x_t, \varnothing) + w\,\big(\epsilon(x_t, c) - \epsilon(x_t, \varnothing)\big)$$
#
# is the score of $p(x_t)\,p(c \mid x_t)^w$: the data, sharpened towards what makes $c$ likely. One network gives
# both terms when it is trained with the condition replaced by "no condition" $\varnothing$ 10% of the time.
#
# Checked on a case with exact scores: two classes in 1D, $p(x \mid c) = \mathcal N(\mu_c, 1)$ with $\mu = \mp 2$,
# equally likely. The guided score, built from the two scores as `cfg_combine` builds $\hat\epsilon_w$, equals the
# gradient of $\log p(x) + w \log p(c \mid x)$ taken by autograd:

# %%
# NBVAL_CHECK_OUTPUT
means = torch.tensor([-2.0, 2.0])


def log_p_given(x: torch.Tensor, c: int) -> torch.Tensor:  # log N(x; mu_c, 1)
    return -0.5 * (x - means[c]) ** 2 - 0.5 * torch.log(torch.tensor(2 * torch.pi))


def log_p(x: torch.Tensor) -> torch.Tensor:  # the mixture, p(c) = 1/2 each
    return torch.logsumexp(torch.stack([log_p_given(x, 0), log_p_given(x, 1)]), dim=0) - torch.log(torch.tensor(2.0))


def log_p_class(x: torch.Tensor, c: int) -> torch.Tensor:  # Bayes: log p(c | x) = log p(x | c) p(c) / p(x)
    return log_p_given(x, c) + math.log(0.5) - log_p(x)


def score(log_density, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(log_density(x).sum(), x)[0]


x = torch.linspace(-5, 5, 201, dtype=torch.float64)
c, worst = 1, 0.0
for w in (0.0, 1.0, 3.0, 8.0):
    guided_score = cfg_combine(score(log_p, x), score(lambda v: log_p_given(v, c), x), w)
    sharpened = score(lambda v, w=w: log_p(v) + w * log_p_class(v, c), x)
    worst = max(worst, (guided_score - sharpened).abs().max().item())
print("guided score = score of p(x) p(c|x)^w at w = 0, 1, 3, 8 (to 1e-12):", worst < 1e-12)

# %% [markdown]
# What the sharpened density looks like: at $w = 1$ it is $p(x \mid c)$; above 1 it leans away from the other
# class, further than the class itself does. For diffusion this holds at each noise level for the noised
# distributions; the chain of guided steps does not sample $p(x_0)p(c \mid x_0)^w$ exactly, which is one reason
# large $w$ degrades images.

# %%
for w in (0.0, 1.0, 3.0, 8.0):
    log_density = log_p(x) + w * log_p_class(x, c)
    density = log_density.exp() / (log_density.exp().sum() * (x[1] - x[0]))
    plt.plot(x, density, label=f"w = {w:g}")
plt.xlabel("x")
plt.ylabel(r"$p(x)\,p(c=1 \mid x)^w$, normalised")
plt.legend()
plt.show()

# %% [markdown]
# ## 2. The class-conditional model
#
# `UNet(num_classes=10)` adds a learned vector per label (and an 11th for "no label") to the time embedding.
# `scripts/train_unet.py --recipe unet_mnist_class` started it from the unconditional model of chapter 4 (label
# vectors at zero, so at step 0 it is that model) and fine-tuned it with 10% of the labels hidden.
#
# `Guided` wraps the model, the labels and the null label into a plain `model(x_t, t)` for any sampler; for
# $w \notin \{0, 1\}$ it runs the conditional and unconditional inputs as one doubled batch, as diffusers'
# pipelines do. `guided_samples` draws one sample per label in batches, from the same noise for every $w$.

# %%
card = load_card("unet_mnist_class")
model = load_model("unet_mnist_class", device)
schedule = make_schedule(**card["schedule"])
null = torch.tensor([card["model"]["num_classes"]])  # the label that means "no label"
print(card["training"]["status"], "|", card["condition"])
n = profile.style_samples
labels = torch.arange(n) % 10
live = {}
for scale in (0.0, 1.0, 3.0):
    samples, seconds = guided_samples(model, schedule, labels, null, scale, profile.sample_steps, device=device)
    live[scale] = samples
    print(f"w = {scale:g}: {n} digits in {seconds:.0f} s")
fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
for ax, (scale, samples) in zip(axes, live.items(), strict=True):
    show_images(samples[:30], nrow=10, ax=ax, title=f"w = {scale:g} (asked for 0..9 in each row)")
plt.show()

# %%
for scale, samples in live.items():
    print(f"w = {scale:g}: {class_accuracy(classifier, samples, labels):.0%} read as the asked-for digit")

# %% [markdown]
# At $w = 0$ the labels are ignored (10% is chance); at $w = 1$ most digits obey; at $w = 3$ more do, with thicker,
# more prototypical strokes.
#
# **Guidance and the clipped $\hat x_0$.** Those $w = 3$ samples were drawn with one detail that matters. DDIM
# clips $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$ to $[-1, 1]$ (chapter 4), and
# at $t = 999$, $1/\sqrt{\bar\alpha_t} \approx 2 \times 10^4$: the clip does most of the work. The step
# $x_{t'} = \sqrt{\bar\alpha_{t'}}\,\hat x_0 + \sqrt{1 - \bar\alpha_{t'}}\,\hat\epsilon$ then mixes a clipped
# $\hat x_0$ with an unclipped $\hat\epsilon$, two estimates that no longer describe the same $x_t$. For a plain
# model the mismatch is small; for guided noise, extrapolated beyond anything the network produced in training,
# it is not. `guided_samples` therefore re-derives the noise from the clipped estimate,
# $\hat\epsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0)/\sqrt{1 - \bar\alpha_t}$ (diffusers' DDIM option
# `use_clipped_model_output`), so each step is the DDIM step of a model that predicted the clipped $\hat x_0$.
# First the identity, on one guided step from pure noise; then the same $w = 3$ run with the unclipped noise:

# %%
# NBVAL_CHECK_OUTPUT
x_T = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3)).to(device)
t_start = torch.full((8,), schedule.T - 1, device=device)
with torch.no_grad():
    eps_guided = Guided(model, labels[:8].to(device), null.to(device), 3.0)(x_T, t_start)
alpha_bar = schedule.alpha_bar[-1].to(device)
x0_clipped = ((x_T - (1 - alpha_bar).sqrt() * eps_guided) / alpha_bar.sqrt()).clamp(-1, 1)
eps_rederived = (x_T - alpha_bar.sqrt() * x0_clipped) / (1 - alpha_bar).sqrt()


def mismatch(eps: torch.Tensor) -> float:  # how far x0_clipped and eps are from describing x_T
    return (alpha_bar.sqrt() * x0_clipped + (1 - alpha_bar).sqrt() * eps - x_T).abs().max().item()


print("re-derived noise and clipped x0_hat describe x_T (to 1e-5):", mismatch(eps_rederived) < 1e-5)
print("the guided noise and clipped x0_hat do (to 1e-5):", mismatch(eps_guided) < 1e-5)

# %%
unclipped_noise, _ = guided_samples(
    model, schedule, labels, null, 3.0, profile.sample_steps, device=device, use_clipped_model_output=False
)
print(
    f"w = 3: {class_accuracy(classifier, live[3.0], labels):.0%} read right with the re-derived noise, "
    f"{class_accuracy(classifier, unclipped_noise, labels):.0%} with the guided noise as it is"
)
show_images(unclipped_noise[:30], nrow=10, title="w = 3, the guided noise kept unclipped (asked for 0..9 in each row)")
plt.show()

# %% [markdown]
# ## 3. The guidance sweep
#
# What $w$ buys and costs, measured: conditional accuracy (the classifier reads the asked-for digit), FID against
# held-out digits (which includes variety), and diversity, the spread of the classifier's features within each
# class (`class_spread`, grouped by the digit the classifier reads, so that wrong-class samples do not count as
# variety) over that of real digits. `python scripts/bench.py guidance` measured 500 digits per $w$
# for six scales; the live points are this notebook's smaller run.

# %%
sweep = load_results("guidance")
print(f"benchmark: {sweep['n']} digits per w, DDIM-{sweep['steps']}, model {sweep['model_status']}")
runs = sweep["runs"]
scales = [run["scale"] for run in runs]
real_spread = sweep["real_spread"]
live_scores = {
    scale: (class_accuracy(classifier, x, labels), class_spread(classifier, x) / real_spread)
    for scale, x in live.items()
}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
axes[0].plot(scales, [run["accuracy"] for run in runs], "o-", label=f"benchmark (n = {sweep['n']})")
axes[0].plot(list(live_scores), [a for a, _ in live_scores.values()], "x", ms=10, label=f"live (n = {n})")
axes[0].set_ylabel("conditional accuracy")
fid_ratio = torch.tensor([run["fid"] / run["fid_floor"] for run in runs])
fid_band = torch.tensor([run["fid_sd"] / run["fid_floor"] for run in runs])  # the FID's bootstrap spread
axes[1].plot(scales, fid_ratio, "o-")
axes[1].fill_between(scales, fid_ratio - fid_band, fid_ratio + fid_band, alpha=0.25, label="± 1 sd (bootstrap)")
axes[1].set_ylabel("FID / real-vs-real floor")
axes[1].legend()
axes[2].plot(scales, [run["spread"] / real_spread for run in runs], "o-")
axes[2].plot(list(live_scores), [s for _, s in live_scores.values()], "x", ms=10)
axes[2].set_ylabel("spread within classes / real")
for ax in axes:
    ax.set_xlabel("guidance scale w")
axes[0].legend()
plt.tight_layout()
plt.show()
best = max(runs, key=lambda run: run["accuracy"])
lowest_fid = min(runs, key=lambda run: run["fid"])
print(
    f"best accuracy {best['accuracy']:.3f} at w = {best['scale']:g}; lowest FID {lowest_fid['fid']:.2f} "
    f"± {lowest_fid['fid_sd']:.2f} at w = {lowest_fid['scale']:g}"
)
for scale, (accuracy, spread) in live_scores.items():
    print(f"live w = {scale:g}: accuracy {accuracy:.2f}, spread / real {spread:.2f}")

# %% [markdown]
# ## 4. Captions and cross-attention
#
# Captions are made from what can be measured: the digit, its stroke thickness and its slant
# (`course_lib.captions`; the words come from fixed thresholds on the measures). Each training digit's caption is
# built from its own measurements, with each part left out 30% of the time and the whole caption 10% (the empty
# caption is the "no condition" of guidance), so the model also learns "a thick", "leaning left" on their own:
#
# The text-conditioned model reads the tokens through a two-layer Transformer and cross-attention at 7 x 7:
# queries from the image, keys and values from the tokens, exactly the pathway of Stable Diffusion's prompts.

# %%
digits, digit_labels = load_digits("train")
print("captions of the first train digits:", describe(digits[:4], digit_labels[:4]))
text_card = load_card("unet_mnist_text")
text_model = load_model("unet_mnist_text", device)
text_schedule = make_schedule(**text_card["schedule"])
print(text_card["training"]["status"], "|", text_card["condition"])
sizes = [28 // 2**level for level, on in enumerate(text_card["model"]["attention"]) if on]  # halved per level
print(f"text encoder {text_card['model']['text']}; cross-attention at", ", ".join(f"{k} x {k}" for k in sizes))
asked = torch.arange(n) % 10


def prompt_samples(words: dict, negative: str = "") -> torch.Tensor:
    """n samples of the prompts "a [words] DIGIT [words]" for each digit in turn, guided at w = 3."""
    return caption_samples(text_model, text_schedule, asked, words, negative, 3.0, profile.sample_steps, device)


shown = {}
for words in ({}, {"thickness": "thick"}, {"thickness": "thin"}, {"slant": "leaning left"}, {"slant": "leaning right"}):
    samples = prompt_samples(words)
    shown[caption(None, **words) or "(digit only)"] = samples
    agreement = f", {word_agreement(samples, **words):.0%} have the asked-for word" if words else ""
    print(
        f"{caption(7, **words).replace('seven', 'DIGIT')!r}: digit accuracy "
        f"{class_accuracy(classifier, samples, asked):.0%}{agreement}, thickness "
        f"{measure_thickness(samples).mean():.2f}, slant {measure_slant(samples).mean():.2f}"
    )
fig, axes = plt.subplots(1, len(shown), figsize=(15, 2.4))
for ax, (title, samples) in zip(axes, shown.items(), strict=True):
    show_images(samples[:20], nrow=10, ax=ax, title=title)
plt.show()

# %% [markdown]
# `python scripts/bench.py captions` measured the same on more samples per prompt:

# %%
prompt_bench = load_results("captions")
print(f"benchmark: {prompt_bench['n']} samples per prompt set, model {prompt_bench['model_status']}")
for row in prompt_bench["prompts"]:
    agreement = f"{row['word_agreement']:.0%}" if row["word_agreement"] is not None else "  - "
    print(
        f"  {caption(7, **row['words']).replace('seven', 'DIGIT')!r:28s} negative {row['negative']!r:10s}: digit "
        f"accuracy {row['digit_accuracy']:.0%}, word agreement {agreement}, thickness {row['thickness']:.2f}"
    )

# %% [markdown]
# ## 5. Negative prompts
#
# In the guidance formula the unconditional prediction is the point guidance pushes away from. Put a caption
# there, $\hat\epsilon = \epsilon(x_t, \text{neg}) + w\,(\epsilon(x_t, c) - \epsilon(x_t, \text{neg}))$, and the
# samples move away from what the negative caption describes. Diffusers' `negative_prompt` is exactly this. Plain
# digit prompts with the negative prompt "a thick", from the same noise as above:

# %%
pushed = prompt_samples({}, negative="a thick")
plain = shown["(digit only)"]
print(
    f"thickness: no negative prompt {measure_thickness(plain).mean():.2f}, negative 'a thick' "
    f"{measure_thickness(pushed).mean():.2f}; digit accuracy {class_accuracy(classifier, pushed, asked):.0%}"
)
show_images(torch.cat([plain[:10], pushed[:10]]), nrow=10, title="the same noise: no negative prompt / 'a thick'")
plt.show()

# %% [markdown]
# ## Recap
#
# - A class-conditional UNet adds a label embedding to the time embedding; an extra "no label" entry, trained in
#   place of the label 10% of the time, gives the unconditional model in the same network.
# - Classifier-free guidance extrapolates from the unconditional towards the conditional prediction,
#   $\hat\epsilon_w = \epsilon_\varnothing + w(\epsilon_c - \epsilon_\varnothing)$: the score of
#   $p(x_t)\,p(c \mid x_t)^w$ (checked on exact scores). One doubled batch computes both terms.
# - With $\hat x_0$ clipped, guided DDIM must re-derive the noise from the clipped estimate; kept as guided, the
#   two estimates disagree and strong guidance produces clean digits of the wrong class (measured).
# - Raising $w$ buys conditional accuracy and costs diversity: the spread within each class shrinks and FID,
#   which sees variety, rises past its best $w$ (the sweep, measured).
# - Captions reach the UNet through cross-attention on a small text encoder's tokens, Stable Diffusion's pathway;
#   each word's effect is measured by the classifier and image moments. A negative prompt takes the place of the
#   empty caption in the guidance formula, so guidance pushes away from it.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** The paper (Ho & Salimans 2021, eq. 6) writes guidance as
# $\tilde\epsilon = (1 + w')\,\epsilon_c - w'\,\epsilon_\varnothing$. Write `diffusers_scale(w_paper)`, the $w$ of
# this chapter (diffusers' `guidance_scale`) that gives the same prediction, and check it on random predictions.


# %% tags=["solution", "hide-input"]
def diffusers_scale(w_paper: float) -> float:
    ### BEGIN SOLUTION
    return 1.0 + w_paper
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
eps_c, eps_null = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
for w_paper in (0.0, 0.5, 2.0):
    paper = (1 + w_paper) * eps_c - w_paper * eps_null
    assert torch.allclose(cfg_combine(eps_null, eps_c, diffusers_scale(w_paper)), paper, atol=1e-6), w_paper
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** `Guided` runs one doubled batch. Compute the guided prediction of the class model at $w = 3$
# with two separate forward passes instead (labels, then the null label), and check that both ways agree.


# %% tags=["solution", "hide-input"]
def two_pass_guidance(xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    with torch.no_grad():
        cond = model(xt, t, labels)
        uncond = model(xt, t, torch.full_like(labels, card["model"]["num_classes"]))
    return uncond + scale * (cond - uncond)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
xt = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(5)).to(device)
t = torch.tensor([10, 200, 400, 600, 800, 990], device=device)
asked = torch.tensor([0, 1, 2, 7, 8, 9], device=device)
with torch.no_grad():
    batched = Guided(model, asked, null.to(device), 3.0)(xt, t)
assert torch.allclose(two_pass_guidance(xt, t, asked, 3.0), batched, atol=1e-4), "not the guided prediction"
print("exercise 2: correct")
