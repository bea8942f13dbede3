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
# # Chapter 9: From scratch to diffusers
#
# [Open in Colab](https://colab.research.google.com/github/diffusion-course/diffusion-course/blob/main/notebooks/09_diffusers.ipynb)
# [Launch on Binder](https://mybinder.org/v2/gh/diffusion-course/diffusion-course/main?labpath=notebooks%2F09_diffusers.ipynb)
#
# Eight chapters built diffusion from its parts: schedules, the DDPM and DDIM steps, a UNet, latents, guidance,
# LoRA. 🤗 diffusers packages the same parts behind three kinds of object: **models** (networks with a config,
# saved and loaded as a folder), **schedulers** (the tables and the step) and **pipelines** (the loop that ties
# them together). This chapter moves the course's own model and schedule into those objects and checks, number
# by number, that nothing changes on the way; then it takes Stable Diffusion's pipeline apart, built from tiny,
# randomly initialised components, to see where every idea of the course sits in it.
#
# By the end of this chapter you can:
#
# 1. write a course schedule as a diffusers scheduler config and check that the tables agree;
# 2. make a model of your own a diffusers model, run it through `DDPMPipeline` and `DDIMPipeline`, and say which
#    scheduler each pipeline's loop is right for;
# 3. swap schedulers on one model and compare them by wall time and FID;
# 4. save a pipeline with `save_pretrained`, load it back with `from_pretrained`, and get identical outputs;
# 5. name what each component of `StableDiffusionPipeline` does, and where classifier-free guidance, negative
#    prompts and LoRA appear in its API.

# %%
import json
import shutil
import tempfile
import time
from pathlib import Path

import diffusers
import matplotlib.pyplot as plt
import torch
from diffusers import (
    ConfigMixin,
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    ModelMixin,
    StableDiffusionPipeline,
    UNet2DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from course_lib.benchmark import gflops_per_image, parameter_count
from course_lib.claims import check_claim
from course_lib.guidance import cfg_combine
from course_lib.interop import (
    TOKENS,
    load_diffusers_unet,
    scheduler_config,
    scheduler_sample,
    tiny_stable_diffusion,
    to_diffusers_scheduler,
)
from course_lib.metrics import load_digit_classifier, sample_scores
from course_lib.nets.unet import UNet
from course_lib.plotting import show_images
from course_lib.profiles import get_device, get_profile, synchronize
from course_lib.samplers import ddim_sample, ddim_step
from course_lib.sampling import SAMPLERS, run_sampler
from course_lib.schedules import SCHEDULE_NAMES, make_schedule
from course_lib.weights import load_card

profile = get_profile()
device = get_device()
torch.set_num_threads(1)  # as in chapter 5: steady speed on a shared 2-core machine
plt.rcParams["figure.dpi"] = 110
diffusers.utils.logging.set_verbosity_error()  # keep warnings and progress bars out of the outputs
diffusers.utils.logging.disable_progress_bar()
print(f"profile: {profile.name} | device: {device} | diffusers {diffusers.__version__}")
print(f"digits per scheduler: {profile.sampler_samples} | steps per digit: {profile.step_counts[1]}", end=" | ")
print(f"DDIM steps for the grid: {profile.sample_steps}")

# %% [markdown]
# The model is chapter 4's shipped UNet (eps-prediction, cosine schedule, $T = 1000$), loaded as a diffusers
# model twice: one copy on the device for sampling, one on the CPU for the checks, whose printed results must be
# the same on every machine. `cpu_unet.net` is the course's own `UNet`, with the same weights.

# %%
card = load_card("unet_mnist_eps")
schedule = make_schedule(card["schedule"]["name"], card["schedule"]["T"])
T = schedule.T
unet = load_diffusers_unet("unet_mnist_eps").to(device)
cpu_unet = load_diffusers_unet("unet_mnist_eps")
model = cpu_unet.net  # the course's UNet, as the course's samplers call it: model(xt, t)
print(f"{type(unet).__name__} holding a {type(model).__name__} of {parameter_count(model):,} parameters")

# %% [markdown]
# ## 1. A schedule is a scheduler config
#
# A diffusers scheduler holds the tables of chapter 2 (`betas`, `alphas`, `alphas_cumprod`, which the course
# calls $\beta$, $\alpha$ and $\bar\alpha$) and builds them from its config: `num_train_timesteps` is $T$, and
# `beta_schedule` names the schedule. diffusers' names for the course's schedules are in
# `course_lib.schedules.DIFFUSERS_BETA_SCHEDULE`; the cosine schedule of Nichol & Dhariwal is "squaredcos_cap_v2"
# (the cap is the clip at $\beta_{max} = 0.999$). The timestep convention is the same: an integer $t$ in
# $0..T-1$. By hand, for the shipped model's schedule:

# %%
# NBVAL_CHECK_OUTPUT
by_hand = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
gap = (by_hand.alphas_cumprod - schedule.alpha_bar).abs().max().item()
print("diffusers' alphas_cumprod equals our alpha_bar to 1e-6:", gap < 1e-6)

# %% [markdown]
# `scheduler_config` writes that config for any course schedule. A schedule made by `make_schedule(name, T)` with
# its default parameters goes by name, where the scheduler knows the name (only `DDPMScheduler` knows "sigmoid");
# any other table goes as `trained_betas`, the betas themselves. Every schedule with every scheduler the course
# uses:

# %%
# NBVAL_CHECK_OUTPUT
print(scheduler_config(schedule))
for name in SCHEDULE_NAMES:
    row = []
    for kind in SAMPLERS:
        scheduler = to_diffusers_scheduler(make_schedule(name, T), kind)
        how = "trained_betas" if scheduler.config.trained_betas is not None else scheduler.config.beta_schedule
        equal = (scheduler.alphas_cumprod - make_schedule(name, T).alpha_bar).abs().max() < 1e-6
        row.append(f"{kind}: {how} {bool(equal)}")
    print(f"{name:9s} " + " | ".join(row))

# %% [markdown]
# The rest of a scheduler's config says how it steps: for the shipped model, DDIM with "trailing" spacing and
# $\hat x_0$ clipped to $[-1, 1]$, as chapter 5 ran it (`clip_sample` is the course's `clip_x0`). One step of
# `DDIMScheduler.step` against the course's `ddim_step`, on the network's real output at $t = T-1$:

# %%
ddim = to_diffusers_scheduler(schedule, "DDIM", clip_x0=True)
print({key: ddim.config[key] for key in ("timestep_spacing", "clip_sample", "clip_sample_range", "set_alpha_to_one")})

# %%
# NBVAL_CHECK_OUTPUT
ddim.set_timesteps(10)
t, t_next = ddim.timesteps[0].item(), ddim.timesteps[1].item()
xt = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    eps_hat = cpu_unet(xt, t).sample
theirs = ddim.step(eps_hat, t, xt).prev_sample
ours, _ = ddim_step(schedule, eps_hat, t, t_next, xt, clip_x0=True)
print(f"t = {t} -> {t_next}: DDIMScheduler.step equals ddim_step to 1e-5:", bool((theirs - ours).abs().max() < 1e-5))

# %% [markdown]
# ## 2. Our UNet as a diffusers model
#
# What does a pipeline need from a model? Reading `DDPMPipeline`'s source: `unet.config.sample_size` and
# `unet.config.in_channels` for the shape of $x_T$, `unet.dtype` and its device, and `unet(x, t).sample` with
# `t` one timestep for the whole batch. And `save_pretrained` / `from_pretrained` want a config that rebuilds the
# model. diffusers' own `UNet2DModel` would give all that, but it cannot be the course's UNet, whatever its
# config: it keeps the outputs of its first convolution and of every downsampler as extra skips and has one more
# residual block per level on the way up to take them, one `layers_per_block` for all levels (ours has
# `blocks = (1, 1, 2)`), a convolution after each upsampling, and a fixed head dimension where ours fixes the
# number of heads. Its pieces do match ours (a `ResnetBlock2D` with "scale_shift" time conditioning is our
# `ResBlock`), so the smallest UNet2DModel that has room for every layer of ours, with the extra blocks set to
# the identity, would carry dead weight. Measured:

# %%
model_kwargs = {key: value for key, value in card["model"].items() if key != "class"}
roomy = UNet2DModel(
    sample_size=28,
    in_channels=1,
    out_channels=1,
    block_out_channels=tuple(model_kwargs["channels"]),
    layers_per_block=max(model_kwargs["blocks"]),
    down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in model_kwargs["attention"]),
    up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(model_kwargs["attention"])),
    norm_num_groups=model_kwargs["groups"],
    attention_head_dim=model_kwargs["channels"][-1] // model_kwargs["heads"],
    resnet_time_scale_shift="scale_shift",
    attn_norm_num_groups=model_kwargs["groups"],
)


class Plain(torch.nn.Module):
    """model(xt, t) -> tensor, as `gflops_per_image` calls a model."""

    def __init__(self, unet2d):
        super().__init__()
        self.unet2d = unet2d

    def forward(self, xt, t):
        return self.unet2d(xt, t).sample


ours_gflops, roomy_gflops = gflops_per_image(model, backward=False), gflops_per_image(Plain(roomy), backward=False)
print(f"course UNet:          {parameter_count(model):>9,} parameters, {ours_gflops:.2f} GFLOPs per digit")
print(f"UNet2DModel with room: {parameter_count(roomy):>9,} parameters, {roomy_gflops:.2f} GFLOPs per digit", end="")
print(f" ({roomy_gflops / ours_gflops:.1f}x)")

# %% [markdown]
# Twice the compute for the same function is not a conversion. The other way is a thin wrapper: a class that is
# a diffusers model (`ModelMixin` gives saving, loading, `.dtype`, `.device`; `ConfigMixin` with
# `@register_to_config` records the constructor's arguments as the config) and holds our UNet. Written out:


# %%
class MyUNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self, sample_size=28, in_channels=1, channels=(32, 64, 96), blocks=(1, 1, 2), attention=(False, False, True)
    ):
        super().__init__()
        self.net = UNet(in_channels, tuple(channels), tuple(blocks), tuple(attention))

    def forward(self, sample, timestep, return_dict=True):
        t = torch.as_tensor(timestep, device=sample.device).expand(len(sample))  # pipelines pass one t
        return UNet2DOutput(sample=self.net(sample, t))


# %%
# NBVAL_CHECK_OUTPUT
mine = MyUNet()
mine.net.load_state_dict(model.state_dict())
x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    print(
        "MyUNet equals course_lib.interop.CourseUNet2DModel:", torch.equal(mine(x, 500).sample, cpu_unet(x, 500).sample)
    )
print("its config:", {key: value for key, value in cpu_unet.config.items() if not key.startswith("_")})

# %% [markdown]
# `course_lib.interop.CourseUNet2DModel` is that wrapper with every keyword of the UNet (and class labels for a
# class-conditional one); `load_diffusers_unet` builds it from a shipped card and loads the checked weights.
#
# ## 3. Pipelines
#
# `DDIMPipeline` takes a model and a scheduler (it converts any scheduler it is given to `DDIMScheduler`) and
# runs the loop: draw $x_T$ from the generator, then for each timestep call the model and step. Its output is
# $(x_0/2 + 0.5)$ clipped to $[0, 1]$, the pixel range of an image file. The shipped model, `profile.grid_images`
# digits with `profile.sample_steps` steps, on the device:

# %%
pipeline = DDIMPipeline(unet=unet, scheduler=to_diffusers_scheduler(schedule, "DDIM", clip_x0=True)).to(device)
pipeline.set_progress_bar_config(disable=True)
synchronize(device)
start = time.perf_counter()
grid = pipeline(
    batch_size=profile.grid_images,
    generator=torch.Generator().manual_seed(2),
    num_inference_steps=profile.sample_steps,
    output_type="pt",
).images
synchronize(device)
print(f"{len(grid)} digits in {time.perf_counter() - start:.1f} s")
show_images(grid.cpu() * 2 - 1, nrow=16, title=f"DDIMPipeline, {profile.sample_steps} steps, the shipped model")
plt.show()

# %% [markdown]
# Is that chapter 5's sampler? The pipeline draws $x_T$ = `randn(shape, generator=generator)` before anything
# else, so the same seed gives the course's sampler the same start. With a CPU generator the numbers are the same
# on every device.

# %%
# NBVAL_CHECK_OUTPUT
cpu_pipeline = DDIMPipeline(unet=cpu_unet, scheduler=to_diffusers_scheduler(schedule, "DDIM", clip_x0=True))
cpu_pipeline.set_progress_bar_config(disable=True)
steps = profile.step_counts[0]
call = dict(batch_size=4, num_inference_steps=steps, output_type="pt")
theirs = cpu_pipeline(generator=torch.Generator().manual_seed(3), **call).images
x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(3))
ours = ddim_sample(model, schedule, x_T, steps, clip_x0=True)[0]
print("DDIMPipeline equals ddim_sample to 1e-5:", bool(((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max() < 1e-5))

# %% [markdown]
# `DDPMPipeline` runs the same loop with `DDPMScheduler`, which adds noise at every step. After $x_T$ it draws
# each step's noise from the same generator, after the model call, as the course's samplers do, so handing the
# generator on reproduces its whole random stream: with all $T$ steps it is chapter 3's `ddpm_sample`
# (`tests/test_interop.py` checks that on a short schedule; 1,000 calls per digit cost too much here). Given fewer
# steps than $T$, `DDPMScheduler` visits "leading" timesteps and takes the ancestral step of the shorter chain
# between them; that is DDIM with $\eta = 1$ (Song et al. 2021, section 4.1), as long as $\hat x_0$ is not
# clipped (a clipped $\hat x_0$ enters the two formulas differently):

# %%
# NBVAL_CHECK_OUTPUT
ddpm_pipeline = DDPMPipeline(unet=cpu_unet, scheduler=to_diffusers_scheduler(schedule, "DDPM"))
ddpm_pipeline.set_progress_bar_config(disable=True)
theirs = ddpm_pipeline(generator=torch.Generator().manual_seed(4), **call).images
generator = torch.Generator().manual_seed(4)
x_T = torch.randn(4, 1, 28, 28, generator=generator)
ours = ddim_sample(model, schedule, x_T, steps, eta=1.0, generator=generator, spacing="leading")[0]
print(
    "DDPMPipeline equals DDIM with eta = 1 to 1e-5:", bool(((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max() < 1e-5)
)

# %% [markdown]
# Both pipelines leave out two lines of the general loop, the one `StableDiffusionPipeline` runs: the start is
# $x_T$ times `scheduler.init_noise_sigma`, and the model sees `scheduler.scale_model_input(x, t)`. For DDPM, DDIM
# and DPM-Solver both do nothing. Euler (chapter 5) works on the variance-exploding state
# $x = x_t/\sqrt{\bar\alpha_t}$, which starts at $\sigma_{max} = \sqrt{(1 - \bar\alpha_{T-1})/\bar\alpha_{T-1}}$
# times the noise (printed below: about $2 \times 10^4$ for the cosine schedule, whose last $\beta$ is clipped at
# 0.999; about 157 for the linear one) and must be scaled back before the network sees it.
# `course_lib.interop.scheduler_sample` is the general loop, from a given $x_T$:
#
# ```python
# scheduler.set_timesteps(steps)
# x = x_T * scheduler.init_noise_sigma
# for t in scheduler.timesteps:
#     model_output = unet(scheduler.scale_model_input(x, t), t).sample
#     x = scheduler.step(model_output, t, x, generator=generator).prev_sample
# ```
#
# The start of Euler's state, for this model's schedule and for the linear one:

# %%
sigma_max = {
    name: ((1 - s.alpha_bar[-1]) / s.alpha_bar[-1]).sqrt().item()
    for name, s in (("cosine (this model)", schedule), ("linear", make_schedule("linear", schedule.T)))
}
euler = to_diffusers_scheduler(schedule, "Euler (Karras)")
euler.set_timesteps(10)
print({name: f"{value:.3g}" for name, value in sigma_max.items()}, f"init_noise_sigma {euler.init_noise_sigma:.3g}")
check_claim(
    1e4 < sigma_max["cosine (this model)"] < 3e4 and 150 < sigma_max["linear"] < 165,
    "sigma_max is about 2 x 10^4 for the cosine schedule and about 157 for the linear one",
    f"{sigma_max}",
)

# %% [markdown]
# ## 4. Swapping schedulers on one model
#
# A scheduler is a config plus a step; the model does not change. The four samplers of chapter 5 as diffusers
# schedulers, each from the same `profile.sampler_samples` noises with `profile.step_counts[1]` network calls per
# digit, timed on the device and scored with chapter 4's classifier beside the real-vs-real floor. diffusers'
# Euler has no clip, so it runs without one.

# %%
classifier = load_digit_classifier(device)
n, table_steps = profile.sampler_samples, profile.step_counts[1]


def diffusers_samples(kind, steps, n, seed=5, batch_size=50):
    """n digits from one scheduler: x_T and the DDPM noise from seeded CPU generators, batch after batch."""
    scheduler = to_diffusers_scheduler(schedule, kind, clip_x0=kind != "Euler (Karras)")
    noise, step_noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    samples, seconds = [], 0.0
    for start in range(0, n, batch_size):
        x_T = torch.randn(min(batch_size, n - start), 1, 28, 28, generator=noise).to(device)
        synchronize(device)
        began = time.perf_counter()
        samples.append(scheduler_sample(unet, scheduler, x_T, steps, step_noise).clamp(-1, 1).cpu())
        synchronize(device)
        seconds += time.perf_counter() - began
    return type(scheduler).__name__, torch.cat(samples), seconds


swap = []
for kind in SAMPLERS:
    scheduler_name, samples, seconds = diffusers_samples(kind, table_steps, n)
    swap.append(
        {"scheduler": scheduler_name, "seconds": seconds, "grid": samples[:8], **sample_scores(classifier, samples)}
    )
floor_text = f"{swap[0]['fid_floor']:.2f} ± {swap[0]['fid_floor_sd']:.2f}"
print(f"{n} digits per scheduler, {table_steps} steps each; FID floor at n = {n}: {floor_text}")
print(f"{'scheduler':28s} {'s':>6s} {'FID ± sd':>13s} {'confident':>9s}")
for run in swap:
    fid_text = f"{run['fid']:.2f} ± {run['fid_sd']:.2f}"
    print(f"{run['scheduler']:28s} {run['seconds']:6.1f} {fid_text:>13s} {run['confident_fraction']:9.2f}")

# %%
fig, axes = plt.subplots(len(swap), 1, figsize=(5, 0.75 * len(swap)))
for ax, run in zip(axes, swap):
    show_images(run["grid"], nrow=8, ax=ax)
    ax.set_title(f"{run['scheduler']}, {table_steps} steps", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# The wall times are close: the network's calls are the cost, and a scheduler's step is a few tensor operations.
# The quality is where schedulers differ, and by how much depends on the number of steps: chapter 5's benchmark
# swept it for the course's samplers. Those compute the same steps; on the first four digits (float32 tables
# computed two ways keep DPM-Solver++ and Euler up to about 1e-3 apart, `tests/test_interop.py` says why):

# %%
x_T = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(5))
for kind in SAMPLERS[1:]:  # DDPM with few steps is DDIM with eta = 1 only unclipped (section 3)
    clip_x0 = kind != "Euler (Karras)"
    theirs = scheduler_sample(cpu_unet, to_diffusers_scheduler(schedule, kind, clip_x0=clip_x0), x_T, table_steps)
    ours = run_sampler(kind, model, schedule, x_T, table_steps, clip_x0=clip_x0)
    print(f"{kind:17s} diffusers vs course: largest pixel difference {(theirs - ours).abs().max():.1e}")

# %% [markdown]
# ## 5. Saving and loading
#
# `save_pretrained` writes a folder: `model_index.json` names each component's library and class, and each
# component has a subfolder with its config and, for a model, its weights as safetensors. Our UNet is recorded
# as `["course_lib.interop", "CourseUNet2DModel"]`. diffusers imports nothing that a folder names (importing runs
# code); it looks a library it does not know up among the modules already imported, so `course_lib.interop` must
# be imported before `from_pretrained`, as it is here. (diffusers also warns that `DDIMPipeline` is annotated
# with a `UNet2DModel`; any model called the same way works, and the set-up cell turned warnings off.)

# %%
folder = Path(tempfile.mkdtemp())
cpu_pipeline.save_pretrained(folder)
for path in sorted(folder.rglob("*")):
    if path.is_file():
        print(f"{str(path.relative_to(folder)):45s} {path.stat().st_size:>10,} bytes")
print(json.loads((folder / "model_index.json").read_text()))

# %%
# NBVAL_CHECK_OUTPUT
reloaded = DiffusionPipeline.from_pretrained(folder)
reloaded.set_progress_bar_config(disable=True)
print(type(reloaded).__name__, type(reloaded.unet).__name__, type(reloaded.scheduler).__name__)
before = cpu_pipeline(generator=torch.Generator().manual_seed(6), **call).images
after = reloaded(generator=torch.Generator().manual_seed(6), **call).images
print("identical outputs after the round trip:", torch.equal(before, after))
shutil.rmtree(folder)

# %% [markdown]
# ## 6. The anatomy of Stable Diffusion
#
# `StableDiffusionPipeline` is chapters 6 to 8 in one object: a text encoder for the prompt (chapter 7), a UNet
# that reads it by cross-attention and works on latents (chapters 6 and 7), a VAE between latents and pixels
# (chapter 6), a scheduler, and classifier-free guidance in the loop (chapter 7). The real one has about a
# billion parameters; `tiny_stable_diffusion` builds every component tiny and randomly initialised, so that its
# images mean nothing but every tensor has the real shape and passes through the real code.

# %%
sd = tiny_stable_diffusion(seed=0)
for name, component in sd.components.items():
    if isinstance(component, torch.nn.Module):
        print(f"{name:13s} {type(component).__name__:22s} {parameter_count(component):>8,} parameters")
    elif component is not None:
        print(f"{name:13s} {type(component).__name__}")

# %% [markdown]
# **The tokenizer** turns a prompt into a fixed number of token ids: CLIP's byte-pair encoding, here with a
# vocabulary learned from the words of chapter 7's captions, so that each of them is one token and any other word
# a few pieces.

# %%
# NBVAL_CHECK_OUTPUT
for prompt in ["a thick seven leaning right", "a zebra"]:
    ids = sd.tokenizer(prompt, padding="max_length", max_length=TOKENS).input_ids
    print(f"{prompt!r:30s} -> {sd.tokenizer.convert_ids_to_tokens(ids)}")

# %% [markdown]
# **The text encoder** turns the ids into one vector per token, the context that the UNet's cross-attention
# reads. **The VAE** maps images to latents 4x smaller on each side and back, and the diffusion runs on the latents
# scaled by `scaling_factor` (chapter 6's latent scale). Shapes:

# %%
# NBVAL_CHECK_OUTPUT
with torch.no_grad():
    tokens = sd.tokenizer(["a thick seven"], padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    prompt_embeds = sd.text_encoder(tokens)[0]
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    latents = sd.vae.encode(image).latent_dist.mode() * sd.vae.config.scaling_factor
    decoded = sd.vae.decode(latents / sd.vae.config.scaling_factor).sample
print(f"token ids {tuple(tokens.shape)} -> prompt embeddings {tuple(prompt_embeds.shape)}")
print(f"image {tuple(image.shape)} -> latents {tuple(latents.shape)} -> decoded {tuple(decoded.shape)}")
print(f"scaling_factor {sd.vae.config.scaling_factor}, vae_scale_factor {sd.vae_scale_factor}")

# %% [markdown]
# **The loop**, written out from the pieces, the way `StableDiffusionPipeline.__call__` runs it with guidance
# scale $w$: encode the prompt and the negative prompt (the empty one by default), start from latent noise, and
# at each step call the UNet once on the batch doubled, the unconditional half first, and combine the halves with
# chapter 7's `cfg_combine`, $\hat\epsilon_\varnothing + w\,(\hat\epsilon_c - \hat\epsilon_\varnothing)$:


# %%
@torch.no_grad()
def my_stable_diffusion(pipe, prompt, negative_prompt, guidance_scale, steps, generator):
    def embed(texts):
        ids = pipe.tokenizer(texts, padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]  # (B, tokens, 32)

    context = torch.cat([embed(negative_prompt), embed(prompt)])  # (2B, tokens, 32): unconditional half first
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(prompt), 4, size, size, generator=generator) * pipe.scheduler.init_noise_sigma
    pipe.scheduler.set_timesteps(steps)
    for t in pipe.scheduler.timesteps:
        model_input = pipe.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        uncond, cond = pipe.unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
        latents = pipe.scheduler.step(cfg_combine(uncond, cond, guidance_scale), t, latents).prev_sample
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


# %%
# NBVAL_CHECK_OUTPUT
prompt, negative = ["a thick seven", "a two leaning left"], ["leaning left", "thin"]
sd_call = dict(guidance_scale=4.0, num_inference_steps=steps, output_type="pt")
theirs = sd(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(8), **sd_call).images
ours = my_stable_diffusion(sd, prompt, negative, 4.0, steps, torch.Generator().manual_seed(8))
print("the loop written out equals StableDiffusionPipeline to 1e-5:", bool((theirs - ours).abs().max() < 1e-5))

# %% [markdown]
# So `guidance_scale` is $w$ of chapter 7 in diffusers' convention ($w = 1$ is the plain conditional model), and
# `negative_prompt` is what the unconditional half is conditioned on instead of the empty prompt: guidance then
# pushes away from it. Listening to the UNet's calls shows both in the API: the batch is doubled only when
# $w > 1$, and the first half of its context is the negative prompt's embedding.

# %%
# NBVAL_CHECK_OUTPUT
calls = []
hook = sd.unet.register_forward_hook(
    lambda module, args, kwargs, output: calls.append((args[0].shape[0], kwargs["encoder_hidden_states"])),
    with_kwargs=True,
)
for w in (1.0, 4.0):
    calls.clear()
    sd(prompt, negative_prompt=negative, generator=torch.Generator().manual_seed(8), **{**sd_call, "guidance_scale": w})
    batch, per_step = calls[0][0], len(calls) == steps
    print(f"guidance_scale {w}: UNet batch {batch} for {len(prompt)} prompts, one UNet call per step: {per_step}")
hook.remove()
with torch.no_grad():
    negative_embeds = sd.text_encoder(
        sd.tokenizer(negative, padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    )[0]
print("unconditional half = the negative prompt's embedding:", torch.allclose(calls[0][1][:2], negative_embeds))

# %% [markdown]
# **LoRA.** Chapter 8 wrote low-rank adapters by hand, with peft's parameter names. diffusers keeps adapters with
# peft: `unet.add_adapter(LoraConfig(...))` injects them, `save_lora_weights` writes only their weights, and a
# pipeline's `load_lora_weights` puts them into its UNet. Below, an adapter with random weights stands in for a
# trained one (the default initialisation, $B = 0$, would change nothing), saved, and loaded into a fresh pipeline.

# %%
lora_config = LoraConfig(
    r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
)
trained = tiny_stable_diffusion(seed=0)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(9)
    trained.unet.add_adapter(lora_config, adapter_name="toy")
lora_state = get_peft_model_state_dict(trained.unet, adapter_name="toy")
lora_folder = Path(tempfile.mkdtemp())
StableDiffusionPipeline.save_lora_weights(lora_folder, unet_lora_layers=lora_state)
print(f"{len(lora_state)} tensors, {sum(v.numel() for v in lora_state.values()):,} numbers:", end=" ")
print(f"{sorted(p.name for p in lora_folder.iterdir())}")


# %%
# NBVAL_CHECK_OUTPUT
def draw(pipe, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(10), **sd_call, **kwargs).images


base = draw(sd)
sd.load_lora_weights(lora_folder, adapter_name="toy")
print("with the LoRA the outputs change:", bool((draw(sd) - base).abs().max() > 1e-3))
print("and equal the pipeline it was trained in:", bool((draw(sd) - draw(trained)).abs().max() < 1e-5))
print(
    "scale 0 gives the base model back:",
    bool((draw(sd, cross_attention_kwargs={"scale": 0.0}) - base).abs().max() < 1e-5),
)
sd.unload_lora_weights()
print("unloaded, the base model again:", bool((draw(sd) - base).abs().max() < 1e-5))
shutil.rmtree(lora_folder)

# %% [markdown]
# `pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])` mixes several adapters, `pipe.fuse_lora()` folds
# them into the weights (chapter 8's `merge_lora`), as the course's `set_lora_scale` and `merge_lora` did.
#
# ## Optional, online: models from the Hub
#
# With the network, the same objects load real models by name: `from_pretrained("owner/name")` downloads the
# folder that `save_pretrained` writes. Set `USE_HUB = True` to try; offline each cell says in one line what it
# would do.

# %%
USE_HUB = False

if USE_HUB:
    try:
        cifar = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
        cifar.scheduler = DDIMScheduler.from_config(cifar.scheduler.config)
        show_images(cifar(batch_size=8, num_inference_steps=50, output_type="pt").images * 2 - 1, nrow=8)
        plt.show()
    except OSError as error:
        print(f"could not load google/ddpm-cifar10-32 ({type(error).__name__}): the Hub is out of reach")
else:
    print("USE_HUB is False: would load google/ddpm-cifar10-32 (a UNet2DModel) and sample it with DDIM, 50 steps.")

# %%
if USE_HUB:
    try:
        real_sd = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5").to(device)
        print({name: type(c).__name__ for name, c in real_sd.components.items()})
        real_sd("a hand-written seven", negative_prompt="blurry", guidance_scale=7.5).images[0]
    except OSError as error:
        print(f"could not load stable-diffusion-v1-5 ({type(error).__name__}): the Hub is out of reach")
else:
    print("USE_HUB is False: would load Stable Diffusion 1.5, the same five components full size, and draw a prompt.")

# %% [markdown]
# ## Recap
#
# - A diffusers scheduler is the course's schedule plus a step: `scheduler_config` writes the schedule by name
#   (cosine is "squaredcos_cap_v2") or as `trained_betas`, and the tables agree to $10^{-6}$.
# - A model becomes a diffusers model by subclassing `ModelMixin` and `ConfigMixin` and returning a
#   `UNet2DOutput`; the course's UNet is wrapped, not converted, because UNet2DModel has a different structure.
# - `DDIMPipeline` is chapter 5's DDIM, `DDPMPipeline` with few steps is DDIM with $\eta = 1$; the general loop
#   adds `init_noise_sigma` and `scale_model_input`, which Euler needs. Swapping schedulers changes the quality at
#   a given number of calls, not the cost per call.
# - `save_pretrained` / `from_pretrained` round-trip a pipeline exactly; a component from outside diffusers is
#   found among the imported modules.
# - Stable Diffusion is tokenizer -> text encoder -> UNet on VAE latents with cross-attention -> VAE decoder,
#   with classifier-free guidance in the loop: `guidance_scale` is $w$, `negative_prompt` conditions the
#   unconditional half, and LoRA adapters are peft's, loaded with `load_lora_weights`.
#
# ## Exercises
#
# Try each exercise before you open the reference solution under it: the book collapses it, and the student
# copy (`make student`) replaces it with a stub. The check under it tells you when your answer is right.
#
# **Exercise 1.** A linear schedule with $T = 500$ and $\beta_{end} = 0.03$ is not the default one, so
# `scheduler_config` passes its betas. Build a `DDIMScheduler` for it by name instead (`beta_schedule`,
# `beta_start`, `beta_end`) as `named_scheduler`, and check that its `alphas_cumprod` equals the course's table.

# %% tags=["solution", "hide-input"]
### BEGIN SOLUTION
steep = make_schedule("linear", 500, beta_end=0.03)
named_scheduler = DDIMScheduler(num_train_timesteps=500, beta_schedule="linear", beta_start=1e-4, beta_end=0.03)
### END SOLUTION

# %%
# NBVAL_CHECK_OUTPUT
assert "trained_betas" in scheduler_config(steep), "scheduler_config should not name a non-default schedule"
assert named_scheduler.config.trained_betas is None, "build it by name, not with trained_betas"
assert (named_scheduler.alphas_cumprod - steep.alpha_bar).abs().max() < 1e-6, "the tables differ"
print("exercise 1: correct")

# %% [markdown]
# **Exercise 2.** Write `pipeline_loop(unet, scheduler, x_T, steps)`, the loop of `DDPMPipeline` (no
# `init_noise_sigma`, no `scale_model_input`), and show that it agrees with `scheduler_sample` for
# DPM-Solver++ but not for Euler.


# %% tags=["solution", "hide-input"]
@torch.no_grad()
def pipeline_loop(unet, scheduler, x_T, steps):
    ### BEGIN SOLUTION
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x).prev_sample
    return x
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(11))
for kind, should_agree in [("DPM-Solver++(2M)", True), ("Euler (Karras)", False)]:
    loop = pipeline_loop(cpu_unet, to_diffusers_scheduler(schedule, kind), x_T, steps)
    general = scheduler_sample(cpu_unet, to_diffusers_scheduler(schedule, kind), x_T, steps)
    assert bool((loop - general).abs().max() < 1e-5) == should_agree, f"{kind}: expected agree={should_agree}"
print("exercise 2: correct")

# %% [markdown]
# **Exercise 3.** A rank-$r$ adapter on a Linear layer with `in` inputs and `out` outputs has $r\,(in + out)$
# numbers. Write `lora_numbers(unet, r, targets)` from the shapes of the tiny UNet's layers whose names end in one
# of `targets`, and check it against the adapter saved above.


# %% tags=["solution", "hide-input"]
def lora_numbers(unet, r, targets):
    ### BEGIN SOLUTION
    layers = [m for name, m in unet.named_modules() if any(name.endswith("." + t) for t in targets)]
    return sum(r * (layer.in_features + layer.out_features) for layer in layers)
    ### END SOLUTION


# %%
# NBVAL_CHECK_OUTPUT
expected = sum(v.numel() for v in lora_state.values())
counted = lora_numbers(tiny_stable_diffusion(seed=0).unet, 4, ["to_q", "to_k", "to_v", "to_out.0"])
assert counted == expected, f"counted {counted}, the adapter has {expected}"
print("exercise 3: correct")
