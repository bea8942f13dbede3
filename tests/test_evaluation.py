"""FID and KID (known values, an independent scipy reference, identities), the shipped digit classifier, bad inputs."""

import pytest
import torch

from course_lib.data import load_digits
from course_lib.metrics import (
    class_accuracy,
    class_histogram,
    class_spread,
    classifier_features,
    classifier_probabilities,
    confident_flags,
    confident_fraction,
    copy_check,
    fid,
    fid_with_spread,
    kid,
    load_digit_classifier,
    nearest_distances,
    paired_fid_gap,
    real_floor,
    sample_scores,
)
from course_lib.nets.classifier import DigitClassifier
from course_lib.weights import load_card


def exact_sample(n: int, mean: torch.Tensor, covariance: torch.Tensor, seed: int) -> torch.Tensor:
    """n points (n, d) whose sample mean and (1 / (n - 1)) sample covariance are exactly `mean` and `covariance`."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(dim=0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # sample covariance exactly I
    return mean + z @ torch.linalg.cholesky(covariance).T


def test_fid_of_a_set_with_itself_is_zero():
    features = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    assert fid(features, features) == pytest.approx(0, abs=1e-8)
    few = features[:10]  # fewer samples than dimensions: a singular covariance still gives 0
    assert fid(few, few) == pytest.approx(0, abs=1e-5)


def test_fid_equals_the_closed_form_for_known_gaussians():
    # Diagonal covariances: ||mu_a - mu_b||^2 + sum_i (s_a + s_b - 2 sqrt(s_a s_b)).
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0, 0.5]).double(), torch.tensor([1.0, 1.0, 0.0, -0.5]).double()
    s_a, s_b = torch.tensor([1.0, 4.0, 0.25, 2.0]).double(), torch.tensor([9.0, 1.0, 0.25, 0.5]).double()
    expected = (mu_a - mu_b).square().sum() + (s_a + s_b - 2 * (s_a * s_b).sqrt()).sum()
    a, b = exact_sample(300, mu_a, torch.diag(s_a), 1), exact_sample(400, mu_b, torch.diag(s_b), 2)
    assert fid(a, b) == pytest.approx(expected.item(), rel=1e-9)
    # A full covariance and a scaled copy of it: tr(S + c^2 S - 2 c S) = (1 - c)^2 tr S.
    root = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    covariance, c = root @ root.T + 0.1 * torch.eye(6, dtype=torch.float64), 3.0
    a, b = exact_sample(200, torch.zeros(6), covariance, 4), exact_sample(250, torch.ones(6), c**2 * covariance, 5)
    assert fid(a, b) == pytest.approx(6 + (1 - c) ** 2 * covariance.trace().item(), rel=1e-9)


def test_fid_agrees_with_a_scipy_sqrtm_reference():
    linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(6)
    a = torch.randn(200, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    b = torch.randn(300, 16, generator=generator) * 2 + 0.3
    sigma_a, sigma_b = torch.cov(a.double().T).numpy(), torch.cov(b.double().T).numpy()
    root = linalg.sqrtm(sigma_a @ sigma_b).real
    expected = (a.double().mean(0) - b.double().mean(0)).square().sum().item() + (sigma_a + sigma_b - 2 * root).trace()
    assert fid(a, b) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("n_a, n_b", [(10, 12), (10, 300), (300, 10), (17, 16)])
def test_fid_with_fewer_samples_than_features_agrees_with_scipy(n_a, n_b):
    # Fewer rows than features (N <= F) takes the factor route: tr(Sigma_a Sigma_b)^(1/2) from an N x N matrix.
    linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(n_a + n_b)
    a = torch.randn(n_a, 16, generator=generator) @ torch.randn(16, 16, generator=generator)
    b = torch.randn(n_b, 16, generator=generator) * 2 + 0.3
    sigma_a, sigma_b = torch.cov(a.double().T).numpy(), torch.cov(b.double().T).numpy()
    root = linalg.sqrtm(sigma_a @ sigma_b).real
    expected = (a.double().mean(0) - b.double().mean(0)).square().sum().item() + (sigma_a + sigma_b - 2 * root).trace()
    assert fid(a, b) == pytest.approx(expected, rel=1e-6)
    assert fid(b, a) == pytest.approx(fid(a, b), rel=1e-12)


def test_kid_matches_the_unbiased_double_sum_and_separates_distributions():
    generator = torch.Generator().manual_seed(7)
    a, b = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator) + 0.5
    k = lambda x, y: (float(x @ y) / 3 + 1) ** 3  # noqa: E731
    within = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(6) for j in range(6) if i != j) / 30
    across = sum(k(a[i], b[j]) for i in range(6) for j in range(6)) / 36
    assert kid(a, b) == pytest.approx(within - 2 * across, rel=1e-6)  # m = N = M: one subset, the whole sets

    # Two samples of one Gaussian: about 0 (the spread at this size is about 0.01); a shifted one: far above.
    same_a, same_b = torch.randn(300, 16, generator=generator), torch.randn(300, 16, generator=generator)
    shifted = torch.randn(300, 16, generator=generator) + 0.5
    for subsets in (dict(), dict(n_subsets=5, subset_size=200, generator=generator)):
        assert abs(kid(same_a, same_b, **subsets)) < 0.05
        assert kid(same_a, shifted, **subsets) > 0.3


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier("cpu")


@pytest.fixture(scope="module")
def heldout():
    return load_digits("heldout")


def test_shipped_classifier_is_accurate_and_confident_on_heldout(classifier, heldout):
    images, labels = heldout
    accuracy = class_accuracy(classifier, images, labels)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(load_card("digit_classifier")["heldout_accuracy"], abs=1.5e-3)  # card is true
    assert confident_fraction(classifier, images) >= 0.9
    assert torch.allclose(class_histogram(classifier, images), torch.full((10,), 0.1, dtype=torch.float64), atol=0.02)
    assert classifier_features(classifier, images[:7]).shape == (7, 128)


def test_confident_flags_are_the_confident_fraction_image_by_image(classifier, heldout):
    images = torch.cat([heldout[0][:30], torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1])
    flags = confident_flags(classifier, images)
    top = classifier_probabilities(classifier, images).max(dim=1).values
    assert flags.dtype == torch.bool and flags.shape == (40,)
    assert torch.equal(flags, top >= 0.9) and flags.double().mean().item() == confident_fraction(classifier, images)
    assert not flags[30:].any()  # noise is never read with confidence


def test_the_copy_check_tells_training_digits_from_new_ones(heldout):
    train = load_digits("train")[0]
    # held-out digits against themselves: the share nearer than their own 5% quantile is 5% by construction
    new = copy_check(heldout[0])
    assert new["median"] == new["heldout_median"] and new["near_share"] == pytest.approx(0.05, abs=1e-3)
    copies = copy_check(train[:200] + 0.01 * torch.randn(200, 1, 28, 28, generator=torch.Generator().manual_seed(2)))
    assert copies["near_share"] == 1.0 and copies["median"] < 0.1 * copies["heldout_median"]
    # the distance is plain Euclidean distance in pixels to the nearest reference image
    moved = train[:3] + torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1) / 28  # every pixel moved by c / 28: 784 of them
    assert torch.allclose(nearest_distances(moved, train[:3]), torch.tensor([0.5, 1.0, 2.0]), atol=1e-5)
    with pytest.raises(ValueError, match=r"quantile must lie in \(0, 1\); got 0"):
        copy_check(heldout[0][:5], quantile=0)
    with pytest.raises(ValueError, match=r"reference must be digit images"):
        nearest_distances(heldout[0][:5], torch.zeros(3, 784))


def test_noise_scores_far_above_the_real_floor_and_is_no_digit(classifier):
    floor = real_floor(classifier, n=200)
    noise = torch.rand(200, 1, 28, 28, generator=torch.Generator().manual_seed(8)) * 2 - 1
    scores = sample_scores(classifier, noise)
    assert scores["n"] == floor["n"] == 200 and scores["fid_floor"] == floor["fid"] > 0
    assert scores["kid_floor"] == floor["kid"]  # the same n held-out digits, the same seed
    assert scores["fid"] > 10 * scores["fid_floor"] and scores["kid"] > 10 * abs(scores["kid_floor"])
    assert scores["confident_fraction"] < 0.05  # outlier exposure: the classifier is unsure of noise


def test_class_spread_is_the_rms_distance_to_the_class_mean(classifier, heldout):
    images, labels = heldout
    one_prototype = images[labels == 7][:1].repeat(10, 1, 1, 1)  # a "collapsed" class: no spread at all
    images, labels = images[:60], labels[:60]
    features = classifier_features(classifier, images).double()
    by_hand = [
        (features[labels == c] - features[labels == c].mean(0)).norm(dim=1).pow(2).mean().sqrt()
        for c in labels.unique()
    ]
    assert class_spread(classifier, images, labels) == pytest.approx(torch.stack(by_hand).mean().item(), rel=1e-9)
    # (not exactly 0 with several threads: a batch of identical images can give features differing by 1e-6)
    assert class_spread(classifier, one_prototype, torch.full((10,), 7)) == pytest.approx(0, abs=1e-4)
    with pytest.raises(ValueError, match="at least two images of some class"):
        class_spread(classifier, images[:2], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="10 images, labels of shape \\(9,\\)"):
        class_spread(classifier, images[:10], labels[:9])


def test_class_spread_groups_by_the_digit_the_classifier_reads(classifier, heldout):
    """Asked labels that are wrong (a weakly guided sampler) do not change the default grouping."""
    images = heldout[0][:60]
    read = classifier_probabilities(classifier, images).argmax(1)
    shuffled = read[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    assert class_spread(classifier, images) == pytest.approx(class_spread(classifier, images, read), rel=1e-12)
    assert class_spread(classifier, images, shuffled) > 1.2 * class_spread(classifier, images)


def test_bad_inputs_raise(classifier, heldout):
    images, labels = heldout
    with pytest.raises(ValueError, match=r"features_a must be \(N, F\) with N >= 2 samples; got shape \(1, 4\)"):
        fid(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"feature sizes differ: features_a \(5, 4\), features_b \(5, 3\)"):
        kid(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"images must be digit images \(N, 1, 28, 28\); got \(2, 28, 28\)"):
        classifier_features(classifier, torch.randn(2, 28, 28))
    with pytest.raises(ValueError, match=r"got \(2, 3, 28, 28\)"):
        confident_fraction(classifier, torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="images hold 784 NaN or infinite values"):
        class_histogram(classifier, torch.cat([images[:1], torch.full((1, 1, 28, 28), float("nan"))]))
    with pytest.raises(ValueError, match=r"samples must be digit images .* got \(4, 1, 32, 32\)"):
        sample_scores(classifier, torch.randn(4, 1, 32, 32))
    with pytest.raises(ValueError, match="need one label per image: 10 images, labels of shape \\(9,\\)"):
        class_accuracy(classifier, images[:10], labels[:9])
    with pytest.raises(ValueError, match=r"threshold must lie in \(0, 1\); got 1.5"):
        confident_fraction(classifier, images[:10], threshold=1.5)
    with pytest.raises(ValueError, match=r"n must lie in 2..1000 .*; got 1001"):
        real_floor(classifier, n=1001)
    with pytest.raises(ValueError, match="training mode"):
        classifier_features(DigitClassifier().train(), images[:4])
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\); got 1.0"):
        DigitClassifier(dropout=1.0)


def test_a_paired_fid_gap_cancels_the_noise_two_sample_sets_share():
    generator = torch.Generator().manual_seed(0)
    reference, noise = torch.randn(300, 6, generator=generator), torch.randn(300, 6, generator=generator)
    a, b = noise + 0.3, noise + 0.3 + 0.05 * torch.randn(300, 6, generator=generator)  # pairs from the same noise
    gap, sd = paired_fid_gap(a, b, reference)
    assert gap == pytest.approx(fid(a, reference) - fid(b, reference), rel=1e-12)
    (_, sd_a), (_, sd_b) = fid_with_spread(a, reference), fid_with_spread(b, reference)
    assert sd < 0.25 * (sd_a**2 + sd_b**2) ** 0.5  # what the pairs share no longer counts as spread
    assert paired_fid_gap(a, a, reference) == (0.0, 0.0)
    with pytest.raises(ValueError, match="features_a has 300, features_b 299"):
        paired_fid_gap(a, b[:-1], reference)
    with pytest.raises(ValueError, match="repeats must be >= 2"):
        paired_fid_gap(a, b, reference, repeats=1)
