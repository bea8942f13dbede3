"""scripts/train_unet.py under `accelerate launch`: two CPU processes train one model, stop together, and resume.

The script runs through its own main(). A small launcher, written into the test's folder, only adds a tiny recipe
to its RECIPES, serves 64 shipped digits from a file (the processes skip importing `datasets`), and records what
each process's `train` call did. Two CPU processes: `accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=true
(torchrun-style processes on the gloo backend; `--cpu` alone starts several processes only through mpirun).
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from course_lib.data import load_digits

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("accelerate") is None,
    reason="accelerate is not installed (part of the `dev` extra: pip install accelerate)",
)

LAUNCHER = """
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {scripts!r})
import train_unet
import course_lib.train
from course_lib.train import TrainConfig

TINY = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)
config = TrainConfig(steps=4, batch_size=8, lr=1e-3, warmup=1, ema_decay=0.9, checkpoint_every_s=0.0)
train_unet.RECIPES["tiny"] = train_unet.Recipe("tiny", TINY, config, schedule=dict(name="cosine", T=100))
train_unet.load_digits = lambda split: torch.load({digits!r}, weights_only=True)
out = Path(os.environ["RESULTS"])
resumed, writes = [], []


def recording_load(path, model, optimizer, ema, generator, *args):
    state = real_load(path, model, optimizer, ema, generator, *args)
    resumed.append(generator.get_state())  # where this process's random stream continues
    return state


def recording_replace(source, target):  # the checkpoint files this process writes
    writes.append(str(target))
    real_replace(source, target)


def recording_train(model, *args, accelerator, **kwargs):
    state, ema = real_train(model, *args, accelerator=accelerator, **kwargs)
    rank = accelerator.process_index
    weights = dict(model=model.state_dict(), ema=ema.model.state_dict(), resumed=resumed)
    torch.save(weights, out / f"rank{{rank}}.pt")
    record = dict(processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision)
    record.update(step=state.step, losses=state.losses, writes=len(writes))
    (out / f"rank{{rank}}.json").write_text(json.dumps(record))
    return state, ema


real_load, course_lib.train.load_checkpoint = course_lib.train.load_checkpoint, recording_load
real_replace, course_lib.train.os.replace = os.replace, recording_replace
real_train, train_unet.train = train_unet.train, recording_train
sys.exit(train_unet.main())
"""


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("accelerate")
    images, labels = load_digits("train")
    torch.save((images[:64].clone(), labels[:64].clone()), folder / "digits.pt")
    path = folder / "launch_train_unet.py"
    path.write_text(textwrap.dedent(LAUNCHER.format(scripts=str(ROOT / "scripts"), digits=str(folder / "digits.pt"))))
    return path


def launch(launcher: Path, results: Path, checkpoint: Path, *options: str) -> list[dict]:
    """The script on two CPU processes; each rank's record, its weights under "weights"."""
    results.mkdir()
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", str(29500 + os.getpid() % 1000)),
        *(str(launcher), "--recipe", "tiny", "--threads", "1", "--checkpoint", str(checkpoint), *options),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "RESULTS": str(results)}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 processes" in result.stdout and result.stdout.count("tiny: step") == 1  # the main process prints
    ranks = []
    for rank in range(2):
        record = json.loads((results / f"rank{rank}.json").read_text())
        record["weights"] = torch.load(results / f"rank{rank}.pt", weights_only=True)
        ranks.append(record)
    return ranks


def test_two_processes_train_in_step_and_resume(launcher, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    # 1. a budget of a few microseconds: the main process stops after one step, and the other with it
    first = launch(launcher, tmp_path / "first", checkpoint, "--budget-minutes", "1e-7")
    assert [r["processes"] for r in first] == [2, 2] and [r["step"] for r in first] == [1, 1]
    assert first[0]["writes"] == 2 and first[1]["writes"] == 0  # the main process alone writes (step 1, the end)
    assert first[0]["weights"]["resumed"] == first[1]["weights"]["resumed"] == []  # a fresh run
    payload = torch.load(checkpoint, weights_only=True)
    assert payload["step"] == 1 and payload["generators"].shape[0] == 2  # one generator state per process
    assert not torch.equal(payload["generators"][0], payload["generators"][1])  # each draws its own batches

    # 2. the next launch continues from the file to the end of the run, with bf16 autocast this time
    second = launch(launcher, tmp_path / "second", checkpoint, "--budget-minutes", "10", "--mixed-precision", "bf16")
    assert [r["mixed_precision"] for r in second] == ["bf16", "bf16"]
    for rank in range(2):  # every process takes its own random stream back
        assert torch.equal(second[rank]["weights"]["resumed"][0], payload["generators"][rank])
    assert [r["step"] for r in second] == [4, 4] and second[1]["writes"] == 0
    assert second[0]["losses"][0] == first[0]["losses"][0] and len(second[0]["losses"]) == 4
    assert second[0]["losses"] == second[1]["losses"]  # the mean over the processes, the same on both
    for part in ("model", "ema"):  # DDP keeps the ranks' weights equal
        ours, theirs = second[0]["weights"][part], second[1]["weights"][part]
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), part
    assert torch.load(checkpoint, weights_only=True)["step"] == 4


def test_one_process_through_the_accelerator_is_the_plain_loop(tmp_path):
    """Process 0 draws from config.seed: on one process the accelerator's path trains exactly as the plain loop."""
    from accelerate import Accelerator

    from course_lib.nets.unet import UNet
    from course_lib.schedules import make_schedule
    from course_lib.train import TrainConfig, train

    tiny = dict(channels=(8, 16), blocks=(1, 1), attention=(False, True), heads=2, groups=4)
    schedule, data = make_schedule("cosine", 100), torch.rand(16, 1, 8, 8) * 2 - 1
    config = TrainConfig(steps=6, batch_size=4, lr=3e-3, warmup=2, ema_decay=0.9)
    torch.manual_seed(0)
    plain, _ = train(UNet(**tiny), schedule, data, config, checkpoint=tmp_path / "plain.pt", progress=False)
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    accelerated, _ = train(
        UNet(**tiny),
        schedule,
        data,
        config,
        checkpoint=tmp_path / "accelerated.pt",
        progress=False,
        accelerator=accelerator,
    )
    assert accelerated.losses == plain.losses
    payload = torch.load(tmp_path / "accelerated.pt", weights_only=True)
    assert payload["generators"].shape[0] == 1 and torch.equal(payload["generators"][0], payload["generator"])
