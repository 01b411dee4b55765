"""Real reference sets for FID-type metrics, and their cached features and statistics.

A reference is a folder of images (PNG, JPG, ... searched recursively, sorted by path, read
as RGB like clean-fid), a backbone's real data (``backbone.real_latents(split)`` decoded
and quantised to 8 bits like the saved samples), or precomputed statistics: a clean-fid
compatible ``.npz`` file with ``mu`` [D] and ``sigma`` [D, D] (FID only; metrics that need
the features themselves, such as precision/recall, refuse it). Statistics (float64 mean and
covariance) and features are computed once per (reference, fingerprint, resolution, mode, N,
transform, feature extractor) and cached as ``.npz`` under the cache folder, with a hash of
that key in the file name; files are written atomically, so an interrupted run never leaves
a half-written cache.

A reference is named by a string: a folder path, an ``.npz`` path, a split name of the
backbone's real data ("" for its test split), or a :class:`ReferenceSpec` encoded as JSON
(what evaluation protocols pass, see :mod:`cdmbench.protocols`), which adds

- ``captions``: a COCO captions JSON; the reference is then the images of the selected
  captions (``file_name`` of each image, under the folder), one caption per image
  (:func:`coco_pairs`), the ``select`` images of smallest rank;
- ``n``: at most ``n`` images, a deterministic subset (:func:`ranked_subset`: the ``n``
  smallest sha256 ranks of the image keys under ``seed``; a smaller ``n`` gives a subset of a
  larger one);
- ``size``/``resize``/``filter``: ``resize = "short-side-center-crop"`` resizes the short
  side to ``size`` and crops the centre ``size`` x ``size`` (torchvision ``Resize(size)`` then
  ``CenterCrop(size)`` on the RGB PIL image, as byliutao/cdm ``cdm/data/datasets.py`` reads
  images at a fixed size, Lanczos there).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdmbench.backbones.base import Backbone
from cdmbench.errors import UserError
from cdmbench.io import atomic_path, to_uint8
from cdmbench.metrics.features import ImageFeatures
from cdmbench.metrics.frechet import feature_stats
from cdmbench.prompts_io import Prompt

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CACHE_VERSION = 1
RESIZES = ("none", "short-side-center-crop")
FILTERS = ("lanczos", "bicubic", "bilinear")


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path."""
    root = Path(folder)
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def read_image(path: str | Path) -> Tensor:
    """One image file as uint8 [3, H, W] (PIL ``convert('RGB')``, as clean-fid reads files)."""
    from PIL import Image

    with Image.open(path) as img:
        arr = np.array(img.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-48:] or "ref"


@dataclass
class Reference:
    """A resolved real reference set: its name, size, resolution and content fingerprint."""

    name: str
    n: int
    resolution: str
    fingerprint: str
    batches: Callable[[int], Iterator[Tensor]]  # batch size -> uint8 [B, C, H, W] batches
    transform: str = ""  # how images were resized/cropped before the extractor; "": as read
    stats_file: Path | None = None  # precomputed (mu, sigma): no images to read

    def describe(self) -> dict[str, Any]:
        out = {"reference": self.name, "n_ref": self.n, "ref_resolution": self.resolution}
        if self.transform:
            out["ref_transform"] = self.transform
        if self.stats_file is not None:
            out["n_ref"] = self.n or "unknown (precomputed statistics)"
        return out

    def key(self, kind: str, extractor: ImageFeatures) -> dict[str, Any]:
        key = {
            "kind": kind,
            "version": CACHE_VERSION,
            "reference": self.name,
            "fingerprint": self.fingerprint,
            "resolution": self.resolution,
            "n": self.n,
            "mode": extractor.mode,
            "resize": extractor.resize,
            "features": extractor.id,
        }
        if self.transform:  # absent otherwise: caches written before transforms keep their name
            key["transform"] = self.transform
        return key

    def cache_path(self, cache_dir: str | Path, kind: str, extractor: ImageFeatures) -> Path:
        blob = json.dumps(self.key(kind, extractor), sort_keys=True).encode()
        digest = hashlib.sha256(blob).hexdigest()[:16]
        return Path(cache_dir) / f"{kind}-{_slug(self.name)}-n{self.n}-{digest}.npz"

    def extract(self, extractor: ImageFeatures) -> Tensor:
        """Features of every reference image (no cache)."""
        feats = [extractor(b) for b in self.batches(extractor.batch_size)]
        return torch.cat(feats)

    def features(self, extractor: ImageFeatures, cache_dir: str | Path) -> Tensor:
        """Features of the reference set, from the cache or computed and cached."""
        if self.stats_file is not None:
            raise UserError(
                f"reference {self.stats_file} holds statistics only (mu, sigma); this metric "
                "needs the reference features: pass a folder of reference images"
            )
        path = self.cache_path(cache_dir, "ref-features", extractor)
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return torch.from_numpy(z["features"])
        f = self.extract(extractor)
        _save_npz(path, self.key("ref-features", extractor), features=f.numpy())
        return f

    def stats(
        self, extractor: ImageFeatures, cache_dir: str | Path
    ) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) in float64, from the cache or computed (from cached features if any);
        for precomputed statistics, those of the file."""
        if self.stats_file is not None:
            return _read_stats(self.stats_file)
        path = self.cache_path(cache_dir, "fid-stats", extractor)
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return z["mu"], z["sigma"]
        feats_path = self.cache_path(cache_dir, "ref-features", extractor)
        if feats_path.is_file():
            f = self.features(extractor, cache_dir)
        else:
            f = self.extract(extractor)
        mu, sigma = feature_stats(f)
        _save_npz(path, self.key("fid-stats", extractor), mu=mu, sigma=sigma)
        return mu, sigma


def _save_npz(path: Path, key: dict[str, Any], **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, key=np.array(json.dumps(key, sort_keys=True)), **arrays)


def _read_stats(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a clean-fid style ``.npz`` as float64, checked."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if "mu" not in z.files or "sigma" not in z.files:
                raise UserError(
                    f"reference statistics {path} lack 'mu' and 'sigma' (has "
                    f"{', '.join(z.files) or 'nothing'}); save them as clean-fid does: "
                    "np.savez(path, mu=mu, sigma=sigma)"
                )
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    except (OSError, ValueError) as e:
        raise UserError(f"reference statistics {path} cannot be read as .npz ({e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(
            f"reference statistics {path}: mu must be [D] and sigma [D, D], got "
            f"{list(mu.shape)} and {list(sigma.shape)}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"reference statistics {path} hold non-finite values")
    return mu, sigma


def _stats_reference(path: Path) -> Reference:
    mu, _ = _read_stats(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    with np.load(path, allow_pickle=False) as z:
        n = int(z["n"]) if "n" in z.files and z["n"].ndim == 0 else 0

    def batches(batch_size: int) -> Iterator[Tensor]:
        raise UserError(f"reference {path} holds statistics only, no images")

    return Reference(
        f"stats:{path}", n, f"{mu.shape[0]}-d statistics", digest, batches, stats_file=path
    )


def _resolution(files: Sequence[Path]) -> str:
    """ "WxH" when every file has that size, else "mixed" (headers only)."""
    from PIL import Image

    sizes = set()
    for p in files:
        with Image.open(p) as img:
            sizes.add(img.size)
    return "x".join(map(str, sizes.pop())) if len(sizes) == 1 else "mixed"


def _same_size_batches(images: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Stacks of at most ``batch_size`` consecutive images of one size, in order."""
    run: list[Tensor] = []
    for img in images:
        if run and (img.shape != run[0].shape or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(img)
    if run:
        yield torch.stack(run)


def _folder_reference(folder: Path, n_ref: int | None) -> Reference:
    files = image_files(folder)
    if not files:
        raise UserError(
            f"reference folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    files = files[:n_ref] if n_ref else files
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    resolution = _resolution(files)

    def batches(batch_size: int) -> Iterator[Tensor]:
        return _same_size_batches(map(read_image, files), batch_size)

    return Reference(f"folder:{folder}", len(files), resolution, h.hexdigest()[:16], batches)


def _backbone_reference(backbone: Backbone, split: str, n_ref: int | None) -> Reference:
    try:
        real = backbone.real_latents(split)
    except ValueError as e:  # an unknown split
        raise UserError(
            f"reference '{split}' is neither a folder of images nor a real-data "
            f"split of backbone '{backbone.name}' ({e})"
        ) from e
    if real is None:
        raise UserError(
            f"backbone '{backbone.name}' has no real data; give the reference as a "
            "folder of real images (--reference PATH)"
        )
    latents = real[0][:n_ref] if n_ref else real[0]
    lat_np = latents.detach().cpu().contiguous()
    fingerprint = hashlib.sha256(lat_np.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]

    def decode(lat: Tensor) -> Tensor:
        with torch.inference_mode():
            x = backbone.decode(lat.to(backbone.device, backbone.dtype))
        return to_uint8(x).cpu()

    first = decode(latents[:1])
    resolution = f"{first.shape[-1]}x{first.shape[-2]}"

    def batches(batch_size: int) -> Iterator[Tensor]:
        for s in range(0, len(latents), batch_size):
            yield decode(latents[s : s + batch_size])

    return Reference(f"{backbone.name}:{split}", len(latents), resolution, fingerprint, batches)


# -------------------------------------------------------------------- subsets and specs
def rank(seed: int, key: str) -> str:
    """The subset rank of ``key`` under ``seed``: sha256 of ``"<seed>:<key>"`` (hex)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def ranked_subset(items: Sequence, n: int | None, seed: int, key: Callable[[Any], str]) -> list:
    """The ``n`` items of smallest :func:`rank` of ``key(item)``, in their original order.

    Deterministic across machines and Python versions (no RNG stream), and nested: the
    subset of size ``m < n`` is a subset of the one of size ``n``. ``None``: every item."""
    if n is None or n >= len(items):
        return list(items)
    keep = set(sorted(range(len(items)), key=lambda i: rank(seed, key(items[i])))[:n])
    return [x for i, x in enumerate(items) if i in keep]


@dataclass(frozen=True)
class CocoPair:
    """One image of a COCO captions file and the caption it is prompted with."""

    image_id: str
    file_name: str
    prompt: Prompt


def coco_pairs(captions: str | Path) -> list[CocoPair]:
    """Every captioned image of a COCO captions JSON (``captions_val2014.json``), by image id.

    One caption per image: the first annotation of the image in file order, whitespace
    collapsed, id ``coco-<annotation id>`` (the rule of :mod:`cdmbench.prompts_io`'s ``coco``
    format); ``file_name`` from the file's ``images`` list."""
    path = Path(captions)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"COCO captions {path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(
            f"COCO captions {path} has no 'annotations' list; pass COCO's "
            "annotations/captions_val2014.json unchanged"
        )
    files = {}
    for img in data.get("images") or []:
        if isinstance(img, dict) and "id" in img and "file_name" in img:
            files[str(img["id"])] = str(img["file_name"])
    first: dict[str, Prompt] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "id", "caption")):
            raise UserError(
                f"COCO captions {path}, annotation {i}: needs 'image_id', 'id' and 'caption'; "
                "pass the COCO captions file unchanged"
            )
        image = str(ann["image_id"])
        if image not in first:
            first[image] = Prompt(f"coco-{ann['id']}", " ".join(str(ann["caption"]).split()))
    missing = [i for i in first if i not in files]
    if missing:
        raise UserError(
            f"COCO captions {path}: image {missing[0]} (and {len(missing) - 1} more) has no "
            "entry in 'images' with its file_name; pass the COCO captions file unchanged"
        )
    order = sorted(first, key=lambda i: (len(i), i))  # numeric ids in numeric order
    return [CocoPair(i, files[i], first[i]) for i in order]


def select_coco(captions: str | Path, n: int | None, seed: int) -> list[CocoPair]:
    """The ``n`` pairs of :func:`coco_pairs` of smallest rank of their image id."""
    return ranked_subset(coco_pairs(captions), n, seed, key=lambda p: p.image_id)


@dataclass(frozen=True)
class ReferenceSpec:
    """A reference with a subset and a resize/crop, carried as one string (:meth:`encode`)."""

    path: str = ""  # folder of images, .npz statistics, or a split of the backbone's real data
    captions: str = ""  # COCO captions JSON: the reference is the images of selected captions
    select: int | None = None  # with captions: how many images (smallest ranks of image ids)
    n: int | None = None  # at most n images: the subset of smallest rank (image id or path)
    seed: int = 0  # of the subset ranks
    size: int | None = None  # side of the square the images are brought to; None: as read
    resize: str = "none"  # "short-side-center-crop": Resize(size) then CenterCrop(size)
    filter: str = "lanczos"  # resampling filter of the resize (PIL)
    label: str = ""  # who fixed it, e.g. "coco10k-fid@1"; names the reference

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise UserError(f"reference resize '{self.resize}': use one of {', '.join(RESIZES)}")
        if self.filter not in FILTERS:
            raise UserError(f"reference filter '{self.filter}': use one of {', '.join(FILTERS)}")
        if self.resize != "none" and not (isinstance(self.size, int) and self.size > 0):
            raise UserError(f"reference resize '{self.resize}' needs a positive size")

    def encode(self) -> str:
        """JSON of the fields that differ from their defaults (what :meth:`parse` reads)."""
        default = ReferenceSpec()
        diff = {k: v for k, v in asdict(self).items() if v != getattr(default, k)}
        return json.dumps(diff, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> ReferenceSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"reference spec {text[:60]!r} is not valid JSON ({e})") from None
        known = {f.name for f in fields(cls)}
        unknown = [k for k in data if k not in known] if isinstance(data, dict) else ["?"]
        if unknown:
            raise UserError(
                f"reference spec: unknown field '{unknown[0]}'; use {', '.join(sorted(known))}"
            )
        return cls(**data)

    def transform(self) -> str:
        if self.resize == "none":
            return ""
        return (
            f"resize short side to {self.size} ({self.filter}), center crop {self.size}x{self.size}"
        )


def load_image(path: str | Path, spec: ReferenceSpec | None = None) -> Tensor:
    """One reference image as uint8 [3, H, W]: RGB, then ``spec``'s resize/crop if any."""
    if spec is None or spec.resize == "none":
        return read_image(path)
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    mode = {
        "lanczos": InterpolationMode.LANCZOS,
        "bicubic": InterpolationMode.BICUBIC,
        "bilinear": InterpolationMode.BILINEAR,
    }[spec.filter]
    with Image.open(path) as img:
        rgb = img.convert("RGB")
    out = TF.center_crop(TF.resize(rgb, spec.size, interpolation=mode), [spec.size, spec.size])
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()


def _spec_reference(spec: ReferenceSpec, backbone: Backbone) -> Reference:
    """The reference a :class:`ReferenceSpec` names; every file is checked to exist."""
    path = Path(spec.path).expanduser() if spec.path else None
    if path is not None and path.suffix.lower() == ".npz":
        if not path.is_file():
            raise UserError(f"reference statistics {path}: no such file")
        return _stats_reference(path.resolve())
    if path is None or (not path.exists() and len(path.parts) == 1):  # a split name
        if spec.captions or spec.resize != "none":
            raise UserError("a reference with captions or a resize needs a folder of images")
        return _backbone_reference(backbone, spec.path or "test", spec.n)
    if not path.is_dir():
        raise UserError(f"reference {path}: no such folder of images")
    folder = path.resolve()
    if spec.captions:
        pairs = select_coco(spec.captions, spec.select, spec.seed)
        pairs = ranked_subset(pairs, spec.n, spec.seed, key=lambda p: p.image_id)
        files = [folder / p.file_name for p in pairs]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise UserError(
                f"reference image {absent[0]} not found ({len(absent)} of the {len(files)} "
                f"images of the selected captions are missing); pass the folder holding "
                f"COCO's {Path(absent[0]).parent.name or 'val2014'} images"
            )
    else:
        files = image_files(folder)
        if not files:
            raise UserError(
                f"reference folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files = ranked_subset(
            files, spec.n, spec.seed, key=lambda f: f.relative_to(folder).as_posix()
        )
    if len(files) < 2:
        raise UserError(f"reference {folder}: {len(files)} image(s) selected, need at least 2")
    h = hashlib.sha256(spec.encode().encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    resolution = f"{spec.size}x{spec.size}" if spec.resize != "none" else _resolution(files)
    threads = min(8, os.cpu_count() or 1)

    def decoded(window: int) -> Iterator[Tensor]:
        with ThreadPoolExecutor(threads) as pool:  # decoding and resampling release the GIL
            for lo in range(0, len(files), window):
                yield from pool.map(lambda f: load_image(f, spec), files[lo : lo + window])

    def batches(batch_size: int) -> Iterator[Tensor]:
        # images decoded ahead in bounded windows, whatever N
        return _same_size_batches(decoded(max(batch_size, 4 * threads)), batch_size)

    name = f"{spec.label + ':' if spec.label else 'folder:'}{folder}"
    if spec.captions:
        name += f" (images of {Path(spec.captions).name})"
    return Reference(name, len(files), resolution, h.hexdigest()[:16], batches, spec.transform())


def resolve_reference(spec: str, backbone: Backbone, n_ref: int | None = None) -> Reference:
    """A folder path, an ``.npz`` of statistics, a JSON :class:`ReferenceSpec`, or a split of
    the backbone's real data ("" means the test split). ``n_ref`` caps the number of images:
    the first ``n_ref`` by path for a plain folder, :func:`ranked_subset` for a spec."""
    if n_ref is not None and n_ref < 2:
        raise UserError(f"n_ref must be at least 2, got {n_ref}")
    if spec.lstrip().startswith("{"):
        parsed = ReferenceSpec.parse(spec)
        return _spec_reference(parsed if n_ref is None else replace(parsed, n=n_ref), backbone)
    path = Path(spec).expanduser() if spec else None
    if path is not None and path.suffix.lower() == ".npz":
        if not path.is_file():
            raise UserError(f"reference statistics {path}: no such file")
        return _stats_reference(path.resolve())
    if path is not None and path.is_dir():
        return _folder_reference(path.resolve(), n_ref)
    if path is not None and (path.exists() or len(path.parts) > 1):
        raise UserError(f"reference {spec} is not a folder of images")
    return _backbone_reference(backbone, spec or "test", n_ref)


__all__ = [
    "IMAGE_EXTENSIONS",
    "CocoPair",
    "Reference",
    "ReferenceSpec",
    "coco_pairs",
    "image_files",
    "load_image",
    "rank",
    "ranked_subset",
    "read_image",
    "resolve_reference",
    "select_coco",
]
