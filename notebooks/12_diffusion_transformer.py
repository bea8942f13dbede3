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
# # Chapter 12: A diffusion transformer
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/12_diffusion_transformer.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F12_diffusion_transformer.ipynb)
#
# Every model of this course so far is a UNet: convolutions at several resolutions, attention only where the image
# is small. Today's image generators are transformers instead. Peebles and Xie (2023, "Scalable Diffusion Models
# with Transformers", **DiT**) cut the VAE's latent into patches, treat each patch as a token, and run a plain
# vision transformer on them, conditioned on the time and the class through its layer norms; Stable Diffusion 3 and
# FLUX train such transformers with the flow matching of chapter 10. The appeal is not a better inductive bias (a
# transformer has less of one) but that it **scales**: quality follows compute smoothly, and the DiT paper's
# central figure is FID against training GFLOPs for models of several sizes.
#
# This chapter builds a DiT from its parts on the 4 x 7 x 7 latents of chapter 6, proves it equal to diffusers'
# `DiTTransformer2DModel` on identical weights, trains it with flow matching, and sets three widths of it against
# the latent UNet trained on the same 256,000 latents.
#
# By the end of this chapter you can:
#
# 1. turn an image or a latent into tokens and back (patchify, unpatchify), and say what the patch size costs;
# 2. explain the 2D sin-cos positions and adaLN-Zero conditioning, and why a fresh DiT is the identity map;
# 3. map our DiT onto diffusers' weights and show the two compute the same function;
# 4. train a class-conditional DiT with flow matching and read a small scaling study (FID against training
#    compute) beside its spread.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch.utils.flop_counter import FlopCounterMode

from course_lib.benchmark import load_results, parameter_count
from course_lib.claims import check_claim, clearly_below
from course_lib.data import load_digits
from course_lib.guidance import guided_flow_samples, label_condition
from course_lib.interop import diffusers_dit, diffusers_dit_block
from course_lib.metrics import class_accuracy, load_digit_classifier
from course_lib.nets.dit import DiT, dit_gflops, modulate, sincos_pos_embed
from course_lib.nets.embedding import timestep_embedding
from course_lib.nets.vae import encode_latents, latent_decoder
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile
from course_lib.recipes import TRANSFORMER_STUDY
from course_lib.sampling import LATENT_SHAPE
from course_lib.train import TrainConfig, train
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
decisive = profile.name != "smoke"  # live claims are decided in the cpu and gpu profiles
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110
print(f"profile: {profile.name} | device: {device} | training steps: {profile.unet_train_steps}")

# %% [markdown]
# ## 1. Images as tokens
#
# A transformer reads a sequence of vectors. DiT cuts its input, C channels of I x I, into non-overlapping p x p
# patches: $N = (I / p)^2$ tokens, each the $p^2 C$ numbers of its patch, mapped by one shared linear layer to the
# model's width d. A convolution with kernel = stride = p is exactly that linear layer applied to every patch, which
# is how DiT (and diffusers' `PatchEmbed`) writes it. At the end, **unpatchify** puts each token's $p^2 C$ output
# numbers back where its patch came from.
#
# First by hand: cut a digit's latent into patches with `reshape`, apply the convolution's weights as a matrix, and
# compare with the model's own patch embedding.

# %%
vae_card = load_card("vae_mnist")
vae = load_model("vae_mnist")
images, labels = load_digits("train")
one_latent = encode_latents(vae, images[:1], vae_card["scaling_factor"])  # (1, 4, 7, 7)

pixel_dit = DiT(in_channels=1, input_size=28, patch_size=4, width=32, depth=1, heads=2).double()
digit = images[:1].double()  # (1, 1, 28, 28)
p, g = pixel_dit.patch_size, pixel_dit.grid_size
patches = digit.reshape(1, 1, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(1, g * g, p * p)  # (1, N, p*p*C)
weight = pixel_dit.patch_embed.weight.permute(0, 2, 3, 1).reshape(pixel_dit.width, -1)  # (d, p*p*C), same order
by_hand = patches @ weight.T + pixel_dit.patch_embed.bias  # (1, N, d)
library = pixel_dit.patchify(digit) - pixel_dit.pos_embed.double()  # the model adds positions; take them off
print(f"{g * g} tokens of {p * p} numbers -> width {pixel_dit.width}")
print(f"patch embedding by hand vs the model's convolution: max difference {(by_hand - library).abs().max():.1e}")
assert torch.allclose(by_hand, library, atol=1e-12)

# %% [markdown]
# Unpatchify is the inverse reshape: token n's numbers, read as a p x p x C patch, go back to grid row n // (I/p)
# and column n % (I/p). Patches of the digit itself must come back as the digit.

# %%
# NBVAL_CHECK_OUTPUT
round_trip = pixel_dit.unpatchify(patches)  # (1, 1, 28, 28)
print("unpatchify(patches) == the digit:", torch.equal(round_trip, digit))
show_images(
    torch.cat([digit, round_trip]).float(), nrow=2, figsize=(3, 1.7), title="a digit and its 49 patches, reassembled"
)
plt.show()

# %% [markdown]
# The patch size sets the cost. Self-attention compares every token with every other: its two products ($QK^\top$
# and $AV$) cost $4N^2d$ per block, against $(8 + 4r)Nd^2$ for the linear layers (q, k, v, output, and the MLP of
# ratio r). `dit_gflops` counts both for a width-128, depth-4 DiT; on a 28 x 28 digit with patch 1 (784 tokens)
# attention is about half the work, on the latent's 49 tokens a small part of it, and the latent DiT is about thirty
# times cheaper per call.

# %%
rows = []
for channels, size, patch in ((1, 28, 1), (1, 28, 2), (1, 28, 4), (4, 7, 1)):
    model = DiT(in_channels=channels, input_size=size, patch_size=patch, width=128, depth=4, heads=4)
    N, d = model.grid_size**2, model.width
    total = dit_gflops(model, backward=False)
    attention = model.depth * 4 * N**2 * d / 1e9
    rows.append((f"{channels} x {size} x {size}, patch {patch}", N, total, attention / total))
    print(f"{rows[-1][0]:22s} {N:4d} tokens  {total:6.3f} GFLOPs per call  attention {attention / total:5.1%}")
pixel_share, latent_share = rows[0][3], rows[-1][3]
check_claim(
    pixel_share > 0.45 and latent_share < 0.1 and rows[0][2] / rows[-1][2] > 25,
    "attention is about half the work at 784 pixel tokens, a small part at 49 latent tokens, and the latent DiT "
    "is about thirty times cheaper",
    f"{pixel_share:.1%} vs {latent_share:.1%}; {rows[0][2] / rows[-1][2]:.0f}x",
)

# %% [markdown]
# ## 2. Where each token is: 2D sin-cos positions
#
# Attention is blind to order: shuffle the tokens and the outputs shuffle with them. DiT adds a fixed position
# vector to each token, as MAE and the original transformer do, in 2D: the first half of the d numbers encodes the
# token's column x, the second half its row y, each as $\sin$ and $\cos$ of the coordinate times the frequencies
# $\omega_i = 10000^{-i/(d/4)}$. Nearby tokens get similar vectors, and a shift by a fixed offset is a rotation of
# each (sin, cos) pair, a linear map the attention can learn. Ours is computed in float64 as a pure function; it
# must equal the one diffusers builds for its DiT (which passes `base_size` = the grid's size: the function's
# default, 16, would stretch a 7 x 7 grid's coordinates by 16 / 7).

# %%
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

ours = sincos_pos_embed(128, 7)  # (49, 128)
theirs = get_2d_sincos_pos_embed(128, 7, base_size=7, output_type="pt").float()  # DiT's arguments for a 7 x 7 grid
print(f"sincos_pos_embed vs diffusers' get_2d_sincos_pos_embed: max difference {(ours - theirs).abs().max():.1e}")
assert torch.allclose(ours, theirs, atol=1e-6)

unit = torch.nn.functional.normalize(ours, dim=1)
similarity = (unit @ unit[3 * 7 + 3]).reshape(7, 7)  # each token's cosine similarity to the centre token's
fig, axes = plt.subplots(1, 2, figsize=(7, 3))
axes[0].imshow(ours.T, aspect="auto", cmap="RdBu")
axes[0].set(title="position vectors (one column per token)", xlabel="token (row-major)", ylabel="dimension")
image = axes[1].imshow(similarity, cmap="viridis")
axes[1].set(title="similarity to the centre token", xticks=[], yticks=[])
fig.colorbar(image, ax=axes[1])
plt.tight_layout()
plt.show()

# %%
# NBVAL_CHECK_OUTPUT
nearest = similarity.flatten().argsort(descending=True)[:5].tolist()
print("the five tokens most like the centre (3, 3):", sorted((n // 7, n % 7) for n in nearest))

# %% [markdown]
# ## 3. Conditioning through the norms: adaLN-Zero
#
# The UNet added its time embedding to every residual block's features. DiT tried three ways to condition a
# transformer (cross-attention to the condition, extra tokens, adaptive layer norm) and kept the cheapest, which was
# also the best (the paper's figure 5). The time's sinusoids (chapter 4) go through a small MLP, the class label
# through an embedding table (one extra row for "no label", for classifier-free guidance), and their sum is one
# vector c per image. Each block turns c into six vectors,
#
# $$(\beta_1, \gamma_1, \alpha_1, \beta_2, \gamma_2, \alpha_2) = W\,\mathrm{SiLU}(c) + b,$$
#
# and uses them around its two halves, a LayerNorm without learned parameters followed by the modulation:
#
# $$x \leftarrow x + \alpha_1 \odot \mathrm{Attn}\big(\mathrm{LN}(x)(1 + \gamma_1) + \beta_1\big),\qquad
#   x \leftarrow x + \alpha_2 \odot \mathrm{MLP}\big(\mathrm{LN}(x)(1 + \gamma_2) + \beta_2\big).$$
#
# **Zero** is the initialisation: W and b start at 0, so every gate $\alpha$ is 0 and every block is the identity;
# the final layer's linear map starts at 0 too, so a fresh DiT outputs exactly 0 whatever it is given. Residual
# networks train better when each block starts as the identity (Goyal et al. 2017 zero the last norm's scale of each
# ResNet block for the same reason). Let us check it, and look at where the first gradient goes.

# %%
torch.manual_seed(0)
fresh = DiT(in_channels=4, input_size=7, patch_size=1, width=64, depth=2, heads=2, num_classes=10)
x = torch.randn(8, 4, 7, 7, generator=torch.Generator().manual_seed(1))
t, y = torch.rand(8, generator=torch.Generator().manual_seed(2)) * 1000, torch.arange(8)
tokens = fresh.patchify(x)
c = fresh.time_mlp(timestep_embedding(t, fresh.time_dim)) + fresh.class_emb(y)
output = fresh(x, t, y)
print("every block is the identity:", all(torch.equal(block(tokens, c), tokens) for block in fresh.blocks))
print("the output is exactly zero:", bool((output == 0).all()))

loss = (output - torch.randn_like(x)).pow(2).mean()
loss.backward()
receiving = [
    name
    for name, parameter in fresh.named_parameters()
    if parameter.grad is not None and parameter.grad.abs().max() > 0
]
print("parameters with a non-zero gradient at step 0:", receiving)

# %% [markdown]
# At step 0 only the final linear map learns: everything before it is multiplied by zero on the way back. Once it
# is non-zero, the gradient reaches the final layer's modulation, then the blocks' gates, and the network grows out
# of the identity. `modulate` is the one line $x(1 + \gamma) + \beta$; a zero $\gamma$ and $\beta$ leave x as it is.

# %%
# NBVAL_CHECK_OUTPUT
print("step 0 trains only final.linear:", set(receiving) == {"final.linear.weight", "final.linear.bias"})
print(
    "modulate with zero shift and scale is the identity:",
    torch.equal(modulate(tokens, 0 * c[:, None], 0 * c[:, None]), tokens),
)

# %% [markdown]
# ## 4. The same function as diffusers' DiT
#
# diffusers implements DiT as `DiTTransformer2DModel`, made of `BasicTransformerBlock`s with
# `norm_type="ada_norm_zero"`. The weights map one to one (`course_lib.interop.diffusers_dit`): our fused q, k, v
# layer is their `to_q`, `to_k`, `to_v`; each of their blocks keeps its own copy of the time and label embedding,
# which our one embedding fills. Two settings differ from the paper's code, and the mapping sets them to the paper's:
# the MLP LayerNorm's eps and the spacing of the time sinusoids. We take a trained DiT of the study (section 6), so
# that no weight is zero and a comparison could fail.

# %%
shipped = [name for name in TRANSFORMER_STUDY if name.startswith("dit_")]
trained = load_model(shipped[0]).double()
x64 = torch.randn(4, *LATENT_SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
t64, y64 = torch.tensor([0.0, 271.8, 640.5, 999.0]), torch.tensor([3, 10, 7, 0])  # 10: no label
with torch.no_grad():
    ours_out = trained(x64, t64, y64)
    theirs_out = diffusers_dit(trained)(x64, t64, y64).sample
    other_spacing = diffusers_dit(trained, paper_time=False)(x64, t64, y64).sample
    c64 = trained.time_mlp(timestep_embedding(t64, trained.time_dim).double()) + trained.class_emb(y64)
    block_tokens = trained.patchify(x64)
    block_gap = (
        (
            trained.blocks[0](block_tokens, c64)
            - diffusers_dit_block(trained, 0)(block_tokens, timestep=t64, class_labels=y64)
        )
        .abs()
        .max()
    )
print(f"`{shipped[0]}`, float64: whole model max |ours - diffusers| = {(ours_out - theirs_out).abs().max():.1e}")
print(f"one block: {block_gap:.1e}; with diffusers' own time spacing: {(ours_out - other_spacing).abs().max():.1e}")

# %%
# NBVAL_CHECK_OUTPUT
print("equal to 1e-10 (model and block):", bool((ours_out - theirs_out).abs().max() < 1e-10 and block_gap < 1e-10))
print("diffusers' own time spacing differs by > 1e-3:", bool((ours_out - other_spacing).abs().max() > 1e-3))

# %% [markdown]
# ## 5. Training a DiT with flow matching on latents
#
# The objective is chapter 10's: draw t, mix $x_t = (1 - t)\,z_0 + t\,\epsilon$ on the straight path from the
# latent $z_0$ to noise, and regress the velocity $\epsilon - z_0$. Two choices follow Stable Diffusion 3 (Esser et
# al. 2024): t is drawn **logit-normal** (more of the middle, where the velocity is hardest to guess), and 10% of the
# labels are replaced by "no label" so that one network also learns the unconditional velocity for guidance. Here
# is a short live run of a small DiT, next to the loss curve of the study's smallest DiT (same objective, 2,000
# steps of 128).

# %%
train_latents = encode_latents(vae, images, vae_card["scaling_factor"])  # (4000, 4, 7, 7)
torch.manual_seed(0)
live = DiT(in_channels=4, input_size=7, patch_size=1, width=64, depth=4, heads=2, num_classes=10)
config = TrainConfig(
    steps=profile.unet_train_steps,
    batch_size=profile.unet_batch_size,
    lr=1e-3,
    warmup=min(20, profile.unet_train_steps),
    objective="flow",
    time_sampling="logit_normal",
    min_snr_gamma=None,
    ema_decay=None,
    seed=0,
)
began = time.perf_counter()
state, _ = train(live, None, train_latents, config, progress=False, condition=label_condition(labels, 0.1, 10))
live_seconds = time.perf_counter() - began
losses = torch.tensor(state.losses)
fifth = max(1, len(losses) // 5)
first, last = losses[:fifth].mean().item(), losses[-fifth:].mean().item()
print(
    f"{len(losses)} steps of {config.batch_size} in {live_seconds:.0f} s: "
    f"loss {first:.3f} (first fifth) -> {last:.3f} (last fifth)"
)
check_claim(last < 0.8 * first, "the live run's flow loss falls", f"{first:.3f} -> {last:.3f}", decisive)

curve = load_card(shipped[0])["training"]["loss_curve"]
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(range(1, len(losses) + 1), losses, lw=0.8, label=f"live: width 64, batch {config.batch_size}")
shipped_steps = [(i + 0.5) * curve["steps_per_point"] for i in range(len(curve["mean_loss"]))]
ax.plot(shipped_steps, curve["mean_loss"], label=f"`{shipped[0]}`: batch 128 (its card)")
ax.set(xscale="log", xlabel="step", ylabel="flow loss", title="flow matching on latents, logit-normal t")
ax.legend()
plt.show()

# %% [markdown]
# ## 6. The study: three DiTs and the latent UNet, same data, same budget
#
# `python scripts/train_unet.py --recipe transformer` trains four class-conditional flow models from scratch on
# the same latents, each 2,000 steps of 128 (256,000 latents), seed 0, AdamW with warm-up and cosine decay, EMA:
# DiTs of width 64, 96 and 128 (`dit_s`, `dit_m`, `dit_l`; depth 4, patch 1: 49 tokens) and the latent UNet of
# chapter 6 with a label embedding (`latent_unet_flow_class`). `python scripts/bench.py transformer` then draws
# 300 samples from each (labels 0-9 in turn, Euler with 20 steps, the same noise for every model), decodes them,
# and scores them: FID against held-out digits with its bootstrap spread, and the fraction the classifier reads as
# the asked-for digit, at guidance 1 (the conditional model) and 2. The training compute counts the forward and
# backward products of every training example (`benchmark.gflops_per_call`, attention included).

# %%
study = load_results("transformer")
runs = study["runs"]
print(f"measured {study['date']} on {study['machine']}; n = {next(iter(runs.values()))['n']} samples per scale")
columns = ("params", "GFLOPs/call", "train TFLOPs", "wall min", "FID w=1", "FID w=2", "acc w=1 / 2")
print(f"{'run':24s}" + "".join(f"{column:>14s}" for column in columns))
for name, run in runs.items():
    plain, guided = run["runs"][0], run["runs"][1]
    cells = (
        f"{run['parameters'] / 1e6:.2f} M",
        f"{run['gflops_per_call']:.4f}",
        f"{run['training_tflops']:.1f}",
        f"{run['wall_minutes']:.0f}",
        f"{plain['fid']:.2f} ± {plain['fid_sd']:.2f}",
        f"{guided['fid']:.2f} ± {guided['fid_sd']:.2f}",
        f"{plain['accuracy']:.3f} / {guided['accuracy']:.3f}",
    )
    print(f"{name:24s}" + "".join(f"{cell:>14s}" for cell in cells))
floor = next(iter(runs.values()))["runs"][0]
print(f"real-vs-real floor at this n: {floor['fid_floor']:.2f} ± {floor['fid_floor_sd']:.2f}")

# %%
dits = [name for name in runs if name.startswith("dit_")]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for scale, marker in ((1.0, "o"), (2.0, "s")):
    for group, color in ((dits, "C0"), ([name for name in runs if name not in dits], "C3")):
        points = [(runs[name]["training_tflops"], runs[name]["runs"][int(scale == 2.0)]) for name in group]
        axes[0].errorbar(
            [pflops for pflops, _ in points],
            [run["fid"] for _, run in points],
            yerr=[run["fid_sd"] for _, run in points],
            marker=marker,
            color=color,
            ls="-" if group is dits else "none",
            capsize=3,
            label=f"{'DiT 64 / 96 / 128' if group is dits else 'latent UNet'}, w = {scale:g}",
        )
axes[0].axhline(floor["fid_floor"], color="gray", ls=":", label="real-vs-real floor")
axes[0].set(
    xscale="log",
    xlabel="training compute (TFLOPs)",
    ylabel="FID (± 1 bootstrap sd)",
    title="quality against training compute",
)
axes[0].legend(fontsize=7)
for name in runs:
    curve = load_card(name)["training"]["loss_curve"]
    steps = [(i + 0.5) * curve["steps_per_point"] for i in range(len(curve["mean_loss"]))]
    axes[1].plot(steps, curve["mean_loss"], label=name)
axes[1].set(xlabel="step (batch 128)", ylabel="flow loss", ylim=(None, 1.2), title="training loss (cards)")
axes[1].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# How to read it. Within the DiTs, quality follows compute: each width costs more per call and per training
# example, and each wider DiT scores a lower FID, by more than the spreads from the narrowest to the widest. That is
# the DiT paper's central figure at digit size, with one caution: our points are three models after the same number
# of steps, so compute and width move together; the paper's stronger finding, that a larger model also wins at
# equal compute, would need FIDs along each run, which the cards do not keep.
#
# Guidance at w = 2 lowers every model's FID, and the weaker the conditional model (the higher its FID at w = 1),
# the more guidance buys: about 6 points for the two narrower DiTs, beyond their spreads, well under one for the UNet,
# within its spread.
#
# The latent UNet scores the lowest FID at w = 1, clearly below the two narrower DiTs. The widest DiT used slightly
# more training compute than the UNet, and the gap between them is inside twice their combined spread: 300 samples
# cannot separate them, and at w = 2 both sit near the real-vs-real floor. At 256,000 training latents the UNet's
# convolutions (locality and weight sharing built in) are worth at least a transformer of the same compute; the DiT
# paper's runs are 400,000 steps of 256, where the transformer's generality pays. Where the curves would cross, this
# study does not say.

# %%
# NBVAL_CHECK_OUTPUT
dit_fid = {name: runs[name]["runs"][0] for name in dits}  # w = 1
by_compute = sorted(dits, key=lambda name: runs[name]["training_tflops"])
fids_in_order = [dit_fid[name]["fid"] for name in by_compute]
smallest, widest = dit_fid[by_compute[0]], dit_fid[by_compute[-1]]
check_claim(
    fids_in_order == sorted(fids_in_order, reverse=True)
    and clearly_below(widest["fid"], widest["fid_sd"], smallest["fid"], smallest["fid_sd"]),
    "each wider DiT scores a lower FID, and the widest is clearly below the narrowest",
    ", ".join(f"{name}: {dit_fid[name]['fid']:.2f} ± {dit_fid[name]['fid_sd']:.2f}" for name in by_compute),
)
unet_name = next(name for name in runs if name not in dits)
plain_fid = {name: run["runs"][0]["fid"] for name, run in runs.items()}
drops = {name: run["runs"][0]["fid"] - run["runs"][1]["fid"] for name, run in runs.items()}
clear_drop = {
    name: clearly_below(
        run["runs"][1]["fid"], run["runs"][1]["fid_sd"], run["runs"][0]["fid"], run["runs"][0]["fid_sd"]
    )
    for name, run in runs.items()
}
weakest_first = sorted(runs, key=lambda name: plain_fid[name], reverse=True)
check_claim(
    all(drop > 0 for drop in drops.values())
    and [drops[name] for name in weakest_first] == sorted(drops.values(), reverse=True)
    and clear_drop[by_compute[0]]
    and clear_drop[by_compute[1]]
    and all(5 < drops[name] < 7 for name in by_compute[:2])
    and not clear_drop[unet_name]
    and drops[unet_name] < 1,
    "guidance lowers every model's FID, the more the weaker the model; by about 6 points for the two narrower DiTs, "
    "beyond their spreads, by under one for the UNet, within its spread",
    ", ".join(f"{name}: {plain_fid[name]:.2f} -> {plain_fid[name] - drops[name]:.2f}" for name in weakest_first),
)
unet_plain = runs[unet_name]["runs"][0]
widest_name = by_compute[-1]
check_claim(
    min(plain_fid, key=plain_fid.get) == unet_name
    and all(
        clearly_below(unet_plain["fid"], unet_plain["fid_sd"], dit_fid[name]["fid"], dit_fid[name]["fid_sd"])
        for name in by_compute[:-1]
    )
    and not clearly_below(unet_plain["fid"], unet_plain["fid_sd"], widest["fid"], widest["fid_sd"])
    and runs[widest_name]["training_tflops"] > runs[unet_name]["training_tflops"],
    "the UNet scores the lowest FID at w = 1, clearly below the two narrower DiTs; the widest DiT, with slightly more "
    "training compute, is within the spreads of it",
    f"{unet_name}: {unet_plain['fid']:.2f} ± {unet_plain['fid_sd']:.2f} "
    f"({runs[unet_name]['training_tflops']:.1f} TFLOPs), {widest_name}: {widest['fid']:.2f} ± {widest['fid_sd']:.2f} "
    f"({runs[widest_name]['training_tflops']:.1f} TFLOPs)",
)

# %% [markdown]
# ## 7. Samples
#
# The largest DiT of the study, each row one asked-for digit, from the same noise at guidance 1 and 2 (Euler, 20
# steps, decoded by the VAE). `guidance.guided_flow_samples` wraps the model in chapter 7's `Guided`, which works
# for a velocity as for a noise prediction: both are linear in the model's output.

# %%
largest = dits[-1]
model = load_model(largest, device)
decode = latent_decoder(vae.to(device), load_card(largest)["latents"]["scaling_factor"])
per_class = max(1, profile.grid_images // 10)
asked = torch.arange(10).repeat_interleave(per_class)  # (10 * per_class,) each row one digit
classifier = load_digit_classifier(device)
fig, axes = plt.subplots(1, 2, figsize=(1 + 1.1 * per_class, 6))
for ax, scale in zip(axes, (1.0, 2.0), strict=True):
    samples, seconds = guided_flow_samples(
        model, asked, torch.tensor([10]), scale, "euler", 20, seed=5, device=device, shape=LATENT_SHAPE, decoder=decode
    )
    accuracy = class_accuracy(classifier, samples.to(device), asked)
    show_images(samples, nrow=per_class, ax=ax, title=f"`{largest}`, w = {scale:g}: {accuracy:.0%} read as asked")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Summary
#
# - A DiT is a plain transformer on patches: patchify is one linear map per patch (a strided convolution),
#   unpatchify its inverse reshape, and the patch size sets the number of tokens and so the attention's quadratic
#   cost; on a VAE's 7 x 7 latent, 49 tokens make attention cheap.
# - Fixed 2D sin-cos positions tell the tokens where they are; adaLN-Zero conditions every block on time and class
#   through its norms, with gates that start at zero so that a fresh DiT is the identity and outputs zero.
# - Our DiT is diffusers' `DiTTransformer2DModel` on the same weights (`interop.diffusers_dit`), to float64
#   rounding, once two settings are set to the paper's.
# - Trained with flow matching on latents, the DiTs' quality follows training compute across widths; at 256,000
#   latents the latent UNet is as good as the widest DiT or better, and guidance helps the weaker models most
#   (section 6, each sentence checked on the stored study).
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** Write `my_unpatchify(tokens, p, channels)`: tokens (B, N, p * p * C), each holding its patch's
# numbers in (patch row, patch column, channel) order, back to images (B, C, I, I) with $I = p\sqrt N$.


# %% tags=["solution", "hide-input"]
def my_unpatchify(tokens: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    ### BEGIN SOLUTION
    B, N, _ = tokens.shape
    g = round(N**0.5)
    x = tokens.reshape(B, g, g, p, p, channels)  # (B, grid row, grid column, patch row, patch column, C)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, g * p, g * p)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
for channels_check, size_check, patch_check in ((1, 28, 4), (4, 7, 1), (3, 12, 3)):
    shape_model = DiT(
        in_channels=channels_check, input_size=size_check, patch_size=patch_check, width=16, depth=1, heads=2
    )
    numbers = torch.randn(
        2, shape_model.grid_size**2, patch_check**2 * channels_check, generator=torch.Generator().manual_seed(6)
    )
    assert torch.equal(my_unpatchify(numbers, patch_check, channels_check), shape_model.unpatchify(numbers)), (
        channels_check,
        patch_check,
    )
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Count the FLOPs of self-attention's two products for one image, `attention_flops(tokens, width,
# heads)`: the scores $QK^\top$ and the weighted sum $AV$, over all heads (a multiply-add counts 2). Does the
# number of heads change it? The check counts a real attention with torch's FLOP counter.


# %% tags=["solution", "hide-input"]
def attention_flops(tokens: int, width: int, heads: int) -> int:
    ### BEGIN SOLUTION
    head_dim = width // heads
    scores = 2 * heads * tokens * tokens * head_dim  # (N x d/h) @ (d/h x N) per head
    weighted = 2 * heads * tokens * tokens * head_dim  # (N x N) @ (N x d/h) per head
    return scores + weighted  # 4 N^2 d, whatever the heads
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
for tokens_check, width_check, heads_check in ((49, 128, 4), (196, 64, 2), (16, 96, 3)):
    q, k, v = (torch.randn(1, heads_check, tokens_check, width_check // heads_check) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    assert attention_flops(tokens_check, width_check, heads_check) == counter.get_total_flops(), (
        tokens_check,
        width_check,
    )
print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** Count a DiT's parameters by hand, `dit_parameters(width, depth, mlp_ratio, patch, channels,
# classes, time_dim)`, for a class-conditional DiT as built here: the patch embedding, the time MLP (time_dim ->
# width -> width), the label table (one extra row for "no label"), per block the modulation (width -> 6 width),
# q, k, v, the output projection and the MLP, and the final layer (modulation to 2 width, then the linear map to
# each patch's numbers). Every linear layer has a bias. Which part grows fastest with the width?


# %% tags=["solution", "hide-input"]
def dit_parameters(
    width: int, depth: int, mlp_ratio: int, patch: int, channels: int, classes: int, time_dim: int
) -> int:
    ### BEGIN SOLUTION
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731
    patch_numbers = patch * patch * channels
    embed = linear(patch_numbers, width) + linear(time_dim, width) + linear(width, width) + (classes + 1) * width
    block = linear(width, 6 * width) + linear(width, 3 * width) + linear(width, width)
    block += linear(width, mlp_ratio * width) + linear(mlp_ratio * width, width)
    final = linear(width, 2 * width) + linear(width, patch_numbers)
    return embed + depth * block + final
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
for width_check, depth_check, patch_check, channels_check in ((64, 4, 1, 4), (96, 2, 2, 1), (128, 4, 1, 4)):
    built = DiT(
        in_channels=channels_check,
        input_size=28 if channels_check == 1 else 7,
        patch_size=patch_check,
        width=width_check,
        depth=depth_check,
        heads=2,
        num_classes=10,
    )
    assert dit_parameters(width_check, depth_check, 4, patch_check, channels_check, 10, 256) == parameter_count(
        built
    ), width_check
print("exercise 3: correct")
