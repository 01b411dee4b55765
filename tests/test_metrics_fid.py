"""FID: the distance against clean-fid and torchmetrics, the clean resize against clean-fid's
own, the metric end to end with small random feature networks, reference caching, and the
one-line failure when clean-fid's Inception weights are missing. Offline: nothing downloads.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from cdmbench.backbones.base import Backbone
from cdmbench.backbones.digits import Digits, load_split
from cdmbench.errors import MissingWeightsError, UserError
from cdmbench.io import to_uint8
from cdmbench.metrics.base import EvalSet, Value
from cdmbench.metrics.features import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    INCEPTION_URL,
    InceptionFeatures,
    clean_resize,
    cleanfid_inception_path,
    inception_path,
)
from cdmbench.metrics.fid import FID
from cdmbench.metrics.frechet import frechet_distance_features


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to download (clean-fid uses urllib) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.delenv(INCEPTION_ENV, raising=False)


def _features(seed: int, n: int = 300, d: int = 64, shift: float = 0.0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ mix + 0.1 * rng.normal(size=(n, d))


def _cleanfid_resize(images: np.ndarray) -> np.ndarray:
    """clean-fid's own resize of uint8 [N, C, H, W], after PIL's grey -> RGB; [N, 3, 299, 299]."""
    from cleanfid.resize import make_resizer

    fn = make_resizer("PIL", False, "bicubic", (299, 299))
    out = []
    for img in images:
        hwc = img.transpose(1, 2, 0)
        if hwc.shape[2] == 1:
            hwc = np.asarray(Image.fromarray(hwc[:, :, 0]).convert("RGB"))
        out.append(fn(hwc).transpose(2, 0, 1))
    return np.stack(out)


class TinyNet(nn.Module):
    """A small randomly initialised conv net: uint8 images -> 16-d features."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.float() / 255.0
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


class Counting:
    """Wraps a feature function and counts the images it embeds."""

    def __init__(self, fn) -> None:
        self.fn, self.images = fn, 0
        self.__qualname__ = "Counting"

    def __call__(self, x: Tensor) -> Tensor:
        self.images += x.shape[0]
        return self.fn(x)


def _write_pngs(folder: Path, images: Tensor) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")


# ------------------------------------------------------------------------------ the distance
def test_fid_matches_cleanfid_and_torchmetrics():
    from cleanfid.fid import fid_from_feats
    from torchmetrics.image.fid import _compute_fid

    a, b = _features(0), _features(1, shift=0.3, scale=1.2)
    ours = frechet_distance_features(b, a)
    clean = float(fid_from_feats(b, a))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tm = float(_compute_fid(tb.mean(0), torch.cov(tb.T), ta.mean(0), torch.cov(ta.T)))
    assert ours > 1.0
    assert ours == pytest.approx(clean, rel=1e-3)
    assert ours == pytest.approx(tm, rel=1e-3)
    assert abs(frechet_distance_features(a, a)) < 1e-6


# ------------------------------------------------------------------------------ the resize
@pytest.mark.parametrize("backend", ["pil", "torch"])
def test_clean_resize_is_cleanfids_resize(backend):
    rng = np.random.default_rng(0)
    # upscales, one-pass cases, and downscales in both of Pillow's pass orders
    for c, h, w in [
        (3, 32, 32),
        (3, 37, 53),
        (1, 8, 8),
        (3, 320, 301),
        (3, 301, 320),
        (3, 299, 150),
        (3, 64, 299),
    ]:
        imgs = rng.integers(0, 256, (2, c, h, w), dtype=np.uint8)
        ours = clean_resize(torch.from_numpy(imgs), backend=backend, threads=2)
        assert ours.dtype == torch.float32 and ours.shape == (2, 3, 299, 299)
        np.testing.assert_array_equal(ours.numpy(), _cleanfid_resize(imgs))  # bit-identical


# ------------------------------------------------------------------------------ weights
def test_inception_location_and_url_are_cleanfids():
    import inspect

    import cleanfid.features
    from cleanfid import downloads_helper

    assert INCEPTION_URL == downloads_helper.inception_url
    assert '"/tmp"' in inspect.getsource(cleanfid.features.feature_extractor)
    assert inception_path() == cleanfid_inception_path()
    assert cleanfid_inception_path().name == INCEPTION_FILE


def test_missing_inception_fails_in_one_line(tmp_path, monkeypatch):
    missing = tmp_path / "weights" / INCEPTION_FILE
    with pytest.raises(MissingWeightsError) as err:
        InceptionFeatures(path=missing).check()
    msg = str(err.value)
    assert "\n" not in msg and INCEPTION_FILE in msg and INCEPTION_URL in msg
    assert str(missing) in msg

    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path))  # a folder: folder/inception-2015-12-05.pt
    with pytest.raises(MissingWeightsError, match=str(tmp_path / INCEPTION_FILE)):
        FID().check()
    data = EvalSet(
        images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
        prompts=[],
        backbone=Backbone(),
        cache_dir=tmp_path / "cache",
    )
    with pytest.raises(MissingWeightsError):
        FID().compute(data)  # fails before any work
    assert not (tmp_path / "cache").exists()


class _FakeLayers(nn.Module):
    """Stands in for the TorchScript file's ``layers``: [B, 3, 299, 299] -> [B, 2048, 1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Conv2d(3, 2048, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(x))


class _FakeInception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def test_inception_file_is_used_as_cleanfid_uses_it(tmp_path, monkeypatch):
    """A TorchScript file where clean-fid's would be is loaded and called as clean-fid does:
    ``base.layers((x - 128) / 128)`` on the clean resize, viewed as [B, 2048]."""
    import warnings

    fake = _FakeInception().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(fake), str(tmp_path / INCEPTION_FILE))
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path))
    feats = InceptionFeatures(batch_size=3)
    feats.check()
    imgs = torch.randint(0, 256, (4, 3, 12, 10), dtype=torch.uint8)
    with torch.no_grad():
        x = (torch.from_numpy(_cleanfid_resize(imgs.numpy())) - 128) / 128
        expected = fake.layers(x).view(4, 2048)
    torch.testing.assert_close(feats(imgs), expected)

    FID().check()  # the default metric finds the file through $CDMBENCH_INCEPTION too


class Recorder(nn.Module):
    """Passes its input to ``net``, keeping copies of what goes in and comes out."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.inputs, self.outputs = net, [], []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.clone())
        self.outputs.append(self.net(x))
        return self.outputs[-1]


def test_inception_pipeline_with_random_inception_v3():
    """The clean pipeline around the real architecture (random weights, never downloaded)."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=True)
    net.fc = nn.Identity()
    rec = Recorder(net).eval()
    feats = InceptionFeatures(model=rec, batch_size=2)
    feats.check()  # an explicit model needs no file
    imgs = torch.randint(0, 256, (2, 1, 20, 24), dtype=torch.uint8)  # grey, as digits
    ours = feats(imgs)
    expected_input = (torch.from_numpy(_cleanfid_resize(imgs.numpy())) - 128) / 128
    assert torch.equal(rec.inputs[0], expected_input)  # clean-fid's resize and scaling, exactly
    assert ours.shape == (2, 2048) and ours.dtype == torch.float32
    assert torch.equal(ours, rec.outputs[0])  # the pool features themselves, untouched
    assert feats.config()["mode"] == "clean" and "user model" in feats.config()["url"]


# ------------------------------------------------------------------------------ the metric
def test_fid_end_to_end_folder_reference_and_cache(tmp_path):
    from cleanfid.fid import fid_from_feats

    net = TinyNet().eval()
    fn = Counting(net)
    ref = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    gen = (torch.randint(0, 200, (30, 3, 16, 16)) + 40).to(torch.uint8)
    _write_pngs(tmp_path / "ref", ref)
    cache = tmp_path / "cache"
    data = EvalSet(
        images=gen,
        prompts=[],
        backbone=Backbone(),
        reference=str(tmp_path / "ref"),
        cache_dir=cache,
    )

    metric = FID(feature_fn=fn, feature_id="tiny", batch_size=16)
    first = metric.compute(data)["fid"]
    with torch.no_grad():
        expected = fid_from_feats(net(gen).double().numpy(), net(ref).double().numpy())
    assert first == pytest.approx(float(expected), rel=1e-4)
    assert fn.images == 70
    files = sorted(cache.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("fid-stats-") and "-n40-" in files[0].name
    assert not list(cache.glob("*.tmp"))  # written atomically
    run = metric.run_config()
    assert run["n_ref"] == 40 and run["n_gen"] == 30 and run["ref_resolution"] == "16x16"
    assert run["reference"].startswith("folder:") and run["features"] == "tiny"
    assert {"mode", "resize", "features", "reference", "n_ref", "n_gen"} <= set(metric.config())

    again = FID(feature_fn=fn, feature_id="tiny", batch_size=16).compute(data)["fid"]
    assert fn.images == 100  # only the generated images: the reference came from the cache
    assert again == first

    FID(feature_fn=fn, feature_id="tiny", n_ref=20).compute(data)
    assert fn.images == 150 and len(list(cache.glob("*.npz"))) == 2  # N is part of the key
    FID(feature_fn=TinyNet()).compute(data)  # another network, content-keyed id: new stats
    assert len(list(cache.glob("*.npz"))) == 3


def test_fid_reference_from_backbone_real_data(tmp_path):
    """reference "" -> the backbone's real test split, decoded and quantised like samples."""
    flat = Counting(lambda x: x.float().flatten(1))
    x_test, _ = load_split("test")
    x_train, _ = load_split("train")
    test_u8, train_u8 = to_uint8((x_test + 1) / 2), to_uint8((x_train + 1) / 2)
    bb = Digits()
    same = FID(feature_fn=flat, feature_id="pixels")
    data = EvalSet(images=test_u8, prompts=[], backbone=bb, cache_dir=tmp_path)
    assert abs(same.compute(data)["fid"]) < 1e-6
    assert same.run_config()["reference"] == "digits:test" and same.run_config()["n_ref"] == 445
    assert len(list(tmp_path.glob("fid-stats-digits-test-n445-*.npz"))) == 1

    data = EvalSet(images=train_u8, prompts=[], backbone=bb, cache_dir=tmp_path)
    value = FID(feature_fn=flat, feature_id="pixels").compute(data)["fid"]
    expected = frechet_distance_features(train_u8.flatten(1).double(), test_u8.flatten(1).double())
    assert value == pytest.approx(expected, rel=1e-9) and value > 0


def test_fid_reference_errors(tmp_path):
    data = EvalSet(
        images=torch.zeros(4, 3, 8, 8, dtype=torch.uint8),
        prompts=[],
        backbone=Backbone(),
        cache_dir=tmp_path,
    )
    with pytest.raises(UserError, match="no real data"):  # "" on a backbone without data
        FID(feature_fn=lambda x: x.float().flatten(1), feature_id="px").compute(data)
    data.reference = str(tmp_path / "missing" / "folder")
    with pytest.raises(UserError, match="not a folder"):
        FID(feature_fn=lambda x: x.float().flatten(1), feature_id="px").compute(data)


def test_fid_registered():
    from cdmbench.registry import METRICS

    cls = METRICS.get("fid")
    assert cls is FID and cls.values == {"fid": Value(higher_is_better=False, tolerance="10%")}
