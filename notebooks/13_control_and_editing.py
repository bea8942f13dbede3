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
# # Chapter 13: Control and editing
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/13_control_and_editing.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F13_control_and_editing.ipynb)
#
# A trained diffusion model denoises any $x_t$ it is handed, whatever produced it. Everything in this chapter uses
# that fact to make a model do what it was never trained to do, mostly without retraining it:
#
# - **ControlNet** (Zhang, Rao & Agrawala 2023) steers a frozen model with a control image, here each digit's
#   outline: a trainable copy of the UNet's way down reads the control, and zero-initialised convolutions add what
#   it finds to the frozen decoder, so that training starts from the frozen model exactly.
# - **img2img / SDEdit** (Meng et al. 2022) noises an image part of the way and denoises it: a rough sketch
#   becomes a realistic digit, and the noise level decides how much of the sketch survives.
# - **Inpainting** with RePaint (Lugmayr et al. 2022) fills a hole: at every step the known pixels are put back,
#   noised to the step's level, and resampling lets the model reconcile the two parts.
# - **Classifier guidance** (Dhariwal & Nichol 2021) adds the gradient of a classifier of noisy images to the noise
#   estimate: chapter 7's guidance with the classifier made explicit.
#
# Every one of them is judged by numbers: how well a sample follows its control (`control.edge_agreement`), how
# faithful and how realistic an edit is, what the filled hole looks like to the digit classifier, and FID always
# beside its spread.
#
# By the end of this chapter you can:
#
# 1. compute a control image from data by code and measure how well samples follow it;
# 2. build a ControlNet on a frozen UNet, show that it starts as the base model bit for bit, and find each of its
#    parts in diffusers' `ControlNetModel`;
# 3. edit with img2img / SDEdit and read the faithfulness-against-realism curve over the strength;
# 4. inpaint by replacement and by RePaint's resampling, and measure both inside and outside the mask;
# 5. derive classifier guidance from Bayes' rule, check its gradient, and set it against classifier-free guidance.

# %%
from itertools import pairwise

import diffusers
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

from course_lib.benchmark import parameter_count
from course_lib.claims import check_claim, clearly_below
from course_lib.control import (
    ControlledUNet,
    ControlNet,
    HintEncoder,
    controlnet_parameter_count,
    edge_agreement,
    edge_map,
    load_controlnet,
)
from course_lib.editing import (
    ClassifierGuided,
    classifier_gradient,
    classifier_guided_eps,
    img2img_timesteps,
    inpaint,
    noisy_class_accuracy,
    renoise,
    sdedit,
)
from course_lib.forward import q_sample
from course_lib.guidance import Guided, cfg_combine
from course_lib.interop import TOKENS, tiny_stable_diffusion
from course_lib.metrics import (
    class_accuracy,
    class_spread,
    confident_fraction,
    load_digit_classifier,
    real_digits,
    sample_scores,
)
from course_lib.nets.classifier import NoisyDigitClassifier
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile
from course_lib.samplers import ddim_sample, ddim_step, spaced_timesteps
from course_lib.schedules import gather, make_schedule
from course_lib.styles import balanced_digits
from course_lib.toy import GaussianMixture
from course_lib.weights import load_card, load_model

profile = get_profile()
device = get_device()
decisive = profile.name != "smoke"  # live claims are decided in the cpu and gpu profiles
torch.set_num_threads(1)
plt.rcParams["figure.dpi"] = 110
diffusers.utils.logging.set_verbosity_error()  # keep warnings and progress bars out of the outputs
diffusers.utils.logging.disable_progress_bar()
steps, n = profile.sample_steps, profile.style_samples
print(f"profile: {profile.name} | device: {device} | DDIM steps: {steps} | digits per measurement: {n}")
classifier = load_digit_classifier(device)
card = load_card("unet_mnist_eps")
base = load_model("unet_mnist_eps", device)
schedule = make_schedule(**card["schedule"])
print(f"base model: unet_mnist_eps, {parameter_count(base):,} parameters, {card['schedule']}")

# %% [markdown]
# ## 1. A control image computed from each digit
#
# A control must be something a sample can be checked against. Here it is the digit's **outline**: the pixels that
# are not ink but touch ink. With ink $I = \{x > 0\}$ and $S$ the 3 x 3 square, the outline is the dilation of the
# ink minus the ink, $E = (I \oplus S) \setminus I$: a ring just outside every stroke. By hand, with the eight
# shifted copies of the ink instead of a max-pool, against `control.edge_map`, on one held-out digit of each class
# (picked by label):

# %%
# NBVAL_CHECK_OUTPUT
digits, digit_labels = balanced_digits(1, split="heldout")  # one of each class: 0, 1, ..., 9
ink = (digits > 0).float()  # (10, 1, 28, 28)
padded = F.pad(ink, (1, 1, 1, 1))  # a border of no ink
shifted = [padded[..., 1 + dy : 29 + dy, 1 + dx : 29 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
touches_ink = torch.stack(shifted).amax(0)  # 1 where the pixel or one of its 8 neighbours is ink
outline_by_hand = 2 * touches_ink * (1 - ink) - 1  # +1 on the outline, -1 elsewhere, like a digit image
print("edge_map equals the outline by hand:", torch.equal(edge_map(digits), outline_by_hand))

# %%
show_images(torch.cat([digits, edge_map(digits)]), nrow=10, title="held-out digits and their outlines (the controls)")
plt.show()

# %% [markdown]
# How well does a sample follow its control? Take the sample's own outline $A$ and the control's $C$, and count the
# overlap: with tolerance 0 the boundary $F_1$ of `edge_agreement` is the Dice coefficient
# $2|A \cap C| / (|A| + |C|)$; with a tolerance of one pixel a pixel counts as matched when the other map has an
# edge within one pixel of it. By hand, and against the library, each digit against its own outline and against
# the outline of the next class:


# %%
# NBVAL_CHECK_OUTPUT
def dice(samples: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    a, c = edge_map(samples) > 0, control > 0  # (B, 1, 28, 28) booleans
    return 2 * (a & c).sum((1, 2, 3)) / (a.sum((1, 2, 3)) + c.sum((1, 2, 3)))


controls = edge_map(digits)
other = controls.roll(1, dims=0)  # each digit against the outline of the previous class
print("edge_agreement equals Dice by hand:", torch.allclose(edge_agreement(digits, other), dice(digits, other)))
print("every digit follows its own outline exactly:", bool((edge_agreement(digits, controls) == 1).all()))

# %%
own, others = edge_agreement(digits, controls), edge_agreement(digits, other)
within_1px = edge_agreement(digits, other, tolerance=1)
print(
    f"F1 with its own outline {own.mean():.2f}; with another class's {others.mean():.2f} (largest {others.max():.2f})"
)
print(f"the same within one pixel: {within_1px.mean():.2f}")
check_claim(
    bool(others.max() < 0.5),
    "no digit agrees with another class's outline at half the level of its own",
    f"F1 with the previous class's outline: {', '.join(f'{v:.2f}' for v in others)}",
)

# %% [markdown]
# So agreement near 1 means a sample traces its control, and a few tenths is what two different digits share by
# chance (both are strokes near the middle of the frame). A model that ignores the control scores the second kind.
#
# ## 2. ControlNet: a trainable copy and zero convolutions
#
# The trained model $\mathcal F(\cdot; \Theta)$ stays frozen. ControlNet copies its way down (input convolution,
# time embedding, down levels, middle) into trainable weights $\Theta_c$, initialised with $\Theta$; a small
# network $\mathcal E$ encodes the control image $c$ into the first feature map, ending in a zero-initialised
# convolution $\mathcal Z(\cdot; \Theta_{z1})$; and every feature map that the frozen decoder reads (each skip and
# the middle's output) receives the copy's matching map through a 1 x 1 convolution initialised at zero,
# $\mathcal Z(\cdot; \Theta_{z2})$ (Zhang et al. 2023, eq. 2):
#
# $$y_c = \mathcal F(x; \Theta) + \mathcal Z\big(\mathcal F(x + \mathcal Z(\mathcal E(c); \Theta_{z1});
#     \Theta_c); \Theta_{z2}\big)$$
#
# The sum is taken inside the network, at each skip and at the middle, with a conditioning scale $s$ on the
# residuals (diffusers' `controlnet_conditioning_scale`). Built on the shipped digit model, fresh, on the CPU (the
# checks of this section print results that must be the same on every machine):

# %%
cpu_base = load_model("unet_mnist_eps")
torch.manual_seed(0)  # the hint encoder's first layers are drawn at random; everything else is copied or zero
fresh = ControlledUNet(cpu_base, ControlNet(cpu_base)).eval()
size = controlnet_parameter_count(fresh.controlnet, cpu_base)
print(f"ControlNet {size['controlnet']:,} parameters beside the base's {size['base']:,}: {size['share']:.0%}")
for name, part in fresh.controlnet.named_children():
    print(f"  {name:12s} {type(part).__name__:12s} {parameter_count(part):>9,}")

# %% [markdown]
# The copy holds most of it: half the UNet is its way down and middle. At initialisation the zero convolutions
# output exact zeros, so the controlled model is the base, bit for bit, whatever the control:

# %%
# NBVAL_CHECK_OUTPUT
x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
t = torch.tensor([5, 250, 600, 990])
control = edge_map(digits[:4])
with torch.no_grad():
    unchanged = torch.equal(fresh(x, t, control), cpu_base(x, t))
print("a fresh ControlNet leaves the base's output unchanged, bit for bit:", unchanged)

# %% [markdown]
# Zero output does not mean zero learning. The gradient of a zero convolution's weight is its input (the copy's
# features, not zero) times the gradient arriving from above, so the output convolutions learn at the first step;
# what sits behind them (the copy, the hint encoder) gets no gradient until they have left zero. One backward pass
# of the denoising loss through the fresh model:

# %%
# NBVAL_CHECK_OUTPUT
fresh.zero_grad()
eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
loss = (fresh(q_sample(schedule, x.clamp(-1, 1), t, eps), t, control) - eps).pow(2).mean()
loss.backward()
zero_convs = [*fresh.controlnet.skip_convs, fresh.controlnet.middle_conv]
print("the zero convolutions get a gradient:", all(conv.weight.grad.abs().max() > 0 for conv in zero_convs))
behind = [p.grad for p in [*fresh.controlnet.encoder.parameters(), *fresh.controlnet.hint.parameters()]]
print("the copy and the hint encoder get none yet:", all(g is None or g.abs().max() == 0 for g in behind))
print("the frozen base gets none at all:", all(p.grad is None for p in cpu_base.parameters()))
fresh.zero_grad()

# %% [markdown]
# Where do the residuals go? By hand: the base's way down as usual; the copy's way down from
# $\texttt{conv\_in}(x) + \mathcal E(c)$; a zero convolution on each of the copy's skips and on its middle; the sums
# into the base's decoder (`UNet.decode` adds them where it reads the skips and the middle, as diffusers'
# `UNet2DConditionModel` adds `down_block_additional_residuals` and `mid_block_additional_residual`). The zero
# convolutions are set to small random weights first, a stand-in for training, so that the residuals are not zero
# and a wrong sum would show:

# %%
# NBVAL_CHECK_OUTPUT
generator = torch.Generator().manual_seed(3)
with torch.no_grad():
    for conv in [*zero_convs, fresh.controlnet.hint.conv_out]:
        for p in conv.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    scale = 0.7
    emb, cross = cpu_base.embed(x, t)
    h, skips, sizes = cpu_base.encode(cpu_base.conv_in(x), emb, cross)  # the frozen way down
    copy = fresh.controlnet.encoder  # the trainable copy, the same code with its own weights
    h_c, skips_c, _ = copy.encode(copy.conv_in(x) + fresh.controlnet.hint(control), *copy.embed(x, t))
    skips = [s + scale * conv(s_c) for s, conv, s_c in zip(skips, fresh.controlnet.skip_convs, skips_c, strict=True)]
    by_hand = cpu_base.decode(h + scale * fresh.controlnet.middle_conv(h_c), emb, skips, sizes, cross)
    library = fresh(x, t, control, scale=scale)
    moved = (library - cpu_base(x, t)).abs().max()
print("ControlledUNet equals the sum by hand (to 1e-5):", bool((library - by_hand).abs().max() < 1e-5))
print("and now differs from the base:", bool(moved > 1e-3))

# %% [markdown]
# ## 3. The trained ControlNet
#
# `scripts/train_control.py --model controlnet` trained the ControlNet on the frozen `unet_mnist_eps`: each
# training digit's outline as the control, the base's own objective and schedule, only the ControlNet's weights
# learning. Its file holds the ControlNet alone; `load_controlnet` puts it on its base, which it loads as any
# shipped model. Its card records how it was trained and how its samples followed held-out outlines:

# %%
controlnet_card = load_card("controlnet_edges")
controlled = load_controlnet("controlnet_edges", device)
training = controlnet_card["training"]
print(f"{training['status']}: {training['images_seen']:,} images in {training['wall_minutes']} min")
print(f"on {training['machine']}")
follows = controlnet_card["follows_control"]
print(follows["how"])
for who in ("controlnet", "base"):
    row = follows[who]
    print(
        f"  {who:10s} F1 {row['edge_f1']:.3f} ± {row['edge_f1_se']:.3f} (within 1 px {row['edge_f1_within_1px']:.3f}), "
        f"read as the control's digit {row['class_accuracy']:.0%}, confident {row['confident_fraction']:.0%}"
    )
check_claim(
    clearly_below(
        follows["base"]["edge_f1"],
        follows["base"]["edge_f1_se"],
        follows["controlnet"]["edge_f1"],
        follows["controlnet"]["edge_f1_se"],
    ),
    "the card says: the ControlNet's samples follow their outlines clearly better than the base's from the same noise",
    f"F1 ControlNet {follows['controlnet']['edge_f1']:.3f} ± {follows['controlnet']['edge_f1_se']:.3f}, "
    f"base {follows['base']['edge_f1']:.3f} ± {follows['base']['edge_f1_se']:.3f}",
)

# %% [markdown]
# Live: the outlines of held-out digits (picked by label, an equal number of each class) as controls, one DDIM
# sample per control, and the base's samples from the same noise, which ignore the control. Three readings: the
# $F_1$ of each sample's outline with its control (beside its standard error), how often the digit classifier reads
# the sample as the digit the control was drawn from, and FID with its spread beside the real-vs-real floor.


# %%
def ddim_batches(model_for, x_T: torch.Tensor, conditions: torch.Tensor, **options) -> torch.Tensor:
    """DDIM samples from x_T in batches of 50, batch b's model built by model_for(conditions of batch b); on the CPU,
    clamped to [-1, 1]."""
    samples = []
    for x_batch, c_batch in zip(x_T.split(50), conditions.split(50), strict=True):
        model = model_for(c_batch.to(device))
        samples.append(ddim_sample(model, schedule, x_batch.to(device), steps, clip_x0=True, **options)[0].cpu())
    return torch.cat(samples).clamp(-1, 1)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), values.std().item() / len(values) ** 0.5


held_out, held_labels = balanced_digits(n // 10, split="heldout")
controls = edge_map(held_out)  # (n, 1, 28, 28)
x_T = torch.randn(controls.shape, generator=torch.Generator().manual_seed(4))
following = ddim_batches(lambda c: controlled.bind(c), x_T, controls)
ignoring = ddim_batches(lambda c: base, x_T, controls)
show_images(
    torch.cat([controls[:10], following[:10], ignoring[:10]]),
    nrow=10,
    title="controls / the ControlNet's samples / the base's samples from the same noise",
)
plt.show()

# %%
reading = {}
for name, samples in [("ControlNet", following), ("base", ignoring)]:
    f1, f1_se = mean_se(edge_agreement(samples, controls))
    near, near_se = mean_se(edge_agreement(samples, controls, tolerance=1))
    scores = sample_scores(classifier, samples)
    reading[name] = dict(f1=f1, f1_se=f1_se, accuracy=class_accuracy(classifier, samples, held_labels), **scores)
    print(
        f"{name:10s} F1 {f1:.3f} ± {f1_se:.3f} (within 1 px {near:.3f} ± {near_se:.3f}) | read as the control's "
        f"digit {reading[name]['accuracy']:.0%} | FID {scores['fid']:.1f} ± {scores['fid_sd']:.1f} "
        f"(floor {scores['fid_floor']:.1f} ± {scores['fid_floor_sd']:.1f}) | "
        f"confident {scores['confident_fraction']:.0%}"
    )
shuffled, shuffled_se = mean_se(edge_agreement(following, controls.roll(1, dims=0)))
print(f"the ControlNet's samples against another digit's control: F1 {shuffled:.3f} ± {shuffled_se:.3f}")
cn, bs = reading["ControlNet"], reading["base"]
check_claim(
    clearly_below(bs["f1"], bs["f1_se"], cn["f1"], cn["f1_se"])
    and clearly_below(shuffled, shuffled_se, cn["f1"], cn["f1_se"]),
    "the ControlNet's samples follow their own outlines clearly better than the base's samples do, and better "
    "than they follow another digit's outline",
    f"F1 ControlNet {cn['f1']:.3f} ± {cn['f1_se']:.3f}, base {bs['f1']:.3f} ± {bs['f1_se']:.3f}, "
    f"another digit's control {shuffled:.3f} ± {shuffled_se:.3f}",
    decisive,
)
check_claim(
    not clearly_below(bs["fid"], bs["fid_sd"], cn["fid"], cn["fid_sd"]),
    "following the control costs no realism: the ControlNet's FID is not clearly above the base's",
    f"FID ControlNet {cn['fid']:.1f} ± {cn['fid_sd']:.1f}, base {bs['fid']:.1f} ± {bs['fid_sd']:.1f}, "
    f"floor {cn['fid_floor']:.1f}",
    decisive,
)

# %% [markdown]
# ## 4. The conditioning scale
#
# The scale $s$ multiplies every residual: $s = 0$ is the base model exactly, $s = 1$ the ControlNet as trained,
# and $s > 1$ pushes harder than training asked for. The same noise and controls at four scales, on the first
# `profile.grid_images` controls (the samples at 0 and 1 are those above: the base's, and the ControlNet's):

# %%
m = min(profile.grid_images, n)
sweep = {0.0: ignoring[:m], 1.0: following[:m]}
for scale in (0.5, 2.0):
    sweep[scale] = ddim_batches(lambda c, scale=scale: controlled.bind(c, scale), x_T[:m], controls[:m])
sweep = dict(sorted(sweep.items()))
x, t, control = x.to(device), t.to(device), control.to(device)
with torch.no_grad():  # scale 0 is the base exactly: the same output at any x_t, so the same samples
    print(
        "scale 0 gives the base's output, bit for bit:", torch.equal(controlled(x, t, control, scale=0.0), base(x, t))
    )
curve = {}
for scale, samples in sweep.items():
    f1, f1_se = mean_se(edge_agreement(samples, controls[:m]))
    curve[scale] = dict(f1=f1, f1_se=f1_se, confident=confident_fraction(classifier, samples))
    curve[scale]["accuracy"] = class_accuracy(classifier, samples, held_labels[:m])
    print(
        f"s = {scale:g}: F1 {f1:.3f} ± {f1_se:.3f} | read as the control's digit {curve[scale]['accuracy']:.0%} "
        f"| confident {curve[scale]['confident']:.0%}"
    )
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
scales = list(curve)
axes[0].errorbar(scales, [c["f1"] for c in curve.values()], [2 * c["f1_se"] for c in curve.values()], marker="o")
axes[0].set_ylabel("F1 with the control (± 2 se)")
axes[1].plot(scales, [c["confident"] for c in curve.values()], "o-", label="confident fraction")
axes[1].plot(scales, [c["accuracy"] for c in curve.values()], "s-", label="read as the control's digit")
axes[1].legend()
for ax in axes:
    ax.set_xlabel("conditioning scale s")
plt.tight_layout()
plt.show()
show_images(torch.cat([s[:10] for s in sweep.values()]), nrow=10, title="s = " + ", ".join(f"{s:g}" for s in sweep))
plt.show()

# %%
check_claim(
    clearly_below(curve[0.5]["f1"], curve[0.5]["f1_se"], curve[1.0]["f1"], curve[1.0]["f1_se"]),
    "the agreement with the control rises from s = 0.5 to s = 1",
    ", ".join(f"s = {s:g}: {c['f1']:.3f} ± {c['f1_se']:.3f}" for s, c in curve.items()),
    decisive,
)
check_claim(
    curve[2.0]["confident"] < curve[1.0]["confident"],
    "pushing past the trained scale costs realism: fewer samples are confident digits at s = 2 than at s = 1",
    ", ".join(f"s = {s:g}: {c['confident']:.0%}" for s, c in curve.items()),
    decisive,
)

# %% [markdown]
# ## 5. Inside diffusers: `ControlNetModel`
#
# diffusers' ControlNet for Stable Diffusion is the same construction on `UNet2DConditionModel`. As chapter 9 did
# for Stable Diffusion, it is built here from tiny, randomly initialised components (`tiny_stable_diffusion`):
# `ControlNetModel.from_unet` copies the UNet's way down, as our `ControlNet(base)` does. Its parts, and ours:

# %%
sd = tiny_stable_diffusion(seed=0)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(5)  # the hint encoder's random layers
    sd_controlnet = ControlNetModel.from_unet(sd.unet, conditioning_embedding_out_channels=(8, 16, 32))
for name, part in sd_controlnet.named_children():
    print(f"{name:26s} {type(part).__name__:32s} {parameter_count(part):>8,}")
share = parameter_count(sd_controlnet) / parameter_count(sd.unet)
print(f"ControlNetModel: {parameter_count(sd_controlnet):,} parameters, {share:.0%} of its UNet's")

# %% [markdown]
# Block by block:
#
# | ours (`course_lib.control`) | diffusers' `ControlNetModel` |
# |---|---|
# | `ControlNet.encoder.conv_in`, `.time_mlp`: the copy's input and time embedding | `conv_in`, `time_embedding` |
# | `ControlNet.encoder.down`, `.mid1` ... `.mid2`: the copy's way down and middle | `down_blocks`, `mid_block` |
# | `ControlNet.hint`, a `HintEncoder` ending in a zero convolution | `controlnet_cond_embedding` |
# | `ControlNet.skip_convs`: a zero 1 x 1 convolution per skip | `controlnet_down_blocks` |
# | `ControlNet.middle_conv`: the zero 1 x 1 convolution on the middle | `controlnet_mid_block` |
# | `UNet.decode(..., skip_residuals, middle_residual)` | the UNet's `down_block_additional_residuals` |
# | (the frozen decoder reads the sums) | and `mid_block_additional_residual` |
# | `ControlledUNet`'s `scale` | `controlnet_conditioning_scale` |
#
# Two differences of layout, none of principle: diffusers' UNets keep the outputs of `conv_in` and of each
# downsampler as skips too, so its ControlNet has a zero convolution for each of those; and Stable Diffusion's
# control is a 512 x 512 image while its UNet works on 64 x 64 latents, so its hint encoder halves the resolution
# at each width (`HintEncoder(stride=2)`), where ours, on pixels, keeps it. Checked: the copy holds the UNet's
# weights; our `HintEncoder` with diffusers' weights computes what `controlnet_cond_embedding` computes; the
# residuals have one entry per skip of the UNet, `conv_in`'s and the downsamplers' included.

# %%
# NBVAL_CHECK_OUTPUT
theirs_state, unet_state = sd_controlnet.state_dict(), sd.unet.state_dict()
copied = [key for key in theirs_state if key in unet_state]
print(
    f"{len(copied)} tensors copied from the UNet, all equal:",
    all(torch.equal(theirs_state[k], unet_state[k]) for k in copied),
)
ours_hint = HintEncoder(out_channels=32, in_channels=3, channels=(8, 16, 32), stride=2)
ours_hint.load_state_dict(sd_controlnet.controlnet_cond_embedding.state_dict())  # the same parameter names
sd_control = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
with torch.no_grad():
    equal = torch.equal(ours_hint(sd_control), sd_controlnet.controlnet_cond_embedding(sd_control))
print("our HintEncoder(stride=2) equals controlnet_cond_embedding:", equal)
skips = 1 + sum(len(block.resnets) + bool(block.downsamplers) for block in sd.unet.down_blocks)  # conv_in's too
with torch.no_grad():
    down, mid = sd_controlnet(
        torch.randn(1, 4, 8, 8), 10, torch.randn(1, 8, 32), controlnet_cond=sd_control[:1], return_dict=False
    )
print(f"residuals: {len(down)} for the {skips} skips, {[tuple(d.shape[1:]) for d in down]}")
print(f"and one on the middle, {tuple(mid.shape[1:])}")

# %% [markdown]
# `StableDiffusionControlNetPipeline` is Stable Diffusion's loop with one more call per step. The control is a
# digit's outline, padded to 32 x 32 and given three channels in $[0, 1]$, the image a pipeline expects. At
# initialisation the pipeline draws exactly what the plain pipeline draws; with its zero convolutions set to random
# weights (a stand-in for training) the loop written out below, the ControlNet's residuals handed to the UNet at
# every step, equals the pipeline at every conditioning scale:

# %%
pipeline = StableDiffusionControlNetPipeline(**sd.components, controlnet=sd_controlnet)
pipeline.set_progress_bar_config(disable=True)
outline = F.pad(edge_map(digits[[3, 7]]), (2, 2, 2, 2), value=-1)  # (2, 1, 32, 32): the outlines of a 3 and a 7
sd_control = ((outline + 1) / 2).repeat(1, 3, 1, 1)  # (2, 3, 32, 32) in [0, 1]
prompt = ["a thick three", "a seven"]
sd_call = dict(guidance_scale=4.0, num_inference_steps=profile.step_counts[0], output_type="pt")


@torch.no_grad()
def my_controlnet_pipeline(pipe, prompt, control, guidance_scale, conditioning_scale, steps, generator):
    def embed(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]  # (B, tokens, 32)

    context = torch.cat([embed([""] * len(prompt)), embed(prompt)])  # the unconditional half first
    control = torch.cat([control, control])  # the control serves both halves
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(prompt), 4, size, size, generator=generator) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(steps)
    for t in pipe.scheduler.timesteps:
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        down, mid = pipe.controlnet(  # 1. the ControlNet's residuals, times the conditioning scale
            model_input, t, context, controlnet_cond=control, conditioning_scale=conditioning_scale, return_dict=False
        )
        eps_hat = pipe.unet(  # 2. the UNet with the residuals added where its decoder reads
            model_input, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
        uncond, cond = eps_hat.chunk(2)  # 3. classifier-free guidance and the scheduler's step, as in chapter 9
        latents = pipe.scheduler.step(cfg_combine(uncond, cond, guidance_scale), t, latents).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


# %%
# NBVAL_CHECK_OUTPUT
def seeded():
    return torch.Generator().manual_seed(7)


plain = sd(prompt, generator=seeded(), **sd_call).images
at_init = pipeline(prompt, image=sd_control, generator=seeded(), **sd_call).images
print("a fresh ControlNetModel changes nothing, bit for bit:", torch.equal(at_init, plain))
generator = torch.Generator().manual_seed(8)
with torch.no_grad():
    for conv in [*sd_controlnet.controlnet_down_blocks, sd_controlnet.controlnet_mid_block]:
        for p in [conv.weight, conv.bias]:
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    for p in sd_controlnet.controlnet_cond_embedding.conv_out.parameters():
        p.copy_(0.05 * torch.randn(p.shape, generator=generator))
for conditioning_scale in (0.0, 0.5, 1.0):
    theirs = pipeline(
        prompt, image=sd_control, generator=seeded(), controlnet_conditioning_scale=conditioning_scale, **sd_call
    ).images
    ours = my_controlnet_pipeline(
        pipeline, prompt, sd_control, 4.0, conditioning_scale, sd_call["num_inference_steps"], seeded()
    )
    equal, changed = bool((theirs - ours).abs().max() < 1e-5), bool((theirs - plain).abs().max() > 1e-4)
    print(f"scale {conditioning_scale}: the loop written out equals the pipeline (to 1e-5): {equal}", end="; ")
    print(f"the images differ from plain Stable Diffusion's: {changed}")

# %% [markdown]
# The pipeline has a few more options, each a line of that loop: `control_guidance_start` / `control_guidance_end`
# call the ControlNet only for a fraction of the steps (the early ones set the layout), and `guess_mode` feeds the
# control to the conditional half only, with the residuals of the shallow skips scaled down. A list of ControlNets
# (`MultiControlNetModel`) adds the residuals of each.
#
# ## 6. img2img / SDEdit
#
# No new network at all: to edit an image $x$, noise it to a level $t_0$ and run the sampler from there
# (Meng et al. 2022, Algorithm 1),
#
# $$x_{t_0} = \sqrt{\bar\alpha_{t_0}}\,x + \sqrt{1 - \bar\alpha_{t_0}}\,\epsilon,$$
#
# then DDIM steps to the clean data. The noise washes out the image's details, and the model puts back details of
# its own that fit what survived. The strength $s \in [0, 1]$ picks $t_0$ as diffusers' img2img pipelines do
# (`img2img_timesteps`): of an $n$-step schedule, the last $\lfloor s\,n \rfloor$ timesteps are taken. For 10 steps:

# %%
# NBVAL_CHECK_OUTPUT
for strength in (0.25, 0.5, 0.75, 1.0):
    print(f"strength {strength}: {img2img_timesteps(schedule.T, 10, strength)}")

# %% [markdown]
# The input: a **sketch** of each held-out digit, its 7 x 7 block average turned to black and white and blown
# back up, the digits' counterpart of SDEdit's stroke paintings, clearly not a real digit. By hand, the noising and
# the DDIM steps, against `editing.sdedit`:


# %%
def sketch(images: torch.Tensor) -> torch.Tensor:
    """A blocky black-and-white sketch of each digit: the 4 x 4 block means, thresholded, enlarged back to 28 x 28."""
    blocks = F.avg_pool2d(images, 4)  # (B, 1, 7, 7)
    return F.interpolate(torch.where(blocks > -0.5, 1.0, -1.0), scale_factor=4, mode="nearest")


# %%
# NBVAL_CHECK_OUTPUT
sketches = sketch(held_out)  # (n, 1, 28, 28)
few = sketches[:4].to(device)
timesteps = img2img_timesteps(schedule.T, steps, 0.5)
eps = torch.randn(few.shape, generator=torch.Generator().manual_seed(9)).to(device)
xt = q_sample(schedule, few, timesteps[0], eps)  # x_{t_0}
with torch.no_grad():
    for t_now, t_next in pairwise([*timesteps, -1]):
        t_batch = torch.full((len(xt),), t_now, device=device)
        xt = ddim_step(schedule, base(xt, t_batch), t_now, t_next, xt, clip_x0=True)[0]
library = sdedit(base, schedule, few, 0.5, steps, torch.Generator().manual_seed(9))
print("sdedit equals the loop by hand (to 1e-5):", bool((library - xt).abs().max() < 1e-5))

# %% [markdown]
# Now the sweep over the strength, every edit from the same noise. Faithfulness is read twice: the distance of the
# edit from its sketch at the sketch's own resolution (the root mean square difference of the 7 x 7 block means;
# the fine detail is what the edit is meant to change), and how often the classifier reads the edit as the digit
# the sketch was drawn from. Realism is FID against held-out digits, beside its spread and the floor, and the
# fraction of edits the classifier reads confidently.


# %%
def sketch_distance(images: torch.Tensor, sketches: torch.Tensor) -> torch.Tensor:
    """The root mean square difference of the 7 x 7 block means of images and sketches, per image (B,)."""
    return (F.avg_pool2d(images, 4) - F.avg_pool2d(sketches, 4)).pow(2).mean((1, 2, 3)).sqrt()


strengths = (0.0, 0.25, 0.5, 0.75, 1.0)
edit_steps = max(steps, 4)  # a schedule of at least 4 steps, so that strength 0.25 keeps one of them
edits, edit_rows = {}, {}
for strength in strengths:
    edited = torch.cat(
        [
            sdedit(base, schedule, batch.to(device), strength, edit_steps, torch.Generator().manual_seed(10 + b)).cpu()
            for b, batch in enumerate(sketches.split(50))
        ]
    ).clamp(-1, 1)
    edits[strength] = edited
    distance, distance_se = mean_se(sketch_distance(edited, sketches))
    scores = sample_scores(classifier, edited)
    edit_rows[strength] = dict(
        distance=distance, distance_se=distance_se, same_digit=class_accuracy(classifier, edited, held_labels), **scores
    )
    print(
        f"s = {strength:4}: distance to the sketch {distance:.3f} ± {distance_se:.3f} | same digit "
        f"{edit_rows[strength]['same_digit']:.0%} | FID {scores['fid']:6.1f} ± {scores['fid_sd']:5.1f} "
        f"(floor {scores['fid_floor']:.1f}) | confident {scores['confident_fraction']:.0%}"
    )
show_images(
    torch.cat([e[:10] for e in edits.values()]), nrow=10, title="rows: s = " + ", ".join(f"{s:g}" for s in strengths)
)
plt.show()

# %%
fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.errorbar(
    [r["distance"] for r in edit_rows.values()],
    [r["fid"] for r in edit_rows.values()],
    yerr=[r["fid_sd"] for r in edit_rows.values()],
    marker="o",
)
for strength, row in edit_rows.items():
    ax.annotate(f"s = {strength:g}", (row["distance"], row["fid"]), textcoords="offset points", xytext=(6, 4))
ax.axhline(edit_rows[0.0]["fid_floor"], color="gray", ls=":", label="real-vs-real floor")
ax.set_xlabel("distance to the sketch (unfaithful ->)")
ax.set_ylabel("FID (unrealistic ->) ± 1 sd")
ax.set_yscale("log")
ax.legend()
plt.show()

# %%
d, f, same = [edit_rows[s]["distance"] for s in strengths], edit_rows, [edit_rows[s]["same_digit"] for s in strengths]
check_claim(
    all(a < b for a, b in zip(d, d[1:])),
    "the higher the strength, the further the edit lands from its sketch",
    ", ".join(f"s = {s:g}: {v:.3f}" for s, v in zip(strengths, d, strict=True)),
    decisive,
)
check_claim(
    clearly_below(f[0.5]["fid"], f[0.5]["fid_sd"], f[0.0]["fid"], f[0.0]["fid_sd"])
    and edit_rows[0.5]["same_digit"] > edit_rows[1.0]["same_digit"] + 0.2,
    "at strength 0.5 the edits are clearly more realistic than the sketches, and far more often the sketch's "
    "digit than at strength 1, which forgets the sketch",
    f"FID s = 0: {f[0.0]['fid']:.1f} ± {f[0.0]['fid_sd']:.1f}, s = 0.5: {f[0.5]['fid']:.1f} ± {f[0.5]['fid_sd']:.1f}; "
    f"same digit {', '.join(f'{v:.0%}' for v in same)}",
    decisive,
)

# %% [markdown]
# That is the trade-off of every img2img slider: at low strength the model only retouches (faithful, still a
# sketch), at strength 1 it starts from noise that keeps a trace of the input of weight
# $\sqrt{\bar\alpha_{T-1}}$, nothing in practice (realistic, any digit). In between lies the useful range, where
# the layout survives the noise and the strokes do not.
#
# ## 7. Inpainting: replacement and RePaint
#
# To fill the pixels where a mask $m$ is 0 and keep those where it is 1, run the sampler from pure noise, and after
# every step overwrite the known pixels with the real image noised to the step's level (Lugmayr et al. 2022,
# eq. 8):
#
# $$x_{t'} = m \odot \big(\sqrt{\bar\alpha_{t'}}\,x + \sqrt{1 - \bar\alpha_{t'}}\,\epsilon\big)
#   + (1 - m) \odot \mathrm{step}(x_t)$$
#
# This is the **replacement** method. Its weakness: the unknown pixels never see what the known ones will become;
# each step, the model's proposal for the hole was made for a known part that is then thrown away and drawn again.
# **RePaint** takes each step $U$ times, jumping back from $t'$ to $t$ with fresh noise in between
# (`editing.renoise`, $x_t = \sqrt{\bar\alpha_t/\bar\alpha_{t'}}\,x_{t'} + \sqrt{1 - \bar\alpha_t/\bar\alpha_{t'}}\,z$),
# so that the model can harmonise the two parts. By hand, the replacement method with deterministic steps
# ($\eta = 0$), against `editing.inpaint`:

# %%
# NBVAL_CHECK_OUTPUT
mask = torch.ones(1, 1, 28, 28)
mask[..., 14:, :] = 0  # the lower half is unknown
known = held_out[:4].to(device)
generator = torch.Generator().manual_seed(11)
xt = torch.randn(known.shape, generator=generator).to(device)  # x_T
timesteps = spaced_timesteps(schedule.T, steps)  # all of them, noisiest first (trailing)
with torch.no_grad():
    for t_now, t_next in pairwise([*timesteps, -1]):
        t_batch = torch.full((len(xt),), t_now, device=device)
        x_unknown = ddim_step(schedule, base(xt, t_batch), t_now, t_next, xt, clip_x0=True)[0]
        noise = torch.randn(known.shape, generator=generator).to(device)
        x_known = known if t_next == -1 else q_sample(schedule, known, t_next, noise)
        xt = mask.to(device) * x_known + (1 - mask.to(device)) * x_unknown
library = inpaint(base, schedule, known, mask, steps, torch.Generator().manual_seed(11), eta=0.0)
print("inpaint (resample=1, eta=0) equals the loop by hand (to 1e-5):", bool((library - xt).abs().max() < 1e-5))

# %% [markdown]
# The comparison, on the lower halves of `profile.grid_images` held-out digits, with RePaint's own setting $\eta = 1$
# (DDPM's amount of noise at each step). RePaint with $U = 4$ costs four times the network calls. Measured outside
# the mask: how far the known pixels moved (they must not move at all). Inside: how often the completed digit is
# read as the digit whose upper half it was given, how often it is read confidently, and FID with its spread.

# %%
m = min(profile.grid_images, n)
halves, half_labels = held_out[:m], held_labels[:m]
filled = {}
for name, resample in [("replacement", 1), ("RePaint, U = 4", 4)]:
    filled[name] = torch.cat(
        [
            inpaint(
                base, schedule, batch.to(device), mask, steps, torch.Generator().manual_seed(12 + b), resample
            ).cpu()
            for b, batch in enumerate(halves.split(50))
        ]
    )
fill_rows = {}
for name, images in {"the real digits": halves, **filled}.items():
    images = images.clamp(-1, 1)
    moved = ((images - halves) * mask).abs().max().item()
    fill_rows[name] = dict(moved=moved, same_digit=class_accuracy(classifier, images, half_labels))
    fill_rows[name]["confident_fraction"] = confident_fraction(classifier, images)
    line = (
        f"{name:15s} known pixels moved by {moved:.1e} | same digit {fill_rows[name]['same_digit']:.0%} | "
        f"confident {fill_rows[name]['confident_fraction']:.0%}"
    )
    if name in filled:  # the real digits are held-out digits themselves: no FID against held-out digits for them
        scores = sample_scores(classifier, images)
        fill_rows[name].update(scores)
        line += f" | FID {scores['fid']:.1f} ± {scores['fid_sd']:.1f} (floor {scores['fid_floor']:.1f})"
    print(line)
show_images(
    torch.cat([halves[:10] * mask[0] - (1 - mask[0]), *[images[:10] for images in filled.values()]]),
    nrow=10,
    title="the known upper halves / replacement / RePaint (U = 4)",
)
plt.show()

# %%
check_claim(
    max(row["moved"] for row in fill_rows.values()) == 0,
    "both methods keep the known pixels exactly",
    ", ".join(f"{name}: {row['moved']:.1e}" for name, row in fill_rows.items()),
)
rp, rep = fill_rows["RePaint, U = 4"], fill_rows["replacement"]
check_claim(
    rp["confident_fraction"] > rep["confident_fraction"] and rp["same_digit"] >= rep["same_digit"] - 0.05,
    "RePaint's completions are confident digits more often than replacement's, and read as the given half's digit "
    "as often (within 5 points)",
    f"confident: replacement {rep['confident_fraction']:.0%}, RePaint {rp['confident_fraction']:.0%}; same digit: "
    f"{rep['same_digit']:.0%}, {rp['same_digit']:.0%}; FID {rep['fid']:.1f} ± {rep['fid_sd']:.1f}, "
    f"{rp['fid']:.1f} ± {rp['fid_sd']:.1f}",
    decisive,
)

# %% [markdown]
# The real digits' row is the ceiling: a completion can be read as the right digit only as often as the real lower
# half lets the classifier read it. Part of what the completions lose to it is not the method's fault: an upper
# half can leave the digit open (the tops of a 7 and a 9, or of a 3 and a 2, can look alike).
#
# ## 8. Classifier guidance
#
# Chapter 7 derived guidance from Bayes' rule, $\nabla \log p(x_t \mid y) = \nabla \log p(x_t) + \nabla \log
# p(y \mid x_t)$, and then made the classifier disappear. Classifier guidance keeps it: a classifier
# $p_\phi(y \mid x_t, t)$ trained on **noisy** images gives the second term by autograd. With
# $\hat\epsilon = -\sqrt{1 - \bar\alpha_t}\,\nabla \log p(x_t)$ (Tweedie, chapter 11), the noise of
# $p(x_t)\,p_\phi(y \mid x_t)^s$ is (Dhariwal & Nichol 2021, Algorithm 2)
#
# $$\hat\epsilon_{s} = \hat\epsilon(x_t, t) - s\,\sqrt{1 - \bar\alpha_t}\;\nabla_{x_t} \log p_\phi(y \mid x_t, t).$$
#
# Checked where everything is exact: two classes of Gaussians, $x_0 \mid y \sim \mathcal N(\mu_y, s_y^2 I)$. The
# noised classes are Gaussians too, $x_t \mid y \sim \mathcal N(\sqrt{\bar\alpha_t}\,\mu_y, (\bar\alpha_t s_y^2 +
# 1 - \bar\alpha_t) I)$, so the exact noisy classifier is Bayes' rule on them, and the exact noise predictions come
# from `GaussianMixture.optimal_denoiser`. At $s = 1$ classifier guidance is the class-conditional model's noise;
# at every $s$ it is chapter 7's classifier-free formula built from the exact models:

# %%
# NBVAL_CHECK_OUTPUT
means = torch.tensor([[1.0, -0.5], [-0.7, 0.4]], dtype=torch.float64)
stds = torch.tensor([0.3, 0.5], dtype=torch.float64)
mixture_eps = GaussianMixture(means, stds, [0.5, 0.5]).optimal_denoiser(schedule)
class_eps = [GaussianMixture(means[y : y + 1], stds[y : y + 1], [1.0]).optimal_denoiser(schedule) for y in (0, 1)]


def exact_classifier(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # logits of p(y | x_t), equal priors
    alpha_bar = gather(schedule.alpha_bar, t, xt).double()  # (B, 1)
    variance = alpha_bar * stds**2 + 1 - alpha_bar  # (B, 2): each class's variance at t
    distance = ((xt[:, None, :] - alpha_bar.sqrt()[:, :, None] * means) ** 2).sum(-1)  # (B, 2)
    return -0.5 * distance / variance - 0.5 * means.shape[1] * variance.log()


xt = torch.randn(256, 2, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
t = torch.randint(0, schedule.T, (256,), generator=torch.Generator().manual_seed(14))
y = torch.randint(0, 2, (256,), generator=torch.Generator().manual_seed(15))
eps_y = torch.where(y[:, None] == 0, class_eps[0](xt, t), class_eps[1](xt, t))
eps_all = mixture_eps(xt, t)
guided = {s: classifier_guided_eps(mixture_eps, exact_classifier, xt, t, y, s, schedule) for s in (0.0, 1.0, 3.0)}
print("scale 1 gives the class-conditional noise (to 1e-10):", torch.allclose(guided[1.0], eps_y, atol=1e-10, rtol=0))
same = all(torch.allclose(g, cfg_combine(eps_all, eps_y, s), atol=1e-10, rtol=0) for s, g in guided.items())
print("every scale equals classifier-free guidance with the exact models (to 1e-10):", same)

# %% [markdown]
# The gradient itself, $\nabla_{x_t} \log p_\phi(y \mid x_t, t)$, comes from `editing.classifier_gradient`: the
# log-probabilities of the batch summed, differentiated with respect to $x_t$ only (the classifier's weights get no
# gradient, and it works inside the samplers' `torch.no_grad()`). Checked against central finite differences, in
# float64, on a few pixels of a freshly built `NoisyDigitClassifier` (GroupNorm, not BatchNorm: each example's
# gradient must be its own):

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(16)
fresh_classifier = NoisyDigitClassifier().double().eval()
xt = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
t, y = torch.tensor([10, 400, 900]), torch.tensor([3, 7, 1])
gradient = classifier_gradient(fresh_classifier, xt, t, y)


def log_p(x: torch.Tensor) -> torch.Tensor:  # log p(y_i | x_i, t_i) for each example, (B,)
    return torch.log_softmax(fresh_classifier(x, t), -1).gather(1, y[:, None])[:, 0]


h, worst = 1e-6, 0.0
for row, col in [(5, 9), (14, 14), (20, 3)]:
    bump = torch.zeros_like(xt)
    bump[:, 0, row, col] = h
    with torch.no_grad():
        finite = (log_p(xt + bump) - log_p(xt - bump)) / (2 * h)  # (B,): each example's own derivative
    worst = max(worst, (finite - gradient[:, 0, row, col]).abs().max().item())
print("classifier_gradient equals finite differences (to 1e-7):", worst < 1e-7)

# %% [markdown]
# Why a classifier of **noisy** images? Guidance needs $p(y \mid x_t)$ at every $t$, and an ordinary classifier,
# trained on clean digits, has never seen $x_t$. The shipped digit classifier (chapter 4's judge) on held-out digits
# noised to $t$, beside `noisy_classifier`, trained by `scripts/train_control.py --model noisy_classifier` on digits
# noised to a uniform $t$ of the base model's schedule (`editing.noisy_classifier_loss`):

# %%
noisy_card = load_card("noisy_classifier")
noisy_classifier = load_model("noisy_classifier", device).eval()
print(noisy_card["training"]["status"], "|", noisy_card["about"])
print(f"schedule: the classifier's {noisy_card['noise_schedule']}, the base's {card['schedule']}")
probe, probe_labels = held_out.to(device), held_labels.to(device)  # the n held-out digits of section 3
noise_levels = (0, 250, 500, 750)
accuracy = {}
for name, judge in [("digit classifier", lambda x, t: classifier(x)), ("noisy classifier", noisy_classifier)]:
    accuracy[name] = noisy_class_accuracy(
        judge, schedule, probe, probe_labels, noise_levels, torch.Generator().manual_seed(18)
    )
    print(f"{name:17s} " + " | ".join(f"t = {t}: {a:.0%}" for t, a in accuracy[name].items()))
print(
    "the card's:        " + " | ".join(f"t = {t}: {a:.0%}" for t, a in noisy_card["heldout_accuracy"]["by_t"].items())
)

# %%
plain_acc, noisy_acc = accuracy["digit classifier"], accuracy["noisy classifier"]
check_claim(
    noisy_acc[500] > plain_acc[500] + 0.1 and noisy_acc[750] > plain_acc[750],
    "the noisy classifier reads digits at t = 500 and 750 better than the classifier trained on clean digits",
    f"t = 500: noisy {noisy_acc[500]:.0%}, plain {plain_acc[500]:.0%}; t = 750: {noisy_acc[750]:.0%}, "
    f"{plain_acc[750]:.0%} (n = {len(probe)})",
    decisive,
)

# %% [markdown]
# ### Classifier guidance against classifier-free guidance
#
# Both on one network, so that only the guidance differs: chapter 7's class-conditional model. Classifier-free guidance
# uses its conditional and unconditional predictions (`Guided`); classifier guidance uses its unconditional prediction
# (the "no label" input) and the noisy classifier's gradient (`ClassifierGuided`). The classifier was trained on the
# base model's schedule, which the class model (fine-tuned from it) shares. Each asks for the digits 0..9 in turn, from
# the same noise, with the noise re-derived from the clipped $\hat x_0$ as chapter 7 found necessary for strong
# guidance. The plan was to compare the two at matched accuracy; classifier guidance never reached the accuracy of
# classifier-free guidance at any scale we tried ($s$ = 1, 3, 10, 30, 100 and 300; the three kept here show the trend),
# so the runs are read side by side instead: accuracy by the independent digit classifier, what the guiding classifier
# itself reads in the finished samples, FID beside its spread, and the spread within classes (`class_spread`, over that
# of real digits: diversity).

# %%
class_card = load_card("unet_mnist_class")
class_model = load_model("unet_mnist_class", device)
assert class_card["schedule"] == card["schedule"] == noisy_card["noise_schedule"], "one schedule for all three"
null = torch.tensor([class_card["model"]["num_classes"]], device=device)  # the label that means "no label"


def unconditional(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return class_model(xt, t, null.expand(len(xt)))


unconditional.prediction_type = "eps"
asked = torch.arange(n) % 10
x_T = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(19))
real_spread = class_spread(classifier, real_digits(n)[0])
options = dict(use_clipped_model_output=True)
runs = {}
for w in (1.0, 3.0):
    runs[f"classifier-free, w = {w:g}"] = ddim_batches(
        lambda y, w=w: Guided(class_model, y, null, w), x_T, asked, **options
    )
for s in (10.0, 100.0, 300.0):
    runs[f"classifier, s = {s:g}"] = ddim_batches(
        lambda y, s=s: ClassifierGuided(unconditional, noisy_classifier, y, s, schedule), x_T, asked, **options
    )
guidance_rows = {}
for name, samples in runs.items():
    scores = sample_scores(classifier, samples)
    accuracy_value = class_accuracy(classifier, samples, asked)
    with torch.no_grad():  # what the guiding classifier itself reads in the finished samples (t = 0)
        own = noisy_classifier(samples.to(device), torch.zeros(len(samples), dtype=torch.long, device=device))
    guidance_rows[name] = dict(
        accuracy=accuracy_value,
        own_reading=(own.argmax(-1).cpu() == asked).float().mean().item(),
        spread=class_spread(classifier, samples) / real_spread,
        **scores,
    )
    print(
        f"{name:24s} accuracy {accuracy_value:.0%} (the noisy classifier: {guidance_rows[name]['own_reading']:.0%})"
        f" | FID {scores['fid']:6.1f} ± {scores['fid_sd']:4.1f} (floor {scores['fid_floor']:.1f}) | spread / real "
        f"{guidance_rows[name]['spread']:.2f}"
    )
fig, axes = plt.subplots(1, len(runs), figsize=(3 * len(runs), 2.4))
for ax, (name, samples) in zip(axes, runs.items(), strict=True):
    show_images(samples[:20], nrow=10, ax=ax, title=name)
plt.show()

# %%
plain, cfg = guidance_rows["classifier-free, w = 1"], guidance_rows["classifier-free, w = 3"]
classifier_rows = {name: row for name, row in guidance_rows.items() if name.startswith("classifier,")}
best_name = max(classifier_rows, key=lambda name: classifier_rows[name]["accuracy"])
check_claim(
    classifier_rows[best_name]["accuracy"] < plain["accuracy"],
    "no classifier-guidance scale reaches the accuracy of the class model's plain conditional prediction (w = 1)",
    ", ".join(f"{name}: {row['accuracy']:.0%}" for name, row in guidance_rows.items()),
    decisive,
)
strong = {name: row for name, row in classifier_rows.items() if name != "classifier, s = 10"}
check_claim(
    all(row["own_reading"] >= 0.95 and row["own_reading"] - row["accuracy"] > 0.1 for row in strong.values()),
    "at s = 100 and 300 the guiding classifier reads nearly every sample (95% or more) as the digit asked for, the "
    "independent judge over 10 points fewer: what the larger scales buy is mostly the guiding classifier's opinion",
    ", ".join(f"{name}: guide {row['own_reading']:.0%}, judge {row['accuracy']:.0%}" for name, row in strong.items()),
    decisive,
)
strongest = classifier_rows["classifier, s = 300"]
check_claim(
    clearly_below(cfg["fid"], cfg["fid_sd"], strongest["fid"], strongest["fid_sd"]),
    "classifier-free guidance at w = 3 is clearly closer to the data (lower FID) than the strongest classifier "
    "guidance",
    f"FID classifier-free w = 3: {cfg['fid']:.1f} ± {cfg['fid_sd']:.1f}, classifier s = 300: "
    f"{strongest['fid']:.1f} ± {strongest['fid_sd']:.1f}; spread / real {cfg['spread']:.2f}, {strongest['spread']:.2f}",
    decisive,
)

# %% [markdown]
# Past $s = 10$, classifier guidance raised the guiding classifier's own reading to nearly every sample while the
# independent judge's accuracy stayed below the plain conditional model's, and at $s = 300$ its FID was clearly above
# classifier-free guidance's at $w = 3$. It needs a second network, trained on noisy images, and a backward pass through
# it at every step; its gradient is that of a small discriminative model, which can raise that classifier's confidence
# by changes a denoiser would not make (the adversarial side of input gradients), which is why the samples are judged by
# another classifier than the one that guided them. Classifier-free guidance needs neither: the generative model's own
# two predictions carry the same Bayes' rule, which is why diffusers' pipelines and every large text-to-image model use
# it. Classifier guidance keeps one advantage: any differentiable judge of $x_t$ can steer a model that was never
# trained with labels.
#
# ## Recap
#
# - A control is best computed from the data by code (here each digit's outline), so that following it is a number:
#   the boundary $F_1$ of the sample's outline against the control.
# - ControlNet copies the frozen UNet's way down into trainable weights, reads the control through a small hint
#   encoder, and adds its features to every skip and the middle of the frozen decoder through zero convolutions:
#   at initialisation it is the base model bit for bit, and the zero convolutions still learn from the first step.
#   diffusers' `ControlNetModel` is the same construction, part for part, and its pipeline's loop is Stable
#   Diffusion's with the residuals handed to the UNet; `controlnet_conditioning_scale` multiplies them.
# - img2img / SDEdit noises an input to $t_0 \approx s\,T$ and denoises: low strength keeps the input (faithful,
#   unrealistic), strength 1 forgets it; the curve between was measured.
# - Inpainting puts the known pixels back, noised, after every step (replacement); RePaint takes each step several
#   times with jumps back so that the two parts can agree. The known pixels come out exactly as given.
# - Classifier guidance adds $-s\sqrt{1 - \bar\alpha_t}\,\nabla \log p_\phi(y \mid x_t)$ to the noise: with exact
#   models it is classifier-free guidance (checked), in practice it needs a classifier of noisy images.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** RePaint's jump back from $t_{from}$ to a noisier $t_{to}$ draws from the forward process between
# the two levels. Write `jump_back(x, t_from, t_to, z)` from $q(x_{t_{to}} \mid x_{t_{from}})$ (compose the forward
# steps $t_{from} + 1, \dots, t_{to}$), check it against `editing.renoise`, and check that from the clean data
# ($t_{from} = -1$, $\bar\alpha = 1$) it is `q_sample`.


# %% tags=["solution", "hide-input"]
def jump_back(x: torch.Tensor, t_from: int, t_to: int, z: torch.Tensor) -> torch.Tensor:
    ### BEGIN SOLUTION
    alpha_bar_from = 1.0 if t_from == -1 else schedule.alpha_bar[t_from]
    ratio = schedule.alpha_bar[t_to] / alpha_bar_from  # the product of alpha over t_from + 1 .. t_to
    return ratio.sqrt() * x + (1 - ratio).sqrt() * z
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(20))
z = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(21))
for t_from, t_to in [(-1, 300), (100, 101), (250, 900)]:
    assert torch.allclose(jump_back(x, t_from, t_to, z), renoise(schedule, x, t_from, t_to, z), atol=1e-6), (
        t_from,
        t_to,
    )
assert torch.allclose(jump_back(x, -1, 500, z), q_sample(schedule, x, 500, z), atol=1e-6), "from the data: q_sample"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Write `guided_eps(model, judge, xt, t, labels, s)`, classifier guidance by hand: the model's noise
# estimate minus $s\sqrt{1 - \bar\alpha_t}$ times the gradient of $\log p(y \mid x_t, t)$, taken with
# `torch.autograd.grad`. Check it against `editing.classifier_guided_eps` on the base model and a freshly built
# noisy classifier (untrained: the formula is what is checked).


# %% tags=["solution", "hide-input"]
def guided_eps(model, judge, xt, t, labels, s):
    ### BEGIN SOLUTION
    with torch.no_grad():
        eps_hat = model(xt, t)
    x = xt.detach().requires_grad_(True)
    log_p = torch.log_softmax(judge(x, t), -1).gather(1, labels[:, None]).sum()
    (gradient,) = torch.autograd.grad(log_p, x)
    alpha_bar_t = schedule.alpha_bar.to(xt.device)[t].view(-1, 1, 1, 1)
    return eps_hat - s * (1 - alpha_bar_t).sqrt() * gradient
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(22)
judge = NoisyDigitClassifier().to(device).eval()
xt = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(23)).to(device)
t, labels = torch.tensor([50, 300, 600, 950], device=device), torch.tensor([0, 4, 7, 9], device=device)
for s in (1.0, 5.0):
    reference = classifier_guided_eps(base, judge, xt, t, labels, s, schedule)
    assert torch.allclose(guided_eps(base, judge, xt, t, labels, s), reference, atol=1e-5), f"scale {s}"
print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** With a tolerance, the boundary $F_1$ counts a pixel of one outline as matched when the other
# outline has an edge within `tolerance` pixels of it (in the $(2\,tol + 1)^2$ square around it): precision is the
# share of the sample's outline matched in the control, recall the share of the control matched in the sample's
# outline. Write `f1_within(samples, control, tolerance)` (a max-pool finds "an edge nearby") and check it against
# `edge_agreement` for tolerances 0, 1 and 2, on digits against the outlines of other classes.


# %% tags=["solution", "hide-input"]
def f1_within(samples: torch.Tensor, control: torch.Tensor, tolerance: int) -> torch.Tensor:
    ### BEGIN SOLUTION
    a, c = (edge_map(samples) > 0).float(), (control > 0).float()  # (B, 1, 28, 28)
    size = 2 * tolerance + 1
    near_a, near_c = (F.max_pool2d(e, size, stride=1, padding=tolerance) for e in (a, c))
    precision = (a * near_c).sum((1, 2, 3)) / a.sum((1, 2, 3))
    recall = (c * near_a).sum((1, 2, 3)) / c.sum((1, 2, 3))
    return 2 * precision * recall / (precision + recall)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
for shift in (1, 3, 5):
    other = edge_map(digits).roll(shift, dims=0)  # each digit against another class's outline
    for tolerance in (0, 1, 2):
        theirs = edge_agreement(digits, other, tolerance=tolerance)
        assert torch.allclose(f1_within(digits, other, tolerance), theirs, atol=1e-6), (shift, tolerance)
print("exercise 3: correct")
