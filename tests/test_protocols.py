"""Evaluation protocols: presets read, subset and resize as documented, and fail before
generating. The COCO tests build a fake COCO layout (captions JSON in captions_val2014.json's
format, images of mixed sizes) in a temporary folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run
from PIL import Image

from cdmbench import protocols
from cdmbench.errors import UserError
from cdmbench.metrics.base import EvalSet
from cdmbench.metrics.fid import FID
from cdmbench.metrics.frechet import feature_stats
from cdmbench.metrics.reference import ReferenceSpec, resolve_reference
from cdmbench.registry import UnknownNameError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SIZES = [(40, 30), (30, 50), (64, 64), (33, 20), (20, 33), (48, 36), (27, 27), (50, 21)]


class _Backbone:  # what protocols read of a backbone: its name (the presets are any-backbone)
    name = "fake-t2i"


def fake_coco(root: Path, n_images: int = 16) -> tuple[Path, Path]:
    """captions_val2014.json (3 captions per image, annotations interleaved across images and
    not in id order) and val2014/ with images of mixed sizes."""
    rng = np.random.default_rng(0)
    images_dir = root / "val2014"
    images_dir.mkdir(parents=True)
    ids = [int(x) for x in rng.choice(600_000, n_images, replace=False)]
    images, anns = [], []
    for k, iid in enumerate(ids):
        w, h = SIZES[k % len(SIZES)]
        name = f"COCO_val2014_{iid:012d}.jpg"
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if k % 5 == 4:  # some greyscale files, as COCO has
            Image.fromarray(arr[..., 0]).save(images_dir / name, quality=95)
        else:
            Image.fromarray(arr).save(images_dir / name, quality=95)
    for j in range(3):
        for k, iid in enumerate(ids):
            anns.append(
                {"image_id": iid, "id": 1000 * (k + 1) + j, "caption": f"  img {iid}  cap {j}\n"}
            )
    anns = anns[::-1][:n_images] + anns[: len(anns) - n_images]  # not in id or image order
    captions = root / "annotations" / "captions_val2014.json"
    captions.parent.mkdir()
    captions.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return captions, images_dir


def by_rank(ids: list[int], seed: int, n: int) -> list[int]:
    """The documented rule, written out: the n image ids of smallest sha256('<seed>:<id>')."""
    return sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())[:n]


def coco_pair(tmp_path, limit=None, n_ref=None):
    captions, images = fake_coco(tmp_path)
    data = {"coco_captions": captions, "coco_images": images}
    proto = protocols.load("coco10k-fid")
    return protocols.resolve(proto, _Backbone(), data, tmp_path, limit, n_ref), captions, images


def test_coco10k_fid_selects_the_same_documented_subset_every_time(tmp_path):
    pair, captions, _ = coco_pair(tmp_path, limit=5)
    again = protocols.resolve(
        protocols.load("coco10k-fid"),
        _Backbone(),
        {"coco_captions": captions, "coco_images": tmp_path / "val2014"},
        tmp_path,
        limit=5,
    )
    assert [(p.id, p.text) for p in pair.prompts] == [(p.id, p.text) for p in again.prompts]
    assert pair.prompt_set == again.prompt_set and pair.prompt_set.startswith("coco10k-fid@1-")
    data = json.loads(captions.read_text())
    ids = [im["id"] for im in data["images"]]
    chosen = sorted(by_rank(ids, 42, 5))  # the preset's seed; listed by image id
    first = {}
    for a in data["annotations"]:  # one caption per image: its first annotation in file order
        first.setdefault(a["image_id"], a)
    assert [p.id for p in pair.prompts] == [f"coco-{first[i]['id']}" for i in chosen]
    assert [p.text for p in pair.prompts] == [" ".join(first[i]["caption"].split()) for i in chosen]
    # nested: a smaller limit keeps a subset; without a limit all 16 (< 9,986) images
    small = protocols.resolve(
        protocols.load("coco10k-fid"),
        _Backbone(),
        {"coco_captions": captions, "coco_images": tmp_path / "val2014"},
        tmp_path,
        limit=3,
    )
    assert {p.id for p in small.prompts} < {p.id for p in pair.prompts}
    full = protocols.resolve(
        protocols.load("coco10k-fid"),
        _Backbone(),
        {"coco_captions": captions, "coco_images": tmp_path / "val2014"},
        tmp_path,
    )
    assert len(full.prompts) == 16 and full.per_prompt == 1 and full.metrics == ["fid"]


def _documented_256(path: Path) -> np.ndarray:
    """The preset's rule written with PIL alone: RGB; short side to 256 with Lanczos (long side
    int(256 * long / short), torchvision's rounding); centre 256 x 256 crop (offsets rounded)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    if w <= h:
        size = (256, int(256 * h / w))
    else:
        size = (int(256 * w / h), 256)
    big = rgb.resize(size, resample=Image.Resampling.LANCZOS)
    left, top = int(round((size[0] - 256) / 2.0)), int(round((size[1] - 256) / 2.0))
    return np.asarray(big.crop((left, top, left + 256, top + 256)))


def test_coco10k_fid_reference_is_the_selected_images_resized_and_cropped(tmp_path):
    pair, captions, images = coco_pair(tmp_path, limit=5)
    ref = resolve_reference(pair.reference, _Backbone())
    assert ref.n == 5 and ref.resolution == "256x256" and "center crop 256x256" in ref.transform
    assert "coco10k-fid@1" in ref.name
    got = torch.cat(list(ref.batches(2)))  # batches of 2, 2, 1: order and content kept
    assert got.dtype == torch.uint8 and got.shape == (5, 3, 256, 256)
    data = json.loads(captions.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    chosen = sorted(by_rank(list(files), 42, 5))
    want = np.stack([_documented_256(images / files[i]) for i in chosen])
    assert np.array_equal(got.permute(0, 2, 3, 1).numpy(), want)
    # --n-ref: a subset of the same images, the same every time
    sub = resolve_reference(
        protocols.resolve(
            protocols.load("coco10k-fid"),
            _Backbone(),
            {"coco_captions": captions, "coco_images": images},
            tmp_path,
            limit=5,
            n_ref=3,
        ).reference,
        _Backbone(),
    )
    assert sub.n == 3 and sub.fingerprint != ref.fingerprint
    assert np.array_equal(
        torch.cat(list(sub.batches(8))).permute(0, 2, 3, 1).numpy(),
        np.stack([_documented_256(images / files[i]) for i in sorted(by_rank(chosen, 42, 3))]),
    )


def test_reference_is_checked_before_anything_is_generated(tmp_path, capsys, monkeypatch):
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(b"")  # FID's weights check passes; nothing reaches the point of loading
    monkeypatch.setenv("CDMBENCH_INCEPTION", str(weights))
    captions, images = fake_coco(tmp_path / "coco")
    victim = sorted(images.iterdir())[0]
    victim.unlink()  # one image of the selection missing
    samples = tmp_path / "samples"
    argv = [
        "eval", "--backbone", "tiny-sd3", "--methods", "teacher", "--steps", "1",
        "--protocol", "coco10k-fid", "--samples", str(samples), "--results", str(tmp_path / "r"),
        "--data", f"coco_captions={captions}", "--data", f"coco_images={images}",
    ]  # fmt: skip
    code, _, err = run(capsys, *argv)
    assert code == 2 and victim.name in err and len(err.strip().splitlines()) == 1
    assert not samples.exists()
    code, _, err = run(capsys, *argv[:-4], "--data", f"coco_images={images}")  # no captions
    assert code == 2 and "coco_captions" in err and "cocodataset.org" in err
    assert not samples.exists()


def test_fid_accepts_precomputed_cleanfid_statistics(tmp_path):
    def fn(x):
        return x.float().mean(dim=(2, 3))  # 3-d features

    gen = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8)
    real = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    mu, sigma = feature_stats(fn(real))
    npz = tmp_path / "inception_stats.npz"
    np.savez(npz, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    ref = resolve_reference(str(npz), None)
    assert np.array_equal(ref.stats(None, tmp_path)[0], mu.astype(np.float32).astype(np.float64))
    with pytest.raises(UserError, match="statistics only"):
        ref.features(None, tmp_path)
    data = EvalSet(images=gen, prompts=[], backbone=None, reference=str(npz), cache_dir=tmp_path)
    metric = FID(feature_fn=fn, feature_id="mean-rgb", device="cpu")
    value = metric.compute(data)["fid"]
    g_mu, g_sigma = feature_stats(fn(gen))
    from cdmbench.metrics.frechet import frechet_distance

    want = frechet_distance(g_mu, g_sigma, mu.astype(np.float32), sigma.astype(np.float32))
    assert value == pytest.approx(want, rel=1e-12)
    assert metric.run_config()["reference"] == f"stats:{npz.resolve()}"
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(UserError, match="lack 'mu' and 'sigma'"):
        resolve_reference(str(tmp_path / "bad.npz"), None)


def test_folder_reference_subset_is_ranked_and_nested(tmp_path):
    folder = tmp_path / "ref"
    folder.mkdir()
    for i in range(10):
        Image.fromarray(np.full((4, 6, 3), i * 20, np.uint8)).save(folder / f"{i:02d}.png")
    spec = ReferenceSpec(path=str(folder), n=4, seed=7)
    ref = resolve_reference(spec.encode(), None)
    got = [int(b[0, 0, 0]) // 20 for b in torch.cat(list(ref.batches(3))).unbind(0)]
    assert got == sorted(int(n[:2]) for n in by_rank([f"{i:02d}.png" for i in range(10)], 7, 4))
    three = resolve_reference(ReferenceSpec(path=str(folder), n=3, seed=7).encode(), None)
    got3 = [int(b[0, 0, 0]) // 20 for b in torch.cat(list(three.batches(3))).unbind(0)]
    assert set(got3) < set(got) and ref.resolution == "6x4"


def test_limit_and_linspace_rules_on_prompt_files(tmp_path):
    prompts = tmp_path / "pickscore" / "test.txt"
    prompts.parent.mkdir()
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(300)))
    div = protocols.resolve(
        protocols.load("pickscore-diversity"), _Backbone(), {}, tmp_path
    )  # found under the data folder by its default path
    want = np.linspace(0, 299, 128, dtype=int)  # byliutao/cdm's diversity prompts
    assert [p.text for p in div.prompts] == [f"prompt number {i}" for i in want]
    assert div.per_prompt == 16 and div.reference == ""
    lim = protocols.resolve(protocols.load("pickscore-2k"), _Backbone(), {}, tmp_path, limit=7)
    again = protocols.resolve(protocols.load("pickscore-2k"), _Backbone(), {}, tmp_path, limit=7)
    assert [p.id for p in lim.prompts] == [p.id for p in again.prompts] and len(lim.prompts) == 7
    ids = [f"test-{i + 1}" for i in range(300)]
    assert [p.id for p in lim.prompts] == [i for i in ids if i in set(by_rank(ids, 0, 7))]


def test_every_metric_is_checked_before_generating(tmp_path):
    proto = tmp_path / "mine.toml"
    proto.write_text(
        '[protocol]\nname = "mine"\nmetrics = ["clip_score", "pickscor"]\n'
        '[prompts]\nset = "general"\n'
    )
    with pytest.raises(UnknownNameError, match="pickscor"):
        protocols.eval_pairs(_Backbone(), str(proto))
    with pytest.raises(UserError, match="--prompts with --protocol"):
        protocols.eval_pairs(_Backbone(), "coco10k-fid", prompts="general")


def test_shipped_protocols_parse_and_ship_as_package_data():
    assert {"coco10k-fid", "pickscore-2k", "drawbench", "parti", "geneval", "digits"} <= set(
        protocols.names()
    )
    from cdmbench.registry import METRICS

    for p in protocols.shipped():
        assert p.version >= 1 and p.description
        assert p.metrics or "samples only" in p.description, p.name
        for m in p.metrics:  # every metric a preset names is registered
            METRICS.entry(m)
        assert all(i.about for i in p.inputs.values()), p.name
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    setup = pyproject["tool"]["setuptools"]
    assert "cdmbench.protocols" in setup["packages"]
    assert setup["package-data"]["cdmbench.protocols"] == ["*.toml"]


def test_digits_protocol_records_name_the_protocol(tmp_path, capsys):
    code, out, err = run(
        capsys,
        *("eval", "--backbone", "digits", "--methods", "teacher", "--steps", "1"),
        *("--protocol", "digits", "--limit", "2", "--samples", str(tmp_path / "s")),
        *("--results", str(tmp_path / "r")),
    )
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    assert recs and all(r["prompt_set"].startswith("digits@1-") for r in recs)
    assert {r["n_samples"] for r in recs} == {400}  # 2 class prompts x 200


@pytest.mark.parametrize(
    "text",
    [
        "protocol = 3\n",
        '[protocol]\nmetrics = "fid"\n[prompts]\nset = "general"\n',
        '[protocol]\nmetrics = ["fid", 2]\n[prompts]\nset = "general"\n',
        '[protocol]\nmetrics = ["fid"]\n[prompts]\nset = 5\n',
        '[protocol]\nmetrics = ["fid"]\n[prompts]\nset = "general"\nsubset = 2.5\n',
        '[protocol]\nmetrics = ["fid"]\n[prompts]\nset = "general"\nseed = true\n',
        '[protocol]\nmetrics = ["fid"]\n[prompts]\ninput = "p"\n[inputs]\np = "x"\n',
        "[protocol\n",
        "\xff\xfe not text",
    ],
)
def test_malformed_protocol_files_are_one_line(tmp_path, capsys, text):
    from tests.cli_run import run

    path = tmp_path / "mine.toml"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    code, _, err = run(capsys, "eval", "--backbone", "tiny-sd3", "--protocol", str(path))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "mine.toml" in err
