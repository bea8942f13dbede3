"""The training loop keeps good work: a diverged run stops before it saves, an interrupt saves and restores eval
mode, a checkpoint refuses another schedule or other data, and bad settings are refused by name."""

import signal
import threading
from dataclasses import replace

import pytest
import torch

from course_lib.ddpm import simple_loss
from course_lib.edm import edm_loss
from course_lib.flow import flow_loss, reflow_loss
from course_lib.nets.mlp import MLPDenoiser
from course_lib.recipes import COMPARISON, RECIPES, TRANSFORMER_STUDY, build, prediction_type
from course_lib.schedules import make_schedule
from course_lib.train import LOSSES, OBJECTIVES, TrainConfig, train

CONFIG = TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup=1, checkpoint_every_s=0.0, seed=0)


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLPDenoiser(data_dim=2, hidden=16, depth=1)


def data(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(0))


def weights(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


class Poisonable(torch.nn.Module):
    """A tiny denoiser whose output turns NaN from its call number `poison_from` on: a run that diverges."""

    def __init__(self, poison_from: int):
        super().__init__()
        self.net, self.calls, self.poison_from = tiny(), 0, poison_from

    def forward(self, xt, t):
        self.calls += 1
        out = self.net(xt, t)
        return out * float("nan") if self.calls >= self.poison_from else out


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    checkpoint, schedule = tmp_path / "run.pt", make_schedule("linear", 50)
    model = Poisonable(poison_from=4)  # steps 0-2 are good and saved (checkpoint_every_s=0), step 3 diverges
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3.*still holds the last good state"):
        train(model, schedule, data(), CONFIG, checkpoint=checkpoint, progress=False)
    after = torch.load(checkpoint, weights_only=True)
    assert after["step"] == 3, "the checkpoint must be the one saved after the last good step"
    assert all(torch.isfinite(value).all() for value in model.state_dict().values()), "NaN reached the weights"
    assert not model.training, "the model must be left in eval mode"


def test_nan_in_the_data_stops_at_the_first_step():
    poisoned = data()
    poisoned[::2] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        train(tiny(), make_schedule("linear", 50), poisoned, CONFIG, progress=False)


def test_a_huge_learning_rate_stops_on_the_first_non_finite_value():
    model = tiny()
    schedule = make_schedule("linear", 50)
    with pytest.raises(FloatingPointError, match="training diverged"):
        train(model, schedule, data() * 1e30, replace(CONFIG, lr=1e30, grad_clip=None), progress=False)


def test_an_interrupt_saves_the_run_and_restores_eval_mode(tmp_path):
    """The notebook's Stop button raises KeyboardInterrupt inside the loop: the work so far is saved."""
    checkpoint, schedule = tmp_path / "run.pt", make_schedule("linear", 50)
    calls = {"n": 0}

    class StopAfterFour(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = tiny()

        def forward(self, xt, t):
            calls["n"] += 1
            if calls["n"] == 5:  # during step 5, as a user's interrupt would
                raise KeyboardInterrupt
            return self.net(xt, t)

    model = StopAfterFour()
    config = replace(CONFIG, checkpoint_every_s=1e9)  # no periodic save: only the interrupt saves
    with pytest.raises(KeyboardInterrupt):
        train(model, schedule, data(), config, checkpoint=checkpoint, progress=False)
    assert not model.training
    assert torch.load(checkpoint, weights_only=True)["step"] == 4


def test_resuming_with_another_schedule_or_other_data_is_refused(tmp_path):
    checkpoint = tmp_path / "run.pt"
    train(tiny(), make_schedule("linear", 50), data(), CONFIG, budget_s=1e-9, checkpoint=checkpoint, progress=False)
    with pytest.raises(ValueError, match="another schedule or other data.*schedule"):
        train(tiny(), make_schedule("cosine", 50), data(), CONFIG, checkpoint=checkpoint, progress=False)
    with pytest.raises(ValueError, match="another schedule or other data.*data"):
        train(tiny(), make_schedule("linear", 50), data() + 1, CONFIG, checkpoint=checkpoint, progress=False)
    state, _ = train(tiny(), make_schedule("linear", 50), data(), CONFIG, checkpoint=checkpoint, progress=False)
    assert state.step == CONFIG.steps


def test_a_truncated_checkpoint_is_named(tmp_path):
    checkpoint = tmp_path / "run.pt"
    train(tiny(), make_schedule("linear", 50), data(), CONFIG, budget_s=1e-9, checkpoint=checkpoint, progress=False)
    checkpoint.write_bytes(checkpoint.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"run\.pt is not a readable checkpoint"):
        train(tiny(), make_schedule("linear", 50), data(), CONFIG, checkpoint=checkpoint, progress=False)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(lr=float("nan")), "lr=nan"),
        (dict(grad_clip=0.0), "grad_clip=0.0"),
        (dict(objective="flow", min_snr_gamma=5.0), "min_snr_gamma=5.0"),
        (dict(time_sampling="lognormal"), "time_sampling 'lognormal'"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **settings)


def test_empty_data_and_a_negative_budget_are_refused():
    with pytest.raises(ValueError, match="no training data"):
        train(tiny(), make_schedule("linear", 50), torch.zeros(0, 2), CONFIG, progress=False)
    with pytest.raises(ValueError, match="budget_s=-5"):
        train(tiny(), make_schedule("linear", 50), data(), CONFIG, budget_s=-5, progress=False)


def test_a_step_loss_that_draws_the_default_minibatch_trains_exactly_as_the_default():
    schedule, x = make_schedule("linear", 50), data()

    def step_loss(net, generator):  # the default's steps 1-2, written out
        index = torch.randint(0, len(x), (CONFIG.batch_size,), generator=generator)
        return LOSSES["ddpm"](net, schedule, x[index], generator, None, CONFIG)

    default, hooked = tiny(), tiny()
    train(default, schedule, x, CONFIG, progress=False)
    train(hooked, schedule, x, CONFIG, progress=False, step_loss=step_loss)
    assert all(torch.equal(a, b) for a, b in zip(weights(default).values(), weights(hooked).values(), strict=True))
    with pytest.raises(ValueError, match="condition or step_loss"):
        train(tiny(), schedule, x, CONFIG, progress=False, step_loss=step_loss, condition=lambda i, g: i)


@pytest.mark.parametrize("objective", [o for o in OBJECTIVES if o != "reflow"])
def test_every_objective_lowers_its_loss_on_a_fixed_batch(objective):
    """Overfit two points: each objective's loss falls (the loss table calls each one correctly)."""
    torch.manual_seed(0)
    model = MLPDenoiser(data_dim=2, hidden=64, depth=2)
    schedule = make_schedule("cosine", 100) if objective == "ddpm" else None
    config = replace(CONFIG, steps=300, batch_size=64, lr=3e-3, warmup=10, objective=objective, ema_decay=None)
    state, _ = train(model, schedule, data(2).repeat(32, 1), config, progress=False)  # two points: learnable
    first, last = sum(state.losses[:30]) / 30, sum(state.losses[-30:]) / 30
    assert last < 0.8 * first, f"{objective}: loss {first:.3f} -> {last:.3f}"


def test_the_loss_table_calls_each_objective_with_the_configs_options():
    """LOSSES[objective] equals the direct call of its function with the config's options, on the same draws."""
    model, schedule, x0 = tiny(), make_schedule("cosine", 100), data(16)
    direct = {
        "ddpm": lambda g: simple_loss(model, schedule, x0, g, "v", 5.0),
        "flow": lambda g: flow_loss(model, x0, g, time_sampling="logit_normal"),
        "reflow": lambda g: reflow_loss(model, torch.stack([x0, x0.flip(0)], 1), g, time_sampling="logit_normal"),
        "edm": lambda g: edm_loss(model, x0, g),
    }
    for objective, call in direct.items():
        config = replace(CONFIG, objective=objective, time_sampling="logit_normal")
        if objective == "ddpm":
            config = replace(config, prediction_type="v", min_snr_gamma=5.0)
        batch = torch.stack([x0, x0.flip(0)], 1) if objective == "reflow" else x0
        ours = LOSSES[objective](model, schedule, batch, torch.Generator().manual_seed(3), None, config)
        assert torch.equal(ours, call(torch.Generator().manual_seed(3))), objective


def test_the_comparison_recipes_differ_only_in_their_objective():
    """Chapter 11's equal-budget comparison: same network, seed, steps, batch and learning rate for every run."""
    recipes = [RECIPES[name] for name in COMPARISON]
    assert {prediction_type(recipe) for recipe in recipes} == {"eps", "v", "velocity", "edm"}
    for recipe in recipes:
        assert recipe.model == recipes[0].model and recipe.init_from is None
        for field in ("steps", "batch_size", "lr", "warmup", "seed", "ema_decay", "grad_clip"):
            assert getattr(recipe.config, field) == getattr(recipes[0].config, field), (recipe.name, field)
    assert recipes[0].config.steps * recipes[0].config.batch_size == 256_000


def test_every_shipped_card_says_what_its_model_is_in_its_recipes_words():
    """Two unconditional digit models ship (the eps base and the flow flagship): each card says which is which."""
    from course_lib.data import data_dir
    from course_lib.weights import load_card

    shipped = [name for name in RECIPES if (data_dir() / f"{name}.json").exists()]
    assert {"unet_mnist_eps", "cmp_flow_logit"} <= set(shipped)
    for name in shipped:
        assert RECIPES[name].about and load_card(name).get("about") == RECIPES[name].about, name
    assert "base of every fine-tuned" in RECIPES["unet_mnist_eps"].about
    assert "flagship" in RECIPES["unet_mnist_flow_logit"].about


def test_images_seen_in_all_count_down_the_whole_chain_of_models_trained_from_one_another(tmp_path):
    """A model trained from one that was itself trained from another saw all three runs' images: the count follows
    init_from to the end (unet_mnist_flow_logit_long's first card counted only its parent's own 512,000)."""
    import json

    from course_lib.data import data_dir, record_sha256
    from course_lib.weights import images_seen_in_all, load_card

    chain = {"a": (100, None), "b": (20, "a"), "c": (3, "b")}
    for name, (images, start) in chain.items():
        training = {
            "images_seen": images,
            **({"init_from": f"data/{start}.safetensors (new layers ...)"} if start else {}),
        }
        (tmp_path / f"{name}.json").write_text(json.dumps({"training": training}))
        record_sha256(tmp_path / f"{name}.json")
    assert [images_seen_in_all(name, tmp_path) for name in "abc"] == [100, 120, 123]
    for path in sorted(data_dir().glob("*.json")):  # every shipped card that records the sum holds the chain's
        training = load_card(path.stem).get("training")
        if isinstance(training, dict) and "images_seen_in_all" in training:
            assert training["images_seen_in_all"] == images_seen_in_all(path.stem), path.stem
    assert images_seen_in_all("unet_mnist_flow_logit") == 768_000  # the goal: as many as unet_mnist_eps
    assert images_seen_in_all("unet_mnist_flow_logit") == images_seen_in_all("unet_mnist_eps")


def test_the_transformer_study_trains_every_network_on_the_same_data_and_recipe():
    """Chapter 12: the DiTs and the latent UNet differ in their network only (flow on the same latents, labels)."""
    recipes = [RECIPES[name] for name in TRANSFORMER_STUDY]
    assert {recipe.model_class.rsplit(".", 1)[1] for recipe in recipes} == {"UNet", "DiT"}
    widths = [recipe.model["width"] for recipe in recipes if recipe.model_class.endswith("DiT")]
    assert widths == sorted(widths) and len(widths) == 3
    for recipe in recipes:
        assert (recipe.config, recipe.latents, recipe.condition, recipe.schedule) == (
            recipes[0].config,
            "vae_mnist",
            "labels",
            None,
        ), recipe.name
        assert prediction_type(recipe) == "velocity" and build(recipe)(
            torch.zeros(2, 4, 7, 7), torch.tensor([0.0, 500.0]), torch.tensor([3, 10])
        ).shape == (2, 4, 7, 7)


def test_a_sigint_during_training_saves(tmp_path):
    """The same through a real SIGINT, as Jupyter's Stop button sends it to the kernel."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # a background job of a shell: it would train forever
        pytest.fail(
            "SIGINT is ignored in this process (run in the background by a shell?): run the tests in the "
            "foreground, or from a process that restores SIGINT"
        )
    checkpoint = tmp_path / "run.pt"
    timer = threading.Timer(1.0, lambda: signal.raise_signal(signal.SIGINT))
    config = replace(CONFIG, steps=10**7, checkpoint_every_s=1e9)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            train(tiny(), make_schedule("linear", 50), data(), config, checkpoint=checkpoint, progress=False)
    finally:
        timer.cancel()
    assert torch.load(checkpoint, weights_only=True)["step"] > 0


LAUNCHER = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {scripts!r})
import train_unet
import course_lib.train
from course_lib.recipes import Recipe
from course_lib.train import TrainConfig

TINY = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)
config = TrainConfig(steps=10**6, batch_size=4, lr=1e-3, warmup=1, ema_decay=0.9, checkpoint_every_s=1e9)
train_unet.RECIPES["tiny"] = Recipe("tiny", TINY, config, schedule=dict(name="cosine", T=100))
train_unet.load_digits = lambda split: (torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
real = course_lib.train.warmup_cosine


def marking(step, steps, warmup):  # called once a step: tells the test how far training has got
    Path({marker!r}).write_text(str(step))
    return real(step, steps, warmup)


course_lib.train.warmup_cosine = marking
sys.argv = ["train_unet.py", "--recipe", "tiny", "--threads", "1", "--budget-minutes", "60", "--checkpoint", {ckpt!r}]
train_unet.stop_on_signals()
try:
    sys.exit(train_unet.main())
except KeyboardInterrupt as stop:
    raise SystemExit(f"stopped ({{stop}})") from None
"""


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_the_training_script_saves_when_killed_in_the_background(tmp_path, signal_name):
    """A shell starts background jobs with SIGINT ignored; the end of a session sends SIGTERM. Either way the
    script saves its checkpoint before it exits."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    marker, checkpoint = tmp_path / "running", tmp_path / "tiny.pt"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER.format(scripts=str(root / "scripts"), marker=str(marker), ckpt=str(checkpoint)))
    ignore_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)  # noqa: E731  as `command &` does
    process = subprocess.Popen(
        [sys.executable, str(launcher)],
        cwd=root,
        preexec_fn=ignore_sigint,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # until step 3 has begun
        if marker.exists() and marker.read_text() not in ("", "0", "1", "2"):
            break
        time.sleep(0.1)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and f"stopped (signal {signal_name})" in stderr, stderr[-2000:]
    assert torch.load(checkpoint, weights_only=True)["step"] >= 3


def test_the_exported_loss_curve_averages_equal_runs_of_steps():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_unet import loss_curve

    curve = loss_curve(torch.arange(2000.0))
    assert curve["steps_per_point"] == 20 and len(curve["mean_loss"]) == 100
    assert curve["mean_loss"][:2] == [9.5, 29.5]  # the means of steps 0-19 and 20-39
    assert loss_curve(torch.tensor([])) == {"steps_per_point": 1, "mean_loss": []}


def test_a_finished_and_exported_run_is_not_trained_again(tmp_path):
    """Found in session 7: `--recipe comparison` restarted cmp_eps from step 0 because its checkpoint had been
    removed after export; the exported card now counts as the run's progress."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_unet import steps_done

    checkpoint, card = tmp_path / "run.pt", tmp_path / "run.json"
    assert steps_done(checkpoint, card) == 0
    card.write_text(json.dumps({"training": {"steps_done": 2000}}))
    assert steps_done(checkpoint, card) == 2000
    torch.save({"step": 17}, checkpoint)  # a checkpoint, when there is one, is the newer record
    assert steps_done(checkpoint, card) == 17
