"""Improved precision and recall with k-NN manifolds (Kynkäänniemi et al. 2019, NeurIPS).

Each real feature r_i gets a ball of radius d(r_i, its k-th nearest other real feature);
precision is the share of generated features inside at least one real ball, recall the
share of real features inside at least one generated ball (radii from the generated set).
A point on a ball's boundary counts as inside (``<=``, as the authors' and StyleGAN2-ADA's
code). Distances are Euclidean, in float64, chunked so that 10k x 10k sets fit in memory.

Feature space: on a backbone with a domain classifier and real images (`digits`), the
classifier's penultimate features with the backbone's test split as the reference (the space
of ``fd_digits``), because Inception features of 8x8 digits say little; elsewhere the one FID
uses (clean-fid Inception).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from cdmbench.backbones.base import Backbone
from cdmbench.errors import UserError
from cdmbench.metrics.base import EvalSet, FeatureMetric, FeatureSet, Value
from cdmbench.metrics.digits import DigitsJudge, DomainFeatures, domain_judge, no_domain
from cdmbench.metrics.features import ImageFeatures, as_features
from cdmbench.metrics.fid import REFERENCE_DEFAULT
from cdmbench.metrics.reference import resolve_reference

SPACES = ("auto", "features", "domain", "digits")  # "digits" is accepted for "domain"


def _distances(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances [len(a), len(b)] in float64."""
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")


def knn_radii(features: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Distance from each row to its k-th nearest other row (Kynkäänniemi et al. 2019)."""
    x = features.to(torch.float64)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k = {k} needs at least k + 1 = {k + 1} features, got {n}")
    out = torch.empty(n, dtype=torch.float64, device=x.device)
    for s in range(0, n, chunk):
        d = _distances(x[s : s + chunk], x)
        rows = torch.arange(d.shape[0], device=x.device)
        d[rows, rows + s] = float("inf")  # not its own neighbour (duplicates still count)
        out[s : s + chunk] = d.kthvalue(k, dim=1).values
    return out


def in_manifold(probe: Tensor, support: Tensor, radii: Tensor, chunk: int = 1024) -> Tensor:
    """For each probe row, whether it lies in at least one ball (support_i, radii_i)."""
    p, s = probe.to(torch.float64), support.to(torch.float64)
    out = torch.empty(p.shape[0], dtype=torch.bool, device=p.device)
    for i in range(0, p.shape[0], chunk):
        out[i : i + chunk] = (_distances(p[i : i + chunk], s) <= radii[None]).any(dim=1)
    return out


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """Improved precision and recall of ``fake`` against ``real`` (Kynkäänniemi et al. 2019)."""
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"need [N, D] feature sets of one D, got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    precision = in_manifold(fake, real, knn_radii(real, k, chunk), chunk)
    recall = in_manifold(real, fake, knn_radii(fake, k, chunk), chunk)
    return {"precision": float(precision.double().mean()), "recall": float(recall.double().mean())}


class PrecisionRecall(FeatureMetric):
    """Improved precision and recall, k-NN manifolds (Kynkäänniemi et al. 2019)."""

    name = "precision_recall"
    values = {
        "precision": Value(higher_is_better=True, tolerance="0.05"),
        "recall": Value(higher_is_better=True, tolerance="0.05"),
    }
    needs = ("images", "reference")

    @property
    def min_samples(self) -> int:  # k nearest neighbours among the generated samples
        return self.k + 1

    all_features = True  # k-NN balls need every feature

    def __init__(
        self,
        k: int = 3,
        features: ImageFeatures | Callable[[Tensor], Any] | None = None,
        *,
        feature_fn: Callable[[Tensor], Any] | None = None,
        feature_id: str | None = None,
        space: str = "auto",
        reference: str | None = None,
        n_ref: int | None = None,
        batch_size: int = 64,
        inception_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        chunk: int = 1024,
    ) -> None:
        """``space``: "auto" (the domain classifier where the backbone has one, else the FID
        features), "features" (always the FID features or ``feature_fn``) or "domain"."""
        if space not in SPACES:
            raise ValueError(f"unknown space '{space}' ({', '.join(SPACES)})")
        if space == "auto" and (features is not None or feature_fn is not None):
            space = "features"  # an explicit extractor is used on every backbone
        self.k, self.space, self.chunk = k, "domain" if space == "digits" else space, chunk
        self.features = as_features(
            features,
            feature_fn=feature_fn,
            feature_id=feature_id,
            inception_path=inception_path,
            batch_size=batch_size,
            device=device,
        )
        self.reference, self.n_ref, self.device = reference, n_ref, device
        self._domain: tuple[Backbone, DigitsJudge | None] | None = None  # (backbone, its judge)
        self.last: dict[str, Any] = {}

    def _judge(self, backbone: Backbone) -> DigitsJudge | None:
        """The domain judge this metric uses on ``backbone``; None: the FID features."""
        if self.space == "features":
            return None
        if self._domain is None or self._domain[0] is not backbone:
            self._domain = (backbone, domain_judge(backbone))
        judge = self._domain[1]
        if judge is None and self.space == "domain":
            raise no_domain("precision_recall with space 'domain'", backbone)
        return judge

    def check(self, backbone: Backbone | None = None) -> None:
        # without a backbone "auto" learns it only in compute(), which checks again before any work
        if self.space == "features" or (backbone is not None and self._judge(backbone) is None):
            self.features.check()

    def config(self) -> dict[str, Any]:
        judge = None if self._domain is None else self._domain[1]
        if judge is None:  # not bound to a backbone, or it has no domain classifier
            domain = "its domain classifier's penultimate features, reference = its test split"
        else:
            d = judge.describe()
            domain = f"{d['features']}, reference = {d['reference']} ({d['n_ref']} images)"
        feats = {
            **self.features.config(),
            "reference": self.reference if self.reference is not None else REFERENCE_DEFAULT,
            "n_ref": self.n_ref or "all",
        }
        auto = {
            judge.backbone.name
            if judge is not None
            else "backbones with a domain classifier": domain,
            "other backbones": feats,
        }
        space: dict[str, Any] = {"auto": auto, "features": feats, "domain": domain}[self.space]
        return {
            "k": self.k,
            "space": space,
            "n_gen": "all samples",
            "distance": "L2, float64",
            "ball": "closed (d <= k-NN radius)",
        }

    def run_config(self) -> dict[str, Any]:
        """``config()`` plus what the last :meth:`compute` used: space, reference, N_ref, N_gen."""
        return {**self.config(), **self.last}

    def extractor(self, backbone: Backbone) -> ImageFeatures:
        judge = self._judge(backbone)
        return self.features if judge is None else DomainFeatures(judge)

    def from_features(self, features: FeatureSet, data: EvalSet) -> dict[str, float]:
        if features.n <= self.k:
            raise UserError(
                f"precision/recall with k = {self.k} needs more than {self.k} "
                f"generated images, got {features.n}"
            )
        judge = self._judge(data.backbone)
        if judge is not None:
            real = judge.reference_features
            d = judge.describe()
            info = {
                "space": d["classifier"],
                "reference": f"{data.backbone.name}:{judge.reference}",
                "n_ref": d["n_ref"],
            }
        else:
            self.features.check()
            self.features.to(self.device if self.device is not None else data.backbone.device)
            ref = resolve_reference(
                self.reference if self.reference is not None else data.reference,
                data.backbone,
                self.n_ref,
            )
            real = ref.features(self.features, data.cache_dir)
            info = {"space": self.features.id, **ref.describe()}
        self.last = {**info, "n_gen": features.n}
        dev = self.device if self.device is not None else "cpu"
        return precision_recall(real.to(dev), features.all().to(dev), self.k, self.chunk)

    def compute(self, data: EvalSet) -> dict[str, float]:
        if data.images.shape[0] <= self.k:  # before any work
            raise UserError(
                f"precision/recall with k = {self.k} needs more than {self.k} "
                f"generated images, got {data.images.shape[0]}"
            )
        return super().compute(data)


__all__ = ["PrecisionRecall", "in_manifold", "knn_radii", "precision_recall"]
