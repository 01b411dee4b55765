"""Per-class coverage: improved recall within each class (mode coverage of a conditional model).

Recall over the whole test set (Kynkäänniemi et al. 2019) can stay high while a model drops
the rarer styles of a class, because another class's samples cover them in feature space.
Here each class that was prompted is scored alone: the real images of class c (the reference split's labels)
against the samples generated for class c, in the domain classifier's features, with k-NN
balls around the generated samples (k = 3, closed balls, as ``precision_recall``). Two
values summarise the classes:

    class_recall_mean = mean_c recall_c        (how much of every class is covered)
    class_recall_min  = min_c recall_c         (the worst-covered class: a collapsed mode)

A reverse-KL (mode-seeking) student shows up as a low minimum at a fair mean. Applies to
backbones with a domain classifier and labelled real data (`digits`: the test split, 44-45
images per class).
"""

from __future__ import annotations

from typing import Any

import torch

from cdmbench.backbones.base import Backbone
from cdmbench.errors import UserError
from cdmbench.metrics.base import EvalSet, Value
from cdmbench.metrics.digits import DigitsFD, DigitsJudge, no_domain
from cdmbench.metrics.prdc import in_manifold, knn_radii


def class_recall(
    real: torch.Tensor,
    real_labels: torch.Tensor,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    k: int = 3,
) -> dict[int, float]:
    """Recall of each class's real features inside the k-NN manifold of that class's
    generated features; {class: recall} over the classes that were generated (a prompt set of
    some classes scores those) and have real images."""
    out: dict[int, float] = {}
    have = {int(v) for v in real_labels.unique()}
    for c in sorted(int(v) for v in fake_labels.unique() if int(v) in have):
        r, f = real[real_labels == c], fake[fake_labels == c]
        if f.shape[0] <= k:
            raise UserError(
                f"class_recall with k = {k} needs more than {k} samples of class {c}, got "
                f"{f.shape[0]}; generate more samples per prompt"
            )
        out[c] = float(in_manifold(r, f, knn_radii(f, k)).double().mean())
    return out


class ClassRecall(DigitsFD):
    """Per-class improved recall in the domain classifier's features: mean and minimum."""

    name = "class_recall"
    values = {
        "class_recall_mean": Value(higher_is_better=True, tolerance="0.05"),
        "class_recall_min": Value(higher_is_better=True, tolerance="0.1"),
    }

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.k = k
        self.last: dict[str, Any] = {}  # the last compute()'s per-class recalls

    @property
    def min_samples(self) -> int:
        return self.k + 1

    def _judge(self, backbone: Backbone) -> DigitsJudge:
        judge = super()._judge(backbone)  # the domain judge DigitsFD binds, and its checks
        if backbone.real_latents(judge.reference) is None:  # labels of the reference split
            raise no_domain(f"metric '{self.name}'", backbone)
        return judge

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "features": "domain classifier penultimate",
            "reference": "the backbone's test split, per class",
            "distance": "L2, float64",
            "ball": "closed (d <= k-NN radius of the generated samples)",
        }

    def compute(self, data: EvalSet) -> dict[str, float]:
        judge = self._judge(data.backbone)
        labels = torch.tensor([p.label for p in data.prompts])
        fake = judge.features_and_logits(data.images.float() / 255.0)[0]
        real_labels = data.backbone.real_latents(judge.reference)[1]
        per_class = class_recall(judge.reference_features, real_labels, fake, labels, self.k)
        if not per_class:
            raise UserError(
                f"class_recall: none of the prompted classes has real images in the "
                f"{judge.reference} split"
            )
        self.last = {"per_class": {str(c): round(v, 4) for c, v in per_class.items()}}
        values = list(per_class.values())
        return {"class_recall_mean": sum(values) / len(values), "class_recall_min": min(values)}


__all__ = ["ClassRecall", "class_recall"]
