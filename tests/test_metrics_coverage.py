"""Per-class coverage (class_recall): per-class improved recall in the domain features."""

import pytest
import torch

from cdmbench.backbones.digits import Digits, load_split
from cdmbench.io import to_uint8
from cdmbench.metrics.base import EvalSet
from cdmbench.metrics.coverage import ClassRecall, class_recall
from cdmbench.prompts_io import Prompt


def test_a_collapsed_class_has_low_recall_and_sets_the_minimum():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 4, generator=g)
    labels = torch.arange(200) % 2
    # class 0: generated like its real points; class 1: every sample at one real point
    fake0 = real[labels == 0] + 0.01 * torch.randn(100, 4, generator=g)
    fake1 = real[labels == 1][:1].repeat(100, 1) + 0.01 * torch.randn(100, 4, generator=g)
    fake = torch.cat([fake0, fake1])
    fake_labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    per = class_recall(real, labels, fake, fake_labels)
    assert per[0] > 0.9
    assert per[1] < 0.1


def test_the_real_test_split_covers_itself():
    bb = Digits()
    x, y = load_split("test")
    prompts = [Prompt(f"digit-{int(c)}", "", int(c)) for c in y]
    data = EvalSet(images=to_uint8((x + 1) / 2), prompts=prompts, backbone=bb)
    m = ClassRecall()
    m.check(bb)
    out = m.compute(data)
    assert out["class_recall_mean"] == 1.0 and out["class_recall_min"] == 1.0
    # class 3 collapsed to copies of one of its images: its recall falls, the minimum with it
    images = data.images.clone()
    threes = (y == 3).nonzero().flatten()
    images[threes] = images[threes[0]].clone()
    collapsed = m.compute(EvalSet(images=images, prompts=prompts, backbone=bb))
    per_class = m.last["per_class"]
    assert per_class["3"] < 0.2 and collapsed["class_recall_min"] == pytest.approx(
        per_class["3"], abs=1e-4
    )
    assert all(per_class[str(c)] == 1.0 for c in range(10) if c != 3)
