"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6).

    d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})

Computed in float64. tr((S1 S2)^{1/2}) is the sum of square roots of the eigenvalues of
S1 S2 (real and non-negative up to round-off for PSD S1, S2), as torchmetrics does.

The statistics of a set too large to hold come from :class:`Moments`: float64 sums of x and
x x^T and the count, accumulated chunk by chunk (and summed over processes) in a fixed order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def feature_stats(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of an [N, D] feature matrix, in float64."""
    f = np.asarray(
        features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64
    )
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an [N >= 2, D] feature matrix, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


@dataclass
class Moments:
    """Float64 first and second moments of feature rows, taken about a fixed ``shift``.

    ``s1 = sum (x - shift)``, ``s2 = sum (x - shift)(x - shift)^T``, ``n`` rows. The shift (the
    mean of the first chunk) keeps the covariance free of the cancellation that raw moments
    suffer for features far from 0; it changes nothing else. Sums of moments with one shift
    add, so chunks or processes combine exactly up to float64 summation order.
    """

    shift: np.ndarray  # [D]
    s1: np.ndarray  # [D]
    s2: np.ndarray  # [D, D]
    n: int = 0

    @classmethod
    def zeros(cls, shift: np.ndarray) -> Moments:
        d = shift.shape[0]
        return cls(np.asarray(shift, np.float64), np.zeros(d), np.zeros((d, d)), 0)

    def add(self, features: Tensor | np.ndarray) -> Moments:
        """Accumulate the rows of one [n, D] chunk (in place); returns self."""
        x = torch.as_tensor(np.asarray(features, dtype=np.float64)) - torch.from_numpy(self.shift)
        self.s1 += x.sum(0).numpy()
        self.s2 += (x.T @ x).numpy()
        self.n += x.shape[0]
        return self

    def mean(self) -> np.ndarray:
        return self.shift + self.s1 / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance, as ``np.cov(x, rowvar=False)``."""
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows, got {self.n}")
        d = self.s1 / self.n
        return (self.s2 - self.n * np.outer(d, d)) / (self.n - 1)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, unbiased covariance), as :func:`feature_stats` of all rows."""
        return self.mean(), self.cov()


def chunk_moments(chunks: Iterable[Tensor | np.ndarray]) -> Moments:
    """Moments of [n_i, D] chunks taken in order, shifted by the mean of the first chunk."""
    out: Moments | None = None
    for c in chunks:
        c = np.asarray(c, dtype=np.float64)
        if c.shape[0] == 0:
            continue
        if c.ndim != 2:
            raise ValueError(f"need [n, D] feature chunks, got shape {c.shape}")
        out = (out or Moments.zeros(c.mean(0))).add(c)
    if out is None:
        raise ValueError("no feature rows")
    return out


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


__all__ = [
    "Moments",
    "chunk_moments",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_features",
    "prompt_accuracy",
]
