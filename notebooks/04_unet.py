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
# # Chapter 4: A UNet from scratch
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/04_unet.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F04_unet.ipynb)
#
# Chapter 3 trained an MLP on points. Images need a network that sees neighbourhoods at several scales: a UNet.
# This chapter builds the course's UNet (`course_lib.nets.unet`) block by block, checks every piece, compares it
# with diffusers' `UNet2DModel`, trains a small one live on digits, and then samples from the model the course
# trained for longer.
#
# By the end of this chapter you can:
#
# 1. build a residual block that takes the timestep as a scale and shift, and a self-attention block, and say why
#    both start as the identity;
# 2. follow a tensor's shape through the down path, the middle and the up path with its skip connections;
# 3. count parameters and FLOPs, and say where a UNet's compute goes;
# 4. train a UNet with EMA weights and sample it with DDIM;
# 5. explain why an eps-prediction model on this cosine schedule (whose last beta is clipped) needs `clip_x0=True`,
#    measure how often the clip acts, and judge samples with a classifier.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.benchmark import DiffusersUNet, gflops_per_image, parameter_count, training_images_per_second
from course_lib.claims import check_claim
from course_lib.data import load_digits
from course_lib.ddpm import simple_loss, x0_from_eps
from course_lib.metrics import confident_fraction, load_digit_classifier, sample_scores
from course_lib.nets.embedding import timestep_embedding
from course_lib.nets.unet import ResBlock, SelfAttention, UNet
from course_lib.plotting import plot_losses, show_images, show_strip
from course_lib.profiles import get_device, get_profile
from course_lib.samplers import ddim_sample
from course_lib.schedules import gather, make_schedule
from course_lib.train import EMA, warmup_cosine
from course_lib.weights import load_card, load_weights, model_config

profile = get_profile()
device = get_device()
# One thread: on the course's shared 2-core test machine it kept its speed when other programs ran beside it.
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110  # keeps the stored figures small
print(f"profile: {profile.name} | device: {device}")
print(f"live training: {profile.unet_train_steps} steps of batch {profile.unet_batch_size}", end=" | ")
print(f"DDIM steps: {profile.sample_steps} | digits scored: {profile.unet_samples}")

# %% [markdown]
# ## 1. The timestep as a vector
#
# The network gets $t$ as an integer. It sees it as the sinusoidal features of Vaswani et al. (section 3.5),
# $[\cos(t\,\omega_i), \sin(t\,\omega_i)]$ with $\omega_i = 10000^{-i/(d/2)}$, which a small MLP then turns into
# the embedding every block reads. Derived in two lines, against the library:

# %%
# NBVAL_CHECK_OUTPUT
dim, t = 32, torch.tensor([0, 1, 10, 500, 999])
omega = 10_000.0 ** (-torch.arange(dim // 2) / (dim // 2))  # (dim/2,) from 1 down to about 1e-4
features = torch.cat([(t[:, None] * omega).cos(), (t[:, None] * omega).sin()], dim=1)  # (5, dim)
print("shape:", tuple(features.shape))
print("equals timestep_embedding (1e-4):", torch.allclose(features, timestep_embedding(t, dim), atol=1e-4))

# %% [markdown]
# ## 2. The residual block, with the time as scale and shift
#
# `ResBlock` is GroupNorm -> SiLU -> 3x3 conv, then the time embedding enters as a per-channel **scale and shift**
# of the normalised features, $h \leftarrow \mathrm{GN}(h)(1 + s) + b$ with $(s, b) = \mathrm{Linear}(\mathrm{SiLU}
# (e))$ (Dhariwal & Nichol 2021, "AdaGN"), then SiLU -> 3x3 conv, plus a skip (a 1x1 conv when the width changes).
# The last conv is initialised to zero, so a fresh block is exactly its skip: a deep stack starts as the identity
# and learns what to add.

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
emb_dim = 128
block = ResBlock(c_in=32, c_out=64, emb_dim=emb_dim, groups=8, dropout=0.0)
x = torch.randn(2, 32, 14, 14)  # (B, c_in, H, W)
emb = torch.randn(2, emb_dim)  # (B, emb_dim)
out = block(x, emb)
print("in:", tuple(x.shape), "-> out:", tuple(out.shape))
print("a fresh block is its skip:", torch.equal(out, block.skip(x)))
for name, child in block.named_children():
    print(f"  {name:8s} {sum(p.numel() for p in child.parameters()):6d} parameters")
print(f"  {'total':8s} {sum(p.numel() for p in block.parameters()):6d}")

# %% [markdown]
# The time projection `emb` is not small: it maps 128 features to a scale and a shift for each of the 64 channels.
#
# ## 3. Self-attention at 7 x 7
#
# At the lowest resolution every position attends to every other: the $H W$ positions become tokens of $C$
# features, multi-head attention mixes them, and the result is added back. At 7 x 7 that is 49 tokens, cheap; at
# 28 x 28 it would be 784 tokens and 256 times the attention matrix. The output projection starts at zero, so
# again a fresh block is the identity.

# %%
# NBVAL_CHECK_OUTPUT
attention = SelfAttention(channels=96, heads=4, groups=8)
x = torch.randn(2, 96, 7, 7)
print("in:", tuple(x.shape), "-> out:", tuple(attention(x).shape), "| tokens:", 7 * 7)
print("a fresh block is the identity:", torch.equal(attention(x), x))
print("parameters:", sum(p.numel() for p in attention.parameters()))

# %% [markdown]
# ## 4. The whole UNet: shapes through the network
#
# The shipped model's recipe lives in its card; `load_card` reads it (the weights come later). Down the UNet each
# level runs its residual blocks and keeps every output as a skip, then a stride-2 conv halves the resolution; the
# middle is ResBlock -> attention -> ResBlock at 7 x 7; up the UNet each block takes the matching skip concatenated
# on the channels, and nearest-neighbour upsampling doubles the resolution. Forward hooks print every block's
# output shape in the order the blocks run:

# %%
card = load_card("unet_mnist_eps")
unet_config = model_config(card)
print("model:", unet_config)
print("schedule:", card["schedule"], "| prediction:", card["prediction_type"])

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
unet = UNet(**unet_config)
shown = (ResBlock, SelfAttention)
hooks = []
for name, module in unet.named_modules():
    if isinstance(module, shown) or name in ("conv_in", "conv_out") or name.startswith("downsample."):
        report = lambda module, inputs, output, name=name: print(f"{name:22s} {tuple(output.shape)}")  # noqa: E731
        hooks.append(module.register_forward_hook(report))
xt = torch.randn(2, 1, 28, 28)
eps_hat = unet(xt, torch.tensor([10, 900]))
for hook in hooks:
    hook.remove()
print("output shape equals input shape:", eps_hat.shape == xt.shape)
print("output is exactly 0 at init:", bool((eps_hat == 0).all()))

# %% [markdown]
# The zero output follows from `conv_out` starting at zero: at step 0 the network predicts $\hat\epsilon = 0$, the
# mean of $\epsilon$, and the loss starts at about 1. Where do the parameters sit?


# %%
# NBVAL_CHECK_OUTPUT
count = parameter_count  # sum(p.numel() for p in module.parameters())
resolutions = [28 // 2**level for level in range(unet.levels)]
for level, size in enumerate(resolutions):
    down = count(unet.down[level]) + (count(unet.downsample[level]) if level < unet.levels - 1 else 0)
    up = count(unet.up[unet.levels - 1 - level])
    print(f"level {level} ({size:2d} x {size:2d}, {unet_config['channels'][level]:3d} ch): down {down:7d}  up {up:7d}")
middle = count(unet.mid1) + count(unet.mid_attention) + count(unet.mid2)
rest = count(unet.time_mlp) + count(unet.conv_in) + count(unet.norm_out) + count(unet.conv_out)
print(f"middle (7 x 7): {middle} | time MLP, conv_in, conv_out: {rest} | total: {count(unet)}")

# %% [markdown]
# Most parameters sit at 7 x 7, where the channels are widest; but parameters are not compute. A 3x3 conv from
# $c$ to $c$ channels at $H \times W$ costs $9 c^2 H W$ multiply-adds: halving the resolution divides the cost by
# 4, and the wider channels at the lower levels ($32 \to 64 \to 96$) pay most of that back. Section 5 counts the
# FLOPs; exercise 2 checks the formula.
#
# ## 5. Against diffusers' `UNet2DModel`
#
# A baseline of similar size from diffusers: widths 32/64/64, two ResBlocks per level, attention at the two lower
# levels (14 x 14 and 7 x 7). Three numbers per network: parameters, FLOPs of one forward pass on one digit
# (torch's `FlopCounterMode`, which counts a multiply-add as 2 FLOPs; `gflops_per_image` runs attention on SDPA's
# MATH backend while counting, because torch's fused CPU attention kernel has no FLOP formula and would count as 0),
# and the time of a few training steps.

# %%
torch.manual_seed(0)
baseline = DiffusersUNet()  # UNet2DModel(**DiffusersUNet.CONFIG), called as baseline(xt, t) like the course's
print({key: DiffusersUNet.CONFIG[key] for key in ("block_out_channels", "layers_per_block", "down_block_types")})
networks = {"course UNet": unet, "diffusers UNet2DModel": baseline}
speeds = {name: training_images_per_second(net, 32, profile.bench_steps) for name, net in networks.items()}
print(f"{'network':24s} {'parameters':>11s} {'GFLOPs/digit':>13s} {'training images/s':>18s}")
for name, net in networks.items():
    gflops = gflops_per_image(net, backward=False)
    print(f"{name:24s} {count(net):11,d} {gflops:13.3f} {speeds[name]:18.1f}")
ratio = speeds["course UNet"] / speeds["diffusers UNet2DModel"]
print(f"one run of {profile.bench_steps} timed steps of batch 32 each: the course UNet trains {ratio:.1f}x as fast")

# %% [markdown]
# One short run on a possibly shared CPU: read the ratio as rough. The FLOP counts are exact and explain most of
# it: diffusers keeps two ResBlocks and a resample conv at 28 x 28 and attends at 14 x 14 (196 tokens), where the
# course UNet keeps one block at full resolution and attends only at 7 x 7.
#
# ## 6. Training a UNet live
#
# The shipped model took hours of CPU. Here a narrower UNet of the same design (channels 16/32/48) trains for
# `profile.unet_train_steps` steps on the 4,000 training digits, with the shipped model's schedule (cosine,
# $T = 1000$). The loop is written out: a minibatch, `simple_loss`, an AdamW step at a warm-up + cosine learning
# rate, and an update of the EMA weights (an exponential moving average; sampling uses them, as their noise is
# averaged out). Three times during training we draw 16 digits with DDIM from the EMA weights.

# %%
schedule = make_schedule(card["schedule"]["name"], card["schedule"]["T"])
digits, _ = load_digits("train")  # (4000, 1, 28, 28) in [-1, 1]
torch.manual_seed(0)
small = UNet(**{**unet_config, "channels": (16, 32, 48)}).to(device)
ema = EMA(small, decay=0.99)
optimizer = torch.optim.AdamW(small.parameters(), lr=2e-3)
steps, warmup = profile.unet_train_steps, profile.unet_train_steps // 10
snapshot_at = {steps // 3, 2 * steps // 3, steps}
print(f"{count(small):,d} parameters; EMA decay {ema.decay}; snapshots after steps {sorted(snapshot_at)}")


def draw(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    """n digits by DDIM (eta = 0, profile.sample_steps steps, x0_hat clipped to [-1, 1]; see section 7)."""
    x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        x0, _ = ddim_sample(model.eval(), schedule, x_T, profile.sample_steps, clip_x0=True)
    return x0.cpu()


# %%
generator = torch.Generator().manual_seed(0)
losses, snapshots, start = [], {}, time.perf_counter()
for step in range(steps):
    # 1. a random minibatch of digits
    x0 = digits[torch.randint(0, len(digits), (profile.unet_batch_size,), generator=generator)].to(device)
    # 2. the simple loss at random t with fresh noise
    small.train()
    loss = simple_loss(small, schedule, x0, generator)
    # 3. one AdamW step at this step's learning rate, then the EMA
    for group in optimizer.param_groups:
        group["lr"] = 2e-3 * warmup_cosine(step, steps, warmup)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(small.parameters(), 1.0)
    optimizer.step()
    ema.update(small)
    losses.append(loss.item())
    if step + 1 in snapshot_at:
        snapshots[step + 1] = draw(ema.model, 16, seed=1)
print(f"{steps} steps in {time.perf_counter() - start:.0f} s (snapshots included)")

# %%
ax = plot_losses(losses, window=max(1, steps // 10))
ax.set_title("Live training loss (eps MSE)")
plt.show()
fig, axes = plt.subplots(1, len(snapshots), figsize=(3.2 * len(snapshots), 3.4))
for ax, (step, images) in zip(axes, sorted(snapshots.items()), strict=True):
    show_images(images, nrow=4, title=f"after {step} steps", ax=ax)
fig.suptitle("EMA samples during live training (same noise each time)")
plt.show()

# %% [markdown]
# How far did the live run get? Chapter 4's classifier reads the last snapshot; the shipped model below is read the
# same way. A few hundred steps of a narrow network give strokes and blobs, not yet digits: the shipped model
# trained for 6,000 steps of a wider one.

# %%
classifier = load_digit_classifier(device)
live_confident = confident_fraction(classifier, snapshots[steps])
print(f"live model after {steps} steps: {live_confident:.0%} of 16 samples read with confidence >= 0.9")
check_claim(
    live_confident < 0.5,
    "a few hundred steps of the narrow network give strokes and blobs, not yet digits",
    f"{live_confident:.0%} of the last snapshot read with confidence",
    decisive=profile.name != "smoke",
)

# %% [markdown]
# **The loss the shipped model was trained with.** The live loop above uses the plain simple loss, every $t$
# weighted alike in $\epsilon$-space. The shipped model's recipe (its card, `min_snr_gamma: 5`) weights each
# example by min-SNR-$\gamma$ (Hang et al. 2023): $w_t = \min(\mathrm{snr}_t, \gamma) / \mathrm{snr}_t$. Why that
# form: an error in $\hat\epsilon$ is an error in $\hat x_0$ times $\sqrt{\mathrm{snr}_t}$
# ($\hat x_0 - x_0 = -(\hat\epsilon - \epsilon)/\sqrt{\mathrm{snr}_t}$, chapter 3's conversion), so
# $\lVert\hat\epsilon - \epsilon\rVert^2 = \mathrm{snr}_t \lVert\hat x_0 - x_0\rVert^2$ and the weighted
# $\epsilon$-loss is $\min(\mathrm{snr}_t, \gamma)\,\lVert\hat x_0 - x_0\rVert^2$: the $x_0$-error at every
# noise level, with the nearly clean steps (where snr is huge and the task is easy) capped at $\gamma$ instead of
# dominating. Checked on one minibatch, the library's loss against that $x_0$-space form:

# %%
# NBVAL_CHECK_OUTPUT
gamma, x0 = 5.0, digits[:16].to(device)
ours = simple_loss(small, schedule, x0, torch.Generator().manual_seed(9), min_snr_gamma=gamma)
generator = torch.Generator().manual_seed(9)  # the same draws as simple_loss: t, then the noise
t = torch.randint(0, schedule.T, (16,), generator=generator).to(device)
eps = torch.randn(x0.shape, generator=generator).to(device)
alpha_bar_t = gather(schedule.alpha_bar, t, x0)  # (16, 1, 1, 1)
xt = alpha_bar_t.sqrt() * x0 + (1 - alpha_bar_t).sqrt() * eps
with torch.no_grad():
    x0_hat = x0_from_eps(schedule, xt, t, small(xt, t))
snr = schedule.snr.to(device)[t]  # (16,)
by_hand = (snr.clamp(max=gamma) * (x0_hat - x0).pow(2).flatten(1).mean(1)).mean()
print("min-SNR eps-loss = min(snr, gamma) x the x0-error:", torch.allclose(ours.detach(), by_hand, rtol=1e-3))

# %% [markdown]
# Let us load the shipped model.
#
# ## 7. The shipped model
#
# Its card says how it was trained: the command, the machine, the time, and whether the run had finished.

# %%
model = load_weights(UNet(**unet_config).to(device), "unet_mnist_eps").eval()
training = card["training"]
print(f"status: {training['status']}")
print(f"steps done: {training['steps_done']} of {training['steps']}, batch {training['batch_size']}")
print(f"wall time: {training['wall_minutes']} min on {training['machine']}")

# %% [markdown]
# **Why `clip_x0=True`.** With eps-prediction every step first estimates
# $\hat x_0 = (x_t - \sqrt{1 - \bar\alpha_t}\,\hat\epsilon) / \sqrt{\bar\alpha_t}$, so an error $\delta$ in
# $\hat\epsilon$ becomes an error $\sqrt{(1 - \bar\alpha_t)/\bar\alpha_t}\,\delta$ in $\hat x_0$. At the first step
# of the cosine schedule that factor is enormous:

# %%
# NBVAL_CHECK_OUTPUT
alpha_bar_last = schedule.alpha_bar[-1].double()
amplification = ((1 - alpha_bar_last) / alpha_bar_last).sqrt()
print(f"alpha_bar at t = {schedule.T - 1}: {alpha_bar_last:.1e}")
print(f"an error in eps_hat is multiplied by {amplification:.1e} in x0_hat")

# %% [markdown]
# A network error of 1% in $\hat\epsilon$ then puts $\hat x_0$ hundreds of units outside the data's range
# $[-1, 1]$, and DDIM's next state inherits it. Clipping $\hat x_0$ to $[-1, 1]$ keeps the first steps sane. This
# is a property of this schedule's last, clipped $\beta$ together with $\epsilon$-prediction (chapter 11 trains
# other parameterisations on the same schedule and measures what they need). How much does the clip do, step by
# step? For each step of a DDIM
# run: the share of $\hat x_0$'s pixels outside $[-1, 1]$, and how far the clip moves them on average.

# %%
x_T = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(2)).to(device)
with torch.no_grad():
    _, path = ddim_sample(model, schedule, x_T, profile.sample_steps, clip_x0=True, record_every=1)
    clip_effect = []  # (t, share of pixels outside [-1, 1], mean |change| made by the clip)
    for t, xt, _ in path:  # x0_hat before the clip, from the network's eps_hat at the recorded state
        t_batch = torch.full((len(xt),), t, device=device)
        x0_raw = x0_from_eps(schedule, xt.to(device), t_batch, model(xt.to(device), t_batch))
        change = (x0_raw - x0_raw.clamp(-1, 1)).abs()
        clip_effect.append((t, (change > 0).float().mean().item(), change.mean().item()))
for t, share, mean_change in clip_effect:
    print(f"t = {t:3d}: {share:4.0%} of pixels clipped, mean change {mean_change:.4f}")
first, later = clip_effect[0][2], max(mean_change for _, _, mean_change in clip_effect[1:])
check_claim(
    first > 100 * later,
    "after the first step the clip touches many pixels but barely moves them; at the first step it moves them far",
    f"mean change {first:.3g} at t = {clip_effect[0][0]}, at most {later:.3g} afterwards",
    decisive=profile.name != "smoke",
)

# %% [markdown]
# A grid of samples, with the same noise:

# %%
start = time.perf_counter()
samples = draw(model, profile.grid_images, seed=2)
print(f"{profile.grid_images} digits x {profile.sample_steps} DDIM steps in {time.perf_counter() - start:.1f} s")
show_images(samples, nrow=8, title="The shipped UNet, DDIM")
plt.show()

# %% [markdown]
# The reverse process of one digit, recorded by `ddim_sample(..., record_every=...)`: the state $x_t$ (top) and
# the network's estimate $\hat x_0$ at that step (bottom). The estimate is a blurry average of digits early on and
# sharpens long before $x_t$ stops looking like noise.

# %%
x_T = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(3)).to(device)
record_every = max(1, profile.sample_steps // 5)
with torch.no_grad():
    x0, path = ddim_sample(model, schedule, x_T, profile.sample_steps, clip_x0=True, record_every=record_every)
labels = [f"t = {t}" for t, _, _ in path] + ["sample"]
show_strip([xt for _, xt, _ in path] + [x0.cpu()], labels, title="x_t during sampling")
plt.show()
show_strip([x0_hat for _, _, x0_hat in path] + [x0.cpu()], labels, title="x0_hat during sampling")
plt.show()

# %% [markdown]
# ### Scores
#
# Two numbers from the shipped digit classifier: the fraction of samples it reads with confidence at least 0.9,
# and the FID of its features between samples and held-out digits, beside the floor that two real sets of the same
# size score. Both are for the export named above; the card's status says whether training has finished.

# %%
start = time.perf_counter()
scored = torch.cat(
    [draw(model, min(256, profile.unet_samples - i), seed=100 + i) for i in range(0, profile.unet_samples, 256)]
)
scores = sample_scores(classifier, scored)
print(f"shipped model ({training['status']}), {scores['n']} samples, {profile.sample_steps} DDIM steps:")
real_confident = confident_fraction(classifier, digits[: scores["n"]])
print(f"  confident fraction: {scores['confident_fraction']:.2f} (as many training digits: {real_confident:.2f})")
print(
    f"  FID: {scores['fid']:.2f} ± {scores['fid_sd']:.2f} "
    f"(real-vs-real floor at n = {scores['n']}: {scores['fid_floor']:.2f} ± {scores['fid_floor_sd']:.2f})"
)
print(f"sampling and scoring took {time.perf_counter() - start:.0f} s")

# %% [markdown]
# The course set this model two targets, FID within 3x the floor and 90% of samples read with confidence, and
# `python scripts/bench.py shipped` measures it against them at n = 1,000 (`docs/benchmarks.md`). Chapter 11 trains
# the same network with other objectives on equal budgets, ships the best of them as the course's flagship
# (trained on as many images as this one) and compares the two sample for sample. This eps model stays the one
# chapter 5 samples and the fine-tuned models of chapters 7, 8, 10 and 13 start from.
#
# ## Recap
#
# - A ResBlock takes the time embedding as a per-channel scale and shift; a zero-initialised last layer makes every
#   residual block, every attention block and the whole network's output start at the identity, or at zero.
# - Self-attention is affordable at 7 x 7 (49 tokens); the UNet halves the resolution twice and widens the
#   channels, with skips carrying the fine detail to the up path. The output has the input's shape.
# - A 3x3 conv costs $9 c^2 H W$ multiply-adds: few blocks at full resolution and attention only at 7 x 7 make
#   the course UNet cheaper than a diffusers baseline of similar size.
# - Training is the chapter 3 loop with EMA weights; sampling the cosine schedule with eps-prediction needs the
#   $\hat x_0$ clip, because $1/\sqrt{\bar\alpha_{T-1}}$ is about $2 \times 10^4$.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** Count the parameters of `ResBlock(c_in, c_out, emb_dim, groups, dropout)` by formula (two
# GroupNorms, two 3x3 convs, the time projection, and the 1x1 skip when $c_{in} \neq c_{out}$), as a function
# `resblock_parameters(c_in, c_out, emb_dim)`.


# %% tags=["solution", "hide-input"]
def resblock_parameters(c_in: int, c_out: int, emb_dim: int) -> int:
    ### BEGIN SOLUTION
    norms = 2 * c_in + 2 * c_out  # a weight and a bias per channel
    convs = (9 * c_in * c_out + c_out) + (9 * c_out * c_out + c_out)
    time_projection = emb_dim * 2 * c_out + 2 * c_out
    skip = c_in * c_out + c_out if c_in != c_out else 0
    return norms + convs + time_projection + skip
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
for c_in, c_out in [(32, 32), (32, 64), (160, 96)]:
    module = ResBlock(c_in, c_out, emb_dim=128, groups=8, dropout=0.0)
    assert resblock_parameters(c_in, c_out, 128) == count(module), f"{c_in}->{c_out}: {count(module)} parameters"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Compute the multiply-adds of a 3x3 conv from $c$ to $c$ channels on one image at each level of
# the shipped UNet ($c$ = 32, 64, 96 at 28, 14, 7 pixels), as a list `macs`, and check them with `FlopCounterMode`
# (2 FLOPs per multiply-add). Which level's convolution is the cheapest?

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
macs = [9 * c**2 * size**2 for c, size in zip(unet_config["channels"], resolutions, strict=True)]
print("multiply-adds per 3x3 conv:", macs)
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
for c, size, expected in zip(unet_config["channels"], resolutions, macs, strict=True):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        torch.nn.Conv2d(c, c, 3, padding=1)(torch.randn(1, c, size, size))
    assert counter.get_total_flops() == 2 * expected, f"c={c}: {counter.get_total_flops()} FLOPs"
print("exercise 2: correct; the 7 x 7 convolution is the cheapest:", macs.index(min(macs)) == 2)
