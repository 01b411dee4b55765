"""Domain metrics (fd_digits, prompt_acc, precision/recall's domain space) follow the backbone
contract (a domain classifier and real images), never a backbone's name."""

from __future__ import annotations

import pytest
import torch

from cdmbench.backbones.base import Backbone
from cdmbench.backbones.digits import Digits, load_split
from cdmbench.errors import UserError
from cdmbench.io import to_uint8
from cdmbench.metrics.base import EvalSet
from cdmbench.metrics.digits import DigitsFD, DigitsJudge, PromptAccuracy
from cdmbench.metrics.prdc import PrecisionRecall
from cdmbench.prompts_io import Prompt


class Renamed(Digits):
    """`digits` under another name: the same classifier and real images."""

    def __init__(self) -> None:
        super().__init__()
        self.name = "renamed"


def _eval_set(backbone: Backbone, n: int = 60) -> EvalSet:
    x, y = load_split("train")
    prompts = [Prompt(f"digit-{int(c)}", "", int(c)) for c in y[:n]]
    return EvalSet(images=to_uint8((x[:n] + 1) / 2), prompts=prompts, backbone=backbone)


@pytest.mark.parametrize("cls", [DigitsFD, PromptAccuracy])
def test_domain_metric_depends_on_the_contract_not_the_name(cls):
    digits, renamed = cls(), cls()
    digits.check(Digits())
    renamed.check(Renamed())
    a = digits.compute(_eval_set(digits.judge.backbone))
    b = renamed.compute(_eval_set(renamed.judge.backbone))
    assert a == b
    judge = DigitsJudge(Digits())
    data = _eval_set(Digits())
    labels = torch.tensor([p.label for p in data.prompts])
    assert a == {cls.name: judge.score(data.images.float() / 255.0, labels)[cls.name]}
    assert renamed.config()["features"] == "renamed classifier penultimate (32-d)"


def test_digits_config_is_what_the_records_store():
    metric = DigitsFD()
    metric.check(Digits())
    assert metric.config() == {
        "features": "digits classifier penultimate (32-d)",
        "reference": "digits test split (445 real images)",
        "dtype": "float64",
        "input": "8-bit PNG levels",
    }
    pr = PrecisionRecall()
    pr.check(Digits())
    assert pr.config()["space"]["digits"] == (
        "digits classifier penultimate (32-d), reference = digits test split (445 images)"
    )


@pytest.mark.parametrize(
    "metric",
    [
        DigitsFD(),
        PromptAccuracy(),
        PrecisionRecall(space="domain"),
        PrecisionRecall(space="digits"),
    ],
)
def test_backbone_without_a_domain_classifier_is_refused_in_one_line(metric):
    class Plain(Backbone):
        name = "plain"

    with pytest.raises(UserError) as err:
        metric.check(Plain())
    assert "\n" not in str(err.value) and "domain classifier" in str(err.value)
    assert "'plain'" in str(err.value)


def test_precision_recall_auto_uses_the_domain_space_of_any_backbone_with_one():
    a, b = PrecisionRecall(), PrecisionRecall()
    a.check(Digits())
    b.check(Renamed())  # no Inception weights needed: the domain classifier is used
    out_a = a.compute(_eval_set(Digits()))
    out_b = b.compute(_eval_set(Renamed()))
    assert out_a == out_b
    assert b.config()["space"]["renamed"] == (
        "renamed classifier penultimate (32-d), reference = renamed test split (445 images)"
    )
    assert b.last["space"] == "renamed classifier" and b.last["reference"] == "renamed:test"


def test_to_uint8_levels_and_layout():
    x = torch.tensor([-0.5, 0.0, 0.2, 0.5, 0.999, 1.0, 3.0]).view(1, 1, 1, 7)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == x.shape
    assert u.flatten().tolist() == [0, 0, 51, 128, 255, 255, 255]
    assert torch.equal(to_uint8(x.double()), u)  # computed in float32 whatever comes in
