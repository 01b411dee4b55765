"""HPSv2 against the authors' package: ``hpsv2.img_score.score`` (tgxs002/HPSv2, PyPI hpsv2x
1.2.0, the fork the official CDM evaluation installs) with its own open_clip copy, its
``preprocess_val`` and a checkpoint in the HPS format, on a tiny random model of the ViT-H-14
layout (same config keys, fewer and narrower layers, the real 224-px input)."""

from __future__ import annotations

import importlib.util
import json
import time
import warnings

import pytest
import torch
from tiny_clip import TEXTS, images

from cdmbench.errors import MissingWeightsError
from cdmbench.metrics.clip_score import uint8_to_pil
from cdmbench.metrics.hps import ENV, HPSv2, preprocess
from cdmbench.registry import METRICS

HAVE_HPS = importlib.util.find_spec("hpsv2") is not None
needs_hps = pytest.mark.skipif(
    not HAVE_HPS,
    reason="hpsv2 reference not installed (pip install clint && pip install --no-deps "
    "hpsv2x==1.2.0)",
)
TINY = "HPS-tiny"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture()
def tiny_arch(monkeypatch):
    """The tiny config registered with open_clip (and the hpsv2 package's copy, if present)."""
    import open_clip.factory

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, TINY, TINY_CFG)
    if HAVE_HPS:
        from hpsv2.src.open_clip import factory

        monkeypatch.setitem(factory._MODEL_CONFIGS, TINY, TINY_CFG)


@pytest.fixture()
def img_score(tiny_arch, tmp_path):
    """hpsv2.img_score with the package's own model and transforms for the tiny config, and
    a checkpoint of it in the HPS format ({"state_dict": ...})."""
    filters = list(warnings.filters)
    import hpsv2.img_score as img_score  # sets a global "ignore UserWarning" filter

    warnings.filters[:] = filters
    from hpsv2.src.open_clip import create_model_and_transforms

    torch.manual_seed(0)
    model, _, preprocess_val = create_model_and_transforms(
        TINY, None, precision="amp", device="cpu", light_augmentation=True, output_dict=True
    )
    with torch.no_grad():  # HPS' fine-tuned logit scale, so that leaving it out is tested
        model.logit_scale.fill_(4.6052)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    img_score.model_dict.clear()
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    yield img_score, tmp_path / "HPS_v2.1_compressed.pt"
    img_score.model_dict.clear()


@needs_hps
def test_equals_hpsv2_img_score(img_score):
    ref, ckpt = img_score
    metric = HPSv2(ckpt, model=TINY, batch_size=3)
    metric.check()
    for size in [(224, 224), (48, 64), (300, 257), (64, 23)]:
        x = images(4, seed=1, size=size)
        ours = metric.scores(x, TEXTS)
        assert ours.dtype == torch.float64 and ours.std() > 1e-4
        expected = [
            ref.score([pil], text, cp=str(ckpt))[0]
            for pil, text in zip(uint8_to_pil(x), TEXTS, strict=True)
        ]
        ref_scores = torch.tensor(expected, dtype=torch.float64)
        # 1e-5 relative to the batch's largest score: a cosine near 0 has no relative digits
        tol = 1e-5 * float(ref_scores.abs().max())
        torch.testing.assert_close(ours, ref_scores, rtol=1e-5, atol=tol)


@needs_hps
def test_preprocessing_equals_preprocess_val(tiny_arch):
    """The package's ToTensor -> ResizeMaxSize -> Normalize, per PIL image, against ours
    batched (the batched tensor version is byliutao/cdm's)."""
    from hpsv2.src.open_clip import image_transform

    transform = image_transform(224, is_train=False, resize_longest_max=True)
    for size in [(224, 224), (225, 100), (48, 64), (300, 257)]:
        x = images(2, seed=2, size=size)
        ref = torch.stack([transform(p) for p in uint8_to_pil(x)])
        torch.testing.assert_close(preprocess(x, 224), ref, rtol=0, atol=1e-6)


def test_random_weights_and_grey(tiny_arch):
    metric = HPSv2(model=TINY, pretrained=False, batch_size=2)
    metric.check()
    with pytest.warns(UserWarning, match="random weights"):
        model = metric.load("cpu")
    grey = images(3, seed=3)[:, :1]
    s = metric.scores(grey, TEXTS[:3])
    torch.testing.assert_close(s, metric.scores(grey.expand(-1, 3, -1, -1), TEXTS[:3]))
    one = metric.score_batch(model, grey[:1], TEXTS[:1])
    torch.testing.assert_close(one, s[:1], rtol=1e-6, atol=0)
    assert s.abs().max() <= 1 + 1e-6  # a cosine: no logit scale


def test_missing_weights_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for metric, needle in [
        (HPSv2(cache_dir=tmp_path), "xswu/HPSv2/HPS_v2.1_compressed.pt"),
        (HPSv2(cache_dir=tmp_path, version="v2.0"), "HPS_v2_compressed.pt"),
        (HPSv2(tmp_path / "none.pt"), "none.pt"),
    ]:
        t0 = time.perf_counter()
        with pytest.raises(MissingWeightsError) as exc:
            metric.check()
        assert time.perf_counter() - t0 < 5
        assert needle in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="version"):
        HPSv2(version="v3")


def test_registered_with_config():
    assert METRICS.get("hpsv2") is HPSv2
    cfg = HPSv2().config()
    json.dumps(cfg)
    assert cfg["model"] == "ViT-H-14" and cfg["version"] == "v2.1"
    assert "no logit scale" in cfg["convention"]
