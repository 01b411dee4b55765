"""Domain measures: Fréchet distance in a domain classifier's features, and prompt accuracy.

They apply to any backbone with a domain classifier and real images (``Backbone.
domain_classifier`` and ``Backbone.real_images``); `digits` ships both, hence the names
``fd_digits`` and ``prompt_acc``. Samples are judged as the images a user would save: decoded
to [0, 1], quantised to 8 bits, mapped back to the classifier's [-1, 1] input. The reference
set is the held-out test split (on `digits` 445 real images), which neither the teacher nor
the classifier saw.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cdmbench.backbones.base import Backbone
from cdmbench.errors import UserError
from cdmbench.metrics.base import EvalSet, Metric, Value
from cdmbench.metrics.features import ImageFeatures
from cdmbench.metrics.frechet import feature_stats, frechet_distance, prompt_accuracy


def quantize(images: Tensor) -> Tensor:
    """[0, 1] images -> 8-bit levels -> the classifier's [-1, 1] input."""
    return (images.clamp(0, 1) * 255).round() / 127.5 - 1.0


def no_domain(what: str, backbone: Backbone) -> UserError:
    """The one-line error for a domain measure on a backbone without a classifier or real data."""
    return UserError(
        f"{what} needs a backbone with a domain classifier and real "
        f"images; '{backbone.name}' has none (use fid or precision_recall with "
        "--reference)"
    )


class DigitsJudge:
    """Scores samples against the backbone's real test split with its domain classifier."""

    def __init__(
        self,
        backbone: Backbone,
        reference: str = "test",
        device: str | torch.device | None = None,
        classifier: nn.Module | None = None,
    ) -> None:
        """``device``: where to score (default: where the backbone puts its classifier)."""
        classifier = classifier if classifier is not None else backbone.domain_classifier()
        if classifier is None:
            raise no_domain("a domain judge", backbone)
        self.backbone, self.reference = backbone, reference
        self.classifier = classifier if device is None else classifier.to(device)
        self.device = next(self.classifier.parameters()).device

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate features and class logits of [0, 1] images, as saved at 8 bits."""
        x = quantize(images.to(self.device))
        f = self.classifier.features(x)
        return f, self.classifier.head(f)

    @cached_property
    def reference_features(self) -> Tensor:
        real = self.backbone.real_images(self.reference)
        if real is None:
            raise no_domain("a domain judge", self.backbone)
        return self.features_and_logits(real)[0]

    @cached_property
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        return feature_stats(self.reference_features)

    def describe(self) -> dict[str, Any]:
        """The classifier, its feature space and the reference set in words, and N_ref (on
        `digits`: "digits classifier", "... penultimate (32-d)", "digits test split", 445)."""
        n, dim = self.reference_features.shape
        classifier = f"{self.backbone.name} classifier"
        return {
            "classifier": classifier,
            "features": f"{classifier} penultimate ({dim}-d)",
            "reference": f"{self.backbone.name} {self.reference} split",
            "n_ref": n,
        }

    def score(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """{"fd_digits", "prompt_acc"} of [0, 1] images generated for class ``labels``."""
        f, logits = self.features_and_logits(images)
        return {
            "fd_digits": frechet_distance(*feature_stats(f), *self.reference_stats),
            "prompt_acc": prompt_accuracy(logits, labels),
        }


class DomainFeatures(ImageFeatures):
    """The judge's penultimate features of uint8 images, as an extractor the scoring driver
    shards and caches like any other; it stays on the judge's device."""

    mode = "8-bit PNG levels"

    def __init__(self, judge: DigitsJudge, batch_size: int = 1024) -> None:
        super().__init__(batch_size, judge.device)
        self.judge = judge
        d = judge.describe()
        self.id = f"{d['features']}, {judge.backbone.name} domain classifier"

    def to(self, device: str | torch.device) -> DomainFeatures:
        return self

    def embed(self, images: Tensor) -> Tensor:
        return self.judge.features_and_logits(images.float() / 255.0)[0].cpu()


def domain_judge(
    backbone: Backbone, reference: str = "test", device: str | torch.device | None = None
) -> DigitsJudge | None:
    """A judge of ``backbone``'s images; None where it has no domain classifier or real images."""
    classifier = backbone.domain_classifier()
    if classifier is None or backbone.real_images(reference) is None:
        return None
    return DigitsJudge(backbone, reference, device, classifier)


class DigitsFD(Metric):
    """Fréchet distance in the domain classifier's features to the real test split."""

    name = "fd_digits"
    values = {"fd_digits": Value(higher_is_better=False, tolerance="15%")}
    needs = ("images",)
    # the classifier is small: on the CPU its numbers do not depend on the accelerator
    device = "cpu"
    min_samples = 2  # a covariance needs two samples

    def __init__(self) -> None:
        self.judge: DigitsJudge | None = None

    def _judge(self, backbone: Backbone) -> DigitsJudge:
        if self.judge is None or self.judge.backbone is not backbone:
            judge = domain_judge(backbone, device=self.device)
            if judge is None:
                raise no_domain(f"metric '{self.name}'", backbone)
            self.judge = judge
        return self.judge

    def check(self, backbone: Backbone | None = None) -> None:
        if backbone is not None:
            self._judge(backbone)

    def config(self) -> dict[str, Any]:
        if self.judge is None:  # not yet bound to a backbone by check()
            features, reference = "domain classifier penultimate", "the backbone's test split"
        else:
            d = self.judge.describe()
            features, reference = d["features"], f"{d['reference']} ({d['n_ref']} real images)"
        return {
            "features": features,
            "reference": reference,
            "dtype": "float64",
            "input": "8-bit PNG levels",
        }

    def compute(self, data: EvalSet) -> dict[str, float]:
        labels = torch.tensor([p.label for p in data.prompts])
        scores = self._judge(data.backbone).score(data.images.float() / 255.0, labels)
        return {"fd_digits": scores["fd_digits"]}


class PromptAccuracy(DigitsFD):
    """Share of samples the domain classifier assigns to the prompted class."""

    name = "prompt_acc"
    values = {"prompt_acc": Value(higher_is_better=True, tolerance="0.02")}
    min_samples = 1

    def compute(self, data: EvalSet) -> dict[str, float]:
        labels = torch.tensor([p.label for p in data.prompts])
        scores = self._judge(data.backbone).score(data.images.float() / 255.0, labels)
        return {"prompt_acc": scores["prompt_acc"]}


__all__ = [
    "DigitsFD",
    "DigitsJudge",
    "DomainFeatures",
    "PromptAccuracy",
    "domain_judge",
    "quantize",
]
