"""The shipped digits (split, range, integrity checks) and the run profiles / device helper."""

import shutil

import pytest
import torch

from course_lib.data import IMAGE_SIZE, data_dir, load_digits, to_pixels
from course_lib.profiles import PROFILES, get_device, get_profile, randn_like


def test_digits_have_the_documented_split_and_range():
    images, labels = load_digits("train")
    assert images.shape == (4000, 1, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert torch.equal(labels.bincount(), torch.full((10,), 400))
    heldout, heldout_labels = load_digits("heldout")
    assert heldout.shape[0] == 1000 and torch.equal(heldout_labels.bincount(), torch.full((10,), 100))
    everything, _ = load_digits("all")
    assert everything.shape[0] == 5000
    # no held-out image is also a training image
    train_keys = {bytes(to_pixels(x).numpy()) for x in images}
    assert not any(bytes(to_pixels(x).numpy()) in train_keys for x in heldout)


def test_digits_are_the_files_rows_in_order():
    """load_digits reads whole Arrow columns; each row must still be the file's row (pixels, label, split)."""
    import datasets

    rows = datasets.Dataset.from_parquet(str(data_dir() / "mnist5k.parquet"), keep_in_memory=True).with_format("numpy")
    everything, labels = load_digits("all")
    heldout, _ = load_digits("heldout")
    heldout_rows = [i for i, split in enumerate(rows["split"]) if split == "heldout"]
    for i in (0, 1, 2499, 4999):
        row = rows[i]
        assert torch.equal(everything[i].flatten(), torch.from_numpy(row["pixels"]).float() / 127.5 - 1)
        assert labels[i].item() == row["label"]
    assert torch.equal(heldout[7].flatten(), torch.from_numpy(rows[heldout_rows[7]]["pixels"]).float() / 127.5 - 1)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="unknown split 'test'; valid: train, heldout, all"):
        load_digits("test")


@pytest.fixture
def data_copy(tmp_path, monkeypatch):
    for name in ("mnist5k.parquet", "SHA256SUMS"):
        shutil.copy(data_dir() / name, tmp_path / name)
    monkeypatch.setenv("COURSE_DATA_DIR", str(tmp_path))
    return tmp_path


def test_damaged_file_is_named_with_the_rebuild_command(data_copy):
    with open(data_copy / "mnist5k.parquet", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match=r"mnist5k.parquet is damaged.*make data"):
        load_digits()


def test_missing_file_is_named_with_the_rebuild_command(data_copy):
    (data_copy / "mnist5k.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"mnist5k.parquet is missing; rebuild it with: make data"):
        load_digits()


def test_profiles(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "smoke")
    assert get_profile() is PROFILES["smoke"]
    monkeypatch.setenv("COURSE_PROFILE", "laptop")
    with pytest.raises(ValueError, match="COURSE_PROFILE='laptop' is not a profile; valid: smoke, cpu, gpu"):
        get_profile()
    monkeypatch.delenv("COURSE_PROFILE")
    assert get_profile().name == ("gpu" if torch.cuda.is_available() else "cpu")
    smoke, cpu = PROFILES["smoke"], PROFILES["cpu"]
    assert smoke.toy_train_steps < cpu.toy_train_steps and smoke.toy_samples < cpu.toy_samples


@pytest.mark.parametrize("name", PROFILES)
def test_profile_budgets_fit_what_the_chapters_need(name):
    """FID needs 2..1000 samples (metrics.real_digits); chapter 5 sweeps at least two increasing step counts."""
    profile = PROFILES[name]
    assert 2 <= profile.unet_samples <= 1000 and 2 <= profile.sampler_samples <= 1000
    assert 2 <= profile.frame_digits <= 1000
    assert len(profile.step_counts) >= 2 and list(profile.step_counts) == sorted(set(profile.step_counts))
    assert 1 <= profile.step_counts[0] and profile.step_counts[-1] <= 1000


def test_device(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="COURSE_DEVICE='tpu'"):
        get_device()


def test_seeded_noise_does_not_depend_on_the_device():
    x = torch.zeros(3, 4)
    a = randn_like(x, torch.Generator().manual_seed(5))
    b = randn_like(x.double(), torch.Generator().manual_seed(5))
    assert a.shape == x.shape and b.dtype == torch.float64
    assert torch.equal(a, torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_every_prefix_of_a_split_is_class_balanced(split):
    """The file is interleaved by class (scripts/build_digits.py): the first n digits hold n // 10 or n // 10 + 1
    of every class, so "the first 500 digits" can never again be 400 zeros and 100 ones."""
    _, labels = load_digits(split)
    counts = torch.zeros(10, dtype=torch.long)
    for n, label in enumerate(labels.tolist(), start=1):
        counts[label] += 1
        assert counts.max() - counts.min() <= 1 or n > {"train": 4000, "heldout": 1000, "all": 4000}[split], n
    assert set(labels[:100].tolist()) == set(range(10))
