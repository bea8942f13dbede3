"""Chapter 13: control images and their agreement, ControlNet, img2img / SDEdit, inpainting, classifier guidance.

Exact where the maths allows: drawn shapes have known outlines; a ControlNet at initialisation (or at scale 0) is
its base bit for bit; a model that is the exact denoiser of a point mass makes every x0_hat that point, so edits
are known in closed form; with exact Gaussian models and an exact noisy classifier, classifier guidance is the
class-conditional noise (scale 1) and equals classifier-free guidance at every scale.

Parity with diffusers, on identical inputs:
- `HintEncoder` with stride 2 and diffusers' `ControlNetConditioningEmbedding` with the same weights: equal outputs.
- The injection of residuals: a tiny `UNet2DConditionModel` with `ControlNetModel.from_unet` is checked to do what
  `UNet.decode` does: zero residuals change nothing (bit for bit), `mid_block_additional_residual` acts as a shift
  of the mid block's output, `down_block_additional_residuals` as a shift of the skips only (not of the features
  that go on down), one zero convolution per skip the decoder reads.
- img2img: `img2img_timesteps` equals `StableDiffusionImg2ImgPipeline.get_timesteps` (diffusers' own function),
  and `sdedit` with "leading" spacing equals diffusers' img2img loop with `DDIMScheduler` (noise to the first
  kept timestep with `add_noise`, then `step`), to 2e-6 (diffusers' float32 alpha_bar table against ours;
  measured 5e-7).
- Inpainting: `inpaint` with eta = 0, resample = 1 and "leading" spacing equals diffusers' `RePaintPipeline` with
  jump_n_sample = 1 (the replacement method) on the same UNet and generator, to 1e-5 (measured 2.3e-6). With
  eta > 0 or jumps they differ by design: diffusers reuses one noise draw for the step and the known part, and
  its `undo_step` adds the noise of betas[t .. t + n - 1] (n single steps) where the jump back from t - n to t
  needs betas[t - n + 1 .. t] (`renoise` takes that jump in one draw).
"""

import functools
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DDIMScheduler,
    RePaintPipeline,
    RePaintScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding

from course_lib.control import (
    ControlledUNet,
    ControlNet,
    HintEncoder,
    controlnet_parameter_count,
    edge_agreement,
    edge_map,
    skip_channels,
)
from course_lib.editing import (
    ClassifierGuided,
    classifier_gradient,
    classifier_guided_eps,
    img2img_timesteps,
    inpaint,
    noisy_classifier_loss,
    renoise,
    sdedit,
)
from course_lib.forward import q_sample
from course_lib.guidance import cfg_combine
from course_lib.interop import CourseUNet2DModel
from course_lib.nets.classifier import NoisyDigitClassifier
from course_lib.nets.unet import UNet
from course_lib.recipes import DIGIT_MODEL
from course_lib.samplers import ddim_sample
from course_lib.schedules import gather, make_schedule
from course_lib.styles import balanced_digits as load_balanced_digits
from course_lib.toy import GaussianMixture

# diffusers turns tensors into numpy arrays in a way numpy 2 warns about; its RePaint code is deprecated
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)

COSINE = make_schedule("cosine", 1000)
LINEAR = make_schedule("linear", 1000)
TINY = dict(channels=(8, 16), blocks=(1, 2), attention=(False, True), heads=2, groups=4)


@functools.cache
def two_of_each() -> tuple[torch.Tensor, torch.Tensor]:
    """Two train digits of every class, classes interleaved (0, 1, ..., 9, 0, 1, ...), read once."""
    return load_balanced_digits(2)


def balanced_digits(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` (1 or 2) digits of every class, classes interleaved."""
    digits, labels = two_of_each()
    return digits[: 10 * per_class], labels[: 10 * per_class]


def randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every parameter drawn at random (the zero-initialised ones too), so that a model's output depends on all."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def square(top: int = 8, left: int = 8, side: int = 12) -> torch.Tensor:
    """A filled square of ink (+1) on the background (-1): (1, 1, 28, 28)."""
    image = -torch.ones(1, 1, 28, 28)
    image[..., top : top + side, left : left + side] = 1
    return image


def point_mass_denoiser(x_star: torch.Tensor, schedule):
    """The exact eps-model of data that is always x_star: E[eps | x_t] = (x_t - sqrt(alpha_bar_t) x*) /
    sqrt(1 - alpha_bar_t), whose x0_hat is x_star at every step."""

    def model(xt, t):
        alpha_bar_t = gather(schedule.alpha_bar, t, xt)
        return (xt - alpha_bar_t.sqrt() * x_star) / (1 - alpha_bar_t).sqrt()

    return model


def smooth_fake_model(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, smooth stand-in for a trained eps-network on images (it mixes neighbouring pixels, changes with t)."""
    t = t.to(xt.dtype).reshape(-1, 1, 1, 1)
    return 0.6 * xt + 0.2 * torch.tanh(xt.roll(1, dims=-1) - xt.roll(1, dims=-2)) * torch.cos(t / 300)


# --- control images ---------------------------------------------------------------------------------------------


def test_edge_map_of_drawn_shapes():
    # a filled square's outline is the one-pixel ring just outside it
    ring = torch.zeros(28, 28, dtype=torch.bool)
    ring[7:21, 7:21] = True
    ring[8:20, 8:20] = False
    edges = edge_map(square())
    assert edges.shape == (1, 1, 28, 28)
    assert set(edges.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(edges[0, 0] > 0, ring)
    # one pixel of ink: its 8 neighbours; a blank image: no edges; ink at the border: padding is not ink
    dot = -torch.ones(1, 1, 28, 28)
    dot[..., 5, 5] = 1
    assert (edge_map(dot) > 0).sum() == 8 and (edge_map(dot)[0, 0, 4:7, 4:7] > 0).sum() == 8
    assert (edge_map(-torch.ones(1, 1, 28, 28)) < 0).all()
    assert (edge_map(square(0, 0, 5))[0, 0] > 0).sum() == 5 + 5 + 1
    with pytest.raises(ValueError, match=r"digit images \(N, 1, 28, 28\)"):
        edge_map(torch.zeros(1, 28, 28))


def test_edge_agreement_on_drawn_shapes():
    image, moved = square(), square(left=11)  # the same square 3 pixels to the right
    control = edge_map(image)
    assert edge_agreement(image, control).tolist() == [1.0]
    # the two 52-pixel rings share only 11 pixels of their top row and 11 of their bottom one: Dice 44 / 104
    assert edge_agreement(moved, control).item() == pytest.approx(44 / 104, abs=1e-6)
    # within 1 pixel: 12 + 12 of the rows and the 2 end pixels of one side, 26 of 52 on either side
    assert edge_agreement(moved, control, tolerance=1).item() == pytest.approx(26 / 52, abs=1e-6)
    assert edge_agreement(moved, control, tolerance=3).item() == pytest.approx(1.0)  # every pixel within 3
    blank = -torch.ones(1, 1, 28, 28)
    assert edge_agreement(blank, edge_map(blank)).item() == 1.0  # no edges on either side agree
    assert edge_agreement(blank, control).item() == 0.0 and edge_agreement(image, edge_map(blank)).item() == 0.0
    with pytest.raises(ValueError, match="one control per sample"):
        edge_agreement(torch.cat([image, image]), control)
    with pytest.raises(ValueError, match="tolerance must be an integer"):
        edge_agreement(image, control, tolerance=-1)


def test_real_digits_follow_their_own_outline_and_not_another():
    digits, labels = balanced_digits(1)  # one of each class: 0, 1, ..., 9
    controls = edge_map(digits)
    assert torch.equal(edge_agreement(digits, controls), torch.ones(10))
    other = edge_agreement(digits, controls.roll(1, dims=0))  # each digit against the previous class's outline
    assert other.max() < 0.5, other


# --- ControlNet -------------------------------------------------------------------------------------------------


def controlled_tiny(**unet_options) -> tuple[UNet, ControlledUNet]:
    base = randomised(UNet(**TINY, **unet_options))
    return base, ControlledUNet(base, ControlNet(base))


def test_controlnet_starts_as_the_base_exactly_and_copies_its_weights():
    base, controlled = controlled_tiny()
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([0, 500, 999])
    control = edge_map(torch.randn(3, 1, 28, 28))
    with torch.no_grad():
        assert torch.equal(controlled(x, t, control), base(x, t))  # zero convolutions: bit for bit
    # the trainable copy holds the base's weights (way down, middle, embeddings), in its own storage
    copied = controlled.controlnet.encoder.state_dict()
    base_state = base.state_dict()
    assert copied and all(torch.equal(value, base_state[name]) for name, value in copied.items())
    assert not any(name.startswith(("up.", "norm_out.", "conv_out.")) for name in copied)  # no decoder
    assert all(value.data_ptr() != base_state[name].data_ptr() for name, value in copied.items())
    assert all(parameter.requires_grad for parameter in controlled.controlnet.parameters())
    assert not any(parameter.requires_grad for parameter in base.parameters())
    # one zero 1x1 convolution per skip the decoder reads, and one on the middle
    assert [conv.in_channels for conv in controlled.controlnet.skip_convs] == skip_channels(base) == [8, 16, 16]
    with pytest.raises(TypeError, match="built from a course_lib.nets.unet.UNet"):
        ControlNet(torch.nn.Conv2d(1, 1, 1))


def test_training_the_controlnet_leaves_the_base_alone():
    """One optimiser over all of the controlled model's parameters: the base gets no gradient and keeps its weights.
    The zero convolutions of the outputs learn at the first step; the hint's zero convolution gets its first
    gradient only through them, at the second. Scale 0 stays the base exactly."""
    base, controlled = controlled_tiny()
    before = {name: value.clone() for name, value in base.state_dict().items()}
    optimizer = torch.optim.AdamW(controlled.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 28, 28, generator=generator), torch.tensor([10, 200, 600, 900])
    control, target = edge_map(torch.randn(4, 1, 28, 28, generator=generator)), torch.randn(4, 1, 28, 28)
    hint_out = controlled.controlnet.hint.conv_out.weight
    for step in range(2):
        optimizer.zero_grad()
        loss = (controlled(x, t, control) - target).pow(2).mean()
        loss.backward()
        assert all(parameter.grad is None for parameter in base.parameters())
        if step == 0:
            assert hint_out.grad.abs().max() == 0  # behind zero convolutions: no gradient yet
            assert controlled.controlnet.middle_conv.weight.grad.abs().max() > 0
        else:
            assert hint_out.grad.abs().max() > 0
        optimizer.step()
    assert all(torch.equal(value, before[name]) for name, value in base.state_dict().items())
    assert hint_out.abs().max() > 0 and controlled.controlnet.middle_conv.weight.abs().max() > 0
    with torch.no_grad():
        assert (controlled(x, t, control) - base(x, t)).abs().max() > 1e-4  # the control now steers the output
        assert torch.equal(controlled(x, t, control, scale=0.0), base(x, t))
        half = controlled(x, t, control, scale=0.5) - base(x, t)
        assert half.abs().max() > 0


def test_controlnet_shapes_for_the_digit_model_and_its_size():
    for options in ({}, {"num_classes": 10}):
        base = randomised(UNet(**DIGIT_MODEL, **options))
        controlnet = ControlNet(base)
        controlled = ControlledUNet(base, controlnet)
        x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
        labels = torch.tensor([4, 10]) if options else None
        with torch.no_grad():
            skip_residuals, middle_residual = controlnet(x, t, edge_map(x), labels)
            assert [tuple(r.shape) for r in skip_residuals] == [(2, 32, 28, 28), (2, 64, 14, 14), (2, 96, 7, 7)] + [
                (2, 96, 7, 7)
            ]
            assert middle_residual.shape == (2, 96, 7, 7)
            assert torch.equal(controlled(x, t, edge_map(x), 1.0, labels), base(x, t, labels))
    count = controlnet_parameter_count(controlnet, base)
    assert count["base"] == sum(p.numel() for p in base.parameters())
    assert count["share"] == count["controlnet"] / count["base"]
    assert 0.5 < count["share"] < 0.65  # the way down and the middle: a little more than half of the UNet
    with pytest.raises(ValueError, match="one control per image, at the image's size"):
        controlnet(x, t, torch.zeros(2, 1, 14, 14), labels)


def test_decode_adds_residuals_where_the_decoder_reads():
    base = randomised(UNet(**TINY))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 50])
    with torch.no_grad():
        emb, cross = base.embed(x, t)
        h, skips, sizes = base.encode(base.conv_in(x), emb, cross)
        assert torch.equal(base.decode(h, emb, skips, sizes, cross), base(x, t))
        middle = torch.randn_like(h)
        residuals = [torch.randn_like(skip) for skip in skips]
        assert torch.equal(
            base.decode(h, emb, skips, sizes, cross, residuals, middle),
            base.decode(h + middle, emb, [s + r for s, r in zip(skips, residuals, strict=True)], sizes, cross),
        )
        zeros = [torch.zeros_like(skip) for skip in skips]
        assert torch.equal(base.decode(h, emb, skips, sizes, cross, zeros, torch.zeros_like(h)), base(x, t))
        assert len(skips) == 3 and len(sizes) == 1  # the lists given are not consumed
        with pytest.raises(ValueError, match=r"one residual per skip \(3\); got 2"):
            base.decode(h, emb, skips, sizes, cross, residuals[:2], middle)


def test_a_bound_controlled_model_samples():
    base, controlled = controlled_tiny()
    control = edge_map(square())
    model = controlled.bind(control, scale=0.7)  # one control for every sample
    x_T = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ddim_sample(model, COSINE, x_T, 3)[0], ddim_sample(base, COSINE, x_T, 3)[0])
    with pytest.raises(ValueError, match="batch size 2 for a batch of 3"):
        controlled.bind(torch.cat([control, control]))(x_T, torch.tensor([1, 2, 3]))


def test_hint_encoder_equals_diffusers_conditioning_embedding():
    ours = HintEncoder(out_channels=8, in_channels=3, channels=(4, 8, 16), stride=2)
    theirs = ControlNetConditioningEmbedding(8, conditioning_channels=3, block_out_channels=(4, 8, 16))
    randomised(theirs, seed=3)  # its last convolution non-zero, as after training
    ours.load_state_dict(theirs.state_dict())  # the same parameter names
    control = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert ours(control).shape == (2, 8, 8, 8)
        assert torch.equal(ours(control), theirs(control))
    assert HintEncoder(8).conv_out.weight.abs().max() == 0  # zero-initialised, as diffusers' zero_module


def test_residual_injection_mirrors_diffusers_unet2dcondition():
    """diffusers' UNet2DConditionModel adds `down_block_additional_residuals[i]` to its i-th skip (not to the
    features that go on down) and `mid_block_additional_residual` to the mid block's output, as `UNet.decode` does
    (test_decode_adds_residuals_where_the_decoder_reads): each is checked here, bit for bit, against a forward
    hook that shifts that tensor. ControlNetModel.from_unet has one zero 1x1 convolution per skip its UNet reads
    (conv_in's and each downsampler's output included), as ours has one per skip the course's UNet reads."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    randomised(unet)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8), conditioning_channels=1)
    x, t, context = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    with torch.no_grad():
        plain = unet(x, t, context).sample
        down, mid = controlnet(x, t, context, controlnet_cond=torch.randn(2, 1, 16, 16), return_dict=False)
        # at initialisation the residuals are exact zeros and leave the output unchanged, bit for bit
        assert all(residual.abs().max() == 0 for residual in [*down, mid])
        assert torch.equal(
            unet(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample, plain
        )
        n_skips = 1 + sum(len(block.resnets) + bool(block.downsamplers) for block in unet.down_blocks)  # conv_in too
        assert len(down) == len(controlnet.controlnet_down_blocks) == n_skips
        # a residual on the middle: the output of a mid block shifted by it
        r_mid = torch.randn_like(mid)
        zeros = [torch.zeros_like(d) for d in down]
        residual = unet(x, t, context, down_block_additional_residuals=zeros, mid_block_additional_residual=r_mid)
        hook = unet.mid_block.register_forward_hook(lambda module, args, output: output + r_mid)
        shifted = unet(x, t, context).sample
        hook.remove()
        assert torch.equal(residual.sample, shifted) and (shifted - plain).abs().max() > 1e-3
        # a residual on the skips of the last down block: those skips shifted, the features going down kept
        last = unet.down_blocks[-1]
        r_skips = [torch.randn_like(d) for d in down[-len(last.resnets) :]]
        down_residuals = [*zeros[: -len(r_skips)], *r_skips]
        residual = unet(
            x, t, context, down_block_additional_residuals=down_residuals, mid_block_additional_residual=0 * mid
        )

        def shift_skips(module, args, output):
            sample, skips = output
            return sample, tuple(skip + r for skip, r in zip(skips, r_skips, strict=True))

        hook = last.register_forward_hook(shift_skips)
        shifted = unet(x, t, context).sample
        hook.remove()
        assert torch.equal(residual.sample, shifted) and (shifted - plain).abs().max() > 1e-3


# --- img2img / SDEdit -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_img2img_timesteps_equal_diffusers(spacing):
    for steps in (10, 20, 50):
        scheduler = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        for strength in (0.0, 0.05, 0.1, 0.3, 0.5, 0.58, 0.75, 0.9, 1.0):
            theirs, n = StableDiffusionImg2ImgPipeline.get_timesteps(
                SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
            )
            ours = img2img_timesteps(1000, steps, strength, spacing)
            assert ours == theirs.tolist() and len(ours) == n, (steps, strength)


def test_sdedit_equals_diffusers_img2img_loop_with_ddim():
    images = balanced_digits(1)[0][:3]
    for strength, steps in [(0.3, 10), (0.6, 20), (1.0, 10)]:
        generator = torch.Generator().manual_seed(7)
        ours = sdedit(smooth_fake_model, LINEAR, images, strength, steps, generator, spacing="leading")
        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=True, set_alpha_to_one=True)
        scheduler.set_timesteps(steps)
        timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=scheduler), steps, strength, "cpu"
        )
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(7))
        latents = scheduler.add_noise(images, noise, timesteps[:1].repeat(len(images)))
        for t in timesteps:
            latents = scheduler.step(smooth_fake_model(latents, t.expand(len(images))), t, latents).prev_sample
        assert (ours - latents).abs().max() < 2e-6, (strength, (ours - latents).abs().max())


def test_sdedit_exact_cases():
    images = balanced_digits(1)[0][:4]
    generator = torch.Generator().manual_seed(0)
    # strength 0: the input back (a copy)
    same = sdedit(smooth_fake_model, COSINE, images, 0.0, 10, generator)
    assert torch.equal(same, images) and same.data_ptr() != images.data_ptr()
    # strength 1: DDIM from the images noised to T - 1, exactly
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    full = sdedit(smooth_fake_model, COSINE, images, 1.0, 8, torch.Generator().manual_seed(3))
    reference = ddim_sample(smooth_fake_model, COSINE, q_sample(COSINE, images, 999, eps), 8, clip_x0=True)[0]
    assert torch.equal(full, reference)
    # the exact denoiser of a point mass x*: every edit ends at x*, whatever the strength and eta
    x_star = images[:1].double().flip(-1)
    model = point_mass_denoiser(x_star, LINEAR)
    for strength, eta in [(0.2, 0.0), (0.5, 1.0), (1.0, 0.5)]:
        edited = sdedit(model, LINEAR, images.double(), strength, 10, generator, clip_x0=False, eta=eta)
        assert (edited - x_star).abs().max() < 1e-9


def test_sdedit_refuses_bad_arguments():
    images = balanced_digits(1)[0][:2]
    for strength in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
            sdedit(smooth_fake_model, COSINE, images, strength, 10)
    with pytest.raises(ValueError, match="keeps int"):
        sdedit(smooth_fake_model, COSINE, images, 0.05, 10)
    with pytest.raises(ValueError, match="steps must be an integer in 1..T"):
        sdedit(smooth_fake_model, COSINE, images, 0.5, 0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sdedit(smooth_fake_model, COSINE, images * float("nan"), 0.5, 10)
    velocity_model = SimpleNamespace(prediction_type="velocity")
    with pytest.raises(ValueError, match="predicts 'velocity'"):
        sdedit(velocity_model, COSINE, images, 0.5, 10)


# --- inpainting -------------------------------------------------------------------------------------------------


def left_half_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 28, 28)
    mask[..., :14] = 1  # the left half known
    return mask


def test_inpainting_keeps_the_known_pixels_exactly():
    images = balanced_digits(1)[0][:3]
    model = randomised(UNet(**TINY))
    mask = left_half_mask()
    with torch.no_grad():
        for eta, resample in [(1.0, 1), (0.0, 2)]:
            out = inpaint(model, COSINE, images, mask, 4, torch.Generator().manual_seed(0), resample=resample, eta=eta)
            assert torch.equal(out * mask, images * mask)
            assert (out - images).abs()[..., 14:].max() > 0.1  # the rest was filled in by the model
    # the exact denoiser of a point mass x*: the unknown pixels become x*'s, the known ones stay
    x_star = balanced_digits(1)[0][5:6].double()
    out = inpaint(point_mass_denoiser(x_star, LINEAR), LINEAR, images.double(), mask, 10, resample=3, clip_x0=False)
    assert (out - (mask * images + (1 - mask) * x_star)).abs().max() < 1e-9
    # renoise from the clean data is q_sample
    eps = torch.randn(images.shape)
    assert torch.equal(renoise(COSINE, images, -1, 400, eps), q_sample(COSINE, images, 400, eps))


def test_resampling_brings_the_inpainted_half_to_the_conditional_mean():
    """Data x0 ~ N(mu, s^2 I + v v^T) on 28 x 28 digits-shaped tensors: one smooth pattern v with a random
    amplitude, plus small independent noise. Its exact eps-model is analytic (Sherman-Morrison), and so is the mean
    of the right half given the left half, mu_u + v_u (v_k . (x_k - mu_k)) / (s^2 + |v_k|^2). The plain replacement
    method (resample = 1) leaves the right half's mean far from it; RePaint's resampling brings it close (128
    samples, 10 DDPM-like steps; the Monte Carlo error of the mean is about 0.01 of the distance from mu)."""
    yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, 28, dtype=torch.float64)] * 2, indexing="ij")
    v = 0.6 * torch.exp(-(xx**2 + yy**2) / 0.5).reshape(-1)
    mu, s = torch.full((784,), -0.2, dtype=torch.float64), 0.1

    def model(xt, t):  # E[eps | x_t] = sqrt(1 - abar) Cov_t^{-1} (x_t - sqrt(abar) mu), Cov_t = c I + abar v v^T
        alpha_bar = gather(COSINE.alpha_bar, t, xt).double().reshape(-1, 1)
        c = alpha_bar * s**2 + 1 - alpha_bar
        d = xt.double().reshape(len(xt), -1) - alpha_bar.sqrt() * mu
        solved = (d - (alpha_bar * (d @ v)[:, None] / (c + alpha_bar * (v @ v))) * v) / c
        return ((1 - alpha_bar).sqrt() * solved).reshape(xt.shape).to(xt.dtype)

    x0 = mu + 2.0 * v + s * torch.randn(784, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = left_half_mask()
    known = mask.reshape(-1).bool()
    conditional_mean = mu + v * (v[known] @ (x0[known] - mu[known])) / (s**2 + v[known] @ v[known])
    images = x0.float().reshape(1, 1, 28, 28).expand(128, 1, 28, 28)
    errors = {}
    for resample in (1, 3):
        out = inpaint(model, COSINE, images, mask, 10, torch.Generator().manual_seed(1), resample, clip_x0=False)
        mean = out.double().reshape(128, -1).mean(0)
        errors[resample] = ((mean - conditional_mean)[~known].norm() / (mu - conditional_mean)[~known].norm()).item()
    assert errors[1] > 0.05 and errors[3] < 0.02 and errors[3] < errors[1] / 3, errors


def test_inpainting_equals_diffusers_repaint_without_jumps():
    """The replacement method (eta = 0, no jumps) against diffusers' RePaintPipeline on the same UNet and noise."""
    net = randomised(CourseUNet2DModel(**TINY))
    pipeline = RePaintPipeline(unet=net, scheduler=RePaintScheduler(num_train_timesteps=1000, clip_sample=True))
    pipeline.set_progress_bar_config(disable=True)
    images = balanced_digits(1)[0][:2]
    mask = left_half_mask()
    options = dict(num_inference_steps=10, eta=0.0, jump_length=1, jump_n_sample=1, output_type="np")
    theirs = pipeline(images, mask, generator=torch.Generator().manual_seed(4), **options).images
    with torch.no_grad():
        ours = inpaint(net.net, LINEAR, images, mask, 10, torch.Generator().manual_seed(4), eta=0.0, spacing="leading")
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - theirs).max() < 1e-5


def test_inpainting_refuses_bad_arguments():
    images = balanced_digits(1)[0][:2]
    with pytest.raises(ValueError, match="only 1 .known: kept. and 0"):
        inpaint(smooth_fake_model, COSINE, images, 0.5 * left_half_mask(), 4)
    with pytest.raises(ValueError, match="must broadcast to the images' shape"):
        inpaint(smooth_fake_model, COSINE, images, torch.ones(3, 1, 28, 28), 4)
    for resample in (0, 1.5, True):
        with pytest.raises(ValueError, match="resample must be an integer >= 1"):
            inpaint(smooth_fake_model, COSINE, images, left_half_mask(), 4, resample=resample)
    with pytest.raises(ValueError, match="steps must be an integer in 1..T"):
        inpaint(smooth_fake_model, COSINE, images, left_half_mask(), 1001)


# --- classifier guidance ----------------------------------------------------------------------------------------


def two_gaussian_classes():
    """Two classes in D = 6: x0 | y ~ N(mu_y, s_y^2 I), p(y) = 1/2. The exact models, all in float64: the
    unconditional eps (of the mixture), each class's eps, and the exact noisy classifier log p(y | x_t, t)."""
    means = torch.tensor([[1.0, -0.5, 0.3, 0.0, 0.8, -1.0], [-0.7, 0.4, -0.2, 0.9, -0.6, 0.5]], dtype=torch.float64)
    stds = torch.tensor([0.3, 0.5], dtype=torch.float64)
    mixture = GaussianMixture(means, stds, [0.5, 0.5])
    classes = [GaussianMixture(means[y : y + 1], stds[y : y + 1], [1.0]) for y in range(2)]

    def classifier(xt, t):  # logits: log N(x_t; sqrt(abar) mu_y, (abar s_y^2 + 1 - abar) I), equal priors
        alpha_bar = gather(COSINE.alpha_bar, t, xt)  # (B, 1)
        variance = alpha_bar * stds**2 + 1 - alpha_bar  # (B, 2)
        distance = ((xt[:, None, :] - alpha_bar.sqrt()[:, :, None] * means[None]) ** 2).sum(-1)  # (B, 2)
        return -0.5 * distance / variance - 0.5 * means.shape[1] * variance.log()

    return mixture.optimal_denoiser(COSINE), [c.optimal_denoiser(COSINE) for c in classes], classifier


def test_classifier_guidance_is_the_class_conditional_noise_for_exact_models():
    unconditional, conditional, classifier = two_gaussian_classes()
    xt = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(2))
    eps_y = torch.where(labels[:, None] == 0, conditional[0](xt, t), conditional[1](xt, t))
    eps = unconditional(xt, t)
    for scale in (0.0, 1.0, 2.5):
        guided = classifier_guided_eps(unconditional, classifier, xt, t, labels, scale, COSINE)
        # p(x_t) p(y | x_t)^s: eps + s (eps_y - eps), classifier-free guidance's formula with the exact models
        assert torch.allclose(guided, cfg_combine(eps, eps_y, scale), atol=1e-10, rtol=0)
    guided = classifier_guided_eps(unconditional, classifier, xt, t, labels, 1.0, COSINE)
    assert torch.allclose(guided, eps_y, atol=1e-10, rtol=0)
    # a whole DDIM run guided at scale 1 is the run of the class-conditional model
    x_T = torch.randn(16, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    guided_model = ClassifierGuided(unconditional, classifier, torch.tensor([1]), 1.0, COSINE)
    guided_run, conditional_run = (
        ddim_sample(guided_model, COSINE, x_T, 20)[0],
        ddim_sample(conditional[1], COSINE, x_T, 20)[0],
    )
    assert torch.allclose(guided_run, conditional_run, atol=1e-8, rtol=0)


def test_the_guidance_gradient_is_taken_with_respect_to_xt_only():
    model = randomised(UNet(**TINY))
    classifier = randomised(NoisyDigitClassifier(channels=(4, 8), time_dim=8, groups=2))
    xt, t, labels = torch.randn(3, 1, 28, 28), torch.tensor([5, 300, 900]), torch.tensor([1, 7, 3])
    kept = xt.clone()
    guided = classifier_guided_eps(model, classifier, xt, t, labels, 2.0, COSINE)
    assert not guided.requires_grad and xt.grad is None and torch.equal(xt, kept)
    assert all(p.grad is None for p in [*model.parameters(), *classifier.parameters()])
    # the gradient is each example's own: finite differences on one pixel of example 1
    gradient = classifier_gradient(classifier, xt, t, labels)
    bumped = xt.clone()
    bumped[1, 0, 10, 12] += 1e-2
    log_p = lambda x: torch.log_softmax(classifier(x, t), -1).gather(1, labels[:, None])[:, 0]  # noqa: E731
    with torch.no_grad():
        change = log_p(bumped) - log_p(xt)
    assert change[1].item() == pytest.approx(1e-2 * gradient[1, 0, 10, 12].item(), rel=0.05, abs=1e-6)
    assert change[0] == 0 and change[2] == 0
    with torch.no_grad():  # inside the samplers' no_grad too
        assert torch.equal(classifier_guided_eps(model, classifier, xt, t, labels, 2.0, COSINE), guided)
        expected = model(xt, t) - 2.0 * (1 - gather(COSINE.alpha_bar, t, xt)).sqrt() * gradient
        assert torch.allclose(guided, expected, atol=1e-6)
    with pytest.raises(ValueError, match="guidance scale must be a number >= 0"):
        classifier_guided_eps(model, classifier, xt, t, labels, -1.0, COSINE)
    with pytest.raises(ValueError, match="training mode"):
        classifier_gradient(classifier.train(), xt, t, labels)
    with pytest.raises(ValueError, match=r"need labels \(B,\) long"):
        classifier_gradient(classifier.eval(), xt, t, labels.float())


def test_noisy_digit_classifier_learns_and_keeps_examples_apart():
    digits, labels = balanced_digits(2)  # 20 digits
    torch.manual_seed(0)
    classifier = NoisyDigitClassifier(channels=(8, 16), time_dim=16, groups=4)
    x, t = digits[:4], torch.tensor([0, 100, 500, 999])
    logits = classifier(x, t)
    assert logits.shape == (4, 10)
    other = x.clone()
    other[1] = 0
    assert torch.equal(classifier(other, t)[[0, 2, 3]], logits[[0, 2, 3]])  # GroupNorm: examples independent
    assert (classifier(x, torch.tensor([999, 100, 500, 999]))[0] - logits[0]).abs().max() > 0  # t matters
    with pytest.raises(ValueError, match=r"need images \(B, 1, H, W\)"):
        classifier(torch.zeros(2, 28, 28), t[:2])
    # overfit: on lightly noised digits the loss falls from log(10) to under half of it in 100 steps
    light = make_schedule("linear", 50, beta_end=2e-3)  # alpha_bar >= 0.95
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = noisy_classifier_loss(classifier, light, digits, labels, generator)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[:5]) / 5 > 2.2 and sum(losses[-5:]) / 5 < 1.0, losses
