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

# %% [markdown]
# DRAFT (not yet a chapter: it needs data/unet_mnist_class.* and data/unet_mnist_text.* from
# `python scripts/train_unet.py --recipe unet_mnist_class|unet_mnist_text`, and the guidance sweep of
# scripts/bench.py). Move to notebooks/07_guidance.py, add the Colab cell, run.
#
# # Chapter 7: Conditioning and classifier-free guidance
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
# 2. derive classifier-free guidance from Bayes' rule and implement it as one batched forward pass;
# 3. measure what the guidance scale does to accuracy and diversity;
# 4. condition on text through cross-attention, and check that every word of a prompt does what it says;
# 5. use a negative prompt, and say why it works.

# %%
import matplotlib.pyplot as plt
import torch

from course_lib.captions import caption, measure_slant, measure_thickness, tokenize
from course_lib.guidance import Guided, cfg_combine
from course_lib.metrics import class_accuracy, class_histogram, load_digit_classifier
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile
from course_lib.samplers import ddim_sample
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 80
print(f"profile: {profile.name} | device: {device} | DDIM steps: {profile.sample_steps}")
classifier = load_digit_classifier(device)

# %% [markdown]
# ## 1. Guidance from Bayes' rule
#
# The score of the conditional distribution splits: $\nabla \log p(x_t \mid c) = \nabla \log p(x_t) +
# \nabla \log p(c \mid x_t)$. Classifier guidance (Dhariwal & Nichol 2021) trains a classifier on noisy images for
# the second term and scales it by $w$. Classifier-free guidance needs no classifier: with
# $\epsilon \propto -\nabla\log p$, the classifier's term is $\epsilon(x_t, \varnothing) - \epsilon(x_t, c)$ (up to
# a factor), so
#
# $$\hat\epsilon_w = \epsilon(x_t, \varnothing) + w\,\big(\epsilon(x_t, c) - \epsilon(x_t, \varnothing)\big)$$
#
# samples from $p(x_t)\,p(c \mid x_t)^w$, sharpened towards what makes $c$ likely. One network gives both terms
# when it is trained with the condition replaced by "no condition" $\varnothing$ 10% of the time.

# %%
# NBVAL_CHECK_OUTPUT
uncond, cond = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
print("w = 0 is unconditional:", torch.equal(cfg_combine(uncond, cond, 0.0), uncond))
print("w = 1 is conditional:", torch.equal(cfg_combine(uncond, cond, 1.0), cond))
print("w = 3 extrapolates:", cfg_combine(uncond, cond, 3.0).tolist())

# %% [markdown]
# ## 2. The class-conditional model
#
# `UNet(num_classes=10)` adds a learned vector per label (and an 11th for "no label") to the time embedding.
# `scripts/train_unet.py --recipe unet_mnist_class` started it from the unconditional model of chapter 4 (label
# vectors at zero, so at step 0 it is that model) and fine-tuned it with 10% of the labels hidden.

# %%
card = load_card("unet_mnist_class")
model = load_model("unet_mnist_class", device)
schedule = make_schedule(card["schedule"]["name"], card["schedule"]["T"])
print(card["training"]["status"], "|", card["condition"])
labels = torch.arange(10).repeat_interleave(4).to(device)
x_T = torch.randn(len(labels), 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(device)
fig, axes = plt.subplots(1, 3, figsize=(12, 2.6))
for ax, scale in zip(axes, (0.0, 1.0, 3.0), strict=True):
    guided = Guided(model, labels, torch.tensor([10], device=device), scale)
    images = ddim_sample(guided, schedule, x_T, profile.sample_steps, clip_x0=True)[0].cpu()
    show_images(images, nrow=20, ax=ax, title=f"w = {scale}")
plt.show()

# %% [markdown]
# ## 3. The guidance sweep
#
# For each $w$: conditional accuracy (the classifier reads the asked-for digit), and diversity (the spread of
# the classifier's features within a class), from `profile.style_samples` digits per $w$.

# %%
scales = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0)
n = profile.style_samples
labels = (torch.arange(n) % 10).to(device)
x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
accuracy = []
for scale in scales:
    guided = Guided(model, labels, torch.tensor([10], device=device), scale)
    images = ddim_sample(guided, schedule, x_T, profile.sample_steps, clip_x0=True)[0].clamp(-1, 1)
    accuracy.append(class_accuracy(classifier, images, labels))
    print(
        f"w = {scale}: conditional accuracy {accuracy[-1]:.2f}, classes {class_histogram(classifier, images).tolist()}"
    )
plt.plot(scales, accuracy, "o-")
plt.xlabel("guidance scale w")
plt.ylabel("conditional accuracy")
plt.show()

# %% [markdown]
# ## 4. Captions and cross-attention
#
# Captions are made from what can be measured: the digit, its stroke thickness and its slant
# (`course_lib.captions`). The text-conditioned model reads the tokens through a two-layer Transformer and
# cross-attention at 7 x 7.

# %%
text_model = load_model("unet_mnist_text", device)
prompts = [caption(7, "thick", "leaning right"), caption(7, "thin", "leaning left"), caption(2, "", "upright")]
empty = tokenize([""]).to(device)
for prompt in prompts:
    tokens = tokenize([prompt]).to(device)
    x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(2)).to(device)
    images = ddim_sample(Guided(text_model, tokens, empty, 3.0), schedule, x_T, profile.sample_steps, clip_x0=True)[0]
    images = images.clamp(-1, 1).cpu()
    print(
        f"{prompt!r}: digit {class_histogram(classifier, images).argmax().item()}, "
        f"thickness {measure_thickness(images).mean():.2f}, slant {measure_slant(images).mean():.2f}"
    )

# %% [markdown]
# ## 5. Negative prompts
#
# Put a caption in the place of "no condition": guidance then pushes away from it. "a seven" with the negative
# prompt "thick" should give thinner sevens than "a seven" alone.

# %%
seven = tokenize(["a seven"]).to(device)
for negative in ("", "a thick"):
    guided = Guided(text_model, seven, tokenize([negative]).to(device), 3.0)
    images = ddim_sample(guided, schedule, x_T, profile.sample_steps, clip_x0=True)[0].clamp(-1, 1).cpu()
    print(f"negative prompt {negative!r}: thickness {measure_thickness(images).mean():.2f}")
