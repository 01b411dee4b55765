"""Scoring a sample set on every rank: streamed chunks, per-chunk cache, exact combination.

    manifest order --cut--> chunks of whole prompts (at most ``chunk_size`` images each)
    chunk c --rank c % world--> PNGs decoded in a thread pool -> one output per job:
        features   [n, D] float32   one per (feature network): FID, precision/recall share it
        scores     [n] float64      one per PerSampleMetric (reward models, CLIP score)
        groups     [g] float64      one per PerPromptMetric (a chunk holds whole prompts)
    each output written atomically to  <cache>/chunks/<sample key>/<job>-<hash>/<c>.npy
    barrier; rank 0 reads the outputs in chunk order and reduces: FID from float64 moments
    summed chunk by chunk, precision/recall on all features, means of scores

Chunk boundaries depend only on the manifest and ``chunk_size``, and every chunk is computed
the same way whichever rank holds it, so the values do not depend on the number of processes;
an interrupted evaluation recomputes only the chunks whose files are missing. At most two
chunks of images are in memory per rank (the one being scored and the next one, decoded
ahead), whatever the size of the set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cdmbench.backbones.base import Backbone
from cdmbench.config import config_hash
from cdmbench.distributed import barrier
from cdmbench.errors import UserError
from cdmbench.io import atomic_path, atomic_write_json, remove_stale_temps
from cdmbench.metrics.base import (
    EvalSet,
    FeatureMetric,
    FeatureSet,
    Metric,
    PerPromptMetric,
    PerSampleMetric,
)
from cdmbench.metrics.features import ImageFeatures, default_threads, thread_pool
from cdmbench.prompts_io import Prompt

CHUNK_FORMAT = 1  # bump when what a chunk file holds changes


# ------------------------------------------------------------------------------ images
def read_pngs(folder: Path, files: Sequence[str], threads: int | None = None) -> Tensor:
    """uint8 [n, C, H, W] from ``folder/files[i]`` (grey -> C = 1), decoded in a thread pool
    into one preallocated array (Pillow releases the GIL while decoding)."""
    from PIL import Image

    def one(f: str) -> np.ndarray:
        with Image.open(folder / f) as im:
            a = np.asarray(im)
        return a[..., None] if a.ndim == 2 else a

    if not files:
        return torch.empty(0, 1, 0, 0, dtype=torch.uint8)
    first = one(files[0])
    out = np.empty((len(files), *first.shape), np.uint8)
    out[0] = first

    def put(i: int) -> None:
        a = one(files[i])
        if a.shape != first.shape:
            raise ValueError(f"{folder / files[i]}: shape {a.shape}, the set's is {first.shape}")
        out[i] = a

    n = threads or default_threads()
    if n > 1 and len(files) > 2:
        list(thread_pool("decode", n).map(put, range(1, len(files))))
    else:
        for i in range(1, len(files)):
            put(i)
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # a view: no second copy of the pixels


def chunk_ranges(prompt_ids: Sequence[str], size: int) -> list[tuple[int, int]]:
    """[start, end) chunks of the manifest holding whole prompts (runs of one prompt id), at
    most ``size`` images each unless one prompt alone has more."""
    if size < 1:
        raise ValueError(f"chunk size must be at least 1, got {size}")
    runs: list[tuple[int, int]] = []
    for i, pid in enumerate(prompt_ids):
        if runs and prompt_ids[runs[-1][0]] == pid:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    chunks: list[tuple[int, int]] = []
    for s, e in runs:
        if chunks and e - chunks[-1][0] <= size:
            chunks[-1] = (chunks[-1][0], e)
        else:
            chunks.append((s, e))
    return chunks


# -------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One per-chunk computation and the metrics that read its outputs."""

    kind: str  # "features", "scores" or "groups"
    key: dict[str, Any]  # what the outputs depend on; hashed into the cache folder's name
    metrics: list[str]
    run: Callable[[Tensor, list[Prompt]], np.ndarray]  # one chunk's images, prompts -> output

    @property
    def name(self) -> str:
        return f"{self.kind}-{config_hash(self.key)}"


def _feature_run(extractor: ImageFeatures) -> Callable[[Tensor, list[Prompt]], np.ndarray]:
    def run(images: Tensor, prompts: list[Prompt]) -> np.ndarray:
        return extractor(images).numpy().astype(np.float32, copy=False)

    return run


def _sample_run(metric: PerSampleMetric, device: str) -> Callable[..., np.ndarray]:
    loaded: list[Any] = []

    def run(images: Tensor, prompts: list[Prompt]) -> np.ndarray:
        if not loaded:
            loaded.append(metric.load(device))
        texts, b = [p.text for p in prompts], max(1, metric.batch_size)
        out = [
            metric.score_batch(loaded[0], images[i : i + b], texts[i : i + b]).to(torch.float64)
            for i in range(0, len(texts), b)
        ]
        return torch.cat(out).numpy() if out else np.zeros(0)

    return run


def _group_run(metric: PerPromptMetric, device: str) -> Callable[..., np.ndarray]:
    loaded: list[Any] = []

    def run(images: Tensor, prompts: list[Prompt]) -> np.ndarray:
        if not loaded:
            loaded.append(metric.load(device))
        out = []
        for s, e in chunk_ranges([p.id for p in prompts], 1):  # one run per prompt
            if e - s >= 2:
                out.append(metric.score_group(loaded[0], images[s:e], prompts[s].text))
        return np.asarray(out, np.float64)

    return run


def plan_jobs(metrics: dict[str, Metric], backbone: Backbone, chunk_size: int) -> list[Job]:
    """The chunk jobs of the metrics the driver shards: one feature job per distinct
    feature network (by id and config), one job per per-sample or per-prompt metric."""
    dev = str(backbone.device)
    where = {"device": torch.device(dev).type, "chunk_size": chunk_size, "format": CHUNK_FORMAT}
    jobs: dict[str, Job] = {}
    for name, m in metrics.items():
        mdev = str(m.device) if getattr(m, "device", None) is not None else dev
        if isinstance(m, FeatureMetric):
            ext = m.extractor(backbone)
            ext.check()
            ext.to(mdev)
            job = Job("features", {**ext.config(), "id": ext.id, **where}, [], _feature_run(ext))
        elif isinstance(m, PerSampleMetric):
            key = {"metric": name, **m.config(), **where}
            job = Job("scores", key, [], _sample_run(m, mdev))
        elif isinstance(m, PerPromptMetric):
            key = {"metric": name, **m.config(), **where}
            job = Job("groups", key, [], _group_run(m, mdev))
        else:
            continue
        jobs.setdefault(job.name, job).metrics.append(name)
    return list(jobs.values())


def sharded(metric: Metric) -> bool:
    """Whether the chunked driver scores this metric (else rank 0 does, on the whole set)."""
    return isinstance(metric, FeatureMetric | PerSampleMetric | PerPromptMetric)


# ------------------------------------------------------------------------------ driver
def _save(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path, fsync=False) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(
            f"scoring output {path} is missing: every process must see the cache folder "
            "(put --samples and the cache on a filesystem shared by all ranks)"
        )
    return np.load(path, allow_pickle=False)


def chunk_folder(cache_dir: str | Path, sample_key: str, job: Job) -> Path:
    """Where ``job``'s chunk outputs for one sample set live."""
    return Path(cache_dir) / "chunks" / sample_key / job.name


def score_chunks(
    folder: Path,
    files: Sequence[str],
    prompts: Sequence[Prompt],
    jobs: Sequence[Job],
    out: Callable[[Job], Path],
    chunk_size: int,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> int:
    """Compute this rank's missing chunk outputs (chunk c belongs to rank c % world), the
    next chunk's PNGs decoded while the current one is scored; returns the chunks computed.
    ``on_progress(images done, images of this rank)``."""
    mine = [(c, s, e) for c, (s, e) in enumerate(chunk_ranges([p.id for p in prompts], chunk_size))]
    mine = [x for x in mine if x[0] % world == rank]
    total, done = sum(e - s for _, s, e in mine), 0
    todo = []
    for c, s, e in mine:
        missing = [j for j in jobs if not (out(j) / f"{c:06d}.npy").is_file()]
        if missing:
            todo.append((c, s, e, missing))
        else:
            done += e - s
    if on_progress is not None:
        on_progress(done, total)
    reader = thread_pool("read-chunk", 1)

    def read(i: int) -> Future:
        _, s, e, _ = todo[i]
        return reader.submit(read_pngs, folder, files[s:e])

    nxt = read(0) if todo else None
    for i, (c, s, e, missing) in enumerate(todo):
        assert nxt is not None
        images = nxt.result()
        nxt = read(i + 1) if i + 1 < len(todo) else None
        for job in missing:
            _save(out(job) / f"{c:06d}.npy", job.run(images, list(prompts[s:e])))
        del images
        done += e - s
        if on_progress is not None:
            on_progress(done, total)
    return len(todo)


def score_sample_set(
    folder: Path,
    sample_key: str,
    files: Sequence[str],
    prompts: Sequence[Prompt],
    metrics: dict[str, Metric],
    data: EvalSet,
    chunk_size: int = 256,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Values of the sharded ``metrics`` (see :func:`sharded`) on one sample set.

    Every rank computes its chunks; rank 0 returns {metric: values}, the others {}. ``data``
    is what reductions see (backbone, reference, cache folder; no images).
    """
    jobs = plan_jobs(metrics, data.backbone, chunk_size)

    def out(job: Job) -> Path:
        return chunk_folder(data.cache_dir, sample_key, job)

    if rank == 0:
        for job in jobs:  # a killed predecessor's half-written chunks; no rank writes yet
            remove_stale_temps(out(job), recursive=False)
            atomic_write_json(out(job) / "key.json", job.key)
    barrier(world)

    score_chunks(folder, files, prompts, jobs, out, chunk_size, rank, world, on_progress)
    barrier(world)
    if rank != 0:
        return {}
    n_chunks = len(chunk_ranges([p.id for p in prompts], chunk_size))

    def outputs(job: Job) -> Iterator[np.ndarray]:
        for c in range(n_chunks):
            yield _load(out(job) / f"{c:06d}.npy")

    values: dict[str, dict[str, float]] = {}
    for job in jobs:
        # k-NN metrics first: they cache the reference features, which FID's statistics reuse
        names = sorted(job.metrics, key=lambda n: not getattr(metrics[n], "all_features", False))
        for name in names:
            m = metrics[name]
            if job.kind == "features":
                fs = FeatureSet(
                    lambda job=job: (torch.from_numpy(a) for a in outputs(job)), len(files)
                )
                values[name] = m.from_features(fs, data)  # type: ignore[attr-defined]
            else:
                values[name] = m.reduce(torch.from_numpy(np.concatenate(list(outputs(job)))))  # type: ignore[attr-defined]
    return values


__all__ = [
    "Job",
    "chunk_folder",
    "chunk_ranges",
    "plan_jobs",
    "read_pngs",
    "score_chunks",
    "score_sample_set",
    "sharded",
]
