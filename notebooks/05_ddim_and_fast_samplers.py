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
# # Chapter 5: DDIM and faster samplers
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/05_ddim_and_fast_samplers.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F05_ddim_and_fast_samplers.ipynb)
#
# DDPM draws a digit with 1,000 network calls. This chapter gets the same digits from 10 to 50 calls, without
# retraining: DDIM (Song, Meng & Ermon 2021) changes the sampler, not the model. We derive it from the DDPM
# posterior, run it on the model of chapter 4, turn its noise up and down, meet two higher-order relatives
# (DPM-Solver++ and Euler on Karras noise levels), and use its determinism to map real digits back to noise and to
# walk between samples.
#
# By the end of this chapter you can:
#
# 1. derive the DDIM family of reverse steps from the requirement that the marginals $q(x_t \mid x_0)$ stay those
#    of training, and check that DDPM is one member of it;
# 2. sample with 10-100 steps, and say what the noise parameter $\eta$ changes;
# 3. compare samplers by wall time and FID, each beside the real-vs-real floor;
# 4. invert a real digit to noise with DDIM and measure how well it comes back;
# 5. interpolate between noises with slerp, and explain why not with a straight line.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch

from course_lib.benchmark import load_results
from course_lib.claims import check_claim, clearly_below
from course_lib.data import load_digits
from course_lib.ddpm import posterior
from course_lib.forward import q_sample
from course_lib.metrics import confident_fraction, load_digit_classifier, sample_scores
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile
from course_lib.samplers import ddim_invert, ddim_sample, ddim_step, slerp, spaced_timesteps
from course_lib.sampling import SAMPLERS, draw_samples
from course_lib.schedules import make_schedule
from course_lib.solvers import karras_sigmas, sigma_to_timestep
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
# One thread: on the course's shared 2-core test machine it kept its speed when other programs ran beside it.
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110  # keeps the stored figures small
print(f"profile: {profile.name} | device: {device}")
print(f"step counts swept: {profile.step_counts} | digits per sampler: {profile.sampler_samples}", end=" | ")
print(f"DDIM steps for demos: {profile.sample_steps}")

# %% [markdown]
# The model is chapter 4's shipped UNet (eps-prediction, cosine schedule, $T = 1000$); its card says how it was
# trained.

# %%
card = load_card("unet_mnist_eps")
model = load_model("unet_mnist_eps", device)
schedule = make_schedule(card["schedule"]["name"], card["schedule"]["T"])
T = schedule.T
training = card["training"]
print(f"unet_mnist_eps: {training['status']}, {training['steps_done']} of {training['steps']} steps")

# %% [markdown]
# ## 1. From the DDPM posterior to DDIM
#
# Training (chapter 3) only ever uses the marginals $q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0,
# (1 - \bar\alpha_t) I)$: the loss draws $x_t$ from them and asks for $\epsilon$. DDPM's reverse step comes from
# one particular way of linking neighbouring steps, the posterior $q(x_{t-1} \mid x_t, x_0)$ of the Markov forward
# chain. Any other link that keeps the same marginals would be trained by the very same loss.
#
# Song et al. look for a link from $x_t$ to an earlier $x_s$ ($s < t$, not necessarily $t - 1$) of the form
#
# $$q_\sigma(x_s \mid x_t, x_0) = \mathcal N\Big(\sqrt{\bar\alpha_s}\,x_0
#     + \sqrt{1 - \bar\alpha_s - \sigma^2}\;\frac{x_t - \sqrt{\bar\alpha_t}\,x_0}{\sqrt{1 - \bar\alpha_t}},\;
#     \sigma^2 I\Big).$$
#
# The fraction is the noise $\epsilon$ that made $x_t$ from $x_0$. If $x_t \sim q(x_t \mid x_0)$, then
# $x_s = \sqrt{\bar\alpha_s}\,x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\epsilon + \sigma z$ with two independent
# standard normals $\epsilon, z$: its mean is $\sqrt{\bar\alpha_s}\,x_0$ and its variance
# $(1 - \bar\alpha_s - \sigma^2) + \sigma^2 = 1 - \bar\alpha_s$. Every $\sigma$ from 0 to $\sqrt{1 -
# \bar\alpha_s}$ keeps the marginal of $x_s$ right. A Monte-Carlo check with one digit, a jump from $t = 600$ to
# $s = 300$ and three values of $\sigma$:

# %%
# NBVAL_CHECK_OUTPUT
x0 = load_digits("heldout")[0][0].flatten().double()  # one digit, 784 pixels
alpha_bar = schedule.alpha_bar.double()
t, s = 600, 300
generator = torch.Generator().manual_seed(0)
eps = torch.randn(4000, 784, generator=generator, dtype=torch.float64)
xt = alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * eps  # (4000, 784) draws of q(x_t | x0)
for sigma in [0.0, 0.5 * (1 - alpha_bar[s]).sqrt(), (1 - alpha_bar[s]).sqrt()]:
    direction = (xt - alpha_bar[t].sqrt() * x0) / (1 - alpha_bar[t]).sqrt()
    mean = alpha_bar[s].sqrt() * x0 + (1 - alpha_bar[s] - sigma**2).sqrt() * direction
    xs = mean + sigma * torch.randn(xt.shape, generator=generator, dtype=torch.float64)
    mean_error = (xs.mean(0) - alpha_bar[s].sqrt() * x0).abs().max()
    variance_error = (xs.var(0).mean() - (1 - alpha_bar[s])).abs()
    print(
        f"sigma = {sigma:.3f}: mean right to 0.1: {bool(mean_error < 0.1)}; variance right to 0.01: "
        f"{bool(variance_error < 0.01)}"
    )

# %% [markdown]
# DDPM is one member of the family: with $s = t - 1$ and $\sigma^2 = \tilde\beta_t$, the posterior variance of
# chapter 3, the mean of $q_\sigma$ is the posterior mean $\tilde\mu_t(x_t, x_0)$. Checked at every $t$ against
# `course_lib.ddpm.posterior`, in float64:

# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(1)
x0_batch = torch.rand(T - 1, 16, generator=generator, dtype=torch.float64) * 2 - 1
t_all = torch.arange(1, T)  # t = 1..T-1, s = t - 1
xt_batch = q_sample(schedule, x0_batch, t_all, torch.randn(T - 1, 16, generator=generator, dtype=torch.float64))
ab_t, ab_s = alpha_bar[t_all, None], alpha_bar[t_all - 1, None]
posterior_variance = schedule.posterior_variance.double()[t_all, None]
family_mean = (
    ab_s.sqrt() * x0_batch
    + (1 - ab_s - posterior_variance).sqrt() * (xt_batch - ab_t.sqrt() * x0_batch) / (1 - ab_t).sqrt()
)
ddpm_mean, _ = posterior(schedule, x0_batch, xt_batch, t_all)
print(
    "family mean with sigma^2 = posterior variance equals DDPM's posterior mean:",
    bool(torch.allclose(family_mean, ddpm_mean.double(), atol=1e-5)),
)

# %% [markdown]
# **Sampling.** We do not know $x_0$, but the network gives $\hat\epsilon$ and with it
# $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$. Putting both into $q_\sigma$
# gives the DDIM step (their eq. 12):
#
# $$x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1 - \bar\alpha_s - \sigma^2}\,\hat\epsilon + \sigma z,\qquad
#   \sigma = \eta\,\sqrt{\frac{1 - \bar\alpha_s}{1 - \bar\alpha_t}}\sqrt{1 - \frac{\bar\alpha_t}{\bar\alpha_s}}.$$
#
# $\eta$ scales the noise: $\eta = 1$ with $s = t - 1$ is DDPM (exercise 1), $\eta = 0$ adds none and makes
# sampling a deterministic function of $x_T$. Because the step may jump from $t$ to any $s$, a sampler can visit a
# sub-sequence of, say, 50 of the 1,000 timesteps. The step written out, against `course_lib.samplers.ddim_step`:


# %%
# NBVAL_CHECK_OUTPUT
def my_ddim_step(eps_hat, t, s, xt, z, eta):
    ab_t, ab_s = schedule.alpha_bar[t], schedule.alpha_bar[s]
    x0_hat = (xt - (1 - ab_t).sqrt() * eps_hat) / ab_t.sqrt()
    sigma = eta * ((1 - ab_s) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_s).sqrt()
    return ab_s.sqrt() * x0_hat + (1 - ab_s - sigma**2).sqrt() * eps_hat + sigma * z


generator = torch.Generator().manual_seed(2)
xt, eps_hat, z = (torch.randn(4, 1, 28, 28, generator=generator) for _ in range(3))
for eta in (0.0, 0.5, 1.0):
    library, _ = ddim_step(schedule, eps_hat, 700, 680, xt, noise=z, eta=eta)
    print(
        f"eta = {eta}: equal to ddim_step:",
        bool(torch.allclose(my_ddim_step(eps_hat, 700, 680, xt, z, eta), library, atol=1e-5)),
    )

# %% [markdown]
# Which sub-sequence? `spaced_timesteps` lays `steps` timesteps over $0..T-1$. The course uses "trailing" spacing
# (Lin et al. 2024), which always starts at $t = T - 1$, where $x_T$ really is almost pure noise; diffusers'
# default for DDIM, "leading", starts lower and so starts from noise the model has not seen at that $t$.

# %%
# NBVAL_CHECK_OUTPUT
for spacing in ("trailing", "leading", "linspace"):
    print(f"{spacing:9s} 10 steps: {spaced_timesteps(T, 10, spacing)}")

# %% [markdown]
# ## 2. Fewer steps, the same digits
#
# With $\eta = 0$ each $x_T$ has one sample, and as the number of steps grows the samples settle: DDIM then
# integrates an ODE (the step is Euler's method for it, in $\bar x = x/\sqrt{\bar\alpha}$ against
# $\sigma = \sqrt{(1 - \bar\alpha)/\bar\alpha}$), and more steps follow its path more closely. Same 8 noises,
# every step count of the sweep; the distance is the RMS pixel difference from the run with the most steps.

# %%
x_T = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3)).to(device)
runs = {}
start = time.perf_counter()
for steps in profile.step_counts:
    runs[steps] = ddim_sample(model, schedule, x_T, steps, clip_x0=True)[0].cpu()
print(f"{len(runs)} runs of 8 digits in {time.perf_counter() - start:.1f} s")
reference = runs[max(runs)]
fig, axes = plt.subplots(len(runs), 1, figsize=(5, 0.75 * len(runs)))
for ax, (steps, images) in zip(axes, runs.items(), strict=True):
    rms = (images - reference).pow(2).mean().sqrt().item()
    show_images(images, nrow=8, ax=ax)
    ax.set_title(f"DDIM-{steps}: RMS difference from DDIM-{max(runs)} {rms:.3f}", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The noise knob $\eta$
#
# $\eta > 0$ adds fresh noise at every step, so one $x_T$ gives many digits. Below, one $x_T$ and four noise
# seeds for each $\eta$: at $\eta = 0$ the four agree, and with more noise they drift apart, towards other
# digits at $\eta = 1$.

# %%
x_T = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(4)).to(device)
etas = (0.0, 0.5, 1.0)
fig, axes = plt.subplots(1, len(etas), figsize=(3 * len(etas), 1.2))
for ax, eta in zip(axes, etas, strict=True):
    draws = torch.cat(
        [
            ddim_sample(
                model, schedule, x_T, profile.sample_steps, eta, torch.Generator().manual_seed(seed), clip_x0=True
            )[0]
            for seed in range(4)
        ]
    ).cpu()
    spread = draws.std(0).mean().item()
    show_images(draws, nrow=4, ax=ax, title=f"eta = {eta}: spread {spread:.2f}")
plt.show()

# %% [markdown]
# Does the noise help or hurt quality? The DDIM paper found, on CIFAR-10 and CelebA, that with few steps
# $\eta = 0$ gives the best FID. That need not carry over: the fresh noise of a stochastic sampler also washes out
# errors made in earlier steps (Karras et al. 2022, section 4), and this model makes large ones in its first steps
# (chapter 4's $\hat x_0$ amplification), so on it $\eta = 1$ may well do better. Measured here:
# `profile.sampler_samples` digits for each $\eta$, at `profile.sample_steps` steps, scored with chapter 4's
# classifier: the fraction read with confidence $\geq 0.9$ and the FID against as many held-out digits, beside
# the floor that two real sets of that size score.

# %%
classifier = load_digit_classifier(device)
n = profile.sampler_samples
x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(5)).to(device)
print(f"{n} digits, DDIM-{profile.sample_steps}:")
eta_scores = {}
for eta in etas:
    generator = torch.Generator().manual_seed(6)
    samples = ddim_sample(model, schedule, x_T, profile.sample_steps, eta, generator, clip_x0=True)[0]
    scores = sample_scores(classifier, samples.clamp(-1, 1).cpu())
    fid_text = f"FID {scores['fid']:.2f} ± {scores['fid_sd']:.2f}"
    floor_text = f"floor {scores['fid_floor']:.2f} ± {scores['fid_floor_sd']:.2f}"
    print(f"  eta = {eta}: confident {scores['confident_fraction']:.2f}, {fid_text} ({floor_text})")
    eta_scores[eta] = scores
low, high = eta_scores[0.0], eta_scores[1.0]
apart = clearly_below(high["fid"], high["fid_sd"], low["fid"], low["fid_sd"]) or clearly_below(
    low["fid"], low["fid_sd"], high["fid"], high["fid_sd"]
)
print(f"eta = 0 and eta = 1 differ by more than twice their combined spread: {apart}")

# %% [markdown]
# ## 4. The sampler family
#
# DDIM with $\eta = 0$ is the simplest solver of the probability-flow ODE. Two others from diffusers' menu, each
# a plain loop in `course_lib.solvers` and equal step by step to the diffusers scheduler (tests/test_samplers.py):
#
# | sampler | network calls | integrates | noise added |
# |---|---|---|---|
# | DDPM (chapter 3) | $T$ = 1000 | the reverse Markov chain, ancestrally | every step |
# | DDIM, $\eta = 0$ | steps | the ODE in $(\bar x, \sigma)$, Euler's method | none |
# | DPM-Solver++(2M) | steps | the ODE in $\lambda$, exact in its linear part, second order | none |
# | Euler (Karras) | steps | the ODE in the VE form, Euler on $\rho = 7$ noise levels | none |
#
# DPM-Solver++ (Lu et al. 2022) integrates the linear part of the ODE exactly in the log-SNR time
# $\lambda = \log(\sqrt{\bar\alpha}/\sqrt{1 - \bar\alpha})$ and extrapolates $\hat x_0$ linearly from the last
# two calls; Karras et al. 2022 crowd the noise levels towards $\sigma_{min}$, where the path bends most.
# DPM-Solver++(2M) reuses the previous call's $\hat x_0$, so it is second order at the price of a first-order
# method. All four clip $\hat x_0$ to $[-1, 1]$ on this model (chapter 4 shows why).
#
# A live comparison: each sampler at two step counts, from the same `profile.sampler_samples` noises.

# %%
live_steps = profile.step_counts[1:3]
live = []
for sampler in SAMPLERS[1:]:  # all but DDPM, which is measured in the benchmark below
    for steps in live_steps:
        samples, seconds = draw_samples(model, schedule, sampler, steps, n, seed=7, device=device)
        live.append({"sampler": sampler, "steps": steps, "seconds": seconds, **sample_scores(classifier, samples)})
        live[-1]["grid"] = samples[:8]
print(f"{n} digits per run; floor FID at n = {n}: {live[0]['fid_floor']:.2f}")
print(f"{'sampler':18s} {'steps':>5s} {'s':>6s} {'FID':>6s} {'confident':>9s}")
for run in live:
    row = f"{run['sampler']:18s} {run['steps']:5d} {run['seconds']:6.1f}"
    print(f"{row} {run['fid']:6.2f} {run['confident_fraction']:9.2f}")

# %%
fig, axes = plt.subplots(len(live), 1, figsize=(5, 0.75 * len(live)))
for ax, run in zip(axes, live, strict=True):
    show_images(run["grid"], nrow=8, ax=ax)
    ax.set_title(f"{run['sampler']}, {run['steps']} steps", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# A live run of `profile.sampler_samples` digits gives a noisy FID, and DDPM-1000 takes minutes per hundred digits
# on a CPU. The full comparison, with DDPM-1000, is a benchmark of its own:
# `python scripts/bench.py samplers --samples 300 --threads 1` (75 minutes on one CPU thread, most of it DDPM-1000;
# on a GPU use the default 500 digits) writes `data/benchmarks/samplers.json` and the table in `docs/benchmarks.md`.
# Its measured results:

# %%
bench = load_results("samplers")
floor = bench["runs"][0]["fid_floor"]
print(f"{bench['model_status']}; {bench['n']} digits per sampler; {bench['machine']}")
print(f"{'sampler':18s} {'steps':>5s} {'ms/digit':>9s} {'FID ± sd':>13s} {'confident':>9s}")
for run in bench["runs"]:
    ms = 1000 * run["seconds"] / run["n"]
    fid_text = f"{run['fid']:.2f} ± {run['fid_sd']:.2f}"
    print(f"{run['sampler']:18s} {run['steps']:5d} {ms:9.1f} {fid_text:>13s} {run['confident_fraction']:9.3f}")

fig, (ax_fid, ax_time) = plt.subplots(1, 2, figsize=(10, 3.6))
for sampler in SAMPLERS:
    runs_of = [run for run in bench["runs"] if run["sampler"] == sampler]
    steps_of = [run["steps"] for run in runs_of]
    fid_of, band = torch.tensor([run["fid"] for run in runs_of]), torch.tensor([run["fid_sd"] for run in runs_of])
    line = ax_fid.plot(steps_of, fid_of, "o-", label=sampler)[0]
    ax_fid.fill_between(steps_of, (fid_of - band).clamp(min=0.1), fid_of + band, color=line.get_color(), alpha=0.2)
    ax_time.plot(steps_of, [1000 * run["seconds"] / run["n"] for run in runs_of], "o-", label=sampler)
ax_fid.axhline(floor, color="grey", linestyle="--", label=f"real-vs-real floor ({floor:.2f})")
ax_fid.set(xscale="log", yscale="log", xlabel="network calls per digit", ylabel="FID", title="quality (bands: ± 1 sd)")
ax_time.set(xscale="log", yscale="log", xlabel="network calls per digit", ylabel="ms per digit", title="cost")
ax_fid.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %%
runs_by = {(run["sampler"], run["steps"]): run for run in bench["runs"]}
ddpm, ddim50, ddim100 = runs_by["DDPM", 1000], runs_by["DDIM", 50], runs_by["DDIM", 100]
dpm20 = runs_by["DPM-Solver++(2M)", 20]
print(
    f"DDIM-50 makes {ddpm['steps'] // ddim50['steps']}x fewer network calls than DDPM-1000, at "
    f"{ddim50['fid'] / ddpm['fid']:.2f}x "
    f"its FID ({ddim50['fid']:.2f} ± {ddim50['fid_sd']:.2f} against {ddpm['fid']:.2f} ± {ddpm['fid_sd']:.2f}; "
    f"{'apart' if clearly_below(ddpm['fid'], ddpm['fid_sd'], ddim50['fid'], ddim50['fid_sd']) else 'within'} "
    "the spreads)"
)
print(
    f"DPM-Solver++(2M)-20 reaches {dpm20['fid'] / ddim100['fid']:.2f}x the FID of DDIM-100 with "
    f"{ddim100['steps'] // dpm20['steps']}x fewer calls ({dpm20['fid']:.2f} ± {dpm20['fid_sd']:.2f} against "
    f"{ddim100['fid']:.2f} ± {ddim100['fid_sd']:.2f})"
)

# %% [markdown]
# **Why Euler (Karras) lags on this model.** Its noise levels run from $\sigma_{max}$ down with $\rho = 7$, which
# crowds them at low noise, as EDM intends for $\sigma_{max} = 80$. The cosine schedule's last, clipped $\beta$
# puts this model's $\sigma_{max}$ at $2 \times 10^4$ (chapter 4), and then half the levels sit where the state is
# pure noise, all mapped to timesteps between 998 and 999:

# %%
levels = karras_sigmas(schedule, 10)[:-1]
capped = karras_sigmas(schedule, 10, sigma_max=80.0)[:-1]
print("sigma levels:        ", [f"{sigma:.3g}" for sigma in levels.tolist()])
print("their timesteps:     ", [f"{t:.1f}" for t in sigma_to_timestep(schedule, levels).tolist()])
print("capped at 80 (EDM):  ", [f"{sigma:.3g}" for sigma in capped.tolist()])
print("their timesteps:     ", [f"{t:.1f}" for t in sigma_to_timestep(schedule, capped).tolist()])
wasted = int((levels > 600).sum())
check_claim(wasted >= 5, "at least half of the 10 levels lie above sigma = 600", f"{wasted} of 10")

# %% [markdown]
# Samplers in the wild cap $\sigma_{max}$ (diffusers' `sigma_max`, EDM's 80); `euler_karras_sample(...,
# sigma_max=80.0)` does, and `draw_samples` passes it on. Before and after, from the same noise:

# %%
euler_steps = profile.step_counts[1]
euler_runs = {}
for label, cap in (("sigma_max 2e4", None), ("sigma_max 80", 80.0)):
    images, _ = draw_samples(model, schedule, "Euler (Karras)", euler_steps, n, seed=7, device=device, sigma_max=cap)
    euler_runs[label] = sample_scores(classifier, images)
    score = euler_runs[label]
    print(
        f"Euler (Karras)-{euler_steps}, {label}: FID {score['fid']:.2f} ± {score['fid_sd']:.2f}, "
        f"confident {score['confident_fraction']:.2f} (floor {score['fid_floor']:.2f})"
    )
before, after = euler_runs["sigma_max 2e4"], euler_runs["sigma_max 80"]
check_claim(
    clearly_below(after["fid"], after["fid_sd"], before["fid"], before["fid_sd"]),
    "capping sigma_max at 80 lowers Euler (Karras)'s FID by more than the spread",
    f"{before['fid']:.2f} ± {before['fid_sd']:.2f} -> {after['fid']:.2f} ± {after['fid_sd']:.2f} at n = {n}",
    decisive=profile.name != "smoke",
)

# %% [markdown]
# Read the curves from right to left: the cost is set by the network calls (the benchmark's wall times were
# measured on a shared CPU, so some points sit above the line the calls draw; `docs/benchmarks.md` says which),
# and the FID stays near DDPM's until the steps get few; where each sampler's curve bends up is how few steps it
# can live with. A gap between two FIDs counts only beyond twice their combined spread (`claims.clearly_below`),
# so bands that merely do not touch are not yet a difference.
#
# ## 5. DDIM inversion: from a digit to its noise
#
# With $\eta = 0$ the sampler is a deterministic map from $x_T$ to $x_0$, the discretised path of an ODE, and an
# ODE can be run backwards: `ddim_invert` takes the same steps upwards in $t$, from a real digit to the noise that
# DDIM would turn into it (Song et al., section 5.4). A step up from $s$ to $t$ would need $\hat\epsilon$ at the
# point it is going to; like diffusers' `DDIMInverseScheduler`, the inversion uses the one at the current point,
# so the round trip is not exact. Two errors compete: that approximation shrinks with more, smaller steps, but
# every step count also spends steps at the top of the schedule, where the state holds almost nothing of the digit
# (below). So the error need not fall steadily as the steps grow; the table says whether it does. Held-out digits
# (the first ones of the split: each a different digit), inverted and sampled back:

# %%
originals = load_digits("heldout")[0][: profile.inversion_images].to(device)
print(f"{'steps':>5s} {'RMS error':>9s} {'PSNR (dB)':>9s} {'x_T mean':>8s} {'x_T std':>7s}")
round_trips = {}
for steps in profile.step_counts:
    inverted, _ = ddim_invert(model, schedule, originals, steps)
    back, _ = ddim_sample(model, schedule, inverted, steps, clip_x0=True)
    mse = (back.clamp(-1, 1) - originals).pow(2).mean().item()
    psnr = 10 * math.log10(4 / mse)  # the pixel range [-1, 1] has width 2
    round_trips[steps] = (inverted.cpu(), back.cpu())
    print(f"{steps:5d} {mse**0.5:9.3f} {psnr:9.1f} {inverted.mean():8.2f} {inverted.std():7.2f}")

# %%
best = min(round_trips, key=lambda steps: (round_trips[steps][1] - originals.cpu()).pow(2).mean())
inverted, back = round_trips[best]
show_images(
    torch.cat([originals.cpu(), inverted.clamp(-1, 1), back]),
    nrow=len(originals),
    title=f"held-out digits / their DDIM-{best} noise / sampled back",
)
plt.show()

# %% [markdown]
# The inverted noise is not a typical draw of $\mathcal N(0, I)$: its spread stays below 1 and it keeps the
# digit's outline. And the round trip loses the most at the top of the schedule: at $t = T-1$ the cosine schedule
# keeps $\sqrt{\bar\alpha_{T-1}} \approx 5 \times 10^{-5}$ of the digit in $x_t$, far below the network's error in
# $\hat\epsilon$ there, so a step through that region cannot carry the digit's details (chapter 4's $\hat x_0$
# amplification, seen from the other side). Image editing by inversion (Mokady et al. 2023) therefore inverts only
# part of the way, or corrects the path.
#
# ## 6. Walking between noises
#
# Two noises $a, b$ in $D = 784$ dimensions have norms near $\sqrt D = 28$ and are nearly orthogonal. The straight
# line between them dips to a norm near $\sqrt{D/2} \approx 20$ in the middle: noise of a size the model never saw
# at $t = T-1$. Spherical interpolation (`slerp`) follows the arc and keeps the norm.

# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(8)
a, b = torch.randn(1, 1, 28, 28, generator=generator), torch.randn(1, 1, 28, 28, generator=generator)
weights = torch.linspace(0, 1, 9).tolist()
lerp_path = [(1 - w) * a + w * b for w in weights]
slerp_path = [slerp(a, b, w) for w in weights]
print("norm along the line:", [round(x.norm().item()) for x in lerp_path])
print("norm along the arc: ", [round(x.norm().item()) for x in slerp_path])

# %%
decoded = {
    name: ddim_sample(model, schedule, torch.cat(path).to(device), profile.sample_steps, clip_x0=True)[0].cpu()
    for name, path in (("straight line", lerp_path), ("slerp", slerp_path))
}
fig, axes = plt.subplots(2, 1, figsize=(6, 1.8))
for ax, (name, images) in zip(axes, decoded.items(), strict=True):
    show_images(images, nrow=9, ax=ax)
    ax.set_title(f"{name}: confident fraction {confident_fraction(classifier, images):.2f}", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# Inversion and slerp together walk between two real digits: invert both, interpolate their noises, sample back.

# %%
heldout_images, heldout_labels = load_digits("heldout")
pair = heldout_images[[int((heldout_labels == digit).nonzero()[0]) for digit in (3, 7)]].to(device)  # a 3, a 7
steps = profile.step_counts[1]
noise_pair, _ = ddim_invert(model, schedule, pair, steps)
path = torch.cat([slerp(noise_pair[:1], noise_pair[1:], w) for w in weights])
walk = ddim_sample(model, schedule, path, steps, clip_x0=True)[0].cpu()
show_images(walk, nrow=9, title=f"from a held-out 3 to a held-out 7 (DDIM-{steps} inversion, slerp)")
plt.show()

# %% [markdown]
# ## Recap
#
# - Training fixes only the marginals $q(x_t \mid x_0)$. The DDIM family $q_\sigma(x_s \mid x_t, x_0)$ keeps them
#   for every $\sigma$ and any jump $t \to s$; $\sigma^2 = \tilde\beta_t$ with $s = t - 1$ is DDPM.
# - DDIM plugs $\hat x_0$ and $\hat\epsilon$ into it; $\eta$ scales the noise. With $\eta = 0$ it is a
#   deterministic ODE solver: 50 steps of it cost 20x fewer network calls than DDPM-1000, for recognisable digits
#   at a higher FID on this model (the benchmark measures how much higher).
# - DPM-Solver++(2M) and Euler on Karras noise levels solve the same ODE with other steps; a benchmark, timed and
#   scored beside the real-vs-real floor, says which is worth how many calls.
# - Deterministic sampling can be run backwards (inversion); a digit survives the round trip except for what the
#   top of the schedule destroys, and more steps do not always make the round trip better.
# - Slerp keeps the norm of the noise the model was trained on, the line does not; on a path of nine samples the
#   confident fractions of the two (section 6) are too few to rank them.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** Show that DDIM with $\eta = 1$ and $s = t - 1$ has DDPM's variance: write `sigma_squared(t)`
# from the $\sigma$ formula of section 1 and compare it with `schedule.posterior_variance` at every $t \geq 1$.


# %% tags=["solution", "hide-input"]
def sigma_squared(t: int, eta: float = 1.0) -> float:
    ### BEGIN SOLUTION
    ab_t, ab_s = alpha_bar[t], alpha_bar[t - 1]
    return (eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)).item()
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
ours = torch.tensor([sigma_squared(t) for t in range(1, T)], dtype=torch.float64)
# rtol 1e-3: the float32 tables round 1 - alpha_bar near t = 0 in the fourth digit
assert torch.allclose(ours, schedule.posterior_variance.double()[1:], rtol=1e-3), "not DDPM's variance"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** DPM-Solver++'s first-order step is
# $x_s = \frac{\sigma_s}{\sigma_t}x_t - \alpha_s(e^{-h} - 1)\,\hat x_0$ with $\alpha = \sqrt{\bar\alpha}$,
# $\sigma = \sqrt{1 - \bar\alpha}$, $\lambda = \log(\alpha/\sigma)$ and $h = \lambda_s - \lambda_t$. Write it as
# `dpm_first_order(x0_hat, xt, t, s)` and show that it is deterministic DDIM (`ddim_step` with $\eta = 0$), for an
# eps-prediction `eps_hat` and its `x0_hat`.


# %% tags=["solution", "hide-input"]
def dpm_first_order(x0_hat, xt, t, s):
    ### BEGIN SOLUTION
    alpha_t, sigma_t = alpha_bar[t].sqrt(), (1 - alpha_bar[t]).sqrt()
    alpha_s, sigma_s = alpha_bar[s].sqrt(), (1 - alpha_bar[s]).sqrt()
    h = torch.log(alpha_s / sigma_s) - torch.log(alpha_t / sigma_t)
    return sigma_s / sigma_t * xt - alpha_s * (torch.exp(-h) - 1) * x0_hat
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(9)
xt, eps_hat = (torch.randn(4, 1, 28, 28, generator=generator, dtype=torch.float64) for _ in range(2))
for t, s in [(999, 899), (500, 450), (100, 20)]:
    ddim_next, x0_hat = ddim_step(schedule, eps_hat, t, s, xt)
    assert torch.allclose(dpm_first_order(x0_hat, xt, t, s), ddim_next, atol=1e-6), f"differs at t={t}"
print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** For independent standard normals $a, b \in \mathbb R^D$, what is the expected squared norm of
# $(1 - w)\,a + w\,b$? Write it as `expected_square_norm(w, D)` and check it on 2,000 pairs at $w = 0.5$; how
# does slerp compare?


# %% tags=["solution", "hide-input"]
def expected_square_norm(w: float, D: int) -> float:
    ### BEGIN SOLUTION
    return ((1 - w) ** 2 + w**2) * D
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(10)
a, b = torch.randn(2000, 784, generator=generator), torch.randn(2000, 784, generator=generator)
measured = (0.5 * a + 0.5 * b).pow(2).sum(1).mean().item()
assert abs(measured / expected_square_norm(0.5, 784) - 1) < 0.01, f"measured {measured:.1f}"
arc_norm = torch.stack([slerp(a[i], b[i], 0.5).norm() for i in range(100)]).mean().item()
print("exercise 3: correct; slerp keeps the norm near sqrt(784) = 28:", abs(arc_norm - 28) < 1)
