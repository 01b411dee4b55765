"""Fréchet distance against torchmetrics' FID formula and against closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from cdmbench.metrics.frechet import (
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    prompt_accuracy,
)


def _features(seed: int, n: int = 500, d: int = 16, shift: float = 0.0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    return shift + scale * rng.normal(size=(n, d)) @ mix + rng.normal(size=(n, d)) * 0.1


def _torchmetrics_fid(a: np.ndarray, b: np.ndarray) -> float:
    """torchmetrics' own statistics (mean, unbiased covariance) and formula, in float64."""
    # imported here: torchmetrics takes seconds to import and only this reference needs it
    from torchmetrics.image.fid import _compute_fid

    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    return float(_compute_fid(ta.mean(0), torch.cov(ta.T), tb.mean(0), torch.cov(tb.T)))


@pytest.mark.parametrize(
    ("seed_b", "shift", "scale"), [(1, 0.0, 1.0), (2, 0.5, 1.0), (3, -0.2, 1.7)]
)
def test_matches_torchmetrics_fid(seed_b, shift, scale):
    a = _features(0)
    b = _features(seed_b, shift=shift, scale=scale)
    ours = frechet_distance_features(a, b)
    ref = _torchmetrics_fid(a, b)
    assert ref > 0.01
    assert ours == pytest.approx(ref, rel=1e-6)


def test_matches_scipy_sqrtm_formula():
    """The pytorch-fid / clean-fid formulation: tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    a, b = _features(10), _features(11, shift=0.3, scale=1.3)
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    ref = float((m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-6)


def test_accepts_torch_tensors_of_any_float_dtype():
    a, b = _features(0), _features(1, shift=0.5)
    ref = frechet_distance_features(a, b)
    assert frechet_distance_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        ref, rel=1e-12
    )
    # float32 features are promoted to float64 before the statistics
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    assert frechet_distance_features(torch.from_numpy(a32), torch.from_numpy(b32)) == pytest.approx(
        frechet_distance_features(a32.astype(np.float64), b32.astype(np.float64)), rel=1e-12
    )


def test_self_distance_is_zero():
    a = _features(4)
    scale = np.trace(feature_stats(a)[1])
    assert abs(frechet_distance_features(a, a)) < 1e-9 * scale


def test_symmetric():
    a, b = _features(5), _features(6, shift=0.4, scale=0.8)
    ab, ba = frechet_distance_features(a, b), frechet_distance_features(b, a)
    assert ab == pytest.approx(ba, rel=1e-9)


def test_translation_adds_squared_mean_difference():
    a = _features(7)
    delta = np.linspace(-1, 1, a.shape[1])
    assert frechet_distance_features(a, a + delta) == pytest.approx(delta @ delta, rel=1e-9)


def test_feature_stats_mean_and_unbiased_covariance():
    a = _features(8, n=50, d=5)
    mu, sigma = feature_stats(torch.from_numpy(a).float())
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    a64 = a.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, a64.mean(0), rtol=1e-12)
    centred = a64 - a64.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / (len(a64) - 1), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("bad", [np.zeros((1, 4)), np.zeros(8), np.zeros((2, 3, 4))])
def test_feature_stats_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        feature_stats(bad)


def test_analytic_diagonal_gaussians():
    mu1 = np.array([0.0, 1.0, -2.0, 0.5])
    mu2 = np.array([1.0, 1.0, 0.0, -0.5])
    a = np.array([1.0, 4.0, 0.25, 2.0])
    b = np.array([9.0, 1.0, 0.25, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(6.0 + 4.0 + 1.0 + 0.0 + (np.sqrt(2) - np.sqrt(0.5)) ** 2)


def test_analytic_commuting_covariances():
    """Same eigenbasis: d^2 = |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2 over eigenvalues."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    l1 = np.array([0.1, 0.5, 1.0, 2.0, 3.0, 5.0])
    l2 = np.array([1.0, 0.5, 4.0, 0.2, 3.0, 0.01])
    s1, s2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_identical_gaussians_zero_and_pure_mean_shift():
    s = np.diag([1.0, 2.0, 3.0])
    assert frechet_distance(np.zeros(3), s, np.zeros(3), s) == pytest.approx(0.0, abs=1e-12)
    assert frechet_distance(np.zeros(3), s, np.ones(3), s) == pytest.approx(3.0, abs=1e-12)


def test_sampled_features_approach_closed_form():
    rng = np.random.default_rng(123)
    d, n = 4, 40000
    mu1, mu2 = np.zeros(d), np.array([0.5, -0.5, 1.0, 0.0])
    a, b = np.array([1.0, 2.0, 0.5, 1.0]), np.array([0.5, 2.0, 1.5, 3.0])
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(a)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(b)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance_features(x, y) == pytest.approx(expected, rel=0.03)


def test_prompt_accuracy():
    logits = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 5.0, 0.0]])
    assert prompt_accuracy(logits, torch.tensor([1, 0, 2, 2])) == pytest.approx(0.75)
    assert prompt_accuracy(logits, torch.tensor([1, 0, 2, 1])) == 1.0
