"""Improved precision/recall (Kynkäänniemi et al. 2019) on constructed cases, against a
naive O(N^2) implementation, and as a metric on `digits` and with a folder reference.
"""

from __future__ import annotations

import math
import urllib.request

import pytest
import torch
from PIL import Image
from torch import Tensor

from cdmbench.backbones.base import Backbone
from cdmbench.backbones.digits import Digits, load_split
from cdmbench.errors import MissingWeightsError
from cdmbench.io import to_uint8
from cdmbench.metrics.base import EvalSet
from cdmbench.metrics.features import INCEPTION_ENV, INCEPTION_FILE
from cdmbench.metrics.prdc import PrecisionRecall, knn_radii, precision_recall


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.delenv(INCEPTION_ENV, raising=False)


def naive_precision_recall(real: list[list[float]], fake: list[list[float]], k: int):
    """The definition, literally, in pure Python."""

    def radii(points):
        return [
            sorted(math.dist(p, q) for j, q in enumerate(points) if j != i)[k - 1]
            for i, p in enumerate(points)
        ]

    def share_inside(probe, support, rad):
        inside = [
            any(math.dist(p, s) <= r for s, r in zip(support, rad, strict=True)) for p in probe
        ]
        return sum(inside) / len(inside)

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


CENTRES = torch.tensor([[30.0, 0.0], [0.0, 30.0], [-30.0, 0.0], [0.0, -30.0]], dtype=torch.float64)


def _clusters(n_per: int, modes: list[int], gen: torch.Generator) -> Tensor:
    """Unit-variance 2-D Gaussian blobs at the chosen ``CENTRES`` (30 apart or more)."""
    return torch.cat(
        [CENTRES[m] + torch.randn(n_per, 2, dtype=torch.float64, generator=gen) for m in modes]
    )


def test_identical_sets():
    real = torch.randn(200, 16, dtype=torch.float64)
    assert precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}


def test_disjoint_far_apart():
    real = torch.randn(200, 16, dtype=torch.float64)
    fake = torch.randn(150, 16, dtype=torch.float64) + 100.0
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_half_the_modes():
    g = torch.Generator().manual_seed(1)
    real = _clusters(150, [0, 1, 2, 3], gen=g)
    exact = precision_recall(real, real[:300].clone())  # modes 0 and 1, point for point
    assert exact == {"precision": 1.0, "recall": 0.5}
    sampled = precision_recall(real, _clusters(150, [0, 1], gen=g))  # fresh draws, 2 modes
    assert sampled["precision"] > 0.9
    assert 0.4 < sampled["recall"] <= 0.5


@pytest.mark.parametrize("k", [1, 3, 5])
def test_matches_naive(k):
    g = torch.Generator().manual_seed(k)
    real = torch.randn(60, 5, dtype=torch.float64, generator=g)
    fake = 0.8 * torch.randn(50, 5, dtype=torch.float64, generator=g) + 0.4
    real[7] = real[3]  # a duplicate: its k-th other neighbour may be at distance 0
    ours = precision_recall(real, fake, k=k, chunk=7)
    p, r = naive_precision_recall(real.tolist(), fake.tolist(), k)
    assert 0.0 < p < 1.0 and 0.0 < r < 1.0
    assert ours == {"precision": p, "recall": r}
    assert precision_recall(real, fake, k=k, chunk=1024) == ours  # chunking changes nothing


def test_radii_and_argument_checks():
    x = torch.tensor([[0.0], [1.0], [3.0], [3.0]], dtype=torch.float64)
    assert knn_radii(x, 1).tolist() == [1.0, 1.0, 0.0, 0.0]
    assert knn_radii(x, 2).tolist() == [3.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError):
        knn_radii(x, 4)
    with pytest.raises(ValueError):
        precision_recall(x, torch.zeros(5, 2))


# ------------------------------------------------------------------------------ the metric
def _digits_u8(labels_kept: set[int] | None = None) -> Tensor:
    x, y = load_split("test")
    if labels_kept is not None:
        x = x[torch.tensor([int(c) in labels_kept for c in y])]
    return to_uint8((x + 1) / 2)


def test_metric_on_digits_uses_the_classifier_space(tmp_path):
    bb = Digits()
    metric = PrecisionRecall()
    metric.check()  # no Inception weights needed to start on digits
    same = metric.compute(EvalSet(images=_digits_u8(), prompts=[], backbone=bb, cache_dir=tmp_path))
    assert same == {"precision": 1.0, "recall": 1.0}
    assert metric.run_config()["space"] == "digits classifier"
    assert metric.run_config()["n_ref"] == 445
    half = metric.compute(
        EvalSet(images=_digits_u8({0, 1, 2, 3, 4}), prompts=[], backbone=bb, cache_dir=tmp_path)
    )
    assert half["precision"] == 1.0
    assert 0.4 < half["recall"] < 0.75  # digits 5-9 are missing: recall drops to about half
    assert not list(tmp_path.iterdir())  # nothing to cache for a 445-image reference


def test_metric_with_feature_fn_and_folder_reference(tmp_path):
    calls = {"n": 0}

    def pixels(x: Tensor) -> Tensor:
        calls["n"] += x.shape[0]
        return x.float().flatten(1)

    ref = torch.randint(0, 256, (24, 3, 6, 6), dtype=torch.uint8)
    (tmp_path / "ref").mkdir()
    for i, img in enumerate(ref):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / "ref" / f"{i}.png")
    data = EvalSet(
        images=ref[:12].clone(),
        prompts=[],
        backbone=Backbone(),
        reference=str(tmp_path / "ref"),
        cache_dir=tmp_path / "cache",
    )
    metric = PrecisionRecall(feature_fn=pixels, feature_id="pixels", batch_size=5)
    out = metric.compute(data)
    assert out["precision"] == 1.0
    p, r = naive_precision_recall(
        ref.flatten(1).double().tolist(), ref[:12].flatten(1).double().tolist(), 3
    )
    assert out == {"precision": p, "recall": r}
    assert calls["n"] == 36
    assert len(list((tmp_path / "cache").glob("ref-features-*-n24-*.npz"))) == 1
    assert PrecisionRecall(feature_fn=pixels, feature_id="pixels").compute(data) == out
    assert calls["n"] == 48  # the reference features came from the cache


def test_metric_needs_inception_off_digits(tmp_path):
    metric = PrecisionRecall(inception_path=tmp_path / INCEPTION_FILE)
    metric.check()  # "auto" cannot know the backbone yet
    data = EvalSet(
        images=torch.zeros(8, 3, 8, 8, dtype=torch.uint8),
        prompts=[],
        backbone=Backbone(),
        cache_dir=tmp_path / "cache",
    )
    with pytest.raises(MissingWeightsError) as err:
        metric.compute(data)
    assert "\n" not in str(err.value) and INCEPTION_FILE in str(err.value)
    with pytest.raises(MissingWeightsError):
        PrecisionRecall(space="features", inception_path=tmp_path / INCEPTION_FILE).check()
