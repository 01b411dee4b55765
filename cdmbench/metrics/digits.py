"""Domain measures on `digits`: Fréchet distance in classifier features and prompt accuracy.

Samples are judged as the images a user would save: decoded to [0, 1], quantised to 8 bits,
mapped back to the classifier's [-1, 1] input. The reference set is the held-out test split
(445 real images), which neither the teacher nor the classifier saw.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from cdmbench.backbones.digits import Digits, load_split
from cdmbench.metrics.frechet import feature_stats, frechet_distance, prompt_accuracy


def quantize(images: Tensor) -> Tensor:
    """[0, 1] images -> 8-bit levels -> the classifier's [-1, 1] input."""
    return (images.clamp(0, 1) * 255).round() / 127.5 - 1.0


class DigitsJudge:
    """Scores digit samples against the real test split with the shipped classifier."""

    def __init__(self, backbone: Digits | None = None, reference: str = "test") -> None:
        self.backbone = backbone or Digits()
        self.classifier = self.backbone.load_classifier()
        self.reference = reference

    @torch.inference_mode()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = quantize(images.to(self.backbone.device))
        f = self.classifier.features(x)
        return f, self.classifier.head(f)

    @cached_property
    def reference_stats(self) -> tuple[np.ndarray, np.ndarray]:
        x, _ = load_split(self.reference)
        return feature_stats(self.features_and_logits((x + 1) / 2)[0])

    def score(self, images: Tensor, labels: Tensor) -> dict[str, float]:
        """{"fd_digits", "prompt_acc"} of [0, 1] images generated for class ``labels``."""
        f, logits = self.features_and_logits(images)
        return {"fd_digits": frechet_distance(*feature_stats(f), *self.reference_stats),
                "prompt_acc": prompt_accuracy(logits, labels)}
