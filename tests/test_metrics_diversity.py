"""Intra-prompt LPIPS and the Vendi score against byliutao/cdm's DiversityScorer computations
(tests/cdm_reference.py, on the ``lpips`` and ``vendi-score`` packages) on LPIPS with
its shipped linear weights and a random AlexNet trunk; the Vendi formula against
``vendi_score.vendi.score_K``; AlexNet weights from a torchvision state dict."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import torch
from cdm_reference import intra_lpips_reference, vendi_reference
from tiny_clip import images

from cdmbench.backbones.base import Backbone
from cdmbench.errors import MissingWeightsError
from cdmbench.metrics.base import EvalSet
from cdmbench.metrics.diversity import ENV, IntraLPIPS, Vendi, vendi_from_kernel
from cdmbench.prompts_io import Prompt
from cdmbench.registry import METRICS

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lpips") is None or importlib.util.find_spec("vendi_score") is None,
    reason='lpips / vendi-score not installed (pip install -e ".[diversity]")',
)
RTOL = 1e-5


def _groups(k: int = 4, prompts: int = 3, size=(64, 80)) -> EvalSet:
    """``prompts`` prompts with k images each; per prompt, the images share a base pattern
    and differ by noise of a prompt-dependent strength, so the diversity varies by prompt."""
    g = torch.Generator().manual_seed(0)
    imgs, ps = [], []
    for p in range(prompts):
        base = images(1, seed=10 + p, size=size).float()
        noise = torch.randn(k, 3, *size, generator=g) * (10 + 30 * p)
        imgs.append((base + noise).clamp(0, 255).round().to(torch.uint8))
        ps += [Prompt(f"p{p}", f"prompt {p}")] * k
    return EvalSet(images=torch.cat(imgs), prompts=ps, backbone=Backbone())


def _metrics():
    lp = IntraLPIPS(pretrained=False, batch_size=4)
    ve = Vendi(pretrained=False, batch_size=3)
    with pytest.warns(UserWarning, match="random AlexNet"):
        model = lp.load("cpu")
    ve._model = model  # the same network, as the CDM scorer uses one for both
    return lp, ve, model


def _reference(model):
    """lpips' own LPIPS-AlexNet, holding the weights of ours."""
    import lpips

    ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    ref.load_state_dict(model.state_dict())
    return ref.eval()


def test_equal_the_cdm_diversity_scorer():
    lp, ve, model = _metrics()
    data = _groups()
    by_prompt = {}
    for i, p in enumerate(data.prompts):
        by_prompt.setdefault(p.id, []).append(data.images[i])
    by_prompt = {k: torch.stack(v).float() / 255.0 for k, v in by_prompt.items()}
    ref = _reference(model)

    per_prompt = [lp.score_group(model, data.images[4 * p : 4 * p + 4], "") for p in range(3)]
    assert per_prompt[0] < per_prompt[1] < per_prompt[2]  # more noise, more diverse
    ours = lp.compute(data)["intra_lpips"]
    assert ours == pytest.approx(intra_lpips_reference(ref, by_prompt, 64), rel=RTOL)

    vendi = [ve.score_group(model, data.images[4 * p : 4 * p + 4], "") for p in range(3)]
    assert all(1 <= v <= 4 for v in vendi) and vendi[0] < vendi[2]
    ours = ve.compute(data)["vendi"]
    assert ours == pytest.approx(vendi_reference(ref, by_prompt, 64), rel=RTOL)


def test_identical_images_and_single_image_prompts():
    lp, ve, model = _metrics()
    same = images(1, seed=1).expand(3, -1, -1, -1)
    assert lp.score_group(model, same, "") == pytest.approx(0.0, abs=1e-7)
    assert ve.score_group(model, same, "") == pytest.approx(1.0, rel=1e-5)
    data = _groups(k=2, prompts=2)
    data.images = torch.cat([data.images, images(1, seed=9, size=(64, 80))])
    data.prompts = [*data.prompts, Prompt("alone", "a single image")]
    assert lp.compute(data)["intra_lpips"] == pytest.approx(
        lp.compute(_groups(k=2, prompts=2))["intra_lpips"]
    )


def test_vendi_formula_equals_vendi_score_K():
    from vendi_score import vendi

    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 16):
        x = torch.nn.functional.normalize(torch.rand(n, 8, generator=g, dtype=torch.float64), dim=1)
        K = (x @ x.T).clamp(0, 1)
        assert vendi_from_kernel(K) == pytest.approx(float(vendi.score_K(K.numpy())), rel=1e-10)
    assert vendi_from_kernel(torch.eye(4)) == pytest.approx(4.0)
    assert vendi_from_kernel(torch.ones(4, 4)) == pytest.approx(1.0)
    assert float(vendi.score_K(np.eye(4))) == pytest.approx(4.0)


def test_alexnet_weights_from_a_torchvision_state_dict(tmp_path, monkeypatch):
    import torchvision

    torch.manual_seed(1)
    alex = torchvision.models.alexnet()
    torch.save(alex.state_dict(), tmp_path / "alexnet.pth")
    monkeypatch.setenv(ENV, str(tmp_path / "alexnet.pth"))
    metric = IntraLPIPS()
    metric.check()
    model = metric.load("cpu")
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.net(x)[-1], alex.features[:12](x))
    torch.save({"features.0.weight": alex.features[0].weight}, tmp_path / "partial.pth")
    with pytest.raises(MissingWeightsError, match="not torchvision's AlexNet"):
        IntraLPIPS(tmp_path / "partial.pth").load("cpu")


def test_missing_weights_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for metric, needle in [
        (Vendi(), "alexnet-owt-7be5be79.pth"),
        (IntraLPIPS(tmp_path / "none.pth"), "none.pth"),
    ]:
        t0 = time.perf_counter()
        with pytest.raises(MissingWeightsError) as exc:
            metric.check()
        assert time.perf_counter() - t0 < 5
        assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_registered_with_config():
    for name, cls in [("intra_lpips", IntraLPIPS), ("vendi", Vendi)]:
        assert METRICS.get(name) is cls
        cfg = cls().config()
        json.dumps(cfg)
        assert cfg["library"].startswith("lpips 0.1.4")
