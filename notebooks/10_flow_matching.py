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
# # Chapter 10: Flow matching and rectified flow
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/10_flow_matching.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F10_flow_matching.ipynb)
#
# Chapter 5 found that deterministic DDIM solves an ODE, and that its path from noise to data bends, so few steps
# miss it. Flow matching (Lipman et al. 2023; Liu et al. 2023, "rectified flow") starts from the other end: choose
# the simplest path from data to noise, a straight line, and train the network on its velocity. Stable Diffusion 3
# and Flux are trained this way (Esser et al. 2024). This chapter derives the loss, trains a flow on 2D data live,
# straightens it with one round of reflow, and samples digits with Euler and Heun against DDIM on the same number
# of network calls.
#
# By the end of this chapter you can:
#
# 1. write the straight path $x_t = (1 - t)\,x_0 + t\,\epsilon$, its velocity and the flow-matching loss, and check
#    them against diffusers' `FlowMatchEulerDiscreteScheduler`;
# 2. sample a flow with Euler and Heun and count their network calls;
# 3. measure how straight a learned flow is, and make it straighter with reflow;
# 4. compare flow matching and DDPM-trained models by quality against network calls.

# %%
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from course_lib.benchmark import load_results
from course_lib.claims import clearly_below
from course_lib.flow import (
    euler_flow_sample,
    flow_loss,
    heun_flow_sample,
    interpolate,
    time_grid,
)
from course_lib.metrics import load_digit_classifier, sample_scores, sliced_wasserstein
from course_lib.nets.mlp import MLPDenoiser
from course_lib.plotting import plot_losses, show_images
from course_lib.profiles import get_device, get_profile
from course_lib.reflow import path_from_trajectory, reflow_pairs, straightness
from course_lib.samplers import ddim_sample
from course_lib.sampling import draw_flow_samples, draw_samples
from course_lib.schedules import make_schedule
from course_lib.toy import moons
from course_lib.train import TrainConfig, train
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110
print(f"profile: {profile.name} | device: {device} | toy training steps: {profile.toy_train_steps}")

# %% [markdown]
# ## 1. A straight path and its velocity
#
# Put the data at $t = 0$ and the noise at $t = 1$ (the convention of SD3 and of diffusers' flow schedulers) and
# join them by a straight line:
#
# $$x_t = (1 - t)\,x_0 + t\,\epsilon,\qquad \frac{dx_t}{dt} = \epsilon - x_0 = v.$$
#
# Each pair $(x_0, \epsilon)$ moves at constant speed. The network sees only $x_t$ and $t$, so the best it can do
# in squared error is the average velocity of all pairs passing through $x_t$ at time $t$,
# $v(x, t) = \mathbb E[\epsilon - x_0 \mid x_t = x]$; and the ODE $dx/dt = v(x, t)$ run from noise at $t = 1$ to
# $t = 0$ carries the noise distribution to the data distribution (Lipman et al. 2023, theorem 1). A warning for
# reading the papers: Lipman et al. and Liu et al. run time the other way, noise at $t = 0$ and data at $t = 1$, so
# their $t$ is our $1 - t$ and their velocity is minus ours; SD3 (Esser et al. 2024) and diffusers write it as
# here. The loss:
#
# $$L = \mathbb E_{t \sim \mathcal U(0, 1),\, x_0,\, \epsilon}\, \lVert v_\theta(x_t, t) - (\epsilon - x_0) \rVert^2.$$
#
# Written out for one batch, against `course_lib.flow.flow_loss` with the same random draws (first t, then
# noise, as the library draws them) and a stand-in network:

# %%
# NBVAL_CHECK_OUTPUT
x0 = moons(256, torch.Generator().manual_seed(0))  # (256, 2)
net = MLPDenoiser(data_dim=2, hidden=32, depth=1)
generator = torch.Generator().manual_seed(1)
t = torch.rand(256, generator=generator)
eps = torch.randn(x0.shape, generator=generator)
xt = (1 - t[:, None]) * x0 + t[:, None] * eps
by_hand = (net(xt, t * 1000) - (eps - x0)).pow(2).mean()  # the network's time input is t * 1000
library = flow_loss(net, x0, torch.Generator().manual_seed(1))
print("flow_loss equals the loss by hand:", bool(torch.allclose(by_hand, library)))
scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
index = torch.randint(0, 1000, (256,), generator=generator)  # diffusers noises at the times of its own table
theirs = scheduler.scale_noise(x0, scheduler.timesteps[index], eps)
ours = interpolate(x0, eps, scheduler.sigmas[index])  # its sigma is our t
print("interpolate equals diffusers' scale_noise:", bool(torch.allclose(ours, theirs, atol=1e-6)))

# %% [markdown]
# ## 2. A flow on two moons, live
#
# The same loop as every chapter (`course_lib.train.train`), with `objective="flow"`: a small MLP learns the
# velocity of the straight paths between the moons and Gaussian noise. Its time input is $t \cdot 1000$, so the
# networks of the earlier chapters work unchanged.

# %%
data = moons(profile.toy_samples, torch.Generator().manual_seed(2))
config = TrainConfig(
    steps=profile.toy_train_steps,
    batch_size=profile.toy_batch_size,
    lr=2e-3,
    warmup=100,
    ema_decay=None,
    grad_clip=None,
    objective="flow",
)
flow = MLPDenoiser(data_dim=2, hidden=128, depth=3)
start = time.perf_counter()
state, _ = train(flow, None, data.to(device), config, progress=False)
print(f"{config.steps} steps in {time.perf_counter() - start:.0f} s")
plot_losses(state.losses, window=max(1, config.steps // 20)).set_title("flow-matching loss")
plt.show()

# %% [markdown]
# Euler's method on the ODE takes one network call per step, $x_{t - h} = x_t - h\,v_\theta(x_t, t)$; Heun's adds
# a corrector, two calls per step (the last step, into $t = 0$, is plain Euler, as in Karras et al. 2022 and
# diffusers' Heun scheduler). Samples against a fresh draw of the data, by sliced Wasserstein distance (chapter 3):

# %%
reference = moons(profile.toy_model_samples, torch.Generator().manual_seed(3))
noise = torch.randn(profile.toy_model_samples, 2, generator=torch.Generator().manual_seed(4))


def distance(samples: torch.Tensor) -> float:
    return sliced_wasserstein(samples.cpu(), reference, generator=torch.Generator().manual_seed(0))


floor = sliced_wasserstein(
    moons(profile.toy_model_samples, torch.Generator().manual_seed(5)),
    reference,
    generator=torch.Generator().manual_seed(0),
)
print(f"floor (two draws of the data): {floor:.3f}")
with torch.no_grad():
    for steps in (1, 2, 4, 8, 32):
        euler, _ = euler_flow_sample(flow, noise.to(device), steps)
        heun, _ = heun_flow_sample(flow, noise.to(device), steps)
        print(
            f"{steps:3d} steps: Euler ({steps} calls) {distance(euler):.3f}, Heun ({2 * steps - 1} calls) "
            f"{distance(heun):.3f}"
        )

# %% [markdown]
# ## 3. How straight is the learned flow? Reflow
#
# The training paths are straight, but they cross: many pairs pass through the same $x_t$, and the network learns
# their average, so the ODE's paths bend. Liu et al. measure it by the straightness
# $S = \int_0^1 \lVert (x_1 - x_0) - \dot x_t \rVert^2\,dt$, zero for a straight path at constant speed
# (`course_lib.reflow.straightness`). **Reflow** trains a new flow on the pairs (noise, its ODE sample) of the old one:
# these pairs no longer cross, so the new flow's paths are straighter, and a step or two gets close.

# %%
with torch.no_grad():
    sample, trajectory = euler_flow_sample(flow, noise[:500].to(device), 64, record_every=1)
times, path = path_from_trajectory(trajectory, sample)
print(f"straightness of the flow's ODE paths (64 Euler steps): {straightness(times, path).mean():.4f}")

# %%
with torch.no_grad():
    pair_noise, pair_samples = reflow_pairs(
        flow, torch.randn(profile.toy_samples, 2, generator=torch.Generator().manual_seed(6)).to(device), 32
    )
pairs = torch.stack([pair_noise, pair_samples], dim=1)  # (N, 2, 2): noise at [:, 0], its sample at [:, 1]
reflowed = MLPDenoiser(data_dim=2, hidden=128, depth=3)
reflowed.load_state_dict(flow.state_dict())  # start from the flow, as Liu et al. do
start = time.perf_counter()
train(reflowed, None, pairs, replace(config, objective="reflow"), progress=False)
print(f"reflow: {config.steps} steps in {time.perf_counter() - start:.0f} s")
with torch.no_grad():
    sample, trajectory = euler_flow_sample(reflowed, noise[:500].to(device), 64, record_every=1)
times, path = path_from_trajectory(trajectory, sample)
print(f"straightness after one reflow: {straightness(times, path).mean():.4f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, (name, model) in zip(axes, (("flow", flow), ("after reflow", reflowed)), strict=True):
    with torch.no_grad():
        sample, trajectory = euler_flow_sample(model, noise[:60].to(device), 32, record_every=1)
    _, path = path_from_trajectory(trajectory, sample)  # (33, 60, 2)
    ax.scatter(*reference[:2000].T, s=1, color="lightgrey")
    for i in range(60):
        ax.plot(*path[:, i].T, linewidth=0.6)
    with torch.no_grad():
        one_step = distance(euler_flow_sample(model, noise.to(device), 1)[0])
    ax.set_title(f"{name}: paths from noise; 1 Euler step: distance {one_step:.3f}", fontsize=9)
    ax.set_aspect("equal")
plt.show()

# %% [markdown]
# ## 4. Digits
#
# `scripts/train_unet.py --recipe unet_mnist_flow` trains chapter 4's UNet with the flow objective, starting from
# the shipped eps model (whose features carry over; the output layer learns to mean a velocity). The comparison
# that matters in practice is quality for a number of network calls: DDIM on the eps model against Euler and Heun
# on the flow model, from the same noise (`draw_flow_samples` uses `draw_samples`' noise for the same seed).
# Heun with $s$ steps costs $2s - 1$ calls, so it is run at the odd counts nearest each budget.

# %%
flow_card = load_card("unet_mnist_flow")
flow_digits = load_model("unet_mnist_flow", device)
eps_card = load_card("unet_mnist_eps")
eps_digits = load_model("unet_mnist_eps", device)
eps_schedule = make_schedule(**eps_card["schedule"])
print(f"flow model: {flow_card['training']['status']}, {flow_card['training']['images_seen']:,d} images")
classifier = load_digit_classifier(device)
n, budgets = profile.sampler_samples, profile.step_counts[:3]
rows = []  # one per live run: sampler, network calls, FID
for calls in budgets:
    heun_steps = (calls + 1) // 2
    runs = {  # (sampler, model, network calls): (samples, seconds)
        ("DDIM", "eps", calls): draw_samples(eps_digits, eps_schedule, "DDIM", calls, n, seed=10, device=device),
        ("Euler", "flow", calls): draw_flow_samples(flow_digits, "euler", calls, n, seed=10, device=device),
        ("Heun", "flow", 2 * heun_steps - 1): draw_flow_samples(
            flow_digits, "heun", heun_steps, n, seed=10, device=device
        ),
    }
    for (sampler, trained_for, used), (samples, seconds) in runs.items():
        scores = sample_scores(classifier, samples)
        rows.append((sampler, used, scores["fid"]))
        print(
            f"{sampler + f' ({trained_for})':12s} {used:3d} calls: FID {scores['fid']:6.2f} ± {scores['fid_sd']:.2f}  "
            "confident "
            f"{scores['confident_fraction']:.2f}  {seconds:5.1f} s"
        )
print(f"(n = {n}; real-vs-real floor FID {scores['fid_floor']:.2f} ± {scores['fid_floor_sd']:.2f})")

# %% [markdown]
# `python scripts/bench.py flow` measured the same on 500 samples per run, up to 50 calls, with the live points
# of this notebook on top. FID is biased upwards on few samples (chapter 5), so the live points sit higher than
# the benchmark's: compare each with the floor of its own sample size.

# %%
flow_bench = load_results("flow")
print(f"benchmark: {flow_bench['n']} samples per run, flow model {flow_bench['flow_status']}")
fig, ax = plt.subplots(figsize=(6, 3.5))
for sampler, color in (("DDIM", "C0"), ("Euler", "C1"), ("Heun", "C2")):
    runs = [run for run in flow_bench["runs"] if run["sampler"] == sampler]
    calls, fid = [run["calls"] for run in runs], torch.tensor([run["fid"] for run in runs])
    band = torch.tensor([run["fid_sd"] for run in runs])  # the bootstrap spread of each FID
    ax.plot(calls, fid, "o-", color=color, label=sampler)
    ax.fill_between(calls, fid - band, fid + band, color=color, alpha=0.2)
    live = [(calls, fid) for name, calls, fid in rows if name == sampler]
    ax.scatter(*zip(*live, strict=True), marker="x", color=color)
ax.axhline(flow_bench["runs"][0]["fid_floor"], color="grey", linestyle=":", label=f"floor, n = {flow_bench['n']}")
ax.axhline(scores["fid_floor"], color="grey", linestyle="--", label=f"floor, n = {n} (this run)")
ax.set(xscale="log", yscale="log", xlabel="network calls", ylabel="FID")
ax.set_title(f"lines: benchmark (n = {flow_bench['n']}, bands ± 1 sd); x: this run (n = {n})", fontsize=10)
ax.minorticks_off()
ax.set_xticks([5, 10, 20, 50], ["5", "10", "20", "50"])
ax.set_yticks([1, 2, 5, 10, 20, 50], ["1", "2", "5", "10", "20", "50"])
ax.legend()
plt.show()

# %% [markdown]
# Read the comparison with its caveat: the flow model is the eps model fine-tuned for 2,000 more steps (256,000
# more images), so it has seen more training, and part of its lead may come from that alone. What the objective
# predicts is a lead that grows as the calls get fewer, where the bending of the paths costs most. The ratio of
# the two FIDs in the benchmark, per budget:

# %%
bench_runs = {(run["sampler"], run["calls"]): run for run in flow_bench["runs"]}
for sampler, calls in bench_runs:
    if sampler == "DDIM":
        ddim, euler = bench_runs["DDIM", calls], bench_runs["Euler", calls]
        apart = clearly_below(euler["fid"], euler["fid_sd"], ddim["fid"], ddim["fid_sd"])
        print(
            f"{calls:3d} calls: FID DDIM (eps) {ddim['fid']:.2f} ± {ddim['fid_sd']:.2f}, Euler (flow) "
            f"{euler['fid']:.2f} ± {euler['fid_sd']:.2f}: ratio {ddim['fid'] / euler['fid']:.1f}"
            f"{'' if apart else ' (within the spreads)'}"
        )

# %% [markdown]
# DDIM is the simplest sampler of the eps model, not its best (chapter 5: DPM-Solver++(2M)), and the two models saw
# different training. Chapter 11 settles how much is the objective: the same UNet trained from scratch with each
# objective on the same 256,000 images (`python scripts/train_unet.py --recipe comparison`), each read with its best
# sampler.

# %% [markdown]
# How straight are the flow's paths for digits? The same straightness as for the moons, on the Euler path of a
# few digits:

# %%
with torch.no_grad():
    x1 = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(11)).to(device)  # the 8 shown below
    sample, trajectory = euler_flow_sample(flow_digits, x1, 32, record_every=1)
times, path = path_from_trajectory(trajectory, sample)
print(f"straightness of the digit flow's paths (32 Euler steps): {straightness(times, path).mean():.4f}")
show_images(
    torch.stack([x0_hat for _, _, x0_hat in trajectory[::4]]).flatten(0, 1).clamp(-1, 1),
    nrow=8,
    title="x0_hat along the path, every 4th step (rows)",
)
plt.show()


# %% [markdown]
# A number needs a baseline. The eps model's DDIM path can be read in the same coordinates: divide the VP state by
# $\sqrt{\bar\alpha_t} + \sqrt{1 - \bar\alpha_t}$ and set $t_{flow} = \sqrt{1 - \bar\alpha_t} / (\sqrt{\bar\alpha_t} +
# \sqrt{1 - \bar\alpha_t})$; then $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1 - \bar\alpha_t}\epsilon$ becomes exactly
# $(1 - t_{flow})x_0 + t_{flow}\epsilon$, the straight path of this chapter (checked below). Both models learn an ODE
# on the same family of paths; what differs is the network and where the sampler puts its steps in time.

# %%
with torch.no_grad():
    ddim_x0, ddim_path = ddim_sample(eps_digits, eps_schedule, x1, 32, clip_x0=True, record_every=1)
alpha_bar = eps_schedule.alpha_bar.double()
scale = {t: (alpha_bar[t].sqrt() + (1 - alpha_bar[t]).sqrt()).item() for t, _, _ in ddim_path}
flow_times = torch.tensor([(1 - alpha_bar[t]).sqrt().item() / scale[t] for t, _, _ in ddim_path] + [0.0])
flow_path = torch.stack([xt / scale[t] for t, xt, _ in ddim_path] + [ddim_x0.cpu()])
t_check = 500  # the identity, on one digit and one noise
x0_check, eps_check = x1[:1].cpu().double() * 0.3, x1[1:2].cpu().double()
vp_state = alpha_bar[t_check].sqrt() * x0_check + (1 - alpha_bar[t_check]).sqrt() * eps_check
t_flow = (1 - alpha_bar[t_check]).sqrt() / (alpha_bar[t_check].sqrt() + (1 - alpha_bar[t_check]).sqrt())
straight = (1 - t_flow) * x0_check + t_flow * eps_check
vp_scale = alpha_bar[t_check].sqrt() + (1 - alpha_bar[t_check]).sqrt()
print("VP state / scale = straight-path state:", torch.allclose(vp_state / vp_scale, straight))
ddim_straightness = straightness(flow_times, flow_path).mean()
print(f"straightness of the eps model's DDIM paths (32 steps) in these coordinates: {ddim_straightness:.4f}")

# %% [markdown]
# ## Recap
#
# - Flow matching trains the network on the velocity $\epsilon - x_0$ of straight paths
#   $x_t = (1 - t)\,x_0 + t\,\epsilon$; the learned velocity field is the average over crossing paths, so its ODE
#   paths bend where the data is multimodal.
# - Euler takes one network call per step, Heun two; both follow the ODE from noise at $t = 1$ to data at $t = 0$.
# - Reflow retrains on the flow's own (noise, sample) pairs, which do not cross: the paths straighten (measured by
#   the straightness $S$) and a single Euler step gets much closer.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** For data that is a single point $x^*$, every path ends there and the optimal velocity is known:
# from $x_t = (1 - t)x^* + t\epsilon$, $v(x_t, t) = (x_t - x^*)/t$. Write it as `point_velocity` and check that
# one Euler step from any noise lands exactly on $x^*$.

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
x_star = torch.tensor([[0.5, -1.0]])


def point_velocity(xt: torch.Tensor, time_input: torch.Tensor) -> torch.Tensor:
    t = time_input[:, None] / 1000  # the model's time input is t * 1000
    return (xt - x_star) / t


### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
landed, _ = euler_flow_sample(point_velocity, torch.randn(8, 2, generator=torch.Generator().manual_seed(7)), 1)
assert torch.allclose(landed, x_star.expand(8, 2), atol=1e-5), landed
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** The course's uniform grid and diffusers' grid: with `time_grid(steps, spacing="diffusers")`,
# check that the times are diffusers' sigmas for 10 steps, with and without SD3's shift of 3.


# %% tags=["solution", "hide-input"]
def diffusers_sigmas(steps: int, shift: float) -> torch.Tensor:
    ### BEGIN SOLUTION
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.double()
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
for shift in (1.0, 3.0):
    ours = time_grid(10, shift, spacing="diffusers")
    assert torch.allclose(ours, diffusers_sigmas(10, shift), rtol=1e-6), (shift, ours)
print("exercise 2: correct")
