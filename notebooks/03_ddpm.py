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
# # Chapter 3: DDPM, the maths and a first trained denoiser
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/03_ddpm.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F03_ddpm.ipynb)
#
# Chapters 1 and 2 built the forward process $q(x_t \mid x_0)$ that turns data into noise. This chapter runs it
# backwards. We derive what the reverse step should be, turn the evidence lower bound (ELBO) into the one-line loss
# that everyone trains with, and then train a small MLP on 1D and 2D data whose exact density we know, so that we
# can measure how good its samples are.
#
# By the end of this chapter you can:
#
# 1. derive the posterior $q(x_{t-1} \mid x_t, x_0)$ and check it against Bayes' rule on a grid;
# 2. go from the ELBO to the simple loss $\lVert \epsilon - \hat\epsilon \rVert^2$, and say what weight Ho et al.
#    dropped and why;
# 3. convert between the eps, x0 and v parameterisations;
# 4. train an MLP denoiser with DDPM and sample from it with the ancestral sampler;
# 5. judge the samples with distances read beside their floor, and against a sampler that uses the exact optimal
#    denoiser.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch.distributions import Normal, kl_divergence

from course_lib.ddpm import (
    ddpm_sample,
    ddpm_step,
    eps_from_v,
    eps_from_x0,
    posterior,
    simple_loss,
    v_from_x0_eps,
    x0_from_eps,
    x0_from_v,
)
from course_lib.forward import q_sample
from course_lib.metrics import mode_proportions, sliced_wasserstein, wasserstein_1d
from course_lib.nets.embedding import timestep_embedding
from course_lib.nets.mlp import MLPDenoiser
from course_lib.plotting import plot_losses
from course_lib.profiles import get_device, get_profile
from course_lib.schedules import make_schedule
from course_lib.toy import bimodal_1d, ring_2d
from course_lib.train import train_denoiser

profile = get_profile()
device = get_device()
# This chapter's networks are tiny: on the course's 2-core test machine one CPU thread trained them as fast as two,
# and kept that speed when other programs shared the cores, where two threads slowed down 5-20x.
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110  # keeps the stored figures small
print(f"profile: {profile.name} | device: {device}")
print(f"per model: {profile.toy_samples} training points, {profile.toy_train_steps} steps of batch", end=" ")
print(f"{profile.toy_batch_size}, {profile.toy_model_samples} samples")

# %% [markdown]
# ## 1. A schedule for the toy problems
#
# Ho et al. use a linear schedule with $T = 1000$ and $\beta_t$ from $10^{-4}$ to $0.02$. Every sample costs one
# network call per step, so we take $T = 200$ and multiply both ends by $1000 / 200 = 5$: each step of the short
# chain then does the work of five steps of the long one, and $\bar\alpha_t$ follows the same curve. The network
# also has 5 times fewer distinct $t$ to learn. Whether 200 steps are enough is not a matter of faith: section 7
# measures how close a sampler that uses the *exact* optimal denoiser on this schedule comes to the data.

# %%
# NBVAL_CHECK_OUTPUT
T = 200
schedule = make_schedule("linear", T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
ho_schedule = make_schedule("linear", 1000)
# step t of the short chain ends where step 5t + 4 of the long one ends
gap = (schedule.alpha_bar - ho_schedule.alpha_bar[4::5]).abs().max().item()
print(f"max |alpha_bar_t (T=200) - alpha_bar_5t+4 (T=1000)| = {gap:.3f}")
print(f"alpha_bar at t = T-1: {schedule.alpha_bar[-1].item():.1e} (the last state is pure noise)")

# %% [markdown]
# ## 2. The posterior $q(x_{t-1} \mid x_t, x_0)$
#
# The reverse step $q(x_{t-1} \mid x_t)$ depends on the whole data distribution and has no closed form. Once we
# also condition on $x_0$ it does. Bayes' rule, with the Markov property $q(x_t \mid x_{t-1}, x_0) = q(x_t \mid
# x_{t-1})$:
#
# $$q(x_{t-1} \mid x_t, x_0) \propto q(x_t \mid x_{t-1})\, q(x_{t-1} \mid x_0)
#   = \mathcal N\big(x_t;\ \sqrt{\alpha_t}\, x_{t-1},\ \beta_t\big)\
#   \mathcal N\big(x_{t-1};\ \sqrt{\bar\alpha_{t-1}}\,x_0,\ 1 - \bar\alpha_{t-1}\big).$$
#
# The log of the right-hand side is a quadratic in $x_{t-1}$, so the posterior is Gaussian. Collecting the
# $x_{t-1}^2$ and $x_{t-1}$ terms gives its precision and its mean:
#
# $$\frac{1}{\tilde\beta_t} = \frac{\alpha_t}{\beta_t} + \frac{1}{1 - \bar\alpha_{t-1}}
#   = \frac{1 - \bar\alpha_t}{\beta_t\,(1 - \bar\alpha_{t-1})},\qquad
#   \tilde\mu_t = \tilde\beta_t\Big(\frac{\sqrt{\alpha_t}}{\beta_t}\,x_t
#   + \frac{\sqrt{\bar\alpha_{t-1}}}{1 - \bar\alpha_{t-1}}\,x_0\Big)
#   = \frac{\sqrt{\bar\alpha_{t-1}}\,\beta_t}{1 - \bar\alpha_t}\,x_0
#   + \frac{\sqrt{\alpha_t}\,(1 - \bar\alpha_{t-1})}{1 - \bar\alpha_t}\,x_t$$
#
# (Ho et al. 2020, eq. 6-7). With the course's indexing, at $t = 0$ the "previous" state is $x_0$ itself
# ($\bar\alpha_{-1} = 1$), so the posterior is the point $x_0$; the formulas are for $t \ge 1$.
# First the derivation in a few lines of torch (float64), against `course_lib.ddpm.posterior`:

# %%
# NBVAL_CHECK_OUTPUT
beta = schedule.betas.double()
alpha = 1 - beta
alpha_bar = alpha.cumprod(0)
alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])

t = torch.arange(1, T)  # every t with a proper posterior
precision = alpha[t] / beta[t] + 1 / (1 - alpha_bar_prev[t])
beta_tilde = 1 / precision
coef_xt = beta_tilde * alpha[t].sqrt() / beta[t]
coef_x0 = beta_tilde * alpha_bar_prev[t].sqrt() / (1 - alpha_bar_prev[t])

generator = torch.Generator().manual_seed(0)
x0 = torch.randn(T - 1, generator=generator, dtype=torch.float64)
xt = torch.randn(T - 1, generator=generator, dtype=torch.float64)
mean, variance = posterior(schedule, x0, xt, t)
print("mean agrees (rel. 1e-5):    ", torch.allclose(coef_x0 * x0 + coef_xt * xt, mean, rtol=1e-5, atol=1e-7))
print("variance agrees (rel. 1e-5):", torch.allclose(beta_tilde, variance, rtol=1e-5, atol=0))

# %% [markdown]
# That checks the algebra, not the idea. For an independent check, do Bayes' rule by brute force: on a fine grid of
# $x_{t-1}$ values, multiply the prior $q(x_{t-1} \mid x_0)$ by the likelihood $q(x_t \mid x_{t-1})$, normalise
# numerically, and read off the mean and variance.


# %%
def grid_posterior(t: int, x0: float, xt: float, grid: torch.Tensor):
    """Prior, likelihood and posterior of x_{t-1} on a grid, each normalised to integrate to 1."""
    beta_t, alpha_bar_prev_t = schedule.betas[t].double(), schedule.alpha_bar_prev[t].double()
    log_prior = Normal(alpha_bar_prev_t.sqrt() * x0, (1 - alpha_bar_prev_t).sqrt()).log_prob(grid)
    log_likelihood = Normal((1 - beta_t).sqrt() * grid, beta_t.sqrt()).log_prob(torch.tensor(xt))
    densities = []
    for log_density in (log_prior, log_likelihood, log_prior + log_likelihood):
        density = (log_density - log_density.max()).exp()
        densities.append(density / torch.trapezoid(density, grid))
    return densities


grid = torch.linspace(-6, 6, 400_001, dtype=torch.float64)  # spacing 3e-5, well below the narrowest posterior

# %%
# NBVAL_CHECK_OUTPUT
x0_value, generator = 1.5, torch.Generator().manual_seed(0)
print("   t   grid mean  formula mean  grid variance  formula variance  agree (rel. 1e-4)")
for t in [1, 20, 100, T - 1]:
    x0 = torch.tensor([x0_value], dtype=torch.float64)
    xt = q_sample(schedule, x0, t, torch.randn(1, generator=generator, dtype=torch.float64))
    _, _, density = grid_posterior(t, x0_value, xt.item(), grid)
    grid_mean = torch.trapezoid(grid * density, grid)
    grid_variance = torch.trapezoid((grid - grid_mean) ** 2 * density, grid)
    mean, variance = posterior(schedule, x0, xt, t)
    agree = torch.allclose(grid_mean, mean, rtol=1e-4) and torch.allclose(grid_variance, variance, rtol=1e-4)
    print(f"{t:4d} {grid_mean:11.4f} {mean.item():13.4f} {grid_variance:14.3e} {variance.item():17.3e}  {agree}")

# %% [markdown]
# The posterior is narrower than both of its factors: the prior says where $x_{t-1}$ could be given the clean
# data, the likelihood says which $x_{t-1}$ could have produced the observed $x_t$. At $t = 2$ the two are equally
# sharp ($1 - \bar\alpha_1 \approx \beta_2$) and the posterior sits between them; at $t = 50$ the prior has
# spread out and the likelihood decides.

# %%
x0_value = 1.5
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for ax, t in zip(axes, [2, 50], strict=True):
    xt_value = q_sample(schedule, torch.tensor([x0_value]), t, torch.tensor([0.8])).item()
    prior, likelihood, post = grid_posterior(t, x0_value, xt_value, grid)
    prior_mean = schedule.alpha_bar_prev[t].sqrt().item() * x0_value
    prior_std = (1 - schedule.alpha_bar_prev[t]).sqrt().item()
    near = ((grid - prior_mean).abs() < 4 * prior_std).nonzero()[:, 0]
    near = near[:: max(1, len(near) // 500)]  # about 500 points per curve
    ax.plot(grid[near], prior[near], label=r"prior $q(x_{t-1} \mid x_0)$")
    ax.plot(grid[near], likelihood[near], label=r"likelihood $q(x_t \mid x_{t-1})$, normalised")
    ax.plot(grid[near], post[near], label=r"posterior $q(x_{t-1} \mid x_t, x_0)$")
    ax.axvline(xt_value, color="gray", ls=":", label=r"observed $x_t$")
    ax.set(xlabel=r"$x_{t-1}$", ylabel="density", title=f"t = {t}, x0 = {x0_value}")
axes[1].legend(fontsize=8, loc="upper left")
fig.suptitle("Bayes' rule on a grid")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. From the ELBO to the simple loss
#
# The model's reverse step is a Gaussian $p_\theta(x_{t-1} \mid x_t) = \mathcal N(\mu_\theta(x_t, t), \sigma_t^2 I)$
# with a fixed variance. The negative ELBO (Ho et al. 2020, eq. 5) is a sum of one term per step,
#
# $$L = \underbrace{D_{KL}\big(q(x_{T-1} \mid x_0) \,\Vert\, p(x_{T-1})\big)}_{\text{no parameters}}
#   + \sum_{t \ge 1} \underbrace{D_{KL}\big(q(x_{t-1} \mid x_t, x_0) \,\Vert\,
#   p_\theta(x_{t-1} \mid x_t)\big)}_{L_{t-1}}
#   \underbrace{- \log p_\theta(x_0 \mid x_{t=0})}_{\text{decoder}},$$
#
# **Two zeros, one notation.** In this course (as in diffusers) the *states* are $x_t$ for $t = 0, \dots, T-1$, and
# the state at index 0 is already noised once: $x_{t=0} = \sqrt{1 - \beta_0}\,x_0 + \sqrt{\beta_0}\,\epsilon$. The
# *clean data* $x_0$ has no index of its own; it is what comes before $t = 0$ (Ho et al. index it as step 0 and
# their states from 1 to $T$, so their $x_1$ is our $x_{t=0}$). That is why `alpha_bar_prev` is 1 at $t = 0$,
# why the posterior of section 2 at $t = 0$ is the point $x_0$, and why the last term above is a decoder from
# $x_{t=0}$ to the clean $x_0$. Wherever both could be meant, the course writes $x_{t=0}$ for the state.
#
# Each $L_{t-1}$ compares two Gaussians. Let the model output a noise estimate $\hat\epsilon$, turn it into
# $\hat x_0$, and use the posterior mean with $\hat x_0$ in place of $x_0$: $\mu_\theta = \tilde\mu_t(\hat x_0, x_t)$.
# For two Gaussians with the same variance the KL is the squared distance of the means over $2\sigma_t^2$, and only
# the $x_0$ term of $\tilde\mu_t$ differs:
#
# $$L_{t-1} = \frac{\lVert \tilde\mu_t(x_0, x_t) - \tilde\mu_t(\hat x_0, x_t) \rVert^2}{2\sigma_t^2}
#   = \frac{\bar\alpha_{t-1}\beta_t^2}{2\sigma_t^2 (1 - \bar\alpha_t)^2}\,\lVert x_0 - \hat x_0 \rVert^2
#   = \underbrace{\frac{\beta_t^2}{2\sigma_t^2\,\alpha_t\,(1 - \bar\alpha_t)}}_{w_t}\,
#   \lVert \epsilon - \hat\epsilon \rVert^2$$
#
# using $x_0 - \hat x_0 = \sqrt{(1 - \bar\alpha_t) / \bar\alpha_t}\,(\hat\epsilon - \epsilon)$ (Ho et al., eq. 12).
# Check it with torch's own Gaussian KL, for $\sigma_t^2 = \tilde\beta_t$, at every $t \ge 1$:

# %%
# NBVAL_CHECK_OUTPUT
t = torch.arange(1, T)
generator = torch.Generator().manual_seed(1)
x0, eps = torch.randn(2, T - 1, generator=generator, dtype=torch.float64)
eps_hat = eps + 0.3 * torch.randn(T - 1, generator=generator, dtype=torch.float64)  # an imperfect prediction
xt = q_sample(schedule, x0, t, eps)
mean_q, variance = posterior(schedule, x0, xt, t)  # the true posterior
mean_p, _ = posterior(schedule, x0_from_eps(schedule, xt, t, eps_hat), xt, t)  # the model's step
kl = kl_divergence(Normal(mean_q, variance.sqrt()), Normal(mean_p, variance.sqrt()))
weight_from_kl = kl / (eps - eps_hat) ** 2

beta_t, alpha_t, alpha_bar_t = (table.double()[t] for table in (schedule.betas, schedule.alphas, schedule.alpha_bar))
elbo_weight = beta_t**2 / (2 * variance * alpha_t * (1 - alpha_bar_t))  # (T-1,) w_t for t = 1..T-1
# rel. 1e-4, not less: the tables are float32, and 1 - alpha_bar_t at t = 1 (about 1.5e-3) keeps 4 of their 7 digits
agree = torch.allclose(weight_from_kl, elbo_weight, rtol=1e-4)
print("KL / (eps - eps_hat)^2 equals w_t at every t (rel. 1e-4):", agree)
for t_show in [1, 10, 50, 100, T - 1]:
    print(f"w_{t_show:<3d} = {elbo_weight[t_show - 1].item():.4f}")

# %% [markdown]
# So the ELBO *is* a weighted MSE on the noise, with weight $w_t$. Ho et al. drop $w_t$ and train on
#
# $$L_{simple} = \mathbb E_{t, x_0, \epsilon}\,\lVert \epsilon - \hat\epsilon(x_t, t) \rVert^2,\qquad
#   t \sim \mathcal U\{0, \dots, T-1\}.$$
#
# Why? $w_t$ is largest at small $t$ (and infinite at $t = 0$, where $\tilde\beta_0 = 0$), where the noise is tiny
# and denoising is easy, yet those steps matter little for what a sample looks like. To see how much of the bound
# they take, we need the error a *perfect* model still makes at each $t$: $\epsilon$ cannot be known from $x_t$
# exactly, and the best guess is $\mathbb E[\epsilon \mid x_t]$. For a Gaussian mixture that is exact
# (`GaussianMixture.optimal_eps`), so we can measure the irreducible MSE per $t$ on the 1D data of chapter 1.

# %%
mixture_1d = bimodal_1d()
n_per_t, generator = 500, torch.Generator().manual_seed(2)
t_all = torch.arange(T).repeat_interleave(n_per_t)  # (T * n_per_t,)
x0 = mixture_1d.sample(len(t_all), generator).double()
eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
xt = q_sample(schedule, x0, t_all, eps)
eps_optimal = mixture_1d.optimal_denoiser(schedule)(xt, t_all)
irreducible = ((eps - eps_optimal) ** 2).reshape(T, n_per_t).mean(1)  # (T,) the best possible MSE at each t

elbo_terms = elbo_weight * irreducible[1:]  # t >= 1
first_tenth = slice(0, T // 10)
share_elbo = (elbo_terms[first_tenth].sum() / elbo_terms.sum()).item()
share_simple = (irreducible[1:][first_tenth].sum() / irreducible[1:].sum()).item()
print(f"share of the first 10% of steps: {share_elbo:.0%} of the ELBO, {share_simple:.0%} of L_simple")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.3))
t = torch.arange(1, T)
axes[0].plot(t, elbo_weight, label=r"$\sigma_t^2 = \tilde\beta_t$ (fixed_small)")
axes[0].plot(t, beta_t / (2 * alpha_t * (1 - alpha_bar_t)), label=r"$\sigma_t^2 = \beta_t$ (fixed_large)")
axes[0].axhline(1, color="gray", ls=":", label=r"$L_{simple}$: 1")
axes[0].set(yscale="log", xlabel="t", ylabel=r"$w_t$", title="ELBO weight on the noise MSE")
axes[0].legend(fontsize=8)
axes[1].plot(torch.arange(T), irreducible, label=r"$L_{simple}$ term (unweighted)")
axes[1].plot(t, elbo_terms, label=r"ELBO term $w_t \times$ MSE")
axes[1].set(yscale="log", xlabel="t", ylabel="per-step loss", title="What the optimal denoiser still pays")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The irreducible error is near 1 at small $t$ (tiny noise on a spread-out distribution: $\epsilon$ is
# unpredictable) and falls to 0 at large $t$ ($x_t \approx \epsilon$). The ELBO puts its largest weights on the
# small-$t$ terms, so even for the optimal denoiser most of the bound comes from the first 10% of the steps, where
# the 1D samples of section 7 have long chosen their mode and are only being polished. $L_{simple}$ weighs every
# step alike and so moves the effort towards the larger $t$, where the noise is still large enough to decide which
# mode a sample ends in (the reverse-process figures of sections 7 and 8 show where that happens). Ho et al.
# (section 3.4) found that this reweighting gives better samples; the price is that $L_{simple}$ is no longer a
# bound on the likelihood.
#
# ## 4. Three parameterisations: eps, x0 and v
#
# The network can output $\hat\epsilon$, $\hat x_0$ or $\hat v$; each determines the others through $x_t$. Write
# $a = \sqrt{\bar\alpha_t}$ and $s = \sqrt{1 - \bar\alpha_t}$, so $a^2 + s^2 = 1$. Then
#
# $$\begin{pmatrix} x_t \\ v \end{pmatrix} = \begin{pmatrix} a & s \\ -s & a \end{pmatrix}
#   \begin{pmatrix} x_0 \\ \epsilon \end{pmatrix},\qquad
#   \begin{pmatrix} x_0 \\ \epsilon \end{pmatrix} = \begin{pmatrix} a & -s \\ s & a \end{pmatrix}
#   \begin{pmatrix} x_t \\ v \end{pmatrix},$$
#
# a rotation by the angle $\phi_t$ with $\cos\phi_t = a$ (Salimans & Ho 2022, section 4), whose inverse is its
# transpose. From $x_t = a x_0 + s \epsilon$ directly: $\hat x_0 = (x_t - s\hat\epsilon) / a$ and
# $\hat\epsilon = (x_t - a \hat x_0) / s$. The derivation in torch, against the library:

# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(3)
x0, eps = torch.randn(2, 64, 2, generator=generator, dtype=torch.float64)
t = torch.randint(0, T, (64,), generator=generator)
a = schedule.alpha_bar.double()[t, None].sqrt()  # (64, 1)
s = (1 - schedule.alpha_bar.double()[t, None]).sqrt()
xt = a * x0 + s * eps
v = a * eps - s * x0

checks = {
    "x0_from_eps": (x0_from_eps(schedule, xt, t, eps), (xt - s * eps) / a),
    "eps_from_x0": (eps_from_x0(schedule, xt, t, x0), (xt - a * x0) / s),
    "v_from_x0_eps": (v_from_x0_eps(schedule, x0, eps, t), v),
    "x0_from_v": (x0_from_v(schedule, xt, t, v), a * xt - s * v),
    "eps_from_v": (eps_from_v(schedule, xt, t, v), s * xt + a * v),
}
for name, (library, ours) in checks.items():
    print(f"{name:14s} equal to ours: {torch.allclose(library, ours, atol=1e-9)}")
print("round trip x0 -> v -> x0:", torch.allclose(x0_from_v(schedule, xt, t, v), x0, atol=1e-9))

# %% [markdown]
# The three choices are the same loss with different weights over $t$. If the network's $\hat x_0$ is off by
# $\delta = \hat x_0 - x_0$, then $\hat\epsilon - \epsilon = -(a/s)\,\delta$ and $\hat v - v = -\delta / s$, so
#
# $$\lVert \epsilon - \hat\epsilon \rVert^2 = \mathrm{snr}_t\,\lVert x_0 - \hat x_0 \rVert^2,\qquad
#   \lVert v - \hat v \rVert^2 = (1 + \mathrm{snr}_t)\,\lVert x_0 - \hat x_0 \rVert^2,\qquad
#   \mathrm{snr}_t = \bar\alpha_t / (1 - \bar\alpha_t).$$
#
# eps-prediction weighs the $x_0$ error by the SNR, which is tiny at large $t$; there $\hat x_0 = (x_t - s\hat\epsilon)
# / a$ divides by a small $a$ and magnifies any error in $\hat\epsilon$. v-prediction keeps a weight of at least 1.

# %%
# NBVAL_CHECK_OUTPUT
x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)  # some imperfect estimate
eps_hat = eps_from_x0(schedule, xt, t, x0_hat)
v_hat = v_from_x0_eps(schedule, x0_hat, eps_hat, t)
snr = schedule.snr.double()[t]
x0_error = ((x0 - x0_hat) ** 2).sum(1)
print("eps error = snr * x0 error:      ", torch.allclose(((eps - eps_hat) ** 2).sum(1), snr * x0_error))
print("v error = (1 + snr) * x0 error:  ", torch.allclose(((v - v_hat) ** 2).sum(1), (1 + snr) * x0_error))
print(f"x0_hat from eps_hat at t = T-1 multiplies eps errors by s/a = {(1 / schedule.snr[-1].sqrt()).item():.0f}")

# %% [markdown]
# We train with eps-prediction, as Ho et al. did (`train_denoiser` also takes `prediction_type="x0"` or `"v"`).
#
# ## 5. Telling the network which step it is at: the timestep embedding
#
# One network serves every $t$, so it needs $t$ as an input. An integer fed as is would be a single, badly scaled
# feature. The standard trick (Vaswani et al. 2017; Ho et al., appendix B) maps $t$ to sines and cosines at
# geometrically spaced frequencies:
#
# $$\mathrm{emb}(t) = \big[\cos(t\,\omega_0), \dots, \cos(t\,\omega_{d/2-1}),\ \sin(t\,\omega_0), \dots,
#   \sin(t\,\omega_{d/2-1})\big],\qquad \omega_i = 10000^{-i/(d/2)}.$$
#
# Fast frequencies tell neighbouring steps apart, slow ones say roughly where in the chain we are.

# %%
# NBVAL_CHECK_OUTPUT
dim = 64
t = torch.arange(T)
omega = 10_000.0 ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
angles = t[:, None].double() * omega[None]  # (T, dim/2)
embedding = torch.cat([angles.cos(), angles.sin()], dim=1)  # (T, dim)
print("equal to timestep_embedding (1e-4):", torch.allclose(timestep_embedding(t, dim).double(), embedding, atol=1e-4))

# %%
fig, ax = plt.subplots(figsize=(8, 3))
image = ax.imshow(embedding.T, aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
ax.set(xlabel="t", ylabel="feature", title=f"Sinusoidal timestep embedding, d = {dim}")
fig.colorbar(image, ax=ax)
plt.show()

# %% [markdown]
# With $T = 200$ the slowest frequencies barely turn over the whole chain (the flat rows at the bottom of each half);
# the network learns which features to use. `MLPDenoiser` adds a learned projection of this embedding to a
# projection of $x_t$, then applies residual blocks (LayerNorm, Linear, SiLU, Linear):

# %%
print(MLPDenoiser(data_dim=1, hidden=64, depth=3))
print(f"parameters: {sum(p.numel() for p in MLPDenoiser(data_dim=1, hidden=64, depth=3).parameters()):,}")

# %% [markdown]
# ## 6. Training on 1D data
#
# The training loop (`course_lib.train.train_denoiser`) is Algorithm 1 of Ho et al.: draw a batch of $x_0$, a
# uniform $t$ and noise $\epsilon$; form $x_t$; step on $\lVert \epsilon - \hat\epsilon(x_t, t) \rVert^2$. The
# data is chapter 1's mixture: 30% of the mass at $-2$ (narrow), 70% at $1.5$ (wide).

# %%
generator = torch.Generator().manual_seed(10)
data_1d = mixture_1d.sample(profile.toy_samples, generator)  # (N, 1) training data
torch.manual_seed(0)  # the network's initial weights
model_1d = MLPDenoiser(data_dim=1, hidden=64, depth=3).to(device)
start = time.perf_counter()
losses_1d = train_denoiser(
    model_1d, schedule, data_1d, profile.toy_train_steps, profile.toy_batch_size, lr=3e-3, progress=False
)
print(f"trained {profile.toy_train_steps} steps in {time.perf_counter() - start:.0f} s")

# %% [markdown]
# What loss should we expect? Not zero: even the optimal denoiser pays the irreducible error of section 3. Its
# $L_{simple}$ is the floor for the training loss.

# %%
generator = torch.Generator().manual_seed(11)
loss_floor_1d = simple_loss(
    mixture_1d.optimal_denoiser(schedule), schedule, mixture_1d.sample(100_000, generator).double(), generator
).item()
ax = plot_losses(losses_1d, label="MLP, 1D mixture")
ax.axhline(loss_floor_1d, color="k", ls="--", label="optimal denoiser")
ax.set_title("Training loss (simple loss, eps-prediction)")
ax.legend()
plt.show()
print(f"last 200 steps: {sum(losses_1d[-200:]) / 200:.4f}, optimal denoiser: {loss_floor_1d:.4f}")

# %% [markdown]
# ## 7. Sampling, and measuring the samples
#
# The ancestral sampler (`ddpm_sample`, Algorithm 2) starts from $x_{T-1} \sim \mathcal N(0, I)$ and repeats
# $x_{t-1} = \tilde\mu_t(\hat x_0, x_t) + \sigma_t z$ down to $t = 0$, with $\sigma_t^2 = \tilde\beta_t$. Next to it
# runs the same sampler driven by the *exact* $\mathbb E[\epsilon \mid x_t]$ of the mixture
# (`GaussianMixture.optimal_denoiser`): the best any network could do on this schedule. Both start from the same
# $x_{T-1}$. The reference sampler is exact maths, not a network, so it runs on the CPU in float64.
#
# The library writes the step through $\hat x_0$, so that x0 and v predictions share the code. Ho et al.'s
# Algorithm 2 writes it through $\hat\epsilon$: substituting $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon)
# / \sqrt{\bar\alpha_t}$ into $\tilde\mu_t$ and simplifying with $\bar\alpha_t = \alpha_t \bar\alpha_{t-1}$ gives
# their eq. 11,
#
# $$\tilde\mu_t(\hat x_0, x_t) = \frac{1}{\sqrt{\alpha_t}}\Big(x_t - \frac{\beta_t}{\sqrt{1 - \bar\alpha_t}}\,
#   \hat\epsilon\Big).$$
#
# One step both ways, with an arbitrary $\hat\epsilon$ and the same noise $z$ ($\sigma_t^2 = \tilde\beta_t$):

# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(4)
for t in [1, 50, 150, T - 1]:
    xt, eps_hat, z = torch.randn(3, 8, 1, generator=generator, dtype=torch.float64)
    # beta, alpha, alpha_bar: the float64 tables of section 2; beta_tilde[t - 1] is sigma_t^2 for fixed_small
    algorithm_2 = (xt - beta[t] / (1 - alpha_bar[t]).sqrt() * eps_hat) / alpha[t].sqrt() + beta_tilde[t - 1].sqrt() * z
    library, _ = ddpm_step(schedule, eps_hat, t, xt, z)
    print(f"t = {t:3d}: ddpm_step equals Algorithm 2 (1e-5): {torch.allclose(library, algorithm_2, atol=1e-5)}")

# %%
n_samples = profile.toy_model_samples
generator = torch.Generator().manual_seed(12)
x_T = torch.randn(n_samples, 1, generator=generator)
start = time.perf_counter()
samples_1d, path_1d = ddpm_sample(model_1d, schedule, x_T.to(device), generator, record_every=1)
samples_1d = samples_1d.cpu()
print(f"{n_samples} samples x {T} steps in {time.perf_counter() - start:.1f} s")
optimal_1d, _ = ddpm_sample(mixture_1d.optimal_denoiser(schedule), schedule, x_T.double(), generator)

# %%
x_plot = torch.linspace(-4, 4.5, 500, dtype=torch.float64)[:, None]
fig, ax = plt.subplots(figsize=(7, 3.3))
bins = torch.linspace(-4, 4.5, 86).tolist()
ax.hist(samples_1d[:, 0].tolist(), bins=bins, density=True, alpha=0.5, label="MLP + DDPM sampler")
ax.hist(optimal_1d[:, 0].tolist(), bins=bins, density=True, histtype="step", lw=1.5, label="optimal denoiser")
ax.plot(x_plot[:, 0], mixture_1d.log_prob(x_plot).exp(), "k", lw=1.5, label="exact density")
ax.set(xlabel=r"$x_0$", ylabel="density", title=f"{n_samples} DDPM samples of the 1D mixture")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The reverse process itself. In grey, the histogram of all the samples' $x_t$ at every step; in colour, a few
# single samples, from noise at $t = T-1$ (left) to data (right). For the first half of the chain the paths wander
# like the noise they are; they split between the two modes around the middle, and the last steps only sharpen.

# %%
states = torch.stack([xt[:, 0] for _, xt, _ in path_1d] + [samples_1d[:, 0]])  # (T + 1, N): x_{T-1}, ..., x_0, sample
steps = torch.arange(T - 1, -2, -1)  # T-1, ..., 0, then -1 for the sample
edges = torch.linspace(-4, 4, 81)
histograms = torch.stack([torch.histogram(row, edges, density=True).hist for row in states])  # (T + 1, 80)
fig, ax = plt.subplots(figsize=(8, 3.3))
extent = (T - 1, -1, -4, 4)  # t decreases to the right
ax.imshow(histograms.T, origin="lower", aspect="auto", extent=extent, cmap="Greys", vmax=0.6, interpolation="nearest")
for i in range(8):
    color = "tab:blue" if states[-1, i] < 0 else "tab:orange"
    ax.plot(steps, states[:, i], color=color, lw=0.9)
ax.set(xlabel="t (the sample at t = -1)", ylabel=r"$x_t$", title="The reverse process in 1D")
plt.show()

# %% [markdown]
# A picture is not a measurement. Two numbers per sampler:
#
# - the distance to a fresh sample of the data: the 1-Wasserstein distance in 1D (`wasserstein_1d`), its sliced
#   version in 2D (`sliced_wasserstein`, the average 1D distance over random projections);
# - the largest gap between the fraction of samples nearest to each mode (`mode_proportions`) and the mode's weight.
#
# Neither is zero even for perfect samples. Each is read beside its **floor**: the same number for an independent
# sample of the true distribution of the same size, here over 10 such samples (mean and standard deviation), which
# is what a perfect sampler scores.


# %%
def distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """W1 in 1D, sliced W1 over 256 fixed random directions in 2D, between samples (N, D) and the reference."""
    samples = samples.float().cpu()
    if samples.shape[1] == 1:
        return wasserstein_1d(samples, reference)
    return sliced_wasserstein(samples, reference, generator=torch.Generator().manual_seed(0))


def mode_error(samples: torch.Tensor, mixture) -> float:
    """max_k |fraction of the samples nearest to mode k - weight of mode k|."""
    return (mode_proportions(samples.float().cpu(), mixture.means) - mixture.weights).abs().max().item()


def floor(mixture, reference: torch.Tensor, generator: torch.Generator, repeats: int = 10):
    """Both measures for `repeats` true samples of the reference's size: (mean, standard deviation), each (2,)."""
    true_samples = [mixture.sample(len(reference), generator) for _ in range(repeats)]
    values = torch.tensor([[distance(x, reference), mode_error(x, mixture)] for x in true_samples])
    return values.mean(0), values.std(0)


generator = torch.Generator().manual_seed(13)
reference_1d = mixture_1d.sample(n_samples, generator)
floors = {"1D": floor(mixture_1d, reference_1d, generator)}
results = {
    ("1D", "MLP + DDPM"): (distance(samples_1d, reference_1d), mode_error(samples_1d, mixture_1d)),
    ("1D", "optimal denoiser + DDPM"): (distance(optimal_1d, reference_1d), mode_error(optimal_1d, mixture_1d)),
}
print("mode proportions, true weights:", mixture_1d.weights.tolist())
print("  MLP samples:     ", [round(p, 3) for p in mode_proportions(samples_1d, mixture_1d.means).tolist()])
print("  optimal samples: ", [round(p, 3) for p in mode_proportions(optimal_1d, mixture_1d.means).tolist()])

# %% [markdown]
# ## 8. Training on 2D data: eight Gaussians on a ring
#
# The same recipe on a harder shape: eight narrow modes of equal weight on a circle of radius 2. The network has to
# put the right mass in each mode and keep the empty middle empty.

# %%
mixture_2d = ring_2d()
generator = torch.Generator().manual_seed(20)
data_2d = mixture_2d.sample(profile.toy_samples, generator)  # (N, 2)
torch.manual_seed(0)
model_2d = MLPDenoiser(data_dim=2, hidden=64, depth=3).to(device)
start = time.perf_counter()
losses_2d = train_denoiser(
    model_2d, schedule, data_2d, profile.toy_train_steps, profile.toy_batch_size, lr=3e-3, progress=False
)
print(f"trained {profile.toy_train_steps} steps in {time.perf_counter() - start:.0f} s")

# %%
loss_floor_2d = simple_loss(
    mixture_2d.optimal_denoiser(schedule), schedule, mixture_2d.sample(100_000, generator).double(), generator
).item()
ax = plot_losses(losses_1d, label="1D mixture")
plot_losses(losses_2d, ax=ax, label="2D ring")
ax.axhline(loss_floor_1d, color="tab:blue", ls="--", lw=1)
ax.axhline(loss_floor_2d, color="tab:orange", ls="--", lw=1)
ax.set_title("Training loss; dashed: the optimal denoiser's loss")
plt.show()
print(f"2D, last 200 steps: {sum(losses_2d[-200:]) / 200:.4f}, optimal denoiser: {loss_floor_2d:.4f}")

# %%
generator = torch.Generator().manual_seed(21)
x_T = torch.randn(n_samples, 2, generator=generator)
start = time.perf_counter()
samples_2d, path_2d = ddpm_sample(model_2d, schedule, x_T.to(device), generator, record_every=10)
samples_2d = samples_2d.cpu()
print(f"{n_samples} samples x {T} steps in {time.perf_counter() - start:.1f} s")
optimal_2d, _ = ddpm_sample(mixture_2d.optimal_denoiser(schedule), schedule, x_T.double(), generator)

# %%
fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharex=True, sharey=True)
shown = slice(0, 2000)  # plot at most 2000 points per panel
panels = [(data_2d, "data"), (samples_2d, "MLP + DDPM sampler"), (optimal_2d, "optimal denoiser + DDPM")]
for ax, (points, title) in zip(axes, panels, strict=True):
    ax.scatter(points[shown, 0], points[shown, 1], s=2, alpha=0.4)
    ax.set(title=title, xlabel=r"$x_0[0]$", aspect="equal", xlim=(-3, 3), ylim=(-3, 3))
axes[0].set_ylabel(r"$x_0[1]$")
plt.tight_layout()
plt.show()

# %% [markdown]
# The reverse process in 2D, from the states recorded every 10 steps (`record_every=10`; 1000 points shown): the
# cloud of noise hardly changes over the first half of the chain, a hole opens in the middle around $t = 40$, and
# the eight modes separate in the last 20 steps.

# %%
recorded = {t: xt for t, xt, _ in path_2d}  # t -> x_t, the state before the step at t
snapshots = [(f"t = {T - 1}", x_T)] + [(f"t = {t}", recorded[t]) for t in (100, 60, 40, 20, 10)]
snapshots.append(("sample", samples_2d))
fig, axes = plt.subplots(1, len(snapshots), figsize=(2.1 * len(snapshots), 2.5), sharex=True, sharey=True)
for ax, (label, xt) in zip(axes, snapshots, strict=True):
    ax.scatter(xt[:1000, 0], xt[:1000, 1], s=1)
    ax.set(title=label, aspect="equal", xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), xticks=[], yticks=[])
fig.suptitle("The reverse process in 2D, from noise (left) to samples (right)")
plt.tight_layout()
plt.show()

# %%
generator = torch.Generator().manual_seed(22)
reference_2d = mixture_2d.sample(n_samples, generator)
floors["2D ring"] = floor(mixture_2d, reference_2d, generator)
results |= {
    ("2D ring", "MLP + DDPM"): (distance(samples_2d, reference_2d), mode_error(samples_2d, mixture_2d)),
    ("2D ring", "optimal denoiser + DDPM"): (distance(optimal_2d, reference_2d), mode_error(optimal_2d, mixture_2d)),
}
print(f"{n_samples} samples per sampler; distance: W1 in 1D, sliced W1 in 2D; floors: mean +- sd over 10 true samples")
print(f"{'data':8s} {'sampler':24s} {'distance':>9s} {'its floor':>17s} {'max|p_k - w_k|':>15s} {'its floor':>17s}")
for (data_name, sampler), (distance_value, mode_error_value) in results.items():
    mean, sd = floors[data_name]
    print(
        f"{data_name:8s} {sampler:24s} {distance_value:9.4f} {mean[0]:8.4f} +- {sd[0]:.4f} "
        f"{mode_error_value:15.4f} {mean[1]:8.4f} +- {sd[1]:.4f}"
    )

# %% [markdown]
# How to read the table: a value within a standard deviation or two of its floor means the samples are as close
# to the data as another draw of the data itself, at this sample size. The optimal-denoiser rows show what the
# sampler and the schedule with $T = 200$ cost on their own; any gap between the MLP rows and them is the
# network's.
#
# ## Recap
#
# - The posterior $q(x_{t-1} \mid x_t, x_0) = \mathcal N(\tilde\mu_t, \tilde\beta_t)$ is Bayes' rule on two
#   Gaussians; a brute-force grid agrees with the closed form.
# - The ELBO is a sum of KLs between Gaussians of equal variance, i.e. a weighted MSE on $\epsilon$ with weight
#   $w_t = \beta_t^2 / (2\sigma_t^2\alpha_t(1 - \bar\alpha_t))$. Dropping $w_t$ gives $L_{simple}$, which stops
#   the tiny-noise steps from dominating.
# - eps, x0 and v predictions are related by a rotation; as losses they differ only by a weight over $t$
#   ($\mathrm{snr}_t$, $1$, $1 + \mathrm{snr}_t$ on the $x_0$ error).
# - A 3-block MLP of 34k parameters, trained for a few thousand steps (under a minute per data set on a laptop CPU),
#   gives DDPM samples whose distances and mode proportions sit within about two standard deviations of their
#   floors in the cpu profile, as do those of the sampler that uses the exact optimal denoiser.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** A v-prediction network returns `v_hat` at noisy points `xt` and steps `t`. Compute `x0_hat` and
# `eps_hat` from it with your own formulas (section 4), without the library's conversion functions.

# %% tags=["solution", "hide-input"]
generator = torch.Generator().manual_seed(30)
xt = torch.randn(16, 2, generator=generator, dtype=torch.float64)
v_hat = torch.randn(16, 2, generator=generator, dtype=torch.float64)
t = torch.randint(0, T, (16,), generator=generator)

### BEGIN SOLUTION
a = schedule.alpha_bar.double()[t, None].sqrt()
s = (1 - schedule.alpha_bar.double()[t, None]).sqrt()
x0_hat = a * xt - s * v_hat
eps_hat = s * xt + a * v_hat
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
assert torch.allclose(x0_hat, x0_from_v(schedule, xt, t, v_hat), atol=1e-9), "x0_hat differs from x0_from_v"
assert torch.allclose(eps_hat, eps_from_v(schedule, xt, t, v_hat), atol=1e-9), "eps_hat differs from eps_from_v"
alpha_bar_check = schedule.alpha_bar.double()[t, None]
rebuilt = alpha_bar_check.sqrt() * x0_hat + (1 - alpha_bar_check).sqrt() * eps_hat
assert torch.allclose(rebuilt, xt, atol=1e-9), "x0_hat and eps_hat must rebuild xt"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Ho et al. report that $\sigma_t^2 = \beta_t$ ("fixed_large") and $\sigma_t^2 = \tilde\beta_t$
# ("fixed_small") give similar samples. Sample the 1D model with `variance_type="fixed_large"` and compute the mode
# proportions of the samples; they should match the true weights (0.3, 0.7) within 0.05.

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
generator = torch.Generator().manual_seed(31)
x_T = torch.randn(n_samples, 1, generator=generator)
samples_large, _ = ddpm_sample(model_1d, schedule, x_T.to(device), generator, variance_type="fixed_large")
proportions_large = mode_proportions(samples_large.cpu(), mixture_1d.means)
print("fixed_large mode proportions:", [round(p, 3) for p in proportions_large.tolist()])
floor_mean, floor_sd = floors["1D"][0][0].item(), floors["1D"][1][0].item()
print(f"W1 to the data: {distance(samples_large, reference_1d):.4f} (floor {floor_mean:.4f} +- {floor_sd:.4f})")
### END SOLUTION

# %%
assert torch.allclose(proportions_large, mixture_1d.weights, atol=0.05), f"proportions {proportions_large.tolist()}"
print("exercise 2: the fixed_large sampler matches the mode weights within 0.05")

# %% [markdown]
# **Exercise 3.** With $\sigma_t^2 = \beta_t$ the two Gaussians in $L_{t-1}$ no longer have equal variances, and
# the KL gains a term that does not depend on $\hat\epsilon$. Compute, for every $t \ge 1$, the weight of the
# $\epsilon$ error in that KL: $\big(KL(\hat\epsilon) - KL(\epsilon)\big) / \lVert \epsilon - \hat\epsilon
# \rVert^2$, with torch's `kl_divergence`, and compare it with $\beta_t / (2\alpha_t(1 - \bar\alpha_t))$.

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
t = torch.arange(1, T)
generator = torch.Generator().manual_seed(32)
x0, eps = torch.randn(2, T - 1, generator=generator, dtype=torch.float64)
eps_hat = eps + 0.3 * torch.randn(T - 1, generator=generator, dtype=torch.float64)
xt = q_sample(schedule, x0, t, eps)
mean_q, variance_q = posterior(schedule, x0, xt, t)
sigma = schedule.betas.double()[t].sqrt()  # fixed_large


def kl_to_model(eps_prediction):
    mean_p, _ = posterior(schedule, x0_from_eps(schedule, xt, t, eps_prediction), xt, t)
    return kl_divergence(Normal(mean_q, variance_q.sqrt()), Normal(mean_p, sigma))


weight_large = (kl_to_model(eps_hat) - kl_to_model(eps)) / (eps - eps_hat) ** 2
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
t_check = torch.arange(1, T)
beta_check, alpha_check = schedule.betas.double()[t_check], schedule.alphas.double()[t_check]
expected = beta_check / (2 * alpha_check * (1 - schedule.alpha_bar.double()[t_check]))
assert torch.allclose(weight_large, expected, rtol=1e-4), f"largest gap {(weight_large - expected).abs().max()}"
print("exercise 3: correct")
