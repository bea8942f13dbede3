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
# # Chapter 2: Noise schedules
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/02_noise_schedules.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F02_noise_schedules.ipynb)
#
# Chapter 1 noised data with one fixed sequence $\beta_0, \dots, \beta_{T-1}$. That sequence, the *noise
# schedule*, decides how fast the signal is destroyed, and so which noise levels the model trains on and the
# sampler walks through. This chapter compares the four schedules of the course on real digits.
#
# **Learning objectives**
#
# - State the course's timestep convention and read $\beta_t$, $\bar\alpha_t$ and the log-SNR off a schedule.
# - Derive $\bar\alpha_t$ by hand, as a cumulative product for the linear schedule and from the closed formula of
#   the cosine schedule, and check both against the library and against diffusers.
# - Compare the linear, cosine, quadratic and sigmoid schedules as curves, as a table and on one digit.
# - Measure how much of a digit survives the last step (the *terminal SNR*), and why a sampler that starts from
#   pure noise sees inputs the model was never trained on when that SNR is not zero.
#
# **Notation**: `T` steps, integer `t` in `0..T-1`, `beta`, `alpha = 1 - beta`, `alpha_bar`
# $=\bar\alpha_t = \prod_{s \le t}\alpha_s$, `snr` $=\bar\alpha_t / (1-\bar\alpha_t)$, `log_snr` its logarithm,
# `x0` the clean data, `xt` the noised data, `eps` the standard normal noise.

# %%
# %config InlineBackend.figure_format = "png"
import math

import matplotlib.pyplot as plt
import torch
from diffusers import DDPMScheduler

from course_lib.data import IMAGE_SIZE, load_digits, load_full_mnist
from course_lib.forward import q_sample
from course_lib.plotting import image_grid, show_strip
from course_lib.profiles import get_device, get_profile, randn_like
from course_lib.schedules import DIFFUSERS_BETA_SCHEDULE, SCHEDULE_NAMES, gather, make_schedule

plt.rcParams["figure.dpi"] = 110
profile = get_profile()
device = get_device()
print(f"profile: {profile.name} ({profile.toy_samples} noise draws per estimate), device: {device}")

# %% [markdown]
# ## The timestep convention
#
# One convention for the whole course, the same as diffusers': **$t$ is an integer in $0, \dots, T-1$**.
# $t = 0$ is the first and least noisy step, $t = T-1$ the last and noisiest; the clean data $x_0$ has no step
# of its own. So $\bar\alpha_0 = 1 - \beta_0$ is already (slightly) below 1, and the table `alpha_bar_prev`,
# $\bar\alpha_{t-1}$, is 1 at $t = 0$: "before step 0" is the clean data.
#
# A schedule is a set of float32 tables of length $T$, computed in float64. `gather` indexes a table with a batch
# of timesteps and shapes the result to broadcast against a batch of images.

# %%
# NBVAL_CHECK_OUTPUT
schedule = make_schedule("linear", T=1000)
print("T =", schedule.T, "| table length:", len(schedule.alpha_bar))
print("alpha_bar falls with t (t = 0 is the least noisy):", bool((schedule.alpha_bar.diff() < 0).all()))
print("alpha_bar_prev[0] == 1:", schedule.alpha_bar_prev[0].item() == 1.0)
print(
    "alpha_bar_prev[t] == alpha_bar[t-1] for t >= 1:", torch.equal(schedule.alpha_bar_prev[1:], schedule.alpha_bar[:-1])
)
print("diffusers' timesteps run from", DDPMScheduler(num_train_timesteps=1000).timesteps[[0, -1]].tolist())
print(
    "gather(alpha_bar, t of shape (2,), images (2, 1, 28, 28)) has shape",
    tuple(gather(schedule.alpha_bar, torch.tensor([0, 999]), torch.zeros(2, 1, IMAGE_SIZE, IMAGE_SIZE)).shape),
)

# %% [markdown]
# ## Derive: $\bar\alpha_t$ is a cumulative product
#
# Each step keeps a fraction $\alpha_t = 1 - \beta_t$ of the signal's variance, so after steps $0, \dots, t$
# (Ho et al. 2020, eq. 4)
#
# $$\bar\alpha_t = \prod_{s=0}^{t} (1 - \beta_s), \qquad
#   q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\, x_0,\ (1 - \bar\alpha_t) I\big).$$
#
# The linear schedule of Ho et al. spaces $\beta_t$ evenly from $10^{-4}$ to $0.02$ over $T = 1000$ steps.
# By hand, in float64: first the product written out for $t = 0, 1, 2$, then all of it with `cumprod`.

# %%
T = 1000
betas_by_hand = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
alpha_bar_by_hand = torch.cumprod(1 - betas_by_hand, dim=0)  # (T,)

written_out = [1 - betas_by_hand[0]]
for t in (1, 2):
    written_out.append(written_out[-1] * (1 - betas_by_hand[t]))
print("product written out:", [f"{value.item():.8f}" for value in written_out])
print("cumprod:            ", [f"{value.item():.8f}" for value in alpha_bar_by_hand[:3]])

# %% [markdown]
# Check against the library's table (float32, so we compare with a tolerance of float32 round-off):

# %%
# NBVAL_CHECK_OUTPUT
linear = make_schedule("linear", T=T)
print("betas agree:", torch.allclose(linear.betas.double(), betas_by_hand, rtol=1e-6, atol=0))
print("alpha_bar agrees:", torch.allclose(linear.alpha_bar.double(), alpha_bar_by_hand, rtol=1e-5, atol=0))
print(
    f"alpha_bar at t = T-1: {alpha_bar_by_hand[-1].item():.4e} (by hand), {linear.alpha_bar[-1].item():.4e} (library)"
)

# %% [markdown]
# ## Derive: the cosine schedule from its formula
#
# Nichol & Dhariwal (2021, eq. 17) define $\bar\alpha$ directly, as a function of the fraction of the process
# done, and derive the betas from it:
#
# $$f(\tau) = \cos^2\!\Big(\frac{\tau + s}{1 + s}\cdot\frac{\pi}{2}\Big), \qquad
#   \bar\alpha = \frac{f(\tau)}{f(0)}, \qquad s = 0.008,$$
#
# with $\beta = 1 - \bar\alpha_{\text{this step}} / \bar\alpha_{\text{previous step}}$ clipped at $0.999$.
# The paper counts steps $1, \dots, T$ and evaluates $f$ at $\tau = t_{\text{paper}} / T$. Our step $t$ is the
# paper's step $t + 1$, so in the course's convention
#
# $$\bar\alpha_t = \frac{f\big((t + 1)/T\big)}{f(0)}, \qquad t = 0, \dots, T-1.$$

# %%
s = 0.008
tau = (torch.arange(T, dtype=torch.float64) + 1) / T  # (T,), (t + 1) / T


def f(tau):
    return torch.cos((tau + s) / (1 + s) * math.pi / 2) ** 2


alpha_bar_cosine = f(tau) / f(torch.tensor(0.0, dtype=torch.float64))
print(f"alpha_bar at t = 0, T/2 - 1, T - 1: {[f'{alpha_bar_cosine[t].item():.4g}' for t in (0, T // 2 - 1, T - 1)]}")

# %% [markdown]
# At the last step the formula gives $f(1) = \cos^2(\pi/2) = 0$ (up to float round-off): a terminal
# $\bar\alpha$ of zero. The clip at $\beta = 0.999$ changes only that step. The offset $s$ keeps $\beta_0$ from
# being vanishingly small: the paper chose it so that $\sqrt{\beta_0}$ is just below one pixel bin, $1/127.5$.

# %%
# NBVAL_CHECK_OUTPUT
cosine = make_schedule("cosine", T=T)
print("alpha_bar agrees for t < T-1:", torch.allclose(cosine.alpha_bar[:-1].double(), alpha_bar_cosine[:-1], atol=1e-6))
print("steps where beta is clipped at 0.999:", (cosine.betas == torch.tensor(0.999)).nonzero().flatten().tolist())
print(f"alpha_bar at t = T-1: formula {alpha_bar_cosine[-1].item():.1e}, library {cosine.alpha_bar[-1].item():.3e}")
print(
    f"sqrt(beta_0) = {cosine.betas[0].sqrt().item():.5f} < 1/127.5 = {1 / 127.5:.5f}:",
    cosine.betas[0].sqrt().item() < 1 / 127.5,
)

# %% [markdown]
# ## Use: four schedules side by side
#
# From here on we use `make_schedule(name, T)`. Writing $u = t / (T-1)$ for the position in the process,
# the four schedules of the course are
#
# | name | definition |
# |---|---|
# | `linear` | $\beta_t = \beta_{start} + u\,(\beta_{end} - \beta_{start})$ (Ho et al. 2020) |
# | `cosine` | $\bar\alpha_t = f((t+1)/T) / f(0)$, above (Nichol & Dhariwal 2021) |
# | `quadratic` | $\sqrt{\beta_t} = \sqrt{\beta_{start}} + u\,(\sqrt{\beta_{end}} - \sqrt{\beta_{start}})$ |
# | `sigmoid` | $\beta_t = \beta_{start} + (\beta_{end} - \beta_{start})\,\sigma(12u - 6)$ (Xu et al. 2022, GeoDiff) |
#
# `quadratic` is diffusers' `scaled_linear`, the schedule of Stable Diffusion (Rombach et al. 2022) with other
# endpoints; `sigmoid` is diffusers' `sigmoid`, a sigmoid on $\beta$ from GeoDiff (Xu et al. 2022). It is not the
# sigmoid schedule of Jabri et al. 2023 and Chen 2023, which puts a sigmoid on $\bar\alpha$ itself, with a start, an
# end and a temperature $\tau$. These three take $\beta_{start} = 10^{-4}$, $\beta_{end} = 0.02$
# by default. The log-SNR,
# $\log\big(\bar\alpha_t / (1 - \bar\alpha_t)\big)$, is the most telling curve: it is positive while the signal
# has more variance than the noise and negative after.

# %%
schedules = {name: make_schedule(name, T=T) for name in SCHEDULE_NAMES}

fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
for name, schedule in schedules.items():
    axes[0].plot(schedule.betas, label=name)
    axes[1].plot(schedule.alpha_bar, label=name)
    axes[2].plot(schedule.log_snr, label=name)
axes[0].set(yscale="log", title=r"$\beta_t$ (log scale)", ylabel=r"$\beta_t$")
axes[1].set(title=r"$\bar\alpha_t$: the signal's share of the variance", ylabel=r"$\bar\alpha_t$")
axes[2].axhline(0, color="grey", lw=0.8)
axes[2].set(title="log-SNR", ylabel=r"$\log(\bar\alpha_t / (1 - \bar\alpha_t))$")
for ax in axes:
    ax.set_xlabel("t")
axes[1].legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The linear schedule destroys the signal early: its $\bar\alpha_t$ is close to zero long before $t = T-1$, so
# many of its steps are spent on inputs that are almost pure noise. Counted, with "almost pure noise" meaning an
# SNR below $0.01$ (the signal's standard deviation under a tenth of the noise's):

# %%
# NBVAL_CHECK_OUTPUT
for name, schedule in schedules.items():
    print(f"{name:>9s}: {int((schedule.snr < 0.01).sum()):4d} of {schedule.T} steps have SNR < 0.01")

# %% [markdown]
# ## Against $t/T$: what happens when $T$ changes
#
# The cosine schedule is a function of $t/T$: with fewer steps it traces the same curve, more coarsely.
# The other three fix $\beta_{start}$ and $\beta_{end}$ *per step*, so with fewer steps they add far less noise
# in total: for small betas, $\bar\alpha_{T-1} = \prod_t (1 - \beta_t) \approx \exp(-\sum_t \beta_t)$.

# %%
fig, axes = plt.subplots(1, 4, figsize=(13, 2.8), sharey=True)
for ax, name in zip(axes, SCHEDULE_NAMES, strict=True):
    for steps in (1000, 250, 50):
        schedule = make_schedule(name, T=steps)
        ax.plot((torch.arange(steps) + 1) / steps, schedule.log_snr, label=f"T = {steps}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title=name, xlabel="(t + 1) / T")
axes[0].set_ylabel("log-SNR")
axes[0].legend()
fig.tight_layout()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
for name in SCHEDULE_NAMES:
    ends = [make_schedule(name, T=steps).alpha_bar[-1].item() for steps in (1000, 50)]
    print(f"{name:>9s}: alpha_bar at t = T-1 is {ends[0]:.2e} with T = 1000 and {ends[1]:.2e} with T = 50")
betas_50 = make_schedule("linear", T=50).betas.double()
print(f"linear, T = 50: sum of betas {betas_50.sum().item():.3f}, exp(-sum) = {math.exp(-betas_50.sum().item()):.2e}")

# %% [markdown]
# With $T = 50$ the linear, quadratic and sigmoid schedules leave most of the signal in at the last step: a
# sampler started from pure noise there would start from the wrong distribution. This is why fast samplers
# (chapter 5) keep the $T = 1000$ training schedule and visit a subset of its steps, rather than build a short
# schedule with the same $\beta$ range.
#
# ## A table, checked against diffusers
#
# $\bar\alpha_t$ at a few steps, from the library, and in the same cell the largest difference over all $t$
# from diffusers' `DDPMScheduler(beta_schedule=...).alphas_cumprod` (diffusers computes in float32).

# %%
shown_t = [0, 250, 500, 750, 999]
print(f"{'t':>9s}" + "".join(f"{t:>11d}" for t in shown_t) + "   max |ours - diffusers|")
for name, schedule in schedules.items():
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule=DIFFUSERS_BETA_SCHEDULE[name]).alphas_cumprod
    max_diff = (schedule.alpha_bar - theirs).abs().max().item()
    assert max_diff <= 1e-5, f"{name}: alpha_bar differs from diffusers' by {max_diff:.2e} (more than 1e-5)"
    row = "".join(f"{schedule.alpha_bar[t].item():>11.4g}" for t in shown_t)
    print(f"{name:>9s}{row}   {max_diff:.1e}")

# %% [markdown]
# The same table as a check: values rounded to three significant digits, well above float noise.

# %%
# NBVAL_CHECK_OUTPUT
for name, schedule in schedules.items():
    print(f"{name:>9s}", [f"{schedule.alpha_bar[t].item():.3g}" for t in shown_t])

# %% [markdown]
# ## One digit under each schedule
#
# A digit from the shipped training set, noised with `q_sample` at the same $t$ under every schedule. One
# seeded $\epsilon$ is shared by every cell, so the only thing that changes along a row is $\bar\alpha_t$:
# $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\,\epsilon$.

# %%
images, labels = load_digits("train")  # (4000, 1, 28, 28) in [-1, 1], (4000,)
x0 = images[labels == 3][:1]  # (1, 1, 28, 28)
grid_t = torch.tensor([0, 100, 250, 400, 550, 700, 850, 999])
eps = randn_like(x0, torch.Generator().manual_seed(0))  # (1, 1, 28, 28), one noise image for every cell
x0_batch = x0.expand(len(grid_t), -1, -1, -1).to(device)  # (8, 1, 28, 28)
eps_batch = eps.expand(len(grid_t), -1, -1, -1).to(device)
rows = [q_sample(schedule, x0_batch, grid_t, eps_batch).cpu() for schedule in schedules.values()]

cell = IMAGE_SIZE + 2  # image_grid pads every image by 2 pixels
fig, ax = plt.subplots(figsize=(8, 4.4))
ax.imshow(image_grid(torch.cat(rows), nrow=len(grid_t)), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
ax.set_xticks([2 + cell * i + IMAGE_SIZE / 2 for i in range(len(grid_t))], [f"t={t}" for t in grid_t.tolist()])
ax.set_yticks([2 + cell * i + IMAGE_SIZE / 2 for i in range(len(rows))], list(schedules))
ax.tick_params(length=0)
ax.set_title("One digit, one noise image, four schedules")
plt.show()

# %% [markdown]
# The linear row loses the digit first; the cosine row keeps a trace of it longest. In the last column every
# row looks like the same noise image. But "looks like" is not "is": the next section measures
# what is left.
#
# ## Terminal SNR: what survives the last step
#
# At $t = T-1$ the model was trained on
# $x_{T-1} = \sqrt{\bar\alpha_{T-1}}\,x_0 + \sqrt{1 - \bar\alpha_{T-1}}\,\epsilon$.
# The *terminal SNR* is $\bar\alpha_{T-1} / (1 - \bar\alpha_{T-1})$; it is zero only if no signal is left.
# Alongside our four schedules we take the one Stable Diffusion trained with: `quadratic` with
# $\beta_{start} = 0.00085$, $\beta_{end} = 0.012$. Lin et al. (2024, Table 1) list its terminal SNR as 0.004682
# and $\sqrt{\bar\alpha_{T-1}}$ as 0.068265.

# %%
# NBVAL_CHECK_OUTPUT
terminal = dict(schedules)
terminal["quadratic (SD)"] = make_schedule("quadratic", T=T, beta_start=0.00085, beta_end=0.012)
print(f"{'schedule':>15s} {'SNR':>10s} {'log-SNR':>8s} {'sqrt(alpha_bar)':>16s}")
for name, schedule in terminal.items():
    snr_last, alpha_bar_last = schedule.snr[-1].item(), schedule.alpha_bar[-1].item()
    print(f"{name:>15s} {snr_last:10.4g} {math.log(snr_last):8.2f} {math.sqrt(alpha_bar_last):16.4g}")
sd_last = terminal["quadratic (SD)"]
print(
    "Stable Diffusion's row matches Lin et al.:",
    round(sd_last.snr[-1].item(), 6) == 0.004682 and round(sd_last.alpha_bar[-1].sqrt().item(), 6) == 0.068265,
)

# %% [markdown]
# ### How much of the digit is left
#
# Take the digit above and many noise draws. For each draw, the correlation over pixels between $x_0$ and
# $x_{T-1}$ is, to a good approximation, $a\sigma / \sqrt{a^2\sigma^2 + b^2}$ with $a = \sqrt{\bar\alpha_{T-1}}$,
# $b = \sqrt{1 - \bar\alpha_{T-1}}$ and $\sigma$ the standard deviation of the digit's pixels. We predict it and
# measure it (the standard error shrinks with the number of draws, which the profile sets).

# %%
n_draws = profile.toy_samples
eps_many = randn_like(x0.expand(n_draws, -1, -1, -1), torch.Generator().manual_seed(1)).to(device)  # (N, 1, 28, 28)
x0_many = x0.to(device).expand_as(eps_many)
x0_centred = (x0 - x0.mean()).flatten().to(device)  # (784,)
pixel_std = x0_centred.pow(2).mean().sqrt().item()
averages, measured = {}, {}
lines = [f"{'schedule':>15s} {'predicted':>10s} {'measured':>10s} {'std. error':>10s}"]
for name, schedule in terminal.items():
    xt = q_sample(schedule, x0_many, schedule.T - 1, eps_many).flatten(1)  # (N, 784)
    xt_centred = xt - xt.mean(dim=1, keepdim=True)
    corr = xt_centred @ x0_centred / (xt_centred.norm(dim=1) * x0_centred.norm())  # (N,), one per draw
    a, b = schedule.alpha_bar[-1].sqrt().item(), (1 - schedule.alpha_bar[-1]).sqrt().item()
    predicted = a * pixel_std / math.sqrt(a**2 * pixel_std**2 + b**2)
    measured[name] = (predicted, corr.mean().item(), corr.std().item() / math.sqrt(n_draws))
    averages[name] = xt.mean(dim=0).reshape(1, IMAGE_SIZE, IMAGE_SIZE).cpu()  # the mean of the N draws of x_{T-1}
    lines.append(f"{name:>15s} {predicted:10.5f} {measured[name][1]:10.5f} {measured[name][2]:10.5f}")
print("\n".join(lines))

# %% [markdown]
# One draw carries only a faint trace of the digit, but the trace is systematic: averaged over the draws, the noise
# cancels and the digit appears wherever $\sqrt{\bar\alpha_{T-1}}$ is not negligible (each average is rescaled
# to the full grey range). Over many training examples that trace is a signal a network can learn to use.

# %%
shown = [(m - m.min()) / (m.max() - m.min()) * 2 - 1 for m in averages.values()]  # each rescaled to [-1, 1]
axes = show_strip(shown, list(averages))
axes[0].figure.suptitle(f"The mean of {n_draws} draws of $x_{{T-1}}$", y=1.1)
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
print(
    "measured correlation within 5 standard errors of the prediction:",
    all(abs(p - m) < 5 * se for p, m, se in measured.values()),
)

# %% [markdown]
# ### The train/test mismatch, measured
#
# At sampling time the sampler has no $x_0$: it starts from $x_{T-1} \sim \mathcal N(0, I)$, which contains no
# signal at all. When the terminal SNR is not zero, that is not the distribution the model saw at $t = T-1$
# during training (Lin et al. 2024). The clearest place to see it is the lowest frequency, the mean brightness.
# Write $z = 28 \cdot \operatorname{mean}(x)$, the image's mean scaled so that $z \sim \mathcal N(0, 1)$ for
# pure noise. For a training input at $t = T-1$ it is shifted by $28\sqrt{\bar\alpha_{T-1}}\operatorname{mean}(x_0)$,
# and digits are mostly dark background ($\operatorname{mean}(x_0) < 0$). We noise every training digit once,
# draw as many pure-noise images, and compare.

# %%
generator = torch.Generator().manual_seed(2)
eps_train = randn_like(images, generator)  # (4000, 1, 28, 28), on the CPU: same numbers on every machine
eps_sampler = randn_like(images, generator)  # what a sampler starts from
z_sampler = IMAGE_SIZE * eps_sampler.mean(dim=(1, 2, 3))  # (4000,)
brightness = {}
for name, schedule in terminal.items():
    z_train = IMAGE_SIZE * q_sample(schedule, images, schedule.T - 1, eps_train).mean(dim=(1, 2, 3))  # (4000,)
    predicted = IMAGE_SIZE * schedule.alpha_bar[-1].sqrt().item() * images.mean().item()
    middle = (z_train.mean() + z_sampler.mean()) / 2  # the best threshold between two equal-width bells
    accuracy = ((z_train < middle).float().mean() + (z_sampler >= middle).float().mean()).item() / 2
    brightness[name] = (z_train, predicted, (z_train.mean() - z_sampler.mean()).item(), accuracy)

fig, axes = plt.subplots(1, len(terminal), figsize=(13, 2.6), sharey=True)
for ax, (name, (z_train, _, shift, _)) in zip(axes, brightness.items(), strict=True):
    ax.hist(z_sampler.numpy(), bins=40, range=(-4, 4), alpha=0.5, density=True, label="sampler: N(0, I)")
    ax.hist(z_train.numpy(), bins=40, range=(-4, 4), alpha=0.5, density=True, label="training, t = T-1")
    ax.set(title=f"{name}\nshift {shift:.2f}", xlabel="z = 28 * mean(x)")
axes[0].set_ylabel("density")
axes[0].legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# The shift is in units of the noise's own standard deviation. A single threshold on $z$ tells a training input
# from a sampler's starting point with the accuracy below (50% means they are indistinguishable). A second
# measure, from the DDPM bound (Ho et al. 2020, eq. 5), is the prior-matching term
# $L_T = D_{KL}\big(q(x_{T-1} \mid x_0)\,\|\,\mathcal N(0, I)\big)$, in closed form for two Gaussians with
# $d = 784$ pixels:
#
# $$L_T = \tfrac12\Big(\bar\alpha_{T-1}\,\|x_0\|^2 - d\,\bar\alpha_{T-1} - d\log(1 - \bar\alpha_{T-1})\Big).$$

# %%
# NBVAL_CHECK_OUTPUT
d = images[0].numel()
x0_norm2 = images.double().flatten(1).pow(2).sum(dim=1)  # (4000,)
print(f"{'schedule':>15s} {'shift: predicted':>16s} {'measured':>9s} {'accuracy':>9s} {'L_T (nats)':>11s}")
for name, (_, predicted, shift, accuracy) in brightness.items():
    alpha_bar_last = terminal[name].alpha_bar[-1].double()
    kl = 0.5 * (alpha_bar_last * x0_norm2 - d * alpha_bar_last - d * torch.log1p(-alpha_bar_last)).mean().item()
    predicted, shift = round(predicted, 2) + 0.0, round(shift, 2) + 0.0  # + 0.0 turns -0.0 into 0.0
    print(f"{name:>15s} {predicted:16.2f} {shift:9.2f} {accuracy:9.0%} {kl:11.2g}")

# %% [markdown]
# What this means for a sampler. With the cosine schedule, the model's inputs at $t = T-1$ are pure noise in
# training too: the sampler's start matches. With the others, the model learned at $t = T-1$ from inputs that are
# a little darker than noise, with a faint digit in them, and it is asked to start from inputs that are neither.
# Lin et al. show what that does to Stable Diffusion: the brightness that leaks through the last step is the
# only brightness it learned to produce, and it cannot generate very dark or very bright images. Their fixes
# are to rescale the schedule so that $\bar\alpha_{T-1} = 0$ exactly (exercise 3), to train with
# $v$-prediction (chapter 3), and to make samplers start at $t = T-1$ (chapter 5).
#
# ## Optional, online: the same measurement on full MNIST
#
# The shipped 4,000 training digits are enough for this chapter. Set `USE_FULL_MNIST = True` to repeat the
# brightness-shift prediction on the 60,000 digits of full MNIST, downloaded by torchvision; offline it says so in
# one line.

# %%
USE_FULL_MNIST = False

if USE_FULL_MNIST:
    try:
        full_images, _ = load_full_mnist()
        for name, schedule in terminal.items():
            shift = IMAGE_SIZE * schedule.alpha_bar[-1].sqrt().item() * full_images.mean().item()
            print(f"{name:>15s}: predicted brightness shift {shift:.2f} on {len(full_images)} digits")
    except ConnectionError as error:
        print(error)
else:
    print("USE_FULL_MNIST is False: the chapter uses the shipped digits only.")

# %% [markdown]
# ## Recap
#
# - A schedule is a table over integer steps $t = 0, \dots, T-1$ (diffusers' convention); $\bar\alpha_t$ is
#   the cumulative product of $1 - \beta_t$, and $\bar\alpha_{t-1}$ at $t = 0$ is 1, the clean data.
# - The linear schedule (Ho et al.) spends about a third of its steps at almost pure noise; the cosine schedule
#   (Nichol & Dhariwal) is defined through $\bar\alpha$ as a function of $t/T$ and spends far fewer. Schedules
#   defined by per-step betas change their total noise when $T$ changes; the cosine schedule does not.
# - Our tables equal diffusers' `alphas_cumprod` for all four schedules.
# - None of the common schedules reaches zero terminal SNR. Where it is visibly above zero (linear, sigmoid,
#   quadratic, Stable Diffusion's), the inputs the model trains on at $t = T-1$ differ measurably from the pure
#   noise a sampler starts from: a train/test mismatch (Lin et al. 2024).
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** Find the first $t$ at which the linear schedule's SNR falls below 1, i.e. the noise has more
# variance than the signal, and the same for the cosine schedule. How many more steps does the cosine schedule
# keep the signal on top? Why is this also the first $t$ at which $\bar\alpha_t < 1/2$?

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
t_linear = int((schedules["linear"].snr < 1).nonzero()[0])
t_cosine = int((schedules["cosine"].snr < 1).nonzero()[0])
print(f"SNR < 1 from t = {t_linear} (linear) and t = {t_cosine} (cosine): {t_cosine - t_linear} steps later")
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
assert t_linear == int((alpha_bar_by_hand < 0.5).nonzero()[0]), f"t_linear={t_linear}: SNR < 1 means alpha_bar < 1/2"
assert t_cosine == int((alpha_bar_cosine < 0.5).nonzero()[0]), f"t_cosine={t_cosine}: SNR < 1 means alpha_bar < 1/2"
assert schedules["linear"].snr[t_linear - 1] >= 1 > schedules["linear"].snr[t_linear], "not the *first* such t"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Write the quadratic betas yourself ($\sqrt{\beta_t}$ evenly spaced from $\sqrt{10^{-4}}$ to
# $\sqrt{0.02}$, then squared), compute their $\bar\alpha_t$ in float64 and compare with
# `make_schedule("quadratic")`.

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
betas_quadratic = torch.linspace(1e-4**0.5, 0.02**0.5, T, dtype=torch.float64) ** 2
alpha_bar_quadratic = torch.cumprod(1 - betas_quadratic, dim=0)
print(f"alpha_bar at t = T-1: {alpha_bar_quadratic[-1].item():.4e}")
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
library = schedules["quadratic"].alpha_bar.double()
assert alpha_bar_quadratic.shape == (T,), (
    f"need one alpha_bar per step, shape ({T},); got {tuple(alpha_bar_quadratic.shape)}"
)
assert torch.allclose(alpha_bar_quadratic, library, rtol=1e-5, atol=0), "your alpha_bar differs from the library's"
print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** Zero terminal SNR (Lin et al. 2024, Algorithm 1). Take Stable Diffusion's schedule,
# `terminal["quadratic (SD)"]`, and rescale $\sqrt{\bar\alpha_t}$ linearly so that it is unchanged at $t = 0$ and
# exactly 0 at $t = T-1$: subtract its last value, then multiply so that the first value is restored. Compute the
# new $\bar\alpha_t$ in float64. (Its last $\beta$ is 1; the check compares yours with diffusers' and with the
# library's `make_schedule(..., zero_terminal_snr=True)`, which chapter 11 trains a model on.)
# What is now the brightness shift of the training inputs at $t = T-1$?

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
sqrt_alpha_bar = terminal["quadratic (SD)"].alpha_bar.double().sqrt()
first, last = sqrt_alpha_bar[0], sqrt_alpha_bar[-1]
alpha_bar_zero_snr = ((sqrt_alpha_bar - last) * first / (first - last)) ** 2
shift_zero_snr = IMAGE_SIZE * alpha_bar_zero_snr[-1].sqrt().item() * images.mean().item()
print(f"alpha_bar at t = T-1: {alpha_bar_zero_snr[-1].item():.2g}, brightness shift there: {shift_zero_snr + 0.0:.2f}")
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
theirs = DDPMScheduler(
    num_train_timesteps=T,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    rescale_betas_zero_snr=True,
).alphas_cumprod.double()
assert alpha_bar_zero_snr[-1] == 0, f"the terminal alpha_bar must be exactly 0; got {alpha_bar_zero_snr[-1].item()}"
assert torch.isclose(alpha_bar_zero_snr[0], sqrt_alpha_bar[0] ** 2), "alpha_bar at t = 0 must not change"
assert (alpha_bar_zero_snr - theirs).abs().max() <= 1e-5, "differs from diffusers' rescale_betas_zero_snr=True"
library = make_schedule("quadratic", T, beta_start=0.00085, beta_end=0.012, zero_terminal_snr=True).alpha_bar
assert (alpha_bar_zero_snr - library.double()).abs().max() <= 1e-5, "differs from course_lib's zero_terminal_snr"
assert shift_zero_snr == 0, f"with zero terminal SNR no brightness leaks; got a shift of {shift_zero_snr}"
print("exercise 3: correct")
