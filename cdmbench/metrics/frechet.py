"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6).

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})

Computed in float64. tr((S1 S2)^{1/2}) is the sum of square roots of the eigenvalues of
S1 S2 (real and non-negative up to round-off for PSD S1, S2), as torchmetrics does.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def feature_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of an [N, D] feature matrix, in float64."""
    f = np.asarray(
        features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64
    )
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an [N >= 2, D] feature matrix, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    eig = np.linalg.eigvals(s1 @ s2)
    tr_covmean = np.sqrt(np.clip(eig.real, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_features(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fréchet distance between two [N, D] feature sets."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def prompt_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of samples the classifier assigns to the prompted class."""
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


__all__ = ["feature_stats", "frechet_distance", "frechet_distance_features", "prompt_accuracy"]
