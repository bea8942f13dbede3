"""How close are samples to the data? Distances for the toy distributions, then scores for generated digits.

Every distance should be read beside its floor: the same distance between two independent samples of the true
distribution, at the same sample count.

- Toy distributions (notebooks/03_ddpm.ipynb): 1D and sliced Wasserstein distances, mode proportions.
- Digits (notebooks/04_unet.ipynb on): the shipped digit classifier (`course_lib.nets.classifier`, trained by
  scripts/train_classifier.py) judges samples. Its logits give the confident fraction, the class accuracy of a
  class-conditional model and the class histogram; its penultimate features give the spread within classes
  (diversity, for the guidance sweep of chapter 7), FID (Heusel et al. 2017) and
  KID (Binkowski et al. 2018), each beside the real-vs-real floor at the same n (`real_floor`, `sample_scores`).
"""

import functools
import math
from collections.abc import Callable

import torch

from course_lib.checks import check_images
from course_lib.data import load_digits
from course_lib.nets.classifier import DigitClassifier
from course_lib.profiles import get_device
from course_lib.weights import load_card, load_weights


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""The 1-Wasserstein (earth mover's) distance between two 1D samples,
    $W_1 = \int_0^1 |F_a^{-1}(u) - F_b^{-1}(u)|\,du$, from their quantile functions on a common grid."""
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(f"need non-empty samples; got {a.numel()} and {b.numel()} points")
    if a.numel() == b.numel():
        return (a.sort().values - b.sort().values).abs().mean().item()
    levels = (torch.arange(max(a.numel(), b.numel()), dtype=torch.float64) + 0.5) / max(a.numel(), b.numel())
    return (torch.quantile(a, levels) - torch.quantile(b, levels)).abs().mean().item()


def sliced_wasserstein(
    a: torch.Tensor, b: torch.Tensor, n_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """The average `wasserstein_1d` between a and b (N, D) projected on random unit directions (Rabin et al. 2011)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) samples of the same D; got {tuple(a.shape)} and {tuple(b.shape)}")
    directions = torch.randn(n_projections, a.shape[1], generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True)  # (P, D)
    a_proj, b_proj = a.double().cpu() @ directions.T, b.double().cpu() @ directions.T  # (N, P)
    return sum(wasserstein_1d(a_proj[:, p], b_proj[:, p]) for p in range(n_projections)) / n_projections


def mode_proportions(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """The fraction of points x (N, D) whose nearest mode among `means` (K, D) is each mode: (K,) summing to 1."""
    nearest = torch.cdist(x.double().cpu(), torch.as_tensor(means, dtype=torch.float64)).argmin(dim=1)  # (N,)
    return torch.bincount(nearest, minlength=len(means)).double() / len(x)


# Digits: a classifier's view of generated images (chapters 4 on). ----------------------------------------------

CLASSIFIER_NAME = "digit_classifier"
FEATURE_BATCH = 500  # images per forward pass of the classifier


def load_digit_classifier(device: torch.device | str | None = None) -> DigitClassifier:
    """The shipped digit classifier (data/digit_classifier.*), checked against the manifest, in eval mode.

    `device`: where to put it; None means `profiles.get_device()`. Its held-out accuracy is in its card
    (`weights.load_card("digit_classifier")["heldout_accuracy"]`)."""
    card = load_card(CLASSIFIER_NAME)
    kwargs = {key: value for key, value in card["model"].items() if key != "class"}
    model = DigitClassifier(**{**kwargs, "channels": tuple(kwargs["channels"])})
    return load_weights(model.to(device if device is not None else get_device()), CLASSIFIER_NAME)


@torch.no_grad()
def _classifier_outputs(classifier: DigitClassifier, images: torch.Tensor, batch_size: int, logits: bool):
    check_images(images)
    if classifier.training:
        raise ValueError("the classifier is in training mode (batch statistics, dropout): call classifier.eval()")
    parameter = next(classifier.parameters())
    run = classifier if logits else classifier.features
    batches = (
        images[i : i + batch_size].to(parameter.device, parameter.dtype) for i in range(0, len(images), batch_size)
    )
    return torch.cat([run(batch).cpu() for batch in batches])


def classifier_features(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = FEATURE_BATCH):
    """The classifier's penultimate-layer features of images (N, 1, 28, 28): (N, F) float32 on the CPU.
    Batches run on the classifier's device."""
    return _classifier_outputs(classifier, images, batch_size, logits=False)


def classifier_probabilities(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = FEATURE_BATCH):
    """p(class | image) by the classifier: (N, n_classes) float32 on the CPU, rows summing to 1."""
    return _classifier_outputs(classifier, images, batch_size, logits=True).softmax(dim=1)


CONFIDENT = 0.9  # a sample is read with confidence when its most likely class has at least this probability


def confident_flags(classifier: DigitClassifier, images: torch.Tensor, threshold: float = CONFIDENT) -> torch.Tensor:
    """(N,) bool: whether each image's most likely class has probability at least `threshold`. Kept per image
    so that two sample sets drawn from the same noise can be compared pair by pair (`claims.paired_fraction_gap`)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1); got {threshold}")
    return classifier_probabilities(classifier, images).max(dim=1).values >= threshold


def confident_fraction(classifier: DigitClassifier, images: torch.Tensor, threshold: float = CONFIDENT) -> float:
    r"""The fraction of images whose most likely class has probability at least `threshold`:
    $\frac{1}{N} \sum_i [\max_c p(c \mid x_i) \geq \text{threshold}]$. A blurred, ambiguous or malformed sample
    lowers it; the shipped classifier was trained to be unsure of noise and blobs (outlier exposure)."""
    return confident_flags(classifier, images, threshold).double().mean().item()


def class_accuracy(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of images that the classifier reads as their label: how well a class-conditional model obeys."""
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),):
        raise ValueError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
    predicted = classifier_probabilities(classifier, images).argmax(dim=1)
    return (predicted == labels.cpu()).double().mean().item()


def class_histogram(classifier: DigitClassifier, images: torch.Tensor) -> torch.Tensor:
    """The fraction of images the classifier assigns to each class: (n_classes,) summing to 1 (0.1 each for the
    balanced real digits; a model that drops a digit shows a hole)."""
    probabilities = classifier_probabilities(classifier, images)
    return torch.bincount(probabilities.argmax(dim=1), minlength=probabilities.shape[1]).double() / len(images)


def class_spread(classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """Diversity within classes: the root mean squared distance of each image's classifier features to the mean
    feature of its class, averaged over the classes present. Guidance that collapses every seven onto one
    prototype lowers it; compare with real digits' spread at the same n.

    Images are grouped by the label the classifier reads (labels=None), not by the label a sampler was asked for:
    grouped by the asked label, a weakly guided run's wrong-class samples would inflate its spread, and the
    measure would count accuracy a second time. Given `labels`, it groups by those instead."""
    features = classifier_features(classifier, images).double()
    if labels is None:
        labels = classifier_probabilities(classifier, images).argmax(dim=1)  # (N,) the label the classifier reads
    labels = torch.as_tensor(labels).cpu()
    if labels.shape != (len(images),):
        raise ValueError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
    spreads = []
    for label in labels.unique():
        members = features[labels == label]
        if len(members) >= 2:
            spreads.append((members - members.mean(0)).pow(2).sum(1).mean().sqrt())
    if not spreads:
        raise ValueError("need at least two images of some class to measure a spread")
    return torch.stack(spreads).mean().item()


def _check_features(features_a: torch.Tensor, features_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"{name} must be (N, F) with N >= 2 samples; got shape {tuple(features.shape)}")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(
            f"the feature sizes differ: features_a {tuple(features_a.shape)}, features_b {tuple(features_b.shape)}"
        )
    return features_a.detach().cpu().double(), features_b.detach().cpu().double()


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    r"""The Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F) (Heusel et al. 2017,
    "Fréchet Inception Distance"; in the course the features are the digit classifier's, not Inception's):

    $$\mathrm{FID} = \|\mu_a - \mu_b\|^2 + \mathrm{tr}\big(\Sigma_a + \Sigma_b - 2 (\Sigma_a \Sigma_b)^{1/2}\big)$$

    Computed in float64, without forming $(\Sigma_a \Sigma_b)^{1/2}$: write $\Sigma_a = X^\top X$ with X the centred
    features over $\sqrt{N - 1}$ (N x F) when N <= F, else the symmetric root $\Sigma_a^{1/2}$ (F x F). Then
    $X \Sigma_b X^\top$ is symmetric positive semi-definite with the nonzero eigenvalues of
    $\Sigma_b X^\top X = \Sigma_b \Sigma_a$ (AB and BA share them), so
    $\mathrm{tr}(\Sigma_a \Sigma_b)^{1/2} = \sum_i \sqrt{\lambda_i(X \Sigma_b X^\top)}$ (round-off below zero
    clipped), from a matrix at most min(N, F) square: cheap at small N, where `fid_with_spread`'s bootstrap calls it
    a hundred times. The set with fewer rows plays a (FID is symmetric). Covariances use the unbiased 1 / (N - 1)
    normalisation, as pytorch-fid does. FID is biased upwards at small N: compare it only with a floor at the same
    N (`real_floor`).

    code -> symbol: mu_a, mu_b -> $\mu_a, \mu_b$;  sigma_b -> $\Sigma_b$;  x -> $X$
    """
    a, b = _check_features(features_a, features_b)
    if len(a) > len(b):
        a, b = b, a
    mu_a, mu_b = a.mean(dim=0), b.mean(dim=0)  # (F,)
    centred_a, centred_b = a - mu_a, b - mu_b
    x = _covariance_factor(centred_a)  # (min(N, F), F), x^T x = Sigma_a
    if len(b) <= b.shape[1]:  # Sigma_b = y^T y with y (M, F): x Sigma_b x^T = (x y^T)(x y^T)^T
        product = x @ centred_b.T / math.sqrt(len(b) - 1)
        middle = product @ product.T
    else:
        sigma_b = centred_b.T @ centred_b / (len(b) - 1)  # (F, F)
        middle = x @ sigma_b @ x.T
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    trace_a = centred_a.square().sum() / (len(a) - 1)  # tr Sigma = the mean squared distance to the mean
    trace_b = centred_b.square().sum() / (len(b) - 1)
    return ((mu_a - mu_b).square().sum() + trace_a + trace_b - 2 * trace_sqrt).item()


def _covariance_factor(centred: torch.Tensor) -> torch.Tensor:
    """X with X^T X = the covariance of `centred` (N, F) features: the rows over sqrt(N - 1) when N <= F, else the
    symmetric root of the covariance (F, F), from its eigendecomposition (round-off below zero clipped)."""
    rows, width = centred.shape
    if rows <= width:
        return centred / math.sqrt(rows - 1)
    values, vectors = torch.linalg.eigh(centred.T @ centred / (rows - 1))
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def kid(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    n_subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> float:
    r"""The kernel inception distance (Binkowski et al. 2018, "Demystifying MMD GANs") between two feature sets:
    the unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012) with the cubic polynomial
    kernel $k(x, y) = (x^\top y / d + 1)^3$ (d = F, the feature size), averaged over `n_subsets` random subsets of
    m = min(subset_size, N, M) samples of each set:

    $$\mathrm{MMD}^2_u = \frac{1}{m(m-1)} \sum_{i \neq j} \big(k(a_i, a_j) + k(b_i, b_j)\big)
                         - \frac{2}{m^2} \sum_{i, j} k(a_i, b_j)$$

    Unbiased, so it is about 0 (and may be slightly negative) for two samples of one distribution, and far less
    dependent on the sample count than FID. When m equals both N and M every subset is the whole set and it is
    computed once. Subsets are drawn with `generator` (None: torch's global generator).
    """
    a, b = _check_features(features_a, features_b)
    if n_subsets < 1 or subset_size < 2:
        raise ValueError(f"need n_subsets >= 1 and subset_size >= 2; got {n_subsets} and {subset_size}")
    m, d = min(subset_size, len(a), len(b)), a.shape[1]
    kernel = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    if m == len(a) == len(b):
        n_subsets = 1
    mmds = []
    for _ in range(n_subsets):
        x = a[torch.randperm(len(a), generator=generator)[:m]]  # (m, F)
        y = b[torch.randperm(len(b), generator=generator)[:m]]  # (m, F)
        k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)  # (m, m) each
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        mmds.append(within - 2 * k_xy.mean())
    return torch.stack(mmds).mean().item()


@functools.cache
def _split_images(split: str) -> torch.Tensor:
    """The images of one split, loaded once per process (only read, never changed)."""
    return load_digits(split)[0]


def real_digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n held-out and n train digits drawn at random (without replacement, seeded): the two real sets of
    `real_floor`. Generated samples are compared with the same held-out n (`sample_scores`)."""
    if not 2 <= n <= 1000:
        raise ValueError(f"n must lie in 2..1000 (the held-out split has 1,000 digits); got {n}")
    generator = torch.Generator().manual_seed(seed)
    heldout, train = _split_images("heldout"), _split_images("train")
    heldout_index = torch.randperm(len(heldout), generator=generator)[:n]
    train_index = torch.randperm(len(train), generator=generator)[:n]
    return heldout[heldout_index], train[train_index]


def real_floor(classifier: DigitClassifier, n: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID and KID between n held-out and n train digits (`real_digits(n, seed)`): what a perfect generator would
    score at this n. Returns {"n", "fid", "kid"}. Report every FID / KID beside the floor at the same n."""
    heldout, train = (classifier_features(classifier, images) for images in real_digits(n, seed))
    generator = torch.Generator().manual_seed(seed)
    return {"n": n, "fid": fid(train, heldout), "kid": kid(train, heldout, generator=generator)}


def sample_scores(classifier: DigitClassifier, samples: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Generated digits (n, 1, 28, 28) against n held-out digits, each score beside its real-vs-real floor at n
    (the same n held-out digits as `real_floor(classifier, n, seed)`).

    Returns {"n", "fid", "fid_sd", "fid_floor", "fid_floor_sd", "kid", "kid_floor", "confident_fraction"}: the
    spreads are bootstrap standard deviations (`fid_with_spread`); two FIDs differ only beyond their spreads."""
    check_images(samples, "samples")
    n = len(samples)
    heldout, train = (classifier_features(classifier, images) for images in real_digits(n, seed))
    generated = classifier_features(classifier, samples)
    kid_of = lambda a, b: kid(a, b, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    fid_value, fid_sd = fid_with_spread(generated, heldout, seed=seed)
    floor, floor_sd = fid_with_spread(train, heldout, seed=seed)
    return {
        "n": n,
        "fid": fid_value,
        "fid_sd": fid_sd,
        "fid_floor": floor,
        "fid_floor_sd": floor_sd,
        "kid": kid_of(generated, heldout),
        "kid_floor": kid_of(train, heldout),
        "confident_fraction": confident_fraction(classifier, samples),
    }


# --- copies of the training set -----------------------------------------------------------------------------------


def nearest_distances(images: torch.Tensor, reference: torch.Tensor, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    """(N,): the Euclidean distance, in pixel space, from each image to its nearest image in `reference`."""
    check_images(images, "images")
    check_images(reference, "reference")
    flat_reference = reference.flatten(1).double()
    nearest = [
        torch.cdist(rows, flat_reference).min(dim=1).values for rows in images.flatten(1).double().split(batch_size)
    ]
    return torch.cat(nearest).float()


def copy_check(samples: torch.Tensor, quantile: float = 0.05) -> dict[str, float]:
    """Are generated digits copies of training digits? Each sample's distance to its nearest training digit (all
    of the train split, which the models learnt from) beside the same distance for the held-out digits, which no
    model saw: a model that memorises puts its samples nearer to the training set than new digits are.

    Returns {"n", "median", "heldout_median", "quantile", "near_share"}: the medians of the two sets of distances,
    and the share of samples nearer to a training digit than the `quantile` of the held-out digits' distances
    (about `quantile` when samples are no nearer than new digits; well above it when the model copies)."""
    check_images(samples, "samples")
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must lie in (0, 1); got {quantile}")
    train = _split_images("train")
    heldout = nearest_distances(_split_images("heldout"), train)
    distances = nearest_distances(samples, train)
    near = torch.quantile(heldout, quantile)
    return {
        "n": len(samples),
        "median": distances.median().item(),
        "heldout_median": heldout.median().item(),
        "quantile": quantile,
        "near_share": (distances < near).double().mean().item(),
    }


# --- spread, and what a fine-tune must keep -----------------------------------------------------------------------


def fid_with_spread(
    features_a: torch.Tensor, features_b: torch.Tensor, repeats: int = 50, seed: int = 0
) -> tuple[float, float]:
    """(FID, its bootstrap standard deviation): FID of the two feature sets as they are, and the standard deviation
    of FID over `repeats` resamplings of both sets with replacement (Efron 1979). Two FIDs at the same n are told
    apart only when their gap exceeds their spreads; a bootstrap FID is biased upwards (repeated rows), so the
    spread is read beside the plain FID, never instead of it."""
    a, b = _check_features(features_a, features_b)
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to give a spread; got {repeats}")
    generator = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(repeats):
        rows_a = torch.randint(len(a), (len(a),), generator=generator)  # (N,) with repeats
        rows_b = torch.randint(len(b), (len(b),), generator=generator)  # (M,)
        draws.append(fid(a[rows_a], b[rows_b]))
    return fid(a, b), torch.tensor(draws).std().item()


def paired_fid_gap(
    features_a: torch.Tensor, features_b: torch.Tensor, reference: torch.Tensor, repeats: int = 50, seed: int = 0
) -> tuple[float, float]:
    """(FID(a, reference) - FID(b, reference), its bootstrap standard deviation) for two sample sets drawn in pairs:
    row i of a and row i of b from the same starting noise (two models, or two samplers, from the same seeds).

    Each resampling takes the same rows of a and of b, and one resampling of the reference for both, so the noise
    the two share cancels in the gap: its spread is smaller than the two FIDs' own spreads combined whenever the
    pairs are alike. a is clearly better than b when the gap is below minus twice its spread (`claims.clearly_below`
    with (gap, sd, 0, 0))."""
    a, ref = _check_features(features_a, reference)
    b, _ = _check_features(features_b, reference)
    if len(a) != len(b):
        raise ValueError(f"paired sets need as many rows: features_a has {len(a)}, features_b {len(b)}")
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to give a spread; got {repeats}")
    generator = torch.Generator().manual_seed(seed)
    gaps = []
    for _ in range(repeats):
        rows = torch.randint(len(a), (len(a),), generator=generator)  # the same pairs for a and b
        rows_ref = torch.randint(len(ref), (len(ref),), generator=generator)
        gaps.append(fid(a[rows], ref[rows_ref]) - fid(b[rows], ref[rows_ref]))
    return fid(a, ref) - fid(b, ref), torch.tensor(gaps).std().item()


def kept_and_changed(
    classifier: DigitClassifier,
    samples: torch.Tensor,
    base_samples: torch.Tensor,
    restyle: Callable[[torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> dict:
    """What a fine-tuned model must keep, measured on its samples beside its base model's (same n, same noise).

    Each model is read against the real digits it should resemble: the base model against held-out digits, the
    fine-tune against the same held-out digits passed through `restyle` (the style it was taught; None: unstyled).
    FID against unstyled digits would punish the very change that was asked for. For each: the class histogram
    (and its largest share: 0.10 is perfectly balanced), the confident fraction, FID with its bootstrap spread;
    and the same reading of the real sets themselves ("reference": what a perfect model of them would score, as
    the classifier may read bold real digits less surely than thin ones), with the real floor of FID at this n."""
    check_images(samples, "samples")
    check_images(base_samples, "base_samples")
    restyle = restyle or (lambda images: images)
    n = len(samples)
    heldout, train = real_digits(n, seed)
    report = {"n": n}
    pairs = (("model", samples, restyle(heldout), restyle(train)), ("base", base_samples, heldout, train))
    for name, images, real, other_real in pairs:
        real_features = classifier_features(classifier, real)
        fid_value, fid_sd = fid_with_spread(classifier_features(classifier, images), real_features, seed=seed)
        floor, floor_sd = fid_with_spread(classifier_features(classifier, other_real), real_features, seed=seed)
        report[name] = {**_class_reading(classifier, images), "fid": fid_value, "fid_sd": fid_sd}
        report[name]["reference"] = {**_class_reading(classifier, real), "floor_fid": floor, "floor_fid_sd": floor_sd}
    report["fid_ratio"] = report["model"]["fid"] / report["base"]["fid"]
    return report


def _class_reading(classifier: DigitClassifier, images: torch.Tensor) -> dict:
    histogram = class_histogram(classifier, images)
    return {
        "histogram": histogram.tolist(),
        "largest_class_share": histogram.max().item(),
        "confident_fraction": confident_fraction(classifier, images),
    }
