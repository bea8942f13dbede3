"""Measure the course's speed and quality figures and write each into docs/benchmarks.md (`make bench`).

    python scripts/bench.py                    every figure, one after another (long: run it in the background)
    python scripts/bench.py unet_speed         one figure only

Each figure rewrites its own marked section of docs/benchmarks.md as soon as it is measured, with the command and
the machine, so a long run can be stopped and one figure redone later. Ratios are always measured in one run.
Figures:
    unet_speed   training images/s of the course UNet vs diffusers' UNet2DModel of about the same size
    unet_loss    their held-out loss after the same number of training images, same recipe and seed
    samplers     the shipped digit model under DDPM-1000, DDIM, DPM-Solver++(2M) and Euler: wall time, FID, KID and
                 confident fraction of 500 samples each, from the same noise (also data/benchmarks/samplers.json,
                 which chapter 5 plots)
    euler_cap    Euler (Karras) with the schedule's sigma_max against sigma_max capped at 80 (chapter 5): FID with
                 its spread, confident fraction, n samples each at 10 and 20 steps
    shipped      the shipped digit model's targets: 1,000 DDIM-50 samples, FID beside the floor, confident fraction
    latent       pixel against latent diffusion (chapter 6): cost per call and per image, FID, 500 DDIM-50 each
    flow         the flow-matching model (Euler, Heun) against the eps model (DDIM) at 5-50 network calls: FID and
                 confident fraction of 500 samples each, from the same noise (also data/benchmarks/flow.json)
    captions     the caption model: does each word of a prompt do what it says (digit accuracy, thickness and slant
                 words measured on the samples, a negative prompt), n samples per prompt set (also
                 data/benchmarks/captions.json, which chapter 7 shows)
    guidance     the class-conditional model under classifier-free guidance, w = 0..8: conditional accuracy, FID,
                 spread within classes, 500 DDIM-20 samples per w (also data/benchmarks/guidance.json, which
                 chapter 7 plots)
    comparison   chapter 11's equal-budget runs through one frame: each finished run's best ODE solver at 10, 20 and
                 50 network calls and a many-step reference, FID with spread (also data/benchmarks/comparison.json;
                 runs measured before are kept)
    flagship     issue 15's flagship (unet_mnist_flow_logit) against the digit model's targets: DDIM-50 and -100,
                 DPM-Solver++(2M)-20, Euler (Karras)-20 and DDPM-1000, FID with spread and confident fraction,
                 drawn in chunks that a stopped run resumes (also data/benchmarks/flagship.json)
    flagship_long  the same for unet_mnist_flow_logit_long (the flagship trained on past 768,000 images), with the
                 flagship beside it from the same noise (also data/benchmarks/flagship_long.json)
    transformer  chapter 12's study: each finished DiT and the latent UNet, class-conditional flow on latents:
                 parameters, GFLOPs, training compute and time, ms per image, FID with spread and accuracy at
                 guidance 1 and 2 (also data/benchmarks/transformer.json; runs measured before are kept)
"""

import argparse
import sys
import time
from dataclasses import replace
from datetime import date
from functools import partial
from pathlib import Path

import torch

from course_lib.benchmark import (
    DiffusersUNet,
    gflops_per_image,
    ms_per_call,
    parameter_count,
    save_results,
    training_images_per_second,
)
from course_lib.data import load_digits
from course_lib.forward import q_sample
from course_lib.metrics import confident_fraction, load_digit_classifier, sample_scores
from course_lib.nets.unet import UNet
from course_lib.profiles import describe_machine
from course_lib.recipes import DIGIT_CONFIG as CONFIG
from course_lib.recipes import DIGIT_MODEL as MODEL
from course_lib.recipes import DIGIT_SCHEDULE as SCHEDULE
from course_lib.sampling import IMAGE_SHAPE, LATENT_CLIP, LATENT_SHAPE, draw_flow_samples, draw_samples
from course_lib.schedules import make_schedule
from course_lib.train import train
from course_lib.weights import load_card, load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_comparison import comparison  # noqa: E402
from bench_conditional import captions, guidance  # noqa: E402
from bench_flagship import STAGES, flagship  # noqa: E402
from bench_transformer import transformer  # noqa: E402
from report import replace_section  # noqa: E402

REPORT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
NAME = "unet_mnist_eps"  # the shipped unconditional digit model


def candidates() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"course UNet": UNet(**MODEL), "diffusers UNet2DModel": DiffusersUNet()}


def unet_speed() -> list[str]:
    rows, speeds = [], {}
    for name, model in candidates().items():
        speeds[name] = training_images_per_second(model)
        rows.append(
            f"| {name} | {parameter_count(model) / 1e6:.2f} M | {gflops_per_image(model):.2f} | {speeds[name]:.1f} |"
        )
    ratio = speeds["course UNet"] / speeds["diffusers UNet2DModel"]
    return [
        "Training throughput at 28 x 28, batch 128, forward + backward + AdamW, measured in one run:",
        "",
        "| model | parameters | GFLOP / image (fwd + bwd) | images / s |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Speed ratio, course UNet / diffusers: **{ratio:.2f}x** (target >= 1.5x).",
    ]


def held_out_loss(model: torch.nn.Module, schedule, images: torch.Tensor) -> float:
    """The plain eps-MSE on fixed (x0, t, eps) triples of held-out digits: the same draws for every model."""
    generator = torch.Generator().manual_seed(1234)
    t = torch.randint(0, schedule.T, (len(images),), generator=generator)
    eps = torch.randn(images.shape, generator=generator)
    xt = q_sample(schedule, images, t, eps)
    with torch.no_grad():
        return (
            sum(
                (model(xt[i : i + 250], t[i : i + 250]) - eps[i : i + 250]).pow(2).sum().item()
                for i in range(0, len(images), 250)
            )
            / eps.numel()
        )


def unet_loss(images_budget: int = 32_000) -> list[str]:
    train_images, _ = load_digits("train")
    heldout, _ = load_digits("heldout")
    schedule = make_schedule(**SCHEDULE)
    steps = images_budget // CONFIG.batch_size
    config = replace(CONFIG, steps=steps, warmup=min(CONFIG.warmup, steps // 10))
    rows = []
    for name, model in candidates().items():
        start = time.perf_counter()
        state, ema = train(model, schedule, train_images, config, progress=False)
        minutes = (time.perf_counter() - start) / 60
        loss, ema_loss = held_out_loss(model, schedule, heldout), held_out_loss(ema.model, schedule, heldout)
        rows.append(f"| {name} | {steps * config.batch_size} | {minutes:.1f} | {loss:.4f} | {ema_loss:.4f} |")
    return [
        f"Held-out eps-MSE after the same number of training images, same recipe as scripts/train_unet.py "
        f"(schedule {SCHEDULE['name']}, batch {config.batch_size}, peak lr {config.lr}, min-SNR gamma "
        f"{config.min_snr_gamma}, learning-rate schedule compressed to {steps} steps), same seed:",
        "",
        "| model | training images | minutes | held-out loss | held-out loss (EMA) |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]


SAMPLER_RUNS = [
    ("DDIM", 10),
    ("DDIM", 20),
    ("DDIM", 50),
    ("DDIM", 100),
    ("DPM-Solver++(2M)", 10),
    ("DPM-Solver++(2M)", 20),
    ("Euler (Karras)", 10),
    ("Euler (Karras)", 20),
    ("Euler (Karras)", 50),
    ("DDPM", 1000),  # last: it costs as much as all the others together
]
SAMPLER_SAMPLES = 500  # per sampler; `--samples` changes it


def model_status() -> str:
    return f"`{NAME}` ({load_card(NAME)['training']['status']})"


def samplers(n: int = SAMPLER_SAMPLES) -> list[str]:
    model = load_model(NAME)
    schedule = make_schedule(**SCHEDULE)
    classifier = load_digit_classifier()
    results = {"model": NAME, "model_status": model_status(), "machine": describe_machine(), "date": str(date.today())}
    command = f"python scripts/bench.py samplers --samples {n} --threads {torch.get_num_threads()}"
    results.update({"command": command, "threads": torch.get_num_threads(), "n": n, "runs": []})
    for sampler, steps in SAMPLER_RUNS:
        samples, seconds = draw_samples(model, schedule, sampler, steps, n)
        scores = sample_scores(classifier, samples)
        results["runs"].append({"sampler": sampler, "steps": steps, "seconds": seconds, **scores})
        save_results("samplers", results)  # after every run, so that a stopped run keeps what it measured
        print(f"{sampler}-{steps}: {seconds:.0f} s, FID {scores['fid']:.2f}", flush=True)
    runs = {(run["sampler"], run["steps"]): run for run in results["runs"]}
    rows = [
        f"| {run['sampler']} | {run['steps']} | {run['seconds']:.1f} | {1000 * run['seconds'] / run['n']:.1f} | "
        f"{run['fid']:.2f} ± {run['fid_sd']:.2f} | {run['kid'] * 1000:.2f} | {run['confident_fraction']:.3f} |"
        for run in results["runs"]
    ]
    ddpm, ddim50, ddim100 = runs["DDPM", 1000], runs["DDIM", 50], runs["DDIM", 100]
    dpm20 = runs["DPM-Solver++(2M)", 20]
    floor = results["runs"][0]
    return [
        f"Model {model_status()}; {n} samples per sampler from the same noise, x0_hat clipped to "
        f"[-1, 1]; FID and KID against {n} held-out digits; real-vs-real floor at that n: FID "
        f"{floor['fid_floor']:.2f}, KID x 1000 {floor['kid_floor'] * 1000:.2f}. Also written to "
        "`data/benchmarks/samplers.json` (chapter 5 plots it).",
        "",
        "| sampler | steps | wall s | ms / image | FID ± sd | KID x 1000 | confident (>= 0.9) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- DDIM-50 vs DDPM-1000: **{ddpm['seconds'] / ddim50['seconds']:.1f}x** faster (target >= 15x), FID ratio "
        f"**{ddim50['fid'] / ddpm['fid']:.2f}** (target <= 1.25).",
        f"- DPM-Solver++(2M)-20 vs DDIM-100: FID ratio **{dpm20['fid'] / ddim100['fid']:.2f}** (target <= 1.2), "
        f"{ddim100['seconds'] / dpm20['seconds']:.1f}x faster.",
    ]


def shipped(n: int = 1000) -> list[str]:
    model = load_model(NAME)
    samples, seconds = draw_samples(model, make_schedule(**SCHEDULE), "DDIM", 50, n)
    classifier = load_digit_classifier()
    scores = sample_scores(classifier, samples)
    real_confident = confident_fraction(classifier, load_digits("heldout")[0][:n])
    return [
        f"Model {model_status()}: {n} DDIM-50 samples ({seconds / 60:.1f} min) against {n} held-out digits.",
        "",
        "| FID ± sd | floor ± sd | FID / floor | KID x 1000 | floor | confident (>= 0.9) |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {scores['fid']:.2f} ± {scores['fid_sd']:.2f} | {scores['fid_floor']:.2f} ± {scores['fid_floor_sd']:.2f} | "
        f"**{scores['fid'] / scores['fid_floor']:.2f}** | "
        f"{scores['kid'] * 1000:.2f} | {scores['kid_floor'] * 1000:.2f} | **{scores['confident_fraction']:.3f}** |",
        "",
        f"Targets: FID <= 3x the floor, confident fraction >= 0.9 ({n} held-out real digits: {real_confident:.3f}).",
    ]


def euler_cap(n: int = SAMPLER_SAMPLES) -> list[str]:
    """Euler (Karras) on the shipped model with the schedule's sigma_max (2 x 10^4, from the clipped last beta)
    and capped at EDM's 80, from the same noise: FID with its bootstrap spread, confident fraction."""
    model, schedule, classifier = load_model(NAME), make_schedule(**SCHEDULE), load_digit_classifier()
    rows = []
    for steps in (10, 20):
        for cap in (None, 80.0):
            samples, _ = draw_samples(model, schedule, "Euler (Karras)", steps, n, sigma_max=cap)
            scores = sample_scores(classifier, samples)
            rows.append(
                f"| {steps} | {'schedule (2.0e4)' if cap is None else f'{cap:g}'} | {scores['fid']:.2f} ± "
                f"{scores['fid_sd']:.2f} | {scores['fid_floor']:.2f} ± {scores['fid_floor_sd']:.2f} | "
                f"{scores['confident_fraction']:.3f} |"
            )
            print(rows[-1], flush=True)
    return [
        f"Model {model_status()}: {n} Euler (Karras) samples per row from the same noise, against {n} held-out "
        "digits; spreads are bootstrap standard deviations. Chapter 5 explains the cap: with the schedule's "
        "sigma_max, half of 10 Karras levels lie above sigma = 600 (timesteps 998-999).",
        "",
        "| steps | sigma_max | FID ± sd | floor ± sd | confident |",
        "|---:|---|---:|---:|---:|",
        *rows,
    ]


def latent(n: int = SAMPLER_SAMPLES, steps: int = 50) -> list[str]:
    """Pixel against latent diffusion, the same recipe and sampler: per-call cost, time per image, FID."""
    classifier = load_digit_classifier()
    vae, latent_card = load_model("vae_mnist"), load_card("latent_mnist_eps")
    scale = latent_card["latents"]["scaling_factor"]
    models = {  # name: (model, what it diffuses, what turns its samples into digits, the x0_hat clip range)
        "pixel": (load_model(NAME), IMAGE_SHAPE, None, True),
        "latent": (load_model("latent_mnist_eps"), LATENT_SHAPE, lambda z0: vae.decode(z0 / scale), LATENT_CLIP),
    }
    rows, measured = [], {}
    for name, (model, shape, decoder, clip_x0) in models.items():
        call_ms = ms_per_call(model, shape)
        schedule = make_schedule(**load_card(NAME if name == "pixel" else "latent_mnist_eps")["schedule"])
        samples, seconds = draw_samples(
            model, schedule, "DDIM", steps, n, decoder=decoder, shape=shape, clip_x0=clip_x0
        )
        scores = sample_scores(classifier, samples)
        measured[name] = (call_ms, seconds, scores)
        rows.append(
            f"| {name} | {shape} | {parameter_count(model) / 1e6:.2f} M | {call_ms:.0f} | {1000 * seconds / n:.1f} | "
            f"{scores['fid']:.2f} ± {scores['fid_sd']:.2f} | {scores['confident_fraction']:.3f} |"
        )
    (pixel_call, pixel_s, pixel), (latent_call, latent_s, latent_scores) = measured["pixel"], measured["latent"]
    return [
        f"Models `{NAME}` and `latent_mnist_eps` ({latent_card['training']['status']}, decoder `vae_mnist`), trained "
        f"with the same recipe; {n} DDIM-{steps} samples each from the same seed (x0_hat clipped to [-1, 1] for "
        f"pixels, [-{LATENT_CLIP}, {LATENT_CLIP}] for latents), the latent time including the decoder; FID against "
        f"{n} held-out digits, real-vs-real floor {pixel['fid_floor']:.2f}.",
        "",
        "| model | diffuses | parameters | ms / call (batch 50) | ms / image | FID ± sd | confident (>= 0.9) |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"- per network call: latent **{pixel_call / latent_call:.1f}x** cheaper; per image end to end: "
        f"**{pixel_s / latent_s:.1f}x** faster (target >= 3x).",
        f"- FID latent / pixel: **{latent_scores['fid'] / pixel['fid']:.2f}** (target <= 1.5).",
    ]


FLOW_CALLS = (5, 10, 20, 50)


def flow(n: int = SAMPLER_SAMPLES) -> list[str]:
    """DDIM on the eps model against Euler and Heun on the flow model (chapter 10) at the same network calls
    (Heun with s steps makes 2s - 1 calls: the odd count at or below each budget), from the same noise."""
    classifier, eps_model, flow_model = load_digit_classifier(), load_model(NAME), load_model("unet_mnist_flow")
    status = load_card("unet_mnist_flow")["training"]["status"]
    schedule = make_schedule(**SCHEDULE)
    results = {"models": [NAME, "unet_mnist_flow"], "flow_status": status, "machine": describe_machine()}
    results.update({"date": str(date.today()), "n": n, "runs": []})
    for calls in FLOW_CALLS:
        heun_steps = (calls + 1) // 2
        runs = [
            ("DDIM", calls, partial(draw_samples, eps_model, schedule, "DDIM", calls, n)),
            ("Euler", calls, partial(draw_flow_samples, flow_model, "euler", calls, n)),
            ("Heun", 2 * heun_steps - 1, partial(draw_flow_samples, flow_model, "heun", heun_steps, n)),
        ]
        for sampler, used, draw in runs:
            samples, seconds = draw()
            scores = sample_scores(classifier, samples)
            results["runs"].append({"sampler": sampler, "calls": used, "seconds": seconds, **scores})
            save_results("flow", results)
            print(f"{sampler}, {used} calls: FID {scores['fid']:.2f}, {seconds:.0f} s", flush=True)
    rows = [
        f"| {run['sampler']} | {run['calls']} | {run['fid']:.2f} ± {run['fid_sd']:.2f} | {run['kid'] * 1000:.2f} | "
        f"{run['confident_fraction']:.3f} | {1000 * run['seconds'] / n:.0f} |"
        for run in results["runs"]
    ]
    return [
        f"Models `{NAME}` (DDIM, trailing spacing, x0_hat clipped) and `unet_mnist_flow` ({status}; Euler and Heun "
        f"on the uniform grid); {n} samples per run from the same noise; FID and KID against {n} held-out digits "
        f"(floor {results['runs'][0]['fid_floor']:.2f} ± {results['runs'][0]['fid_floor_sd']:.2f}). Also written to "
        "`data/benchmarks/flow.json`.",
        "",
        "| sampler | network calls | FID ± sd | KID x 1000 | confident (>= 0.9) | ms / image |",
        "|---|---:|---:|---:|---:|---:|",
        *rows,
    ]


FIGURES = {
    "unet_speed": unet_speed,
    "unet_loss": unet_loss,
    "samplers": samplers,
    "euler_cap": euler_cap,
    "shipped": shipped,
    "latent": latent,
    "guidance": guidance,
    "flow": flow,
    "captions": captions,
    "comparison": comparison,
    "flagship": flagship,
    "flagship_long": partial(flagship, figure="flagship_long"),
    "transformer": transformer,
}
SAMPLED = (
    "samplers",
    "euler_cap",
    "latent",
    "guidance",
    "flow",
    "captions",
    "comparison",
    "flagship",
    "flagship_long",
    "transformer",
)  # the figures that take --samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figures", nargs="*", help=f"figures to measure, of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--samples", type=int, default=SAMPLER_SAMPLES, help="digits per sampler, model or scale")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="flagship figures only: processes drawing their chunks, one torch thread each",
    )
    args = parser.parse_args()
    if args.threads < 0:
        parser.error(f"--threads must be >= 0; got {args.threads}")
    if not 2 <= args.samples <= 1000:
        parser.error(f"--samples must lie in 2..1000 (the held-out digits); got {args.samples}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1; got {args.workers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [name for name in args.figures if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]!r}; valid: {', '.join(FIGURES)}")
    for name in args.figures or FIGURES:
        start = time.perf_counter()
        if name in STAGES:
            lines = flagship(args.samples, args.workers, figure=name)
        else:
            lines = FIGURES[name](args.samples) if name in SAMPLED else FIGURES[name]()
        options = f" --threads {args.threads}" if args.threads else ""
        options += f" --samples {args.samples}" if name in SAMPLED else ""
        options += f" --workers {args.workers}" if name in STAGES and args.workers > 1 else ""
        header = (
            f"Measured {date.today()} with `python scripts/bench.py {name}{options}` on {describe_machine()}, "
            f"{torch.get_num_threads()} torch thread(s)."
        )
        replace_section(REPORT, f"bench:{name}", [f"### {name}", "", header, "", *lines])
        print(f"{name}: written to {REPORT.name} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
