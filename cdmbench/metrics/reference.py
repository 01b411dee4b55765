"""Real reference sets for FID-type metrics, and their cached features and statistics.

A reference is a folder of images (PNG, JPG, ... searched recursively, sorted by path, read
as RGB like clean-fid) or a backbone's real data (``backbone.real_latents(split)`` decoded
and quantised to 8 bits like the saved samples). Statistics (float64 mean and covariance)
and features are computed once per (reference, fingerprint, resolution, mode, N, feature
extractor) and cached as ``.npz`` under the cache folder, with a hash of that key in the file
name; files are written atomically, so an interrupted run never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
CACHE_VERSION = 1


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

    def describe(self) -> dict[str, Any]:
        return {"reference": self.name, "n_ref": self.n, "ref_resolution": self.resolution}

    def key(self, kind: str, extractor: ImageFeatures) -> dict[str, Any]:
        return {
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
        """(mu, sigma) in float64, from the cache or computed (from cached features if any)."""
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


def _folder_reference(folder: Path, n_ref: int | None) -> Reference:
    from PIL import Image

    files = image_files(folder)
    if not files:
        raise UserError(
            f"reference folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    files = files[:n_ref] if n_ref else files
    h = hashlib.sha256()
    sizes = set()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        with Image.open(p) as img:
            sizes.add(img.size)
    resolution = "x".join(map(str, sizes.pop())) if len(sizes) == 1 else "mixed"

    def batches(batch_size: int) -> Iterator[Tensor]:
        run: list[Tensor] = []
        for p in files:  # a batch holds consecutive images of one size
            img = read_image(p)
            if run and (img.shape != run[0].shape or len(run) == batch_size):
                yield torch.stack(run)
                run = []
            run.append(img)
        if run:
            yield torch.stack(run)

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


def resolve_reference(spec: str, backbone: Backbone, n_ref: int | None = None) -> Reference:
    """A folder path, or a split of the backbone's real data ("" means the test split)."""
    if n_ref is not None and n_ref < 2:
        raise UserError(f"n_ref must be at least 2, got {n_ref}")
    path = Path(spec).expanduser() if spec else None
    if path is not None and path.is_dir():
        return _folder_reference(path.resolve(), n_ref)
    if path is not None and (path.exists() or len(path.parts) > 1):
        raise UserError(f"reference {spec} is not a folder of images")
    return _backbone_reference(backbone, spec or "test", n_ref)


__all__ = ["IMAGE_EXTENSIONS", "Reference", "image_files", "read_image", "resolve_reference"]
