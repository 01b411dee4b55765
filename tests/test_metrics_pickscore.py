"""PickScore, the plain-cosine CLIP score and the LAION aesthetic score against the authors'
computations (tests/cdm_reference.py: byliutao/cdm's PickScoreScorer, ClipScorer and
AestheticScorer; improved-aesthetic-predictor's MLP head and simple_inference.py) on tiny random
transformers CLIP models with the real 224-px preprocessing, and the preprocessing against the
steps of transformers 4.x's PIL CLIPImageProcessor, which the authors ran."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from cdm_reference import (
    aesthetic_head,
    aesthetic_predictor_reference,
    aesthetic_reference,
    clip_cos_reference,
    pickscore_reference,
)
from tiny_clip import TEXTS, images, write_model, write_processor

from cdmbench.backbones.base import Backbone
from cdmbench.errors import MissingWeightsError
from cdmbench.metrics.aesthetic import LaionAesthetic
from cdmbench.metrics.base import EvalSet
from cdmbench.metrics.clip_cos import ClipScoreCos
from cdmbench.metrics.clip_score import uint8_to_pil
from cdmbench.metrics.pickscore import PickScore
from cdmbench.prompts_io import Prompt
from cdmbench.registry import METRICS

RTOL = 1e-5


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_clip")
    write_processor(root / "processor")
    write_model(root / "model")
    write_model(root / "clip768", projection_dim=768, seed=1)
    write_processor(root / "clip768")  # CLIP repos hold model and processor files together
    return root


def _reference_processor(d):
    """CLIPProcessor as transformers 4.x's AutoProcessor built it: PIL image processor."""
    from transformers import AutoTokenizer, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(str(d)),
        tokenizer=AutoTokenizer.from_pretrained(str(d)),
    )


def _model(d):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(d)).eval()


def _close(ours, ref):
    torch.testing.assert_close(ours.to(torch.float64), ref.to(torch.float64), rtol=RTOL, atol=0)


def test_pil_processor_is_transformers4_clip_preprocessing(dirs):
    """transformers 4.x CLIPImageProcessor: PIL bicubic resize of the shortest side to 224
    (long side int(224 * long / short)), center crop at ((h - 224) // 2, (w - 224) // 2),
    x / 255 in float32, (x - mean) / std."""
    from PIL import Image

    from cdmbench.metrics import _hf_clip as hf

    proc = hf.load_image_processor(dirs / "processor")
    for size in [(48, 64), (300, 257)]:
        x = images(2, seed=3, size=size)
        ours = hf.pixel_values(proc, x, "cpu")
        for k, pil in enumerate(uint8_to_pil(x)):
            w, h = pil.size
            nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
            r = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC))
            top, left = (nh - 224) // 2, (nw - 224) // 2
            r = r[top : top + 224, left : left + 224].astype(np.float32) * np.float32(1 / 255)
            mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
            std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
            ref = torch.from_numpy(((r - mean) / std).transpose(2, 0, 1))
            torch.testing.assert_close(ours[k], ref, atol=1e-5, rtol=0)


def test_pickscore_equals_the_authors_code(dirs):
    metric = PickScore(dirs / "model", dirs / "processor", batch_size=3)
    metric.check()
    model = metric.load("cpu")
    ref_model, ref_proc = _model(dirs / "model"), _reference_processor(dirs / "processor")

    def ref(prompts, pil):
        return pickscore_reference(ref_model, ref_proc, prompts, pil)

    for size in [(48, 64), (300, 257)]:
        x = images(4, seed=1, size=size)
        ours = metric.scores(x, TEXTS)
        assert ours.dtype == torch.float64 and ours.shape == (4,)
        assert ours.std() > 1e-3  # not degenerate
        _close(ours, ref(TEXTS, uint8_to_pil(x)))
        _close(metric.score_batch(model, x[:1], TEXTS[:1]), ref(TEXTS[:1], uint8_to_pil(x[:1])))
    # grey images are scored as RGB
    grey = images(2, seed=2)[:, :1]
    _close(metric.scores(grey, TEXTS[:2]), metric.scores(grey.expand(-1, 3, -1, -1), TEXTS[:2]))
    data = EvalSet(
        images=images(4, seed=1),
        prompts=[Prompt(str(i), t) for i, t in enumerate(TEXTS)],
        backbone=Backbone(),
    )
    assert metric.compute(data)["pickscore"] == pytest.approx(
        float(ref(TEXTS, uint8_to_pil(data.images)).double().mean()), rel=RTOL
    )


def test_clip_score_cos_equals_the_cdm_code(dirs):
    metric = ClipScoreCos(dirs / "clip768", batch_size=4)
    metric.check()
    ref_model, ref_proc = _model(dirs / "clip768"), _reference_processor(dirs / "clip768")
    for size in [(48, 64), (300, 257)]:
        x = images(4, seed=4, size=size)
        ours = metric.scores(x, TEXTS)
        assert ours.abs().max() <= torch.exp(torch.tensor(3.0)) / 100 + 1e-6
        _close(ours, clip_cos_reference(ref_model, ref_proc, x.float() / 255.0, TEXTS))


def test_aesthetic_equals_the_authors_code(dirs, tmp_path):
    torch.manual_seed(5)
    head = aesthetic_head(768).eval()
    torch.save(head.state_dict(), tmp_path / "aesthetic-model.pth")
    metric = LaionAesthetic(dirs / "clip768", tmp_path / "aesthetic-model.pth", batch_size=3)
    metric.check()
    clip = _model(dirs / "clip768")
    proc = _reference_processor(dirs / "clip768")
    for size in [(48, 64), (300, 257)]:
        x = images(4, seed=6, size=size)
        ours = metric.scores(x, TEXTS)
        assert ours.std() > 1e-4
        # byliutao/cdm: the uint8 tensor straight into the processor
        _close(ours, aesthetic_reference(clip, proc, head, x))
        # improved-aesthetic-predictor simple_inference.py: one PIL image at a time
        for k, pil in enumerate(uint8_to_pil(x)):
            prediction = aesthetic_predictor_reference(clip, proc, head, pil)
            assert ours[k].item() == pytest.approx(prediction, rel=RTOL)


def _one_line(fn) -> str:
    t0 = time.perf_counter()
    with pytest.raises(MissingWeightsError) as exc:
        fn()
    assert time.perf_counter() - t0 < 5  # offline: no retries
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_missing_weights_one_line(tmp_path, monkeypatch):
    for env in ("CDMBENCH_PICKSCORE", "CDMBENCH_AESTHETIC", "CDMBENCH_CLIP"):
        monkeypatch.delenv(env, raising=False)
    msg = _one_line(PickScore(cache_dir=tmp_path).check)
    assert "yuvalkirstain/PickScore_v1" in msg
    msg = _one_line(PickScore(tmp_path / "nowhere", cache_dir=tmp_path).check)
    assert str(tmp_path / "nowhere") in msg
    assert "openai/clip-vit-large-patch14" in _one_line(LaionAesthetic(cache_dir=tmp_path).check)
    assert "openai/clip-vit-large-patch14" in _one_line(ClipScoreCos(cache_dir=tmp_path).check)
    monkeypatch.setenv("CDMBENCH_PICKSCORE", str(tmp_path / "from-env"))
    assert "from-env" in _one_line(PickScore(cache_dir=tmp_path).check)


def test_registered_with_config():
    for name, cls in [
        ("pickscore", PickScore),
        ("clip_score_cos", ClipScoreCos),
        ("aesthetic", LaionAesthetic),
    ]:
        assert METRICS.get(name) is cls
        json.dumps(cls().config())
        assert set(cls.values) == {name}
    assert "/ 100" in ClipScoreCos().config()["convention"]
    assert "clip_score" in METRICS  # torchmetrics' convention stays alongside
