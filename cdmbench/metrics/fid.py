"""FID (Heusel et al. 2017) in clean-fid's "clean" convention (Parmar et al. 2022).

Features: :class:`~cdmbench.metrics.features.InceptionFeatures` by default (clean-fid's
TorchScript Inception, PIL bicubic resize on float32 to 299 x 299), or any ``feature_fn``.
Reference: ``EvalSet.reference`` (or the ``reference`` argument): a folder of real images, or
"" for the backbone's real test split; its float64 statistics are cached per (reference,
resolution, mode, N, extractor) in ``EvalSet.cache_dir``. The distance is
:func:`cdmbench.metrics.frechet.frechet_distance` (float64), which agrees with clean-fid's
``fid_from_feats`` and torchmetrics' ``_compute_fid`` on identical features.

``config()`` is what identifies the metric before it runs (the driver hashes it to skip
work already done), so it holds what is fixed at construction; what one run measured
(reference set, N_ref, N_gen, the cache file) is added by :meth:`FID.run_config`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdmbench.errors import UserError
from cdmbench.metrics.base import EvalSet, FeatureMetric, FeatureSet, Value
from cdmbench.metrics.features import ImageFeatures, as_features
from cdmbench.metrics.frechet import frechet_distance
from cdmbench.metrics.reference import resolve_reference

REFERENCE_DEFAULT = "EvalSet.reference: a folder of real images, or '' for the real test split"


class FID(FeatureMetric):
    """Fréchet Inception Distance (Heusel et al. 2017), clean-fid's convention (Parmar 2022)."""

    name = "fid"
    values = {"fid": Value(higher_is_better=False, tolerance="10%")}
    needs = ("images", "reference")

    min_samples = 2  # a covariance needs two samples

    def __init__(
        self,
        features: ImageFeatures | Callable[[Tensor], Any] | None = None,
        *,
        feature_fn: Callable[[Tensor], Any] | None = None,
        feature_id: str | None = None,
        reference: str | None = None,
        n_ref: int | None = None,
        batch_size: int = 64,
        inception_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        self.features = as_features(
            features,
            feature_fn=feature_fn,
            feature_id=feature_id,
            inception_path=inception_path,
            batch_size=batch_size,
            device=device,
        )
        self.reference = reference
        self.n_ref = n_ref
        self.device = device
        self.last: dict[str, Any] = {}

    def check(self, backbone=None) -> None:
        self.features.check()

    def config(self) -> dict[str, Any]:
        return {
            **self.features.config(),
            "reference": self.reference if self.reference is not None else REFERENCE_DEFAULT,
            "n_ref": self.n_ref or "all",
            "n_gen": "all samples",
            "stats": "float64 mean, unbiased covariance",
            "distance": "Frechet, tr sqrt via eigenvalues of S1 S2 (cdmbench.metrics.frechet)",
        }

    def run_config(self) -> dict[str, Any]:
        """``config()`` plus what the last :meth:`compute` used: reference, N_ref, N_gen."""
        return {**self.config(), **self.last}

    def extractor(self, backbone=None) -> ImageFeatures:
        return self.features

    def from_features(self, features: FeatureSet, data: EvalSet) -> dict[str, float]:
        """FID of the generated features (float64 moments, streamed) against the reference."""
        self.check()  # before any work: a missing file fails in one line, nothing downloads
        if features.n < 2:
            raise UserError(f"FID needs at least 2 generated images, got {features.n}")
        self.features.to(self.device if self.device is not None else data.backbone.device)
        ref = resolve_reference(
            self.reference if self.reference is not None else data.reference,
            data.backbone,
            self.n_ref,
        )
        mu_ref, sigma_ref = ref.stats(self.features, data.cache_dir)
        mu, sigma = features.moments().stats()
        self.last = {
            **ref.describe(),
            "n_gen": features.n,
            "ref_cache": str(Path(ref.cache_path(data.cache_dir, "fid-stats", self.features))),
        }
        return {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref)}

    def compute(self, data: EvalSet) -> dict[str, float]:
        if data.images.shape[0] < 2:  # before any work
            raise UserError(f"FID needs at least 2 generated images, got {data.images.shape[0]}")
        return super().compute(data)


__all__ = ["FID"]
