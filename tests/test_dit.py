"""course_lib.nets.dit: the DiT equal to diffusers' DiTTransformer2DModel, its positions, adaLN-Zero at
initialisation, shapes and refused inputs, a flow-matching loss that falls, its FLOP count, and its card.

How the parity is exact (the weight mapping is `course_lib.interop.diffusers_dit`, whose comment says why): one time
and label embedding copied into each of diffusers' blocks, the MLP LayerNorm's eps and the time sinusoids' spacing
set to the paper's. Nothing else is changed.
"""

from contextlib import nullcontext

import pytest
import torch
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from course_lib.benchmark import gflops_per_call, gflops_per_image, parameter_count
from course_lib.data import read_manifest
from course_lib.flow import euler_flow_sample
from course_lib.guidance import Guided, guided_flow_samples
from course_lib.interop import diffusers_dit, diffusers_dit_block
from course_lib.nets.dit import DiT, dit_gflops, sincos_pos_embed
from course_lib.nets.embedding import timestep_embedding
from course_lib.recipes import Recipe, build, model_class
from course_lib.train import TrainConfig, train
from course_lib.weights import load_model, save_weights

LATENT = dict(in_channels=4, input_size=7, patch_size=1, width=16, depth=2, heads=2)  # 49 tokens
PIXEL = dict(in_channels=1, input_size=28, patch_size=2, width=16, depth=2, heads=2)  # 196 tokens


def randomise_zero_layers(model: torch.nn.Module) -> torch.nn.Module:
    """The zero-initialised layers (adaLN-Zero's modulations, the final layer, the biases) randomised, as training
    makes them: at zero the output is 0 whatever the input, and no comparison could fail."""
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if (parameter == 0).all():
                parameter.normal_(0, 0.3)
    return model


def inputs(config: dict, n: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (n, config["in_channels"], config["input_size"], config["input_size"])
    xt = torch.randn(shape, generator=generator)
    t = torch.tensor([0.0, 271.8, 999.0, 500.5][:n])  # fractional times, as flow matching gives them
    labels = torch.tensor([3, 10, 7, 0][:n])  # 10: no label
    return xt, t, labels


# --- parity with diffusers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [LATENT, PIXEL], ids=["latent 4x7x7 patch 1", "pixel 1x28x28 patch 2"])
def test_the_whole_dit_equals_diffusers_dit(config):
    """End to end, the same weights and inputs (see the module docstring for the mapping and the two settings).
    Measured on CPU: bit for bit equal in float32, 2e-15 apart in float64 (outputs of mean size 0.9, max 4)."""
    ours = randomise_zero_layers(DiT(**config, num_classes=10)).eval()
    theirs = diffusers_dit(ours)  # eval: no random label dropout
    xt, t, labels = inputs(config)
    with torch.no_grad():
        expected, got = theirs(xt, t, labels).sample, ours(xt, t, labels)
        assert expected.abs().mean() > 0.1  # a real output, not zeros
        assert (got - expected).abs().max() < 1e-6
        ours = ours.double()
        theirs = diffusers_dit(ours)
        assert (ours(xt.double(), t, labels) - theirs(xt.double(), t, labels).sample).abs().max() < 1e-12


def test_diffusers_time_sinusoids_are_the_one_difference_left():
    """Without the spacing set to the paper's, diffusers' DiT gives another output on the same weights."""
    ours = randomise_zero_layers(DiT(**LATENT, num_classes=10)).eval()
    theirs = diffusers_dit(ours, paper_time=False)
    xt, t, labels = inputs(LATENT)
    with torch.no_grad():
        assert (ours(xt, t, labels) - theirs(xt, t, labels).sample).abs().max() > 1e-3


def test_one_block_equals_diffusers_basic_transformer_block():
    """BasicTransformerBlock(norm_type="ada_norm_zero") embeds (t, labels) itself: given our time MLP and label
    table, it computes our c from (t, labels), and the block then maps the same tokens to the same tokens: the
    level is (tokens, t, labels) in, tokens out. Measured on CPU: 4e-16 apart in float64 (bit for bit in float32)."""
    model = randomise_zero_layers(DiT(**LATENT, num_classes=10)).double().eval()
    block, theirs = model.blocks[0], diffusers_dit_block(model, 0)
    tokens = torch.randn(3, 49, LATENT["width"], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, t, labels = inputs(LATENT)
    with torch.no_grad():
        c = model.time_mlp(timestep_embedding(t, 256).double()) + model.class_emb(labels)  # (B, D)
        expected = theirs(tokens, timestep=t, class_labels=labels)
        assert (block(tokens, c) - expected).abs().max() < 1e-12
        assert (expected - tokens).abs().max() > 0.1  # the block did something


@pytest.mark.parametrize("width", [16, 128, 192, 256])
@pytest.mark.parametrize("grid_size", [4, 7, 14])  # 7: latents with patch 1 and pixels with patch 4; 14: patch 2
def test_positions_equal_diffusers_get_2d_sincos_pos_embed(width, grid_size):
    """Equal to diffusers' function with its DiT's arguments (base_size = grid size, interpolation_scale 1).
    Measured: bit for bit equal (both compute in float64 and round to float32)."""
    theirs = get_2d_sincos_pos_embed(width, grid_size, base_size=grid_size, output_type="pt").float()
    ours = sincos_pos_embed(width, grid_size)
    assert ours.shape == (grid_size**2, width) and ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 1e-6
    assert torch.equal(DiT(input_size=grid_size, width=width, depth=0).pos_embed[0], ours)
    with pytest.raises(ValueError, match="divisible by 4.*got 6"):
        sincos_pos_embed(6, grid_size)


# --- initialisation, shapes, refused inputs -------------------------------------------------------------------


def test_a_fresh_dit_outputs_zeros_and_each_block_is_the_identity():
    torch.manual_seed(0)
    model = DiT(**LATENT, num_classes=10)
    xt, t, labels = inputs(LATENT)
    assert torch.equal(model(xt, t, labels), torch.zeros_like(xt))  # the final layer starts at zero
    tokens, c = torch.randn(3, 49, 16), torch.randn(3, 16)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)  # adaLN-Zero: the gates start at zero
    # and training moves them: the gates get a gradient at once
    randomise_zero_layers(model.final)
    model(xt, t, labels).square().sum().backward()
    assert all(block.modulation.weight.grad.abs().sum() > 0 for block in model.blocks)


def test_shapes_for_latents_and_pixels():
    xt, t, labels = inputs(LATENT)
    latent = randomise_zero_layers(DiT(**LATENT, num_classes=10))
    assert latent.grid_size**2 == 49 and latent.pos_embed.shape == (1, 49, 16)
    assert latent(xt, t, labels).shape == (3, 4, 7, 7)
    for patch_size, tokens in [(2, 196), (4, 49)]:
        pixel = DiT(**{**PIXEL, "patch_size": patch_size})  # unconditional
        assert pixel.grid_size**2 == tokens
        assert pixel.patchify(torch.randn(2, 1, 28, 28)).shape == (2, tokens, 16)
        assert pixel(torch.randn(2, 1, 28, 28), torch.tensor([1.0, 2.0])).shape == (2, 1, 28, 28)


def test_unpatchify_inverts_the_patches():
    """A token's p*p*C numbers go back to its own patch: unpatchify of the patches cut by hand is the image."""
    model = DiT(in_channels=3, input_size=8, patch_size=2, width=8, depth=0, heads=1)
    image = torch.randn(2, 3, 8, 8)
    patches = image.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 12)  # (B, N, p p C)
    assert torch.equal(model.unpatchify(patches), image)


def test_labels_and_the_no_label_row():
    model = randomise_zero_layers(DiT(**LATENT, num_classes=10)).eval()
    xt, t, _ = inputs(LATENT)
    with torch.no_grad():
        none, three = model(xt, t, torch.full((3,), 10)), model(xt, t, torch.full((3,), 3))
    assert none.isfinite().all() and (none - three).abs().max() > 1e-3  # row 10 is its own condition
    # the label of example 0 reaches only example 0
    with torch.no_grad():
        mixed = model(xt, t, torch.tensor([10, 3, 3]))
    assert torch.allclose(mixed[0], none[0], atol=1e-6) and torch.allclose(mixed[1:], three[1:], atol=1e-6)
    assert model.class_emb.num_embeddings == 11


def test_bad_inputs_are_refused_by_name():
    model = DiT(**LATENT, num_classes=10)
    xt, t, labels = inputs(LATENT)
    with pytest.raises(ValueError, match=r"labels must lie in 0..10 \(10: no label\); got 11"):
        model(xt, t, torch.tensor([3, 11, 0]))
    with pytest.raises(ValueError, match="got -1"):
        model(xt, t, torch.tensor([3, -1, 0]))
    with pytest.raises(ValueError, match=r"pass labels, a \(3,\) long tensor in 0..10.*got None"):
        model(xt, t)
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(3,\)"):
        model(xt, t, labels.float())
    with pytest.raises(ValueError, match=r"got torch.int64 of shape \(2,\)"):
        model(xt, t, labels[:2])
    with pytest.raises(ValueError, match=r"built for inputs \(B, 4, 7, 7\).*got shape \(3, 4, 8, 8\)"):
        model(torch.randn(3, 4, 8, 8), t, labels)
    with pytest.raises(ValueError, match=r"built for inputs \(B, 4, 7, 7\).*got shape \(4, 7, 7\)"):
        model(xt[0], t, labels)
    with pytest.raises(ValueError, match=r"one time per example, shape \(3,\); got shape \(1,\)"):
        model(xt, t[:1], labels)
    with pytest.raises(ValueError, match="built without num_classes, so it takes no condition"):
        DiT(**LATENT)(xt, t, labels)
    with pytest.raises(ValueError, match=r"patch_size=2 does not divide input_size=7.*valid patch sizes: \[1, 7\]"):
        DiT(in_channels=4, input_size=7, patch_size=2)
    with pytest.raises(ValueError, match=r"width \(18\) must be divisible by heads \(4\)"):
        DiT(width=18, heads=4)


def test_diffusers_crops_what_its_patches_do_not_cover():
    """Why ours refuses a patch size that does not divide the input: diffusers' DiT (as timm's PatchEmbed under the
    paper's code) drops the last row and column of a 7 x 7 input with patch 2, and returns 6 x 6."""
    theirs = diffusers_dit({**LATENT, "patch_size": 2}, num_classes=10)
    xt, t, labels = inputs(LATENT)
    with torch.no_grad():
        assert theirs(xt, t, labels).sample.shape == (3, 4, 6, 6)


# --- training, FLOPs, cards -----------------------------------------------------------------------------------


def test_flow_matching_lowers_its_loss_on_a_fixed_batch():
    """Overfit two latents with labels: the flow loss falls (the DiT trains through the course's loop)."""
    torch.manual_seed(0)
    model = DiT(**LATENT, num_classes=10)
    data = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(0)).repeat(8, 1, 1, 1)
    labels = torch.tensor([1, 2]).repeat(8)
    config = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup=5, objective="flow", ema_decay=None)
    state, _ = train(model, None, data, config, progress=False, condition=lambda index, _: labels[index])
    first, last = sum(state.losses[:10]) / 10, sum(state.losses[-10:]) / 10
    assert last < 0.85 * first, f"flow loss {first:.3f} -> {last:.3f}"  # measured: 1.91 -> 1.47


def test_guided_flow_sampling_runs_through_the_dit():
    """Classifier-free guidance batches labels and the no-label row through one call: the DiT serves as the course's
    samplers expect (guidance scale 1 is the conditional model itself)."""
    model = randomise_zero_layers(DiT(**LATENT, num_classes=10)).eval()
    x1, labels = torch.randn(3, 4, 7, 7, generator=torch.Generator().manual_seed(4)), torch.tensor([1, 2, 3])
    guided, _ = euler_flow_sample(Guided(model, labels, torch.tensor([10]), scale=2.0), x1, steps=3)
    conditional, _ = euler_flow_sample(Guided(model, labels, torch.tensor([10]), scale=1.0), x1, steps=3)
    assert guided.shape == x1.shape and guided.isfinite().all()
    assert torch.allclose(conditional, euler_flow_sample(model, x1, steps=3, cond=labels)[0])
    assert (guided - conditional).abs().max() > 1e-3


def test_guided_flow_samples_start_from_the_seeded_noise_and_decode():
    """guidance.guided_flow_samples at scale 1 is the conditional model sampled from draw_flow_samples' noise, in
    its batches (batch b seeded seed + b), with the decoder applied after the solver; scale 2 differs."""
    model = randomise_zero_layers(DiT(**LATENT, num_classes=10)).eval()
    labels, null = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([10])
    decoder = lambda z: z[:, :1].repeat_interleave(4, 2).repeat_interleave(4, 3)[..., :28, :28].tanh()  # noqa: E731
    samples, seconds = guided_flow_samples(
        model, labels, null, 1.0, "euler", 3, seed=7, batch_size=3, shape=(4, 7, 7), decoder=decoder
    )
    expected = []
    for batch, chunk in enumerate(labels.split(3)):
        x1 = torch.randn(len(chunk), 4, 7, 7, generator=torch.Generator().manual_seed(7 + batch))
        expected.append(decoder(euler_flow_sample(model, x1, steps=3, cond=chunk)[0]))
    assert samples.shape == (5, 1, 28, 28) and seconds > 0
    assert torch.equal(samples, torch.cat(expected).clamp(-1, 1))
    guided, _ = guided_flow_samples(model, labels, null, 2.0, "euler", 3, seed=7, shape=(4, 7, 7), decoder=decoder)
    assert (guided - samples).abs().max() > 1e-4


def counted_gflops(model: DiT, backward: bool, math_attention: bool) -> float:
    """torch's FlopCounterMode on one input of the model's shape, as benchmark.gflops_per_image counts."""
    xt, t = torch.randn(1, model.in_channels, model.input_size, model.input_size), torch.tensor([10.0])
    backend = sdpa_kernel([SDPBackend.MATH]) if math_attention else nullcontext()
    with backend, FlopCounterMode(display=False) as counter:
        if backward:
            model(xt, t).sum().backward()
        else:
            with torch.no_grad():
                model(xt, t)
    return counter.get_total_flops() / 1e9


@pytest.mark.parametrize("config", [LATENT, PIXEL, {**PIXEL, "patch_size": 4, "mlp_ratio": 2}])
def test_the_flop_count_by_hand_equals_torchs_count(config):
    """dit_gflops equals FlopCounterMode's count with attention on the MATH backend (which it counts), forward and
    forward plus backward; on CPU's default fused kernel FlopCounterMode leaves out the attention products."""
    model = DiT(**config)
    N, d = model.grid_size**2, model.width
    for backward in (False, True):
        assert dit_gflops(model, backward) == pytest.approx(counted_gflops(model, backward, True), rel=1e-12)
        attention = model.depth * 4 * N**2 * d * (3 if backward else 1) / 1e9
        default = counted_gflops(model, backward, False)
        assert default in (
            pytest.approx(dit_gflops(model, backward)),
            pytest.approx(dit_gflops(model, backward) - attention),
        )
    shape = (model.in_channels, model.input_size, model.input_size)
    for backward in (False, True):  # the benchmark's counter switches to the MATH backend itself
        assert gflops_per_call(model, shape, backward=backward) == pytest.approx(dit_gflops(model, backward), rel=1e-12)
    if config["input_size"] == 28 and config["in_channels"] == 1:  # gflops_per_image takes 28 x 28 digits
        assert gflops_per_image(model) == pytest.approx(dit_gflops(model), rel=1e-12)
    labelled = DiT(**config, num_classes=10)  # the label lookup adds no products
    assert gflops_per_call(labelled, shape, torch.tensor([3])) == pytest.approx(dit_gflops(labelled), rel=1e-12)


def test_a_hand_count_for_one_tiny_config():
    """Width 8, one block, MLP ratio 4, 4 tokens of 1 x 2 x 2 patches, 256 time features, forward:
    patches 2*4*4*8 = 256; time MLP 2*(256*8 + 8*8) = 4224; block: modulation 2*8*48 = 768, q k v 2*4*8*24 = 1536,
    Q K^T and A V 2 * 2*4*4*8 = 512, output 2*4*8*8 = 512, MLP 2 * 2*4*8*32 = 4096; final 2*8*16 = 256 and
    2*4*8*4 = 256: 12,416 in all; the backward doubles all but the 256 + 4096 of the first layers' weights."""
    model = DiT(in_channels=1, input_size=4, patch_size=2, width=8, depth=1, heads=2)
    forward = 256 + 4224 + 768 + 1536 + 512 + 512 + 4096 + 256 + 256
    assert dit_gflops(model, backward=False) * 1e9 == pytest.approx(forward)
    assert dit_gflops(model) * 1e9 == pytest.approx(3 * forward - (256 + 2 * 256 * 8))
    layers = dict(patches=4 * 8 + 8, time_mlp=256 * 8 + 8 + 8 * 8 + 8, modulation=8 * 48 + 48, qkv=8 * 24 + 24)
    layers.update(proj=8 * 8 + 8, mlp=8 * 32 + 32 + 32 * 8 + 8, final=8 * 16 + 16 + 8 * 4 + 4)
    assert parameter_count(model) == sum(layers.values())


def test_a_card_builds_and_loads_a_dit(tmp_path):
    """The recipes' and the cards' class lookup build a DiT by its dotted path; weights round-trip (float16)."""
    config = {**LATENT, "num_classes": 10}
    assert model_class("course_lib.nets.dit.DiT") is DiT
    recipe = Recipe(
        "tiny_dit", config, TrainConfig(objective="flow"), schedule=None, model_class="course_lib.nets.dit.DiT"
    )
    model = randomise_zero_layers(build(recipe)).eval()
    assert isinstance(model, DiT)
    card = {"model": {"class": "course_lib.nets.dit.DiT", **config}, "prediction_type": "velocity"}
    save_weights(model, "tiny_dit", card, folder=tmp_path)
    assert set(read_manifest(tmp_path / "SHA256SUMS")) == {"tiny_dit.safetensors", "tiny_dit.json"}
    loaded = load_model("tiny_dit", folder=tmp_path)
    assert isinstance(loaded, DiT) and not loaded.training and loaded.prediction_type == "velocity"
    assert "pos_embed" not in loaded.state_dict()  # fixed positions are rebuilt, not stored
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())  # as stored
        xt, t, labels = inputs(LATENT)
        assert torch.allclose(loaded(xt, t, labels), model(xt, t, labels), atol=1e-6)
