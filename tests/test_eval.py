"""Digits metrics: Frechet distance vs a float64 reference, scorer quality, determinism, caching, inputs."""

import json
import math

import numpy as np
import pytest
import torch

from adaln.data import load_digits
from adaln.eval import DigitsScorer, DigitsScorerConfig, frechet_distance, gaussian_fit
from adaln.eval.digits import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture(scope="module")
def scorer():
    return DigitsScorer().fit()


def _balanced_noise(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 10


# ------------------------------------------------------------------------------------- Frechet distance


def _fd_reference(mu1, s1, mu2, s2):
    """Independent float64 FD: Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), no sqrtm involved."""
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ s2 @ root)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def test_frechet_distance_matches_float64_reference():
    rng = np.random.default_rng(0)
    worst = 0.0
    for d in (1, 5, 64):
        a, b = rng.normal(size=(d, d + 3)), rng.normal(size=(d, d + 3))
        s1, s2 = a @ a.T / d, b @ b.T / d
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        ref = _fd_reference(mu1, s1, mu2, s2)
        got = frechet_distance(mu1, s1, mu2, s2)
        worst = max(worst, abs(got - ref) / max(1.0, abs(ref)))
    assert worst < 1e-9
    # Diagonal covariances: closed form sum (sqrt(a) - sqrt(b))^2 plus the mean term.
    v1, v2 = rng.uniform(0.1, 2, 7), rng.uniform(0.1, 2, 7)
    m1, m2 = rng.normal(size=7), rng.normal(size=7)
    closed = ((m1 - m2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert abs(frechet_distance(m1, np.diag(v1), m2, np.diag(v2)) - closed) < 1e-12
    assert abs(frechet_distance(m1, np.diag(v1), m1, np.diag(v1))) < 1e-12


def test_frechet_distance_singular_covariance_and_shapes():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(5, 16)), rng.normal(size=(40, 16))  # 5 samples in 16 dims: singular S1
    mu1, s1 = gaussian_fit(f1)
    mu2, s2 = gaussian_fit(f2)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - _fd_reference(mu1, s1, mu2, s2)) < 1e-4
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(mu1, s1[:3], mu2, s2)


def test_gaussian_fit_is_float64_mean_and_unbiased_covariance():
    f = torch.randn(50, 4, dtype=torch.float32)
    mu, sigma = gaussian_fit(f)
    x = f.double().numpy()
    centred = x - x.mean(0)
    assert mu.dtype == np.float64 and np.allclose(mu, x.mean(0), atol=1e-15)
    assert np.allclose(sigma, centred.T @ centred / (50 - 1), atol=1e-14)
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_fit(f[:1])


# ------------------------------------------------------------------------------------------ the scorer


def test_real_heldout_digits_score_high_and_near_zero_fd(scorer):
    real = scorer.real_heldout_reference()
    noise_fd = scorer.evaluate_samples(*_balanced_noise(1000, 0))["frechet_distance"]
    assert real["conditional_accuracy"] >= 0.97
    assert 0.0 <= real["frechet_distance"] < 0.05 * noise_fd
    # The accuracy is the fraction of predictions equal to the requested labels, computed here directly.
    images, labels = load_digits("heldout")
    assert real["conditional_accuracy"] == pytest.approx((scorer.predict(images) == labels).double().mean().item())


def test_pure_noise_is_at_chance_with_large_fd(scorer):
    n = 2000
    result = scorer.evaluate_samples(*_balanced_noise(n, 1))
    # Balanced requests, predictions independent of them: accuracy has mean 0.1 whatever the classifier
    # predicts, and a standard deviation of at most sqrt(0.1 * 0.9 / n) ~= 0.0067; allow 4 of them.
    assert abs(result["conditional_accuracy"] - 0.1) < 4 * math.sqrt(0.09 / n)
    assert result["frechet_distance"] > 20 * scorer.real_heldout_reference()["frechet_distance"]


def test_wrong_labels_lower_accuracy_but_not_fd(scorer):
    images, labels = load_digits("heldout")
    right = scorer.evaluate_samples(images, labels)
    wrong = scorer.evaluate_samples(images, (labels + 1) % 10)
    assert wrong["conditional_accuracy"] < 0.05
    assert wrong["frechet_distance"] == right["frechet_distance"]


def test_features_shape_and_reference_statistics(scorer):
    images, _ = load_digits("train")
    feats = scorer.features(images)
    assert feats.shape == (images.shape[0], 64) and feats.dtype == torch.float32
    mu, sigma = scorer.reference_statistics()
    ref_mu, ref_sigma = gaussian_fit(feats)
    assert np.array_equal(mu, ref_mu) and np.array_equal(sigma, ref_sigma)


def test_fit_is_deterministic_and_leaves_global_rng_alone():
    # The recipe's determinism does not depend on its length: two short fits must agree bit for bit.
    config = DigitsScorerConfig(epochs=2)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    first = DigitsScorer(config).fit()
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    second = DigitsScorer(config).fit()
    for (k, a), (_, b) in zip(first.classifier.state_dict().items(), second.classifier.state_dict().items()):
        assert torch.equal(a, b), k
    images, _ = load_digits("heldout")
    assert torch.equal(first.predict(images), second.predict(images))
    other = DigitsScorer(DigitsScorerConfig(epochs=2, seed=1)).fit()
    assert not torch.equal(first.classifier.head.weight, other.classifier.head.weight)


def test_save_load_round_trip(scorer, tmp_path):
    scorer.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    loaded = DigitsScorer.load(tmp_path)
    images, labels = load_digits("heldout")
    assert torch.equal(loaded.features(images), scorer.features(images))
    assert loaded.evaluate_samples(images, labels) == scorer.evaluate_samples(images, labels)
    assert DigitsScorer.load_or_fit(tmp_path).config == scorer.config
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert meta["config"]["seed"] == 0
    blob = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    blob[-5] ^= 0xFF
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        DigitsScorer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DigitsScorer.load(tmp_path / "nowhere")


def test_slightly_out_of_range_samples_are_clamped(scorer):
    images, labels = load_digits("heldout")
    overshoot = images * 1.2  # in [-1.2, 1.2]
    assert scorer.evaluate_samples(overshoot, labels) == scorer.evaluate_samples(overshoot.clamp(-1, 1), labels)


@pytest.mark.parametrize(
    "images, labels, error, match",
    [
        (np.zeros((4, 1, 8, 8), np.float32), torch.zeros(4, dtype=torch.long), TypeError, "torch.Tensor"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "floating"),
        (torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.long), ValueError, r"\(N, 1, 8, 8\)"),
        (torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long), ValueError, r"\(N, 1, 8, 8\)"),
        (torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long), ValueError, "NaN"),
        (torch.full((4, 1, 8, 8), 16.0), torch.zeros(4, dtype=torch.long), ValueError, r"\[-1, 1\]"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long), ValueError, "one label per image"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4), TypeError, "integer"),
        (torch.zeros(4, 1, 8, 8), torch.full((4,), 10), ValueError, r"\[0, 10\)"),
        (torch.zeros(4, 1, 8, 8), torch.zeros(4, 1, dtype=torch.long), ValueError, r"\(N,\)"),
        (torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), ValueError, "N >= 2"),
    ],
)
def test_bad_inputs(scorer, images, labels, error, match):
    with pytest.raises(error, match=match):
        scorer.evaluate_samples(images, labels)


def test_unfitted_scorer_and_bad_config():
    with pytest.raises(RuntimeError, match="fit"):
        DigitsScorer().predict(torch.zeros(2, 1, 8, 8))
    with pytest.raises(TypeError, match="DigitsScorerConfig"):
        DigitsScorer({"epochs": 1})
