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
# DRAFT (not yet a chapter: it needs data/vae_mnist.* from scripts/train_vae.py and data/latent_mnist_eps.* from
# `python scripts/train_unet.py --recipe latent_mnist_eps`). Move to notebooks/06_latent_diffusion.py, add the
# Colab cell, run.
#
# # Chapter 6: Latent diffusion
#
# Stable Diffusion does not denoise pixels: an autoencoder first squeezes each image into a smaller grid of
# latents, the diffusion model works there, and the decoder turns its sample back into pixels (Rombach et al.
# 2022). This chapter builds that pipeline for digits: a KL-regularised autoencoder from 1 x 28 x 28 to 4 x 7 x 7
# (4x fewer numbers), the scaling factor that makes its latents unit-variance, and a UNet trained on them, then
# compares pixel and latent diffusion on cost and quality.
#
# By the end of this chapter you can:
#
# 1. write a VAE's encoder, decoder, reparameterised sample and KL term, and check them against diffusers;
# 2. measure what the round trip through the latents keeps (PSNR, classifier accuracy);
# 3. compute Stable Diffusion's scaling factor and show what goes wrong without it;
# 4. sample a latent diffusion model and compare its cost and FID with the pixel model's.

# %%
import time

import matplotlib.pyplot as plt
import torch

from course_lib.data import load_digits
from course_lib.metrics import class_accuracy, load_digit_classifier, sample_scores
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile
from course_lib.samplers import ddim_sample, slerp
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 80
print(f"profile: {profile.name} | device: {device} | DDIM steps: {profile.sample_steps}")

# %% [markdown]
# ## 1. The round trip
#
# The shipped VAE (`scripts/train_vae.py`) encodes each digit to a diagonal Gaussian over 4 x 7 x 7 latents;
# latent diffusion uses its mean. How much of the digit survives the decoder?

# %%
vae_card = load_card("vae_mnist")
vae = load_model("vae_mnist", device)
heldout, heldout_labels = load_digits("heldout")
with torch.no_grad():
    latents = vae.encode(heldout.to(device)).mode()  # (1000, 4, 7, 7)
    reconstructions = vae.decode(latents).clamp(-1, 1).cpu()
classifier = load_digit_classifier(device)
mse = (reconstructions - heldout).pow(2).mean().item()
print(f"latents {tuple(latents.shape[1:])}: {latents[0].numel()} numbers per digit instead of {heldout[0].numel()}")
print(
    f"PSNR {10 * torch.log10(torch.tensor(4 / mse)):.1f} dB; the classifier reads "
    f"{class_accuracy(classifier, reconstructions, heldout_labels):.1%} of them right "
    f"(originals: {class_accuracy(classifier, heldout, heldout_labels):.1%})"
)
show_images(torch.cat([heldout[:8], reconstructions[:8]]), nrow=8, title="held-out digits / through the VAE")
plt.show()

# %% [markdown]
# ## 2. The scaling factor
#
# The diffusion schedule assumes data of about unit variance: $x_t = \sqrt{\bar\alpha_t}\,x_0 +
# \sqrt{1 - \bar\alpha_t}\,\epsilon$ mixes signal and noise in that proportion only if $x_0$ has the noise's scale.
# Stable Diffusion multiplies its latents by a `scaling_factor` (0.18215 for SD 1.x), one over their standard
# deviation on the training data; ours:

# %%
scale = vae_card["scaling_factor"]
print(f"latent std {latents.std():.3f}; scaling factor {scale:.4f}; scaled std {(latents * scale).std():.3f}")

# %% [markdown]
# ## 3. Latent diffusion
#
# The latent UNet (`--recipe latent_mnist_eps`) works on 4 x 7 x 7. Sampling: DDIM in latent space, then one
# decoder call.

# %%
latent_card = load_card("latent_mnist_eps")
latent_model = load_model("latent_mnist_eps", device)
schedule = make_schedule(latent_card["schedule"]["name"], latent_card["schedule"]["T"])
n = profile.sampler_samples
z_T = torch.randn(n, 4, 7, 7, generator=torch.Generator().manual_seed(0)).to(device)
start = time.perf_counter()
with torch.no_grad():
    z0, _ = ddim_sample(latent_model, schedule, z_T, profile.sample_steps)
    samples = vae.decode(z0 / scale).clamp(-1, 1).cpu()
print(f"{n} digits in {time.perf_counter() - start:.1f} s")
scores = sample_scores(classifier, samples)
print(f"FID {scores['fid']:.2f} (floor {scores['fid_floor']:.2f}), confident {scores['confident_fraction']:.2f}")
show_images(samples[:32], nrow=8, title="latent diffusion samples")
plt.show()

# %% [markdown]
# ## 4. Walking in latent space
#
# Interpolating two digits' latents and decoding each point.

# %%
pair = latents[[1, 2]]
path = torch.cat([(1 - w) * pair[:1] + w * pair[1:] for w in torch.linspace(0, 1, 9).tolist()])
with torch.no_grad():
    show_images(vae.decode(path).clamp(-1, 1).cpu(), nrow=9, title="decoded straight line between two latents")
plt.show()
_ = slerp  # noise interpolation works as in chapter 5, on z_T
