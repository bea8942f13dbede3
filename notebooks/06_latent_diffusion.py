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
# # Chapter 6: Latent diffusion
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/06_latent_diffusion.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F06_latent_diffusion.ipynb)
#
# Stable Diffusion does not denoise pixels: an autoencoder first squeezes each image into a smaller grid of
# latents, the diffusion model works there, and the decoder turns its sample back into pixels (Rombach et al.
# 2022). This chapter builds that pipeline for digits: a KL-regularised autoencoder from 1 x 28 x 28 to 4 x 7 x 7
# (4x fewer numbers), the scaling factor that makes its latents unit-variance, and a UNet trained on them; then it
# compares pixel and latent diffusion on cost and quality.
#
# By the end of this chapter you can:
#
# 1. write a VAE's reparameterised sample and KL term, and check them against diffusers;
# 2. measure what the round trip through the latents keeps (PSNR, classifier accuracy);
# 3. compute Stable Diffusion's scaling factor and show what goes wrong without it;
# 4. sample a latent diffusion model and compare its cost and FID with the pixel model's.

# %%
import math

import matplotlib.pyplot as plt
import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from course_lib.benchmark import ms_per_call
from course_lib.claims import check_claim, clearly_below
from course_lib.data import load_digits
from course_lib.metrics import class_accuracy, confident_fraction, load_digit_classifier, sample_scores
from course_lib.nets.vae import DiagonalGaussian
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile
from course_lib.sampling import IMAGE_SHAPE, LATENT_CLIP, LATENT_SHAPE, draw_samples
from course_lib.schedules import make_schedule
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
torch.set_num_threads(1)  # as chapter 5: steady speed on a shared 2-core machine
plt.rcParams["figure.dpi"] = 110
print(f"profile: {profile.name} | device: {device} | DDIM steps: {profile.sample_steps}")
print(f"digits sampled per model: {profile.sampler_samples}")

# %% [markdown]
# ## 1. The autoencoder
#
# The encoder maps a digit to a diagonal Gaussian over latents, $q(z \mid x) = \mathcal N(\mu(x),
# \mathrm{diag}\,\sigma^2(x))$, with $z$ of shape 4 x 7 x 7; the decoder maps $z$ back to pixels. Training
# (`scripts/train_vae.py`) minimises the squared reconstruction error plus a small multiple of the KL divergence
# to $\mathcal N(0, I)$ (Kingma & Welling 2014; Rombach et al. keep the weight tiny, here $10^{-3}$, so that the
# latents stay informative and the decoder sharp). Two pieces carry the maths:
#
# - the reparameterised sample $z = \mu + \sigma \odot \epsilon$, $\epsilon \sim \mathcal N(0, I)$, through which
#   gradients reach $\mu$ and $\sigma$;
# - the KL term, in closed form for diagonal Gaussians:
#   $\mathrm{KL} = \tfrac12 \sum_i (\mu_i^2 + \sigma_i^2 - 1 - \log \sigma_i^2)$.
#
# Both written out, against `course_lib.nets.vae.DiagonalGaussian` and diffusers' `DiagonalGaussianDistribution`
# (the class inside Stable Diffusion's `AutoencoderKL`):

# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(0)
encoder_output = torch.randn(3, 8, 7, 7, generator=generator)  # (B, 2 x 4 channels: mean, log-variance, 7, 7)
mean, logvar = encoder_output.chunk(2, dim=1)
my_kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))  # (B,)
my_sample = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
ours, theirs = DiagonalGaussian(encoder_output), DiagonalGaussianDistribution(encoder_output)
print(
    "KL equal to ours and diffusers':", bool(torch.allclose(my_kl, ours.kl())), bool(torch.allclose(my_kl, theirs.kl()))
)
same_sample = torch.allclose(my_sample, ours.sample(torch.Generator().manual_seed(1)))
print("sample equal:", same_sample, bool(torch.allclose(my_sample, theirs.sample(torch.Generator().manual_seed(1)))))

# %% [markdown]
# The shipped VAE and what its card recorded when `scripts/train_vae.py` trained it:

# %%
vae_card = load_card("vae_mnist")
vae = load_model("vae_mnist", device)
count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
print(f"encoder {count(vae.encoder):,d} and decoder {count(vae.decoder):,d} parameters")
training = vae_card["training"]
print(f"trained {training['epochs']} epochs ({training['wall_minutes']} min on {training['machine']})")
print(f"card, held-out: PSNR {vae_card['heldout']['psnr_db']} dB, {vae_card['heldout']['reconstruction_accuracy']:.1%}")

# %% [markdown]
# ## 2. The round trip
#
# Latent diffusion decodes the means $\mu(x)$ that it was trained on. How much of a held-out digit survives
# encoder and decoder? The PSNR measures pixels, the classifier of chapter 4 measures what matters here: is it
# still the same digit?

# %%
heldout, heldout_labels = (part[: profile.vae_digits] for part in load_digits("heldout"))
with torch.no_grad():
    latents = torch.cat([vae.encode(heldout[i : i + 250].to(device)).mode() for i in range(0, len(heldout), 250)])
    reconstructions = torch.cat([vae.decode(z) for z in latents.split(250)]).clamp(-1, 1).cpu()
latents = latents.cpu()  # (N, 4, 7, 7)
classifier = load_digit_classifier(device)
mse = (reconstructions - heldout).pow(2).mean().item()
psnr = 10 * math.log10(4 / mse)  # the pixel range [-1, 1] has width 2
reconstruction_accuracy = class_accuracy(classifier, reconstructions, heldout_labels)
print(
    f"{latents[0].numel()} numbers per digit instead of {heldout[0].numel()} "
    f"({heldout[0].numel() // latents[0].numel()}x fewer)"
)
print(
    f"{len(heldout)} held-out digits: PSNR {psnr:.1f} dB; classified right: {reconstruction_accuracy:.1%} "
    f"(the originals: {class_accuracy(classifier, heldout, heldout_labels):.1%})"
)
show_images(torch.cat([heldout[:8], reconstructions[:8]]), nrow=8, title="held-out digits / through the VAE")
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print("at least 97% of reconstructions read as the right digit:", reconstruction_accuracy >= 0.97)

# %% [markdown]
# What do the four latent channels hold? Each is a 7 x 7 map; shown for the first digits above, channel by channel:

# %%
fig, axes = plt.subplots(1, 4, figsize=(10, 1.6))
for channel, ax in enumerate(axes):
    show_images(latents[:8, channel : channel + 1] / latents[:, channel].abs().max(), nrow=8, ax=ax)
    ax.set_title(f"channel {channel}: std {latents[:, channel].std():.2f}", fontsize=9)
plt.show()

# %% [markdown]
# ## 3. The scaling factor
#
# The schedule assumes data of about unit variance: $x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1 - \bar\alpha_t}\,
# \epsilon$ mixes signal and noise in the proportion it was designed for only if $x_0$ has the scale of the noise.
# Stable Diffusion multiplies its latents by a `scaling_factor` (0.18215 for SD 1.x), one over their standard
# deviation on the training data. Ours, recomputed from the train digits and compared with the card:

# %%
scale = vae_card["scaling_factor"]
latent_std = latents.std().item()
print(f"card (train digits): scaling factor {scale:.4f}, i.e. latent std {1 / scale:.4f}")
print(f"these held-out latents: std {latent_std:.4f}, 1 / std = {1 / latent_std:.4f}")
print(f"scaled by the card's factor: std {(latents * scale).std():.3f}")

# %%
# NBVAL_CHECK_OUTPUT
print("held-out latents give the card's factor to within 2%:", abs(scale * latent_std - 1) < 0.02)

# %% [markdown]
# **What goes wrong without it, part 1: the schedule.** Data of standard deviation $s$ under the schedule has the
# signal-to-noise ratio $s^2\,\bar\alpha_t / (1 - \bar\alpha_t)$: the log-SNR curve of chapter 2 moves by
# $2 \log s$. With $s > 1$ the noisiest steps are not noisy enough (at $t = T-1$ the latent still shows through,
# and sampling from pure noise starts from the wrong distribution); with $s < 1$ the signal drowns early and most
# steps are spent on noise.

# %%
schedule = make_schedule("cosine", 1000)
log_snr = schedule.log_snr.double()
t_axis = torch.arange(schedule.T)
fig, ax = plt.subplots(figsize=(6, 3))
stds = {
    "scaled latents (std 1)": 1.0,
    f"our raw latents (std {latent_std:.2f})": latent_std,
    "SD 1.x raw latents (std 1 / 0.18215)": 1 / 0.18215,
}
for label, s in stds.items():
    shifted = log_snr + 2 * math.log(s)
    crossing = int((shifted < 0).nonzero()[0])
    ax.plot(t_axis, shifted, label=f"{label}: SNR = 1 at t = {crossing}")
    print(f"{label}: log-SNR at t = T-1: {shifted[-1]:.1f}; signal and noise equal at t = {crossing}")
ax.axhline(0, color="grey", linewidth=0.5)
ax.set(xlabel="t", ylabel="log SNR", title="the cosine schedule seen by latents of three scales")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# Our KL term keeps the raw latents within a factor of two of unit scale, so here the shift is modest. Stable
# Diffusion's autoencoder gives latents more than five times too large: without its factor, every log-SNR would
# rise by $2 \log 5.5 \approx 3.4$ and signal would still dominate far into the schedule (the third curve), so
# the model would be trained and sampled on a noise schedule other than the one it was designed with.
#
# ## 4. Latent diffusion
#
# The latent UNet (`python scripts/train_unet.py --recipe latent_mnist_eps`) is the chapter 4 UNet with 4 input
# channels, two levels (7 x 7 and 4 x 4) and attention at 4 x 4, trained with the pixel model's recipe (cosine
# schedule, eps prediction, min-SNR 5, 6,000 steps of batch 128) on the scaled latent means. Sampling is DDIM in
# latent space, then one decoder call: $x_0 = D(z_0 / \text{scale})$.
#
# Chapter 4 clipped the pixel model's $\hat x_0$ to $[-1, 1]$: at $t = T-1$ the cosine schedule keeps
# $\bar\alpha = 2.4 \times 10^{-9}$, and $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha}\,\hat\epsilon)/\sqrt{\bar\alpha}$
# multiplies the network's error by $2 \times 10^4$. Latents need the same guard, but not the pixel range: scaled
# latents are not confined to $[-1, 1]$. We clip to $\pm 4.5$, about the largest scaled latent of the data
# (`course_lib.sampling.LATENT_CLIP` gives the measurements behind the choice):

# %%
print(f"largest |scaled latent| of these held-out digits: {(latents * scale).abs().max():.2f}; clip at {LATENT_CLIP}")
latent_card = load_card("latent_mnist_eps")
latent_model = load_model("latent_mnist_eps", device)
pixel_model = load_model("unet_mnist_eps", device)
assert latent_card["latents"]["scaling_factor"] == scale, "the latent model was trained with another scale"
latent_schedule = make_schedule(**latent_card["schedule"])
print(f"latent UNet: {count(latent_model):,d} parameters; pixel UNet: {count(pixel_model):,d}")
print(f"latent model: {latent_card['training']['status']}, {latent_card['training']['wall_minutes']} min of training")


def sample_latent(n: int, scaling_factor: float = scale, clip: float | bool = LATENT_CLIP):
    """n digits and the seconds they took: DDIM in latent space (profile.sample_steps steps, x0_hat clipped to
    [-clip, clip]), then the decoder on z0 / scaling_factor, timed together."""
    decode = lambda z0: vae.decode(z0 / scaling_factor)  # noqa: E731
    return draw_samples(
        latent_model,
        latent_schedule,
        "DDIM",
        profile.sample_steps,
        n,
        seed=100,
        device=device,
        decoder=decode,
        shape=LATENT_SHAPE,
        clip_x0=clip,
    )


# %% [markdown]
# **Cost.** One network call on a batch of 50 (`ms_per_call`), then the whole sampling of
# `profile.sampler_samples` digits in each space (`draw_samples`, chapter 5's benchmark helper), timed in this run:

# %%
n = profile.sampler_samples
pixel_call, latent_call = ms_per_call(pixel_model, IMAGE_SHAPE), ms_per_call(latent_model, LATENT_SHAPE)
pixel_samples, pixel_seconds = draw_samples(
    pixel_model, schedule, "DDIM", profile.sample_steps, n, seed=100, device=device
)
latent_samples, latent_seconds = sample_latent(n)
print(
    f"one call, batch 50: pixel UNet {pixel_call:.0f} ms, latent UNet {latent_call:.0f} ms "
    f"({pixel_call / latent_call:.1f}x)"
)
print(
    f"{n} digits, DDIM-{profile.sample_steps}: pixels {pixel_seconds:.1f} s, latents + decoder "
    f"{latent_seconds:.1f} s ({pixel_seconds / latent_seconds:.1f}x faster per image)"
)

# %% [markdown]
# **Quality**, scored as in chapters 4 and 5: the FID of the classifier's features against as many held-out
# digits, beside the real-vs-real floor at that n, and the confident fraction.

# %%
scores = {"pixel": sample_scores(classifier, pixel_samples), "latent": sample_scores(classifier, latent_samples)}
print(f"n = {n}, real-vs-real floor FID {scores['pixel']['fid_floor']:.2f} ± {scores['pixel']['fid_floor_sd']:.2f}")
for name, score in scores.items():
    print(f"  {name:6s}: FID {score['fid']:6.2f} ± {score['fid_sd']:.2f}, confident {score['confident_fraction']:.2f}")
print(f"latent FID / pixel FID: {scores['latent']['fid'] / scores['pixel']['fid']:.2f}")
pixel, latent = scores["pixel"], scores["latent"]
check_claim(  # the recap says so
    not clearly_below(pixel["fid"], pixel["fid_sd"], latent["fid"], latent["fid_sd"]),
    "the latent model's FID is no worse than the pixel model's (beyond the spread)",
    f"latent {latent['fid']:.2f} ± {latent['fid_sd']:.2f}, pixel {pixel['fid']:.2f} ± {pixel['fid_sd']:.2f}",
    decisive=profile.name != "smoke",
)
fig, (ax_pixel, ax_latent) = plt.subplots(1, 2, figsize=(10, 3))
show_images(pixel_samples[:32], nrow=8, ax=ax_pixel, title=f"pixel DDIM-{profile.sample_steps}")
show_images(latent_samples[:32], nrow=8, ax=ax_latent, title=f"latent DDIM-{profile.sample_steps} + decoder")
plt.show()

# %% [markdown]
# A few hundred digits give a noisy FID. `python scripts/bench.py latent` measures both models on 500 digits
# each, in one run, and writes the table to `docs/benchmarks.md`.
#
# **Without the scaling factor, part 2: decoding.** The latent model samples *scaled* latents. Forgetting to
# divide by the factor before decoding (a classic Stable Diffusion bug) hands the decoder latents `scale` times
# too large. Whether that hurts depends on the factor: ours is 1.5, and the printed scores say how much this
# decoder minds; Stable Diffusion's latents would arrive 5.5 times off, far outside anything its decoder saw.

# %%
unscaled, _ = sample_latent(min(n, 100), scaling_factor=1.0)
print(
    f"decoded without dividing by {scale:.2f}: confident {confident_fraction(classifier, unscaled):.2f} "
    f"(with it: {confident_fraction(classifier, latent_samples[:100]):.2f})"
)
show_images(unscaled[:16], nrow=8, title="decoder given z0 instead of z0 / scale")
plt.show()

# %% [markdown]
# And without the clip of $\hat x_0$, from the same noise:

# %%
unclipped, _ = sample_latent(min(n, 100), clip=False)
print(f"latent DDIM without clipping x0_hat: confident {confident_fraction(classifier, unclipped):.2f}")
show_images(unclipped[:16], nrow=8, title="latent DDIM, x0_hat not clipped")
plt.show()

# %% [markdown]
# ## 5. Walking in latent space
#
# Pixels average badly: halfway between a 3 and a 7 in pixel space is two faint digits on top of each other. The
# decoder of a straight line between their latents passes through shapes that are each a single stroke pattern.

# %%
# a 3 and a 7, picked by label (the first held-out 3 and the first held-out 7)
pair = [int((heldout_labels == digit).nonzero()[0]) for digit in (3, 7)]
weights = torch.linspace(0, 1, 9)
pixel_path = torch.cat([(1 - w) * heldout[pair[0] : pair[0] + 1] + w * heldout[pair[1] : pair[1] + 1] for w in weights])
latent_path = torch.cat(
    [(1 - w) * latents[pair[0] : pair[0] + 1] + w * latents[pair[1] : pair[1] + 1] for w in weights]
)
with torch.no_grad():
    decoded_path = vae.decode(latent_path.to(device)).clamp(-1, 1).cpu()
fig, axes = plt.subplots(2, 1, figsize=(6, 1.8))
show_images(pixel_path, nrow=9, ax=axes[0], title="straight line in pixel space")
show_images(decoded_path, nrow=9, ax=axes[1], title="straight line in latent space, decoded")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Recap
#
# - A KL-regularised autoencoder turns a digit into 4 x 7 x 7 latents (4x fewer numbers) and back; the KL weight is
#   kept tiny so that almost everything survives the round trip (measured above: PSNR and classifier accuracy).
# - The diffusion model sees latents times the scaling factor, one over their standard deviation: the schedule's
#   SNR is only what it was designed to be for unit-variance data, and the decoder must get the latents back at
#   their own scale.
# - The same recipe trained in latent space samples faster per image, because each network call works on 49
#   positions instead of 784. The decoder's fidelity bounds what latent samples can look like (its round trip is
#   measured above), but on these digits that bound is not what limits them: the latent model's FID came out no
#   worse than the pixel model's (section 4, and `python scripts/bench.py latent` at n = 500).
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** Compute Stable Diffusion's scaling factor for our VAE yourself: `my_scaling_factor(vae, images)`
# as one over the standard deviation of the latent means. The card's comes from the 4,000 train digits; on the
# held-out digits of section 2 yours should agree with it to 2%.


# %% tags=["solution", "hide-input"]
def my_scaling_factor(vae, images) -> float:
    ### BEGIN SOLUTION
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i : i + 500].to(device)).mode() for i in range(0, len(images), 500)])
    return 1 / means.std().item()
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
assert abs(my_scaling_factor(vae, heldout) / vae_card["scaling_factor"] - 1) < 0.02, "not the card's factor"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Data of standard deviation $s$ noised by the schedule has log-SNR $\log \mathrm{SNR}_t + 2\log s$.
# Check it by Monte Carlo: noise the raw (unscaled) held-out latents of section 2 at $t = 400$ and compare the
# measured ratio of signal variance to noise variance with `predicted_log_snr(t, s)`.


# %% tags=["solution", "hide-input"]
def predicted_log_snr(t: int, s: float) -> float:
    ### BEGIN SOLUTION
    return schedule.log_snr[t].item() + 2 * math.log(s)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
t = 400
signal = schedule.alpha_bar[t].sqrt() * latents  # the part of x_t that is data
noise = (1 - schedule.alpha_bar[t]).sqrt() * torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
measured = math.log(signal.var().item() / noise.var().item())
assert abs(measured - predicted_log_snr(t, latent_std)) < 0.05, f"measured {measured:.3f}"
print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** How many times fewer numbers does the diffusion model handle per digit in latent space, and how
# many times fewer positions does each convolution visit? Write `compression(latent_shape, image_shape)` returning
# both.


# %% tags=["solution", "hide-input"]
def compression(latent_shape, image_shape) -> tuple[float, float]:
    ### BEGIN SOLUTION
    numbers = math.prod(image_shape) / math.prod(latent_shape)
    positions = (image_shape[-1] * image_shape[-2]) / (latent_shape[-1] * latent_shape[-2])
    return numbers, positions
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
assert compression((4, 7, 7), (1, 28, 28)) == (4.0, 16.0), compression((4, 7, 7), (1, 28, 28))
print("exercise 3: correct: 4x fewer numbers, 16x fewer positions per convolution")
