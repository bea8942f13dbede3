"""Chapter 11's one frame: the conversion table, every kind of model as D(x; sigma), Tweedie's score, and the ODE
samplers written once, checked against exact mixture scores, DDIM, DPM-Solver++ and diffusers."""

import math

import pytest
import torch

from course_lib import edm
from course_lib.ddpm import OUTPUT_KINDS, prediction_targets, split_output, v_from_x0_eps
from course_lib.frame import (
    Denoiser,
    annealed_langevin,
    as_vp_model,
    denoiser,
    levels,
    ode_sample,
    score,
    solver_steps,
)
from course_lib.samplers import ddim_sample, spaced_timesteps
from course_lib.schedules import make_schedule
from course_lib.solvers import dpm_solver_sample, dpm_solver_timesteps, karras_levels, karras_sigmas, sigma_of_timestep
from course_lib.toy import GaussianMixture, ring_2d


@pytest.fixture(autouse=True)
def float64_defaults():
    """Exact references: these tests compute in float64 (set per test, so other test files are untouched)."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def ve_mixture(mixture: GaussianMixture, sigma: float) -> GaussianMixture:
    """The mixture noised to sigma in the VE frame: x = x0 + sigma eps."""
    return GaussianMixture(mixture.means, (mixture.stds**2 + sigma**2).sqrt(), mixture.weights)


def exact_x0(mixture: GaussianMixture, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x] by Tweedie, from the exact score of the noised mixture."""
    return x + sigma**2 * ve_mixture(mixture, sigma).score(x)


@pytest.mark.parametrize("kind", OUTPUT_KINDS)
@pytest.mark.parametrize("signal, noise", [(0.8, 0.6), (1.0, 3.0), (0.3, 0.7)])  # VP, VE, flow paths
def test_the_conversion_table_reads_back_what_it_writes(kind, signal, noise):
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    x = signal * x0 + noise * eps
    target = prediction_targets(x0, eps, signal, noise)[kind]
    x0_hat, eps_hat = split_output(x, target, kind, signal, noise)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_the_table_agrees_with_diffusers_and_with_the_earlier_chapters():
    diffusers = pytest.importorskip("diffusers")
    schedule = make_schedule("cosine", T=1000)
    x0, eps, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, trained_betas=schedule.betas.numpy())
    v_diffusers = scheduler.get_velocity(x0.float(), eps.float(), t).double()
    torch.testing.assert_close(v_from_x0_eps(schedule, x0, eps, t), v_diffusers, atol=1e-5, rtol=1e-5)
    # flow matching's target in diffusers' SD3 training script is noise - model_input: our "velocity"
    targets = prediction_targets(x0, eps, 0.6, 0.4)
    torch.testing.assert_close(targets["velocity"], eps - x0)
    # the score of a Gaussian N(s x0, n^2) around x = s x0 + n eps is -eps / n
    torch.testing.assert_close(targets["score"], -((0.6 * x0 + 0.4 * eps) - 0.6 * x0) / 0.4**2)


def test_split_output_refuses_an_unknown_kind_by_name():
    with pytest.raises(ValueError, match="unknown prediction_type 'noise'.*score, velocity"):
        split_output(torch.zeros(2), torch.zeros(2), "noise", 1.0, 1.0)


# --- every kind of model as D(x; sigma) --------------------------------------------------------------------------


def exact_vp_eps_model(mixture, schedule):
    """E[eps | x_t] at any (fractional) timestep: the exact VP eps-model of the mixture."""

    def model(xt, t):
        sigma = sigma_of_timestep(schedule, t)[:, None]  # (B, 1)
        return mixture.optimal_eps(xt, 1 / (1 + sigma**2))

    return model


def exact_flow_model(mixture):
    """E[eps - x0 | x_t] on the straight path: the exact velocity model, called with t * 1000 as chapter 10's."""

    def model(xt, time_input):
        t = (time_input / 1000)[:, None]  # (B, 1)
        sigma = t / (1 - t)
        x = xt / (1 - t)  # the VE state
        x0 = torch.cat([exact_x0(mixture, x[i : i + 1], s.item()) for i, s in enumerate(sigma)])
        return (x - x0) / sigma - x0  # eps - x0

    return model


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_a_vp_eps_model_and_a_flow_model_give_the_same_exact_denoiser(sigma):
    mixture, schedule = ring_2d(), make_schedule("cosine", T=1000)
    x = mixture.sample(64, torch.Generator().manual_seed(0)).double() + sigma * torch.randn(64, 2)
    want = exact_x0(mixture, x, sigma)
    vp = denoiser(exact_vp_eps_model(mixture, schedule), "eps", schedule, clip=None)
    flow = denoiser(exact_flow_model(mixture), "velocity", clip=None)
    torch.testing.assert_close(vp(x, sigma), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(flow(x, sigma), want, atol=1e-6, rtol=1e-6)
    # Tweedie: the score of the noised data from the denoiser
    torch.testing.assert_close(score(vp, x, sigma), ve_mixture(mixture, sigma).score(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t", [0, 37, 500.25, 999])
def test_a_flow_model_as_a_vp_model_predicts_the_exact_noise(t):
    # as_vp_model inverts `denoiser`: the exact flow model, read on the cosine clock, is the exact VP eps-model
    mixture, schedule = ring_2d(), make_schedule("cosine", T=1000)
    vp_flow = as_vp_model(denoiser(exact_flow_model(mixture), "velocity", clip=None), schedule)
    xt = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    timesteps = torch.full((16,), t, dtype=torch.float64 if isinstance(t, float) else torch.long)
    want = exact_vp_eps_model(mixture, schedule)(xt, timesteps)
    torch.testing.assert_close(vp_flow(xt, timesteps), want, atol=1e-6, rtol=1e-5)
    assert vp_flow.prediction_type == "eps"
    with pytest.raises(ValueError, match="one timestep per batch"):
        vp_flow(xt[:2], torch.tensor([3, 4]))


def test_an_edm_network_is_read_through_its_preconditioning():
    network = lambda x, t: torch.tanh(x) * (1 + t[:, None] / 1000)  # noqa: E731
    x = torch.randn(6, 2)
    d = denoiser(network, "edm", clip=None)
    torch.testing.assert_close(d(x, 1.7), edm.denoise(network, x, 1.7))
    assert (d.sigma_min, d.sigma_max) == (edm.SIGMA_MIN, edm.SIGMA_MAX) and d.calls == 1


def test_denoiser_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="declares no prediction_type"):
        denoiser(lambda x, t: x)
    with pytest.raises(ValueError, match="pass the schedule"):
        denoiser(lambda x, t: x, "eps")
    with pytest.raises(ValueError, match="sigma must be > 0"):
        denoiser(lambda x, t: x, "edm")(torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="clip must be > 0"):
        Denoiser(lambda x, s: x, 0.1, 1.0, clip=0)


def test_a_zero_terminal_snr_schedule_maps_every_level_to_a_timestep():
    schedule = make_schedule("cosine", T=1000, zero_terminal_snr=True)
    seen = []
    d = denoiser(lambda xt, t: seen.append(t[0].item()) or torch.zeros_like(xt), "v", schedule)
    for sigma in (1e-3, 1.0, 80.0, 1e6):
        d(torch.ones(1, 2), sigma)
    assert all(0 <= t <= 999 for t in seen) and seen == sorted(seen), seen
    assert math.isfinite(d.sigma_max) and d.sigma_max >= 80


# --- the samplers ---------------------------------------------------------------------------------------------


def test_euler_on_the_levels_of_ddims_timesteps_is_ddim():
    """DDIM (eta = 0) is the Euler method of the probability-flow ODE in (sigma, x / sqrt(alpha_bar))."""
    mixture, schedule = ring_2d(), make_schedule("cosine", T=1000)
    model = exact_vp_eps_model(mixture, schedule)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    ddim, _ = ddim_sample(model, schedule, x_T, steps=10)
    timesteps = torch.tensor(spaced_timesteps(1000, 10, "trailing"))
    sigmas = torch.cat([sigma_of_timestep(schedule, timesteps), torch.zeros(1)])
    start = x_T / (1 - schedule.alpha_bar[timesteps[0]]).sqrt()  # the VE state of x_T, divided by sigma_0
    euler = ode_sample(denoiser(model, "eps", schedule, clip=None), start, sigmas, "euler")
    torch.testing.assert_close(euler, ddim, atol=1e-6, rtol=1e-6)


def test_dpmpp_2m_in_the_ve_frame_is_dpm_solver_on_the_same_timesteps():
    mixture, schedule = ring_2d(), make_schedule("cosine", T=1000)
    model = exact_vp_eps_model(mixture, schedule)
    x_T = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    reference, _ = dpm_solver_sample(model, schedule, x_T, steps=8)
    timesteps = torch.tensor(dpm_solver_timesteps(1000, 8))
    sigmas = torch.cat([sigma_of_timestep(schedule, timesteps), torch.zeros(1)])
    start = x_T / (1 - schedule.alpha_bar[timesteps[0]]).sqrt()
    ours = ode_sample(denoiser(model, "eps", schedule, clip=None), start, sigmas, "dpmpp_2m")
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_heun_is_second_order_and_the_solvers_agree_in_the_limit():
    """On the exact denoiser, each solver's endpoint approaches a 400-step Heun reference; halving the step roughly
    halves Euler's error and quarters Heun's."""
    mixture = ring_2d()
    d = Denoiser(lambda x, sigma: exact_x0(mixture, x, sigma), 0.01, 80.0, clip=None)
    x_T = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    reference = ode_sample(d, x_T, karras_levels(400, 0.01, 80.0), "heun")

    def error(solver, steps):
        return (ode_sample(d, x_T, karras_levels(steps, 0.01, 80.0), solver) - reference).norm(dim=1).mean().item()

    euler, heun = [error("euler", n) for n in (40, 80)], [error("heun", n) for n in (40, 80)]
    assert 1.6 < euler[0] / euler[1] < 2.6, euler
    assert heun[0] / heun[1] > 3.0 and heun[1] < euler[1] / 5, heun
    assert error("dpmpp_2m", 80) < euler[1] / 5


def test_solvers_count_their_network_calls():
    d = Denoiser(lambda x, sigma: 0 * x, 0.01, 80.0)
    for solver, calls in (("euler", 10), ("heun", 10), ("dpmpp_2m", 20)):
        d.calls = 0
        ode_sample(d, torch.randn(2, 2), levels(d, solver_steps(solver, calls)), solver)
        assert d.calls == (9 if solver == "heun" else calls), (solver, d.calls)


def test_levels_cap_the_top_and_match_the_schedules_karras_sigmas():
    schedule = make_schedule("cosine", T=1000)
    d = denoiser(lambda x, t: x, "eps", schedule)
    torch.testing.assert_close(levels(d, 10, sigma_max=80.0), karras_sigmas(schedule, 10, sigma_max=80.0))
    assert levels(d, 10)[0].item() == pytest.approx(80.0)


def test_ode_sample_refuses_bad_levels():
    d = Denoiser(lambda x, sigma: x, 0.01, 80.0)
    for bad in ([1.0, 0.5], [1.0, 2.0, 0.0], [0.0]):
        with pytest.raises(ValueError, match="sigmas must"):
            ode_sample(d, torch.zeros(1, 2), torch.tensor(bad))


def test_annealed_langevin_with_the_exact_score_recovers_the_mixture():
    """Annealing finds the modes' weights (0.25 / 0.75), which Langevin at the last level alone does not: started
    wide, its chains stay in the mode nearest their start, half on each side."""
    mixture = GaussianMixture(means=[[-2.0], [2.0]], stds=[0.3, 0.3], weights=[0.25, 0.75])

    def run(sigmas, steps_per_level):
        generator = torch.Generator().manual_seed(4)
        x = 3.0 * torch.randn(4000, 1, generator=generator)
        x = annealed_langevin(
            lambda x, sigma: ve_mixture(mixture, sigma).score(x), x, sigmas, steps_per_level, 0.5 * 0.05**2, generator
        )
        return x, (x > 0).double().mean().item()

    x, right = run(torch.logspace(math.log10(3.0), math.log10(0.05), 10), 50)
    assert abs(right - 0.75) < 0.03, right
    assert abs(x[x > 0].std().item() - math.sqrt(0.3**2 + 0.05**2)) < 0.03
    _, right_unannealed = run(torch.tensor([0.05]), 500)
    assert abs(right_unannealed - 0.5) < 0.05, right_unannealed


def test_draw_ode_samples_batches_and_counts_calls():
    from course_lib.sampling import draw_ode_samples

    d = Denoiser(lambda x, sigma: torch.full_like(x, 0.5), 0.01, 80.0)
    samples, seconds = draw_ode_samples(d, "heun", 10, n=7, batch_size=4)
    assert samples.shape == (7, 1, 28, 28) and seconds >= 0
    torch.testing.assert_close(samples, torch.full_like(samples, 0.5))  # every path ends at D's answer
    assert d.calls == 2 * 9  # two batches, Heun with 5 levels: 9 calls each
