"""Sharded scoring: two gloo processes give the values of one, features are extracted once per
network and shared, an interrupted scoring recomputes only the missing chunks, and no more
than two chunks of images are held at once. Tiny random networks, offline."""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing as mp
import os
import socket
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from cdmbench.backbones.base import Backbone
from cdmbench.metrics.base import EvalSet, PerPromptMetric, Value
from cdmbench.metrics.fid import FID
from cdmbench.metrics.prdc import PrecisionRecall
from cdmbench.prompts_io import Prompt
from cdmbench.scoring import chunk_ranges, read_pngs, score_sample_set

HAVE_IR = importlib.util.find_spec("ImageReward") is not None
TEXTS = ["a red cat", "a blue dog on the table", "a photo of a bird", "the cat", "a dog"]
PER_PROMPT = 7
CHUNK = 16  # two prompts (14 images) per chunk: chunks 0, 2 on rank 0 and chunk 1 on rank 1
CLIP_ARCH = "ViT-S-32-alt"


class TinyNet(nn.Module):
    """uint8 images -> 16-d features, random weights; counts the images it embeds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.seen: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.shape[0])
        return self.net(x.float() / 255.0)


class PixelSpread(PerPromptMetric):
    """Per prompt: the mean distance of its images' mean colours to their centroid."""

    name = "pixel_spread"
    values = {"pixel_spread": Value(higher_is_better=True)}

    def load(self, device="cpu"):
        return None

    def score_group(self, model, images: Tensor, text: str) -> float:
        c = images.double().mean((2, 3))
        return float((c - c.mean(0)).norm(dim=1).mean())


def _images(n: int, seed: int, size: int = 32) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 255).round().to(torch.uint8)


def _write(folder: Path, images: Tensor, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for img, name in zip(images, names, strict=True):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / name)


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory) -> Path:
    """35 generated PNGs (5 prompts x 7), 40 reference PNGs, a tiny BERT vocabulary."""
    root = tmp_path_factory.mktemp("scoring")
    files = [f"{p}-{i:05d}.png" for p in range(len(TEXTS)) for i in range(PER_PROMPT)]
    _write(root / "samples", _images(len(files), seed=1), files)
    _write(root / "ref", _images(40, seed=2), [f"{i:03d}.png" for i in range(40)])
    words = ["a", "photo", "of", "cat", "dog", "red", "blue", "the", "on", "table", "bird"]
    (root / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])
    )
    return root


def _set(root: Path) -> tuple[list[str], list[Prompt]]:
    prompts = [Prompt(str(p), t) for p, t in enumerate(TEXTS) for _ in range(PER_PROMPT)]
    files = [f"{p}-{i:05d}.png" for p in range(len(TEXTS)) for i in range(PER_PROMPT)]
    return files, prompts


def _metrics(root: Path, net: TinyNet) -> dict:
    """FID and precision/recall on one feature network, CLIP score, ImageReward, a per-prompt
    metric; random weights seeded identically in every process."""
    from cdmbench.metrics.clip_score import ClipScore

    ref = str(root / "ref")
    out = {
        "fid": FID(feature_fn=net, feature_id="tiny", batch_size=8, reference=ref),
        "precision_recall": PrecisionRecall(k=3, feature_fn=net, feature_id="tiny", reference=ref),
        "clip_score": ClipScore(CLIP_ARCH, pretrained=None, batch_size=4),
        "pixel_spread": PixelSpread(),
    }
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="random weights"):
        out["clip_score"].load("cpu")
    if HAVE_IR:
        from cdmbench.metrics import _imagereward_compat as compat
        from cdmbench.metrics.image_reward import ImageRewardScore
        from tests.test_metrics_reward import _med_config

        tok = compat.blip_tokenizer(root)
        torch.manual_seed(2)
        med = _med_config(len(tok))  # the reward tests' tiny BLIP text config
        vit = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2)
        model = compat.build_imagereward(med, tok, vit=vit, image_size=32)
        with torch.no_grad():
            for layer in model.mlp.layers:
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0, layer.in_features**-0.5)
                    layer.bias.normal_(0, 0.1)
        ir = ImageRewardScore(batch_size=4)
        ir._model = model  # tests only: the metric itself loads nothing but ImageReward-v1.0
        out["image_reward"] = ir
    return out


def _score(root: Path, cache: Path, rank: int = 0, world: int = 1, net: TinyNet | None = None):
    net = net or TinyNet()
    files, prompts = _set(root)
    data = EvalSet(torch.empty(0), prompts, Backbone(), cache_dir=cache)
    return score_sample_set(
        root / "samples", "set", files, prompts, _metrics(root, net), data, CHUNK, rank, world
    )


def _worker(rank: int, root: str, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        net = TinyNet()
        values = _score(Path(root), Path(root) / "cache2", rank, 2, net)
        Path(root, f"seen-{rank}.json").write_text(json.dumps(net.seen))
        if rank == 0:
            Path(root, "two.json").write_text(json.dumps(values))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_score_as_one(sample_set):
    net = TinyNet()
    one = _score(sample_set, sample_set / "cache1", net=net)
    n = len(TEXTS) * PER_PROMPT
    # one feature pass over the set, shared by FID and precision/recall (+ the reference once)
    assert sum(net.seen) == n + 40
    expected = {"fid", "precision_recall", "clip_score", "pixel_spread"}
    assert set(one) == expected | ({"image_reward"} if HAVE_IR else set())

    ctx = mp.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, str(sample_set), port)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    two = json.loads((sample_set / "two.json").read_text())
    assert set(two) == set(one)
    for metric, values in one.items():
        for name, v in values.items():
            assert math.isfinite(v)
            assert two[metric][name] == pytest.approx(v, rel=1e-6, abs=1e-12), (metric, name)
    # rank 1 embedded only its chunk (2 prompts = 14 images), rank 0 the rest and the reference
    seen = [sum(json.loads((sample_set / f"seen-{r}.json").read_text())) for r in (0, 1)]
    assert seen == [n - 14 + 40, 14]

    # the sharded values are the metrics' own in-memory values on the whole set (up to float32
    # rounding: batches of a chunk are not those of the whole set)
    files, prompts = _set(sample_set)
    images = read_pngs(sample_set / "samples", files)
    data = EvalSet(images, prompts, Backbone(), cache_dir=sample_set / "cache3")
    for metric, m in _metrics(sample_set, TinyNet()).items():
        for name, v in m.compute(data).items():
            assert one[metric][name] == pytest.approx(v, rel=1e-6, abs=1e-12), (metric, name)


def test_interrupted_scoring_recomputes_only_missing_chunks(sample_set, tmp_path):
    cache = tmp_path / "cache"
    first = _score(sample_set, cache)
    chunks = sorted((cache / "chunks" / "set").glob("*/*.npy"))
    jobs = {p.parent.name for p in chunks}
    assert len(jobs) == 3 + HAVE_IR  # features (shared), clip, image_reward, pixel_spread
    assert len(chunks) == 3 * len(jobs) and not list(cache.rglob("*.tmp"))
    feats = next(p.parent for p in chunks if p.parent.name.startswith("features-"))
    (feats / "000001.npy").unlink()  # a scoring killed before chunk 1 was written
    net = TinyNet()
    again = _score(sample_set, cache, net=net)
    assert sum(net.seen) == 14  # chunk 1 only: the reference comes from its cache
    assert again == first
    net = TinyNet()
    assert _score(sample_set, cache, net=net) == first and net.seen == []


def test_at_most_two_chunks_of_images_are_alive(sample_set, tmp_path, monkeypatch):
    """The driver streams: each job sees one chunk (<= CHUNK images) and every earlier chunk
    has been freed by then (the next one may be decoding)."""
    from cdmbench import scoring

    alive: list[weakref.ref] = []
    sizes: list[int] = []
    real = scoring.read_pngs

    def tracked(folder, files, threads=None):
        x = real(folder, files, threads)
        sizes.append(x.shape[0])
        alive.append(weakref.ref(x))
        return x

    monkeypatch.setattr(scoring, "read_pngs", tracked)
    net = TinyNet()
    seen_alive: list[int] = []
    forward = net.forward

    def counting(x):
        seen_alive.append(sum(r() is not None for r in alive))
        return forward(x)

    net.forward = counting
    _score(sample_set, tmp_path, net=net)
    assert sizes == [14, 14, 7] and max(sizes) <= CHUNK
    assert max(seen_alive) <= 2


def test_chunks_hold_whole_prompts():
    ids = ["a"] * 3 + ["b"] * 3 + ["c"] * 5 + ["d"]
    assert chunk_ranges(ids, 6) == [(0, 6), (6, 12)]
    assert chunk_ranges(ids, 4) == [(0, 3), (3, 6), (6, 11), (11, 12)]  # c alone exceeds 4
    assert chunk_ranges(ids, 100) == [(0, 12)]
    with pytest.raises(ValueError):
        chunk_ranges(ids, 0)


def test_read_pngs_matches_pillow(tmp_path):
    imgs = _images(5, seed=3)
    _write(tmp_path, imgs, [f"{i}.png" for i in range(5)])
    assert torch.equal(read_pngs(tmp_path, [f"{i}.png" for i in range(5)], threads=3), imgs)
    grey = imgs[:2, :1]
    Image.fromarray(grey[0, 0].numpy()).save(tmp_path / "g0.png")
    Image.fromarray(grey[1, 0].numpy()).save(tmp_path / "g1.png")
    assert torch.equal(read_pngs(tmp_path, ["g0.png", "g1.png"]), grey)
    assert np.asarray(read_pngs(tmp_path, ["g0.png"])).shape == (1, 1, 32, 32)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_dist_timeout_is_validated(capsys, value):
    from cli_run import run

    code, out, err = run(capsys, "eval", "--dist-timeout", value, "--methods", "teacher")
    assert code == 2 and "for '--dist-timeout': expected a finite number > 0" in out + err
    assert len((out + err).strip().splitlines()) == 1
