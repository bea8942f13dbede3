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
# # Chapter 1: Forward diffusion in 1D
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/01_forward_diffusion.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F01_forward_diffusion.ipynb)
#
# A diffusion model learns to undo a process that slowly destroys data by adding Gaussian noise. Before we learn
# anything, we study that destruction on data we understand completely: a 1D mixture of two Gaussians, whose
# density we can write down at every step.
#
# **Learning objectives**
#
# - Write one step of the forward process, $x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,\epsilon$, and
#   see why it keeps the variance near one.
# - Derive the closed form $q(x_t \mid x_0) = \mathcal N(\sqrt{\bar\alpha_t}\,x_0, (1-\bar\alpha_t) I)$ and
#   check it against the step-by-step chain, numerically.
# - Watch a bimodal distribution dissolve into $\mathcal N(0, 1)$, with its exact density overlaid.
# - Use the reparameterisation trick to differentiate through a noisy sample.
#
# **Notation** (the whole course uses it): `T` steps, integer `t` in `0..T-1` (as in diffusers), `beta`,
# `alpha = 1 - beta`, `alpha_bar` $=\prod_{s \le t}\alpha_s$, `x0` the clean data, `xt` the noised data, `eps` the
# standard normal noise.

# %%
import matplotlib.pyplot as plt
import torch

from course_lib.forward import q_sample, q_step, run_chain
from course_lib.metrics import wasserstein_1d
from course_lib.profiles import get_profile
from course_lib.schedules import make_schedule
from course_lib.toy import GaussianMixture, bimodal_1d

profile = get_profile()
print(f"profile: {profile.name} ({profile.toy_samples} points per sample)")

# %% [markdown]
# ## The data
#
# Our data distribution is a mixture: 30% of the points near $-2$ (narrow), 70% near $1.5$ (wide).
# Because it is a Gaussian mixture, `course_lib.toy.GaussianMixture` knows its exact density.

# %%
mixture = bimodal_1d()
generator = torch.Generator().manual_seed(0)
x0 = mixture.sample(profile.toy_samples, generator)  # (N, 1)

grid = torch.linspace(-5, 5, 801)[:, None]  # (801, 1)
fig, ax = plt.subplots(figsize=(6, 2.8))
ax.hist(x0[:, 0].numpy(), bins=80, density=True, alpha=0.5, label=f"{len(x0)} samples")
ax.plot(grid[:, 0], mixture.log_prob(grid).exp(), color="black", label="exact density")
ax.set_xlabel("$x_0$")
ax.set_title("The data: a mixture of two Gaussians")
ax.legend()
plt.show()

# %% [markdown]
# ## One step of noise
#
# Step $t$ shrinks the current value a little and adds a little Gaussian noise (Ho et al. 2020, eq. 2):
#
# $$x_t = \sqrt{1 - \beta_t}\, x_{t-1} + \sqrt{\beta_t}\,\epsilon, \qquad \epsilon \sim \mathcal N(0, 1).$$
#
# Why the $\sqrt{1-\beta_t}$? If $x_{t-1}$ has variance $v$, then $x_t$ has variance $(1-\beta_t)v + \beta_t$,
# a weighted average of $v$ and $1$. The variance is pulled towards 1 at every step and never blows up: the
# process *preserves variance* once it gets there. Written by hand:

# %%
beta_t = 0.02
x_prev = x0
eps = torch.randn(x_prev.shape, generator=generator)
x_next = (1 - beta_t) ** 0.5 * x_prev + beta_t**0.5 * eps

variance_before = x_prev.var().item()
print(f"variance before: {variance_before:.3f}")
print(f"variance after:  {x_next.var().item():.3f}")
print(f"(1 - beta) * v + beta = {(1 - beta_t) * variance_before + beta_t:.3f}")

# %% [markdown]
# The course's library has the same step as `q_step(schedule, x_prev, t, eps)`: it reads $\beta_t$ from a
# schedule. We use the linear schedule of Ho et al. ($\beta$ from $10^{-4}$ to $0.02$ over $T = 1000$ steps;
# chapter 2 compares schedules). Checked against the hand-written step at the $t$ where $\beta_t$ is closest
# to 0.02:

# %%
# NBVAL_CHECK_OUTPUT
schedule = make_schedule("linear", T=1000)
t_last = schedule.T - 1
print(f"beta at t={t_last}: {schedule.betas[t_last].item():.4f}")
by_hand = (1 - schedule.betas[t_last]).sqrt() * x_prev + schedule.betas[t_last].sqrt() * eps
print("q_step equals the hand-written step:", torch.allclose(q_step(schedule, x_prev, t_last, eps), by_hand))

# %% [markdown]
# ## The whole chain
#
# Applying the step for $t = 0, 1, \dots, T-1$ is the *forward process*. `run_chain` does exactly that and keeps
# every state, so we can watch the two modes blur into one Gaussian. Every few hundred steps:

# %%
states = run_chain(schedule, x0, torch.Generator().manual_seed(1))  # (T, N, 1): states[t] is x_t
shown_t = [0, 50, 100, 200, 400, 999]

fig, axes = plt.subplots(1, len(shown_t), figsize=(14, 2.6), sharey=True)
for ax, t in zip(axes, shown_t):
    ax.hist(states[t, :, 0].numpy(), bins=60, range=(-5, 5), density=True, alpha=0.5)
    ax.set_title(f"t = {t}")
    ax.set_xlabel("$x_t$")
axes[0].set_ylabel("density")
fig.suptitle("The chain dissolves the data into noise")
plt.tight_layout()
plt.show()

# %% [markdown]
# A handful of individual paths: each point wanders like a particle in a fluid (hence "diffusion"), and by the
# end it has forgotten where it started.

# %%
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(states[:, :12, 0].numpy(), lw=0.8)
ax.set_xlabel("t")
ax.set_ylabel("$x_t$")
ax.set_title("Twelve paths of the forward chain")
plt.show()

# %% [markdown]
# ## The closed form
#
# We never need to run the chain. Unroll two steps:
#
# $$x_t = \sqrt{\alpha_t}\,x_{t-1} + \sqrt{1-\alpha_t}\,\epsilon_t
#       = \sqrt{\alpha_t \alpha_{t-1}}\,x_{t-2} + \sqrt{\alpha_t(1-\alpha_{t-1})}\,\epsilon_{t-1}
#         + \sqrt{1-\alpha_t}\,\epsilon_t .$$
#
# The two noise terms are independent Gaussians, so their sum is one Gaussian whose variance is the sum,
# $\alpha_t(1-\alpha_{t-1}) + 1 - \alpha_t = 1 - \alpha_t\alpha_{t-1}$. By induction, with
# $\bar\alpha_t = \prod_{s=0}^{t} \alpha_s$ (Ho et al. 2020, eq. 4):
#
# $$q(x_t \mid x_0) = \mathcal N\big(\sqrt{\bar\alpha_t}\,x_0,\ (1-\bar\alpha_t)\big)
#   \quad\Longleftrightarrow\quad x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon .$$
#
# First, $\bar\alpha$ by hand (a cumulative product, in float64) against the library's table:

# %%
# NBVAL_CHECK_OUTPUT
alpha = 1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
alpha_bar_by_hand = torch.cumprod(alpha, dim=0)
print("max |alpha_bar by hand - library|:", f"{(alpha_bar_by_hand - schedule.alpha_bar).abs().max().item():.0e}")
print(f"alpha_bar at t = 0, 499, 999: {[round(schedule.alpha_bar[t].item(), 5) for t in (0, 499, 999)]}")

# %% [markdown]
# Now the check that matters: one closed-form jump must give the *same distribution* as $t+1$ steps of the chain.
# We compare the chain's samples at several $t$ with closed-form samples of the same size, by their mean,
# variance and 1-Wasserstein distance $W_1$ (`course_lib.metrics.wasserstein_1d`). Two independent samples of the
# same distribution are not identical either, so $W_1$ is shown beside its *floor*: the distance between two
# independent closed-form samples. (Fixed sizes and seeds, so the printed numbers are the same on every machine.)

# %%
# NBVAL_CHECK_OUTPUT
n_check = 20_000
check_generator = torch.Generator().manual_seed(2)
x0_check = mixture.sample(n_check, check_generator)
chain = run_chain(schedule, x0_check, check_generator)  # (T, n_check, 1)
print("   t   chain mean/var   closed mean/var   W1(chain, closed)   W1 floor")
for t in [10, 100, 300, 999]:
    closed = q_sample(schedule, x0_check, t, torch.randn(x0_check.shape, generator=check_generator))
    closed_again = q_sample(schedule, x0_check, t, torch.randn(x0_check.shape, generator=check_generator))
    distance, floor = wasserstein_1d(chain[t], closed), wasserstein_1d(closed, closed_again)
    print(
        f"{t:4d}   {chain[t].mean():6.2f} {chain[t].var():5.2f}    {closed.mean():6.2f} {closed.var():5.2f}"
        f"         {distance:.3f}             {floor:.3f}"
    )
    assert distance < 3 * floor + 0.01, f"the chain and the closed form differ at t={t}"

# %% [markdown]
# The chain and the closed form agree to within sampling noise at every $t$.
#
# ## The exact marginal density
#
# The closed form tells us more: if $x_0$ follows a Gaussian mixture, so does $x_t$. Each component
# $\mathcal N(\mu_k, s_k^2)$ becomes $\mathcal N(\sqrt{\bar\alpha_t}\mu_k,\ \bar\alpha_t s_k^2 + 1 - \bar\alpha_t)$:
# the means shrink towards 0 and the variances grow towards 1. Let us write that by hand for one $t$ and compare
# with `GaussianMixture.noised`:

# %%
# NBVAL_CHECK_OUTPUT
t = 200
alpha_bar_t = schedule.alpha_bar[t].item()
by_hand = GaussianMixture(
    means=alpha_bar_t**0.5 * mixture.means,
    stds=(alpha_bar_t * mixture.stds**2 + 1 - alpha_bar_t).sqrt(),
    weights=mixture.weights,
)
library = mixture.noised(alpha_bar_t)
print("same density on the grid:", torch.allclose(by_hand.log_prob(grid), library.log_prob(grid)))

# %% [markdown]
# Overlaid on the chain's histograms, the exact density of $q(x_t)$ follows the data step by step, down to the
# standard normal at $t = T-1$:

# %%
fig, axes = plt.subplots(1, len(shown_t), figsize=(14, 2.6), sharey=True)
for ax, t in zip(axes, shown_t):
    marginal = mixture.noised(schedule.alpha_bar[t].item())
    ax.hist(states[t, :, 0].numpy(), bins=60, range=(-5, 5), density=True, alpha=0.4)
    ax.plot(grid[:, 0], marginal.log_prob(grid).exp(), color="black", lw=1.2)
    ax.set_title(f"t = {t}")
axes[0].set_ylabel("density")
fig.suptitle("Histograms of the chain and the exact density of $q(x_t)$")
plt.tight_layout()
plt.show()

# %% [markdown]
# Where does the second mode disappear? The exact density lets us count its local maxima at every $t$:


# %%
# NBVAL_CHECK_OUTPUT
def count_modes(density: torch.Tensor) -> int:
    """Local maxima of a density sampled on a grid."""
    return int(((density[1:-1] > density[:-2]) & (density[1:-1] > density[2:])).sum())


modes = [count_modes(mixture.noised(schedule.alpha_bar[t].item()).log_prob(grid).exp()) for t in range(schedule.T)]
print("first t with a single mode:", modes.index(1))

# %% [markdown]
# And the end point: $\bar\alpha_{T-1} \approx 4 \times 10^{-5}$, so $x_{T-1}$ keeps a fraction
# $\sqrt{\bar\alpha_{T-1}} \approx 0.006$ of $x_0$. Its distribution is almost exactly $\mathcal N(0, 1)$, which is
# why sampling (chapter 3) can start from pure noise:

# %%
# NBVAL_CHECK_OUTPUT
standard_normal = GaussianMixture(means=[[0.0]], stds=[1.0], weights=[1.0])
last = mixture.noised(schedule.alpha_bar[-1].item())
density_gap = (last.log_prob(grid).exp() - standard_normal.log_prob(grid).exp()).abs().max().item()
print(f"sqrt(alpha_bar) at t = T-1: {schedule.alpha_bar[-1].sqrt().item():.4f}")
print(f"max |q(x_T-1) - N(0, 1)| on the grid: {density_gap:.4f}")

# %% [markdown]
# ## The reparameterisation trick
#
# "Draw $x_t \sim \mathcal N(\sqrt{\bar\alpha_t}x_0, 1-\bar\alpha_t)$" and
# "compute $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ from a draw of $\epsilon$" give the
# same distribution, but the second writes the sample as a *differentiable function* of $x_0$ (and of the
# schedule), with all randomness pushed into $\epsilon$. Training in chapter 3 depends on this: gradients flow
# through $x_t$.
#
# A check: for $f(x_t) = x_t^2$, $\mathbb E[x_t^2] = \bar\alpha_t x_0^2 + 1 - \bar\alpha_t$, so
# $\partial\,\mathbb E[x_t^2] / \partial x_0 = 2\bar\alpha_t x_0$. Autograd through reparameterised samples
# estimates the same gradient:

# %%
# NBVAL_CHECK_OUTPUT
t = 300
x0_value = torch.tensor([[0.8]], requires_grad=True)
eps = torch.randn(200_000, 1, generator=torch.Generator().manual_seed(3))
xt = q_sample(schedule, x0_value.expand(200_000, 1), t, eps)
(xt**2).mean().backward()
exact = 2 * schedule.alpha_bar[t].item() * 0.8
print(f"autograd estimate: {x0_value.grad.item():.3f}   exact: {exact:.3f}")

# %% [markdown]
# ## Recap
#
# - One step: $x_t = \sqrt{1-\beta_t}x_{t-1} + \sqrt{\beta_t}\epsilon$ pulls the variance towards 1.
# - Many steps collapse into one jump: $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\epsilon$, checked
#   against the chain in distribution ($W_1$ at its sampling floor).
# - For a Gaussian mixture the marginal $q(x_t)$ is known exactly; the two modes merge into one and end as
#   $\mathcal N(0, 1)$.
# - Reparameterised samples are differentiable in $x_0$.
#
# Next, chapter 2 asks how to choose the $\beta_t$; chapter 3 learns to run this process backwards.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** Compute $\bar\alpha_{499}$ of the linear schedule as a product of $(1 - \beta_t)$ using a sum of
# logarithms (`torch.log1p`), which is how you would do it for very long schedules without underflow.

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
answer_1 = torch.log1p(-betas[:500]).sum().exp().item()  # reference solution
### END SOLUTION

# %%
assert abs(answer_1 - schedule.alpha_bar[499].item()) < 1e-6, f"alpha_bar_499 is {schedule.alpha_bar[499]:.6f}"
print("Exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Using the closed form, find the variance of $x_t$ for our mixture at $t = 100$ *without
# sampling*. Hint: $\mathrm{Var}[x_t] = \bar\alpha_t \mathrm{Var}[x_0] + 1 - \bar\alpha_t$, and the variance of a
# mixture is $\sum_k \pi_k (s_k^2 + \mu_k^2) - (\sum_k \pi_k \mu_k)^2$.

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
weights, means, stds = mixture.weights, mixture.means[:, 0], mixture.stds  # reference solution
variance_x0 = (weights * (stds**2 + means**2)).sum() - (weights * means).sum() ** 2
answer_2 = (schedule.alpha_bar[100] * variance_x0 + 1 - schedule.alpha_bar[100]).item()
### END SOLUTION

# %%
sampled = states[100].var().item()
assert abs(answer_2 - sampled) < 0.1 * sampled, f"{answer_2:.3f} is far from the sampled variance {sampled:.3f}"
print(f"Exercise 2: exact {answer_2:.3f}, sampled {sampled:.3f}")

# %% [markdown]
# **Exercise 3.** A schedule with a constant $\beta_t = \beta$ has $\bar\alpha_t = (1-\beta)^{t+1}$. Which constant
# $\beta$ gives the same $\bar\alpha_{T-1}$ as the linear schedule with $T = 1000$?

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
answer_3 = 1 - schedule.alpha_bar[-1].double().item() ** (1 / 1000)  # reference solution
### END SOLUTION

# %%
constant = make_schedule("linear", T=1000, beta_start=answer_3, beta_end=answer_3)
assert abs(constant.alpha_bar[-1] - schedule.alpha_bar[-1]) < 1e-7, "the two end points differ"
print(f"Exercise 3: beta = {answer_3:.5f}")
