"""course_lib.interop: the course's schedule, UNet and samplers inside diffusers, and a tiny Stable Diffusion.

How the pipelines are compared with the course's samplers, exactly: DDPMPipeline and DDIMPipeline draw x_T with
`randn(shape, generator=generator)` first and then each step's noise, after the model call, from the same generator.
The course's samplers draw their noise the same way (`profiles.randn_like`), so x_T drawn from a CPU generator seeded
like the pipeline's, and that generator handed on to the sampler, reproduces the pipeline's whole random stream.
The pipelines return (x0 / 2 + 0.5).clamp(0, 1); the course's x0 is mapped the same way before comparing.
Differences left: diffusers' alphas_cumprod is a float32 cumulative product, ours a float64 one rounded to float32
(5e-7 apart), which whole runs carry into their samples at the 1e-6 level.
"""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DiffusionPipeline, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from course_lib.captions import VOCABULARY
from course_lib.ddpm import ddpm_sample
from course_lib.guidance import cfg_combine
from course_lib.interop import (
    TOKENIZER_WORDS,
    TOKENS,
    CourseUNet2DModel,
    bpe_merges,
    load_diffusers_unet,
    scheduler_config,
    scheduler_sample,
    tiny_stable_diffusion,
    tiny_tokenizer,
    to_diffusers_scheduler,
)
from course_lib.samplers import ddim_sample
from course_lib.sampling import SAMPLERS, run_sampler
from course_lib.schedules import SCHEDULE_NAMES, cosine_betas, make_schedule, schedule_from_betas
from course_lib.weights import load_model

# diffusers turns tensors into numpy arrays in a way numpy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

COSINE = make_schedule("cosine", 1000)  # the shipped model's schedule


@pytest.fixture(scope="module")
def unet():
    return load_diffusers_unet("unet_mnist_eps")


@pytest.fixture(scope="module")
def model():
    return load_model("unet_mnist_eps")


def images(pipeline, seed: int, steps: int, n: int = 2, **kwargs) -> torch.Tensor:
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipeline(batch_size=n, generator=generator, num_inference_steps=steps, output_type="pt", **kwargs).images


def as_pipeline_output(x0: torch.Tensor) -> torch.Tensor:
    return (x0 / 2 + 0.5).clamp(0, 1)


# --- schedules --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("kind", SAMPLERS)
def test_diffusers_tables_equal_ours_for_every_schedule(name, kind):
    """By name where the scheduler knows it (only DDPMScheduler knows "sigmoid"), else as trained_betas.
    Measured: at most 4.2e-7 (sigmoid, T = 1000)."""
    by_name = name != "sigmoid" or kind == "DDPM"
    for schedule in [make_schedule(name, 1000), make_schedule(name, 50)]:
        scheduler = to_diffusers_scheduler(schedule, kind)
        assert (
            (scheduler.config.trained_betas is None) == by_name == ("beta_schedule" in scheduler_config(schedule, kind))
        )
        assert (scheduler.alphas_cumprod - schedule.alpha_bar).abs().max() <= 1e-6, (name, schedule.T)


def test_schedules_diffusers_cannot_name_go_as_trained_betas():
    others = [
        make_schedule("linear", 1000, beta_end=0.03),
        make_schedule("cosine", 1000, s=0.02),
        schedule_from_betas(torch.linspace(1e-3, 0.05, 200, dtype=torch.float64) ** 1.5),
    ]
    for schedule in others:
        config = scheduler_config(schedule, prediction_type="v")
        assert "beta_schedule" not in config and len(config["trained_betas"]) == schedule.T
        scheduler = to_diffusers_scheduler(schedule, "DDIM", "v")
        assert scheduler.config.prediction_type == "v_prediction"
        assert (scheduler.alphas_cumprod - schedule.alpha_bar).abs().max() <= 1e-6


def test_scheduler_configs_by_name():
    assert scheduler_config(COSINE) == {
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "beta_schedule": "squaredcos_cap_v2",
    }
    quadratic = scheduler_config(make_schedule("quadratic", 1000), "DDIM", "x0")
    assert quadratic["beta_schedule"] == "scaled_linear" and quadratic["prediction_type"] == "sample"
    assert (quadratic["beta_start"], quadratic["beta_end"]) == (1e-4, 0.02)
    ddim = to_diffusers_scheduler(COSINE, "DDIM", clip_x0=True).config
    assert ddim.timestep_spacing == "trailing" and ddim.clip_sample and ddim.clip_sample_range == 1.0
    dpm = to_diffusers_scheduler(COSINE, "DPM-Solver++(2M)", clip_x0=True).config
    assert dpm.algorithm_type == "dpmsolver++" and dpm.thresholding and dpm.sample_max_value == 1.0
    assert to_diffusers_scheduler(COSINE, "Euler (Karras)").config.use_karras_sigmas


# --- the UNet ---------------------------------------------------------------------------------------------------


def test_the_wrapper_is_the_course_unet(unet, model):
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0, 500, 999])
    assert torch.equal(unet(x, t).sample, model(x, t))
    assert torch.equal(unet(x, torch.tensor(700)).sample, model(x, torch.full((3,), 700)))  # what pipelines pass
    assert torch.equal(unet(x, 700, return_dict=False)[0], model(x, torch.full((3,), 700)))
    assert tuple(unet.config.blocks) == (1, 1, 2) and unet.config.sample_size == 28
    rebuilt = CourseUNet2DModel.from_config(unet.config)
    assert rebuilt.state_dict().keys() == unet.state_dict().keys()


def test_a_class_conditional_wrapper_takes_class_labels():
    torch.manual_seed(0)
    conditional = CourseUNet2DModel(channels=(8, 16), blocks=(1, 1), attention=(False, True), num_classes=10).eval()
    x, labels = torch.randn(2, 1, 28, 28), torch.tensor([3, 10])
    assert torch.equal(conditional(x, 10, labels).sample, conditional.net(x, torch.full((2,), 10), labels))


# --- pipelines against the course's samplers ----------------------------------------------------------------------


def test_ddim_pipeline_equals_ddim_sample(unet, model):
    """Measured: 1.7e-6."""
    pipeline = DDIMPipeline(unet, to_diffusers_scheduler(COSINE, "DDIM", clip_x0=True))
    theirs = images(pipeline, seed=1, steps=5)
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ours = ddim_sample(model, COSINE, x_T, 5, clip_x0=True)[0]
    assert (theirs - as_pipeline_output(ours)).abs().max() <= 1e-5


def test_ddpm_pipeline_on_every_timestep_equals_ddpm_sample(model, unet):
    """The shipped network on a 10-step cosine schedule (the test compares the loops, not the samples' quality).
    Measured: 2e-6."""
    schedule = make_schedule("cosine", 10)
    pipeline = DDPMPipeline(unet, to_diffusers_scheduler(schedule, "DDPM", clip_x0=True))
    theirs = images(pipeline, seed=2, steps=10)
    generator = torch.Generator().manual_seed(2)
    x_T = torch.randn(2, 1, 28, 28, generator=generator)
    ours = ddpm_sample(model, schedule, x_T, generator, clip_x0=True)[0]
    assert (theirs - as_pipeline_output(ours)).abs().max() <= 1e-5


def test_ddpm_pipeline_with_fewer_steps_is_ddim_with_eta_1(model, unet):
    """DDPMScheduler with S < T steps is the ancestral sampler of the chain on `leading` timesteps, which is DDIM's
    eta = 1 (Song et al. 2021, section 4.1), without clipping (a clipped x0_hat enters the two formulas differently).
    Measured: 3e-6."""
    pipeline = DDPMPipeline(unet, to_diffusers_scheduler(COSINE, "DDPM"))
    theirs = images(pipeline, seed=3, steps=5)
    generator = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 1, 28, 28, generator=generator)
    ours = ddim_sample(model, COSINE, x_T, 5, eta=1.0, generator=generator, spacing="leading")[0]
    assert (theirs - as_pipeline_output(ours)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["DPM-Solver++(2M)", "Euler (Karras)"])
def test_scheduler_sample_equals_the_course_samplers(unet, model, kind):
    """The loop with init_noise_sigma and scale_model_input, on the shipped model. With diffusers' own float32
    alphas_cumprod the runs differ by 3e-4 (DPM-Solver++, clipped) and 2e-4 (Euler): both derive log-SNRs and
    sigmas from 1 - alpha_bar_0 ~ 1e-4, which float32 rounds in the fourth digit, and the network's x0_hat at
    t ~ T-1 magnifies its input's errors (tests/test_samplers.py, module docstring). Given the float64 table that
    ours are rounded from, they agree to 9e-6 (DPM-Solver++) and bitwise (Euler)."""
    clip_x0 = kind != "Euler (Karras)"
    x_T = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    ours = run_sampler(kind, model, COSINE, x_T, 5, clip_x0=clip_x0)
    scheduler = to_diffusers_scheduler(COSINE, kind, clip_x0=clip_x0)
    assert (scheduler_sample(unet, scheduler, x_T, 5) - ours).abs().max() <= 1e-3
    scheduler.alphas_cumprod = torch.cumprod(1 - cosine_betas(1000), 0)  # read by set_timesteps
    assert (scheduler_sample(unet, scheduler, x_T, 5) - ours).abs().max() <= 2e-5


# --- saving and loading -------------------------------------------------------------------------------------------


def test_save_pretrained_then_from_pretrained_gives_identical_outputs(unet, tmp_path):
    pipeline = DDIMPipeline(unet, to_diffusers_scheduler(COSINE, "DDIM", clip_x0=True))
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["course_lib.interop", "CourseUNet2DModel"]
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    for loader in (DiffusionPipeline, DDIMPipeline):
        reloaded = loader.from_pretrained(tmp_path)
        assert type(reloaded) is DDIMPipeline and type(reloaded.unet) is CourseUNet2DModel
        assert torch.equal(images(reloaded, seed=5, steps=3), images(pipeline, seed=5, steps=3))
    unet.save_pretrained(tmp_path / "alone")
    alone = CourseUNet2DModel.from_pretrained(tmp_path / "alone")
    state, reloaded_state = unet.state_dict(), alone.state_dict()
    assert all(torch.equal(state[key], reloaded_state[key]) for key in state)


# --- the tiny Stable Diffusion -------------------------------------------------------------------------------------


def test_bpe_and_the_tiny_tokenizer():
    assert bpe_merges(["aab", "ab"]) == [("a", "b</w>"), ("a", "ab</w>")]
    tokenizer = tiny_tokenizer()
    for word in TOKENIZER_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert len(tokenizer.tokenize("zebra")) > 1  # not learned: split into pieces, still tokenized
    ids = tokenizer(["a thick seven leaning right"], padding="max_length", max_length=TOKENS).input_ids[0]
    assert len(ids) == TOKENS and ids[0] == tokenizer.bos_token_id and ids[-2:] == [tokenizer.eos_token_id] * 2
    assert set(TOKENIZER_WORDS) == set(VOCABULARY[2:])


def test_tiny_stable_diffusion_with_guidance_and_a_negative_prompt():
    """One UNet call per step on the batch doubled (unconditional half first, from the negative prompt), combined
    as course_lib.guidance.cfg_combine; with guidance_scale 1 the batch is not doubled."""
    pipeline = tiny_stable_diffusion()
    calls, received = [], []

    def record(module, args, kwargs, output):
        calls.append((args[0].shape, kwargs["encoder_hidden_states"], output[0]))

    step = pipeline.scheduler.step

    def listening_step(model_output, t, sample, **kwargs):
        received.append(model_output)
        return step(model_output, t, sample, **kwargs)

    hook = pipeline.unet.register_forward_hook(record, with_kwargs=True)
    pipeline.scheduler.step = listening_step
    prompt, negative = ["a thick seven"] * 2, ["leaning left"] * 2
    generator = torch.Generator().manual_seed(6)
    call = dict(num_inference_steps=3, output_type="pt", generator=generator)
    out = pipeline(prompt, negative_prompt=negative, guidance_scale=4.0, **call).images
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert [shape for shape, _, _ in calls] == [(4, 4, 8, 8)] * 3
    _, context, eps_hat = calls[0]
    uncond, cond = eps_hat.chunk(2)
    assert torch.allclose(received[0], cfg_combine(uncond, cond, 4.0), atol=1e-6)
    tokens = pipeline.tokenizer(negative, padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    assert torch.allclose(context[:2], pipeline.text_encoder(tokens)[0], atol=1e-6)
    calls.clear()
    pipeline(prompt, guidance_scale=1.0, **call)
    assert [shape for shape, _, _ in calls] == [(2, 4, 8, 8)] * 3
    hook.remove()
    del pipeline.scheduler.step
    without = pipeline(prompt, guidance_scale=4.0, **{**call, "generator": torch.Generator().manual_seed(6)}).images
    assert (without - out).abs().max() > 1e-3  # the negative prompt changed the images


def test_loading_a_lora_changes_the_output(tmp_path):
    def sample(pipeline, **kwargs):
        generator = torch.Generator().manual_seed(7)
        return pipeline("a thick seven", num_inference_steps=3, generator=generator, output_type="pt", **kwargs).images

    trained = tiny_stable_diffusion()
    base = sample(trained)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(8)
        trained.unet.add_adapter(config, adapter_name="toy")  # random A and B: as if trained
    with_lora = sample(trained)
    assert (with_lora - base).abs().max() > 1e-3
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(trained.unet, adapter_name="toy")
    )

    pipeline = tiny_stable_diffusion()
    assert torch.equal(sample(pipeline), base)
    pipeline.load_lora_weights(tmp_path, adapter_name="toy")
    assert torch.allclose(sample(pipeline), with_lora, atol=1e-6)
    assert torch.allclose(sample(pipeline, cross_attention_kwargs={"scale": 0.0}), base, atol=1e-6)
    pipeline.unload_lora_weights()
    assert torch.allclose(sample(pipeline), base, atol=1e-6)


# --- bad inputs -------------------------------------------------------------------------------------------------


def test_bad_inputs_raise(unet):
    with pytest.raises(ValueError, match="unknown kind 'PNDM'; valid: DDPM, DDIM"):
        to_diffusers_scheduler(COSINE, "PNDM")
    with pytest.raises(ValueError, match="unknown prediction_type 'epsilon'"):
        scheduler_config(COSINE, prediction_type="epsilon")
    with pytest.raises(ValueError, match="cannot clip x0_hat; pass clip_x0=False for Euler"):
        to_diffusers_scheduler(COSINE, "Euler (Karras)", clip_x0=True)
    with pytest.raises(ValueError, match="digit_classifier is a .*DigitClassifier; only course_lib.nets.unet.UNet"):
        load_diffusers_unet("digit_classifier")
    with pytest.raises(ValueError, match=r"one per example \(2\); got shape \(3,\)"):
        unet(torch.zeros(2, 1, 28, 28), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="got steps=0"):
        scheduler_sample(unet, to_diffusers_scheduler(COSINE, "DDIM"), torch.zeros(1, 1, 28, 28), 0)
    with pytest.raises(ValueError, match=r"multiple of 8 .* and >= 16; got 20"):
        tiny_stable_diffusion(image_size=20)
    with pytest.raises(ValueError, match=r"lower-case ASCII letters only; got \['Seven', 'x1'\]"):
        tiny_tokenizer(["a", "Seven", "x1"])
