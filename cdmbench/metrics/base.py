"""The metric plugin interface.

A metric declares its name, what it needs, the exact model and convention it uses
(``config``), and for each named value it produces (``precision`` and ``recall`` come from one
k-NN pass) a :class:`Value`: direction, default regression tolerance, whether it measures the
machine. Every number is stored with the config; the report and ``cdmbench check`` read the
value declarations through :func:`value_spec`, nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from cdmbench.backbones.base import Backbone
from cdmbench.metrics.frechet import Moments, chunk_moments
from cdmbench.prompts_io import Prompt

if TYPE_CHECKING:
    from cdmbench.metrics.features import ImageFeatures

FALLBACK_TOLERANCE = "10%"  # for values no registered metric declares


@dataclass(frozen=True)
class Value:
    """What one value a metric produces means, for the report and the regression check."""

    higher_is_better: bool
    # how much worse `cdmbench check` lets it get: absolute ("0.02") or relative to the
    # baseline ("15%"); None: not checked unless a tolerance is given
    tolerance: str | None = FALLBACK_TOLERANCE
    machine_dependent: bool = False  # measures the machine as much as the model (timings)
    description: str = ""


@dataclass
class EvalSet:
    """What a metric scores: one model at one step count on one prompt set."""

    images: Tensor  # uint8 [N, C, H, W], as written to PNG
    prompts: list[Prompt]  # prompts[i] generated images[i]
    backbone: Backbone
    reference: str = ""  # name of the real reference set, where the backbone has one
    cache_dir: Path = Path(".cdmbench/cache")
    # latency: times one generation of a batch of the given size; returns seconds
    # (end to end, denoiser only) for one call
    timer: Callable[[int], tuple[float, float]] | None = None
    eval_batch: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class Metric:
    """Base class: set the class attributes, implement :meth:`compute`."""

    name: ClassVar[str] = "metric"
    values: ClassVar[dict[str, Value]] = {}  # every value name compute() may return
    needs: ClassVar[tuple[str, ...]] = ("images",)  # images, prompts, labels, reference, timer

    def config(self) -> dict[str, Any]:
        """The exact model, weights and convention; stored with every value."""
        return {}

    def check(self, backbone: Backbone | None = None) -> None:
        """Raise before any work: MissingWeightsError (one line: what to fetch, where to put
        it), or UserError where ``backbone`` lacks what the metric needs."""

    min_samples: ClassVar[int] = 1  # the fewest samples a set must have to be scored

    def too_few(self, prompts: int, per_prompt: int) -> str | None:
        """Why a set of ``prompts`` x ``per_prompt`` samples cannot be scored (None if it can);
        checked before anything is generated."""
        if prompts * per_prompt < self.min_samples:
            return f"at least {self.min_samples} samples; raise --num-samples or add prompts"
        return None

    def run_config(self) -> dict[str, Any]:
        """``config()`` plus what the last ``compute`` used (e.g. N_ref); stored, not hashed."""
        return self.config()

    def compute(self, data: EvalSet) -> dict[str, float]:
        raise NotImplementedError


def declared_values() -> dict[str, Value]:
    """Value name -> its declaration, over every registered metric (first declaration wins)."""
    from cdmbench.registry import METRICS

    out: dict[str, Value] = {}
    for name in METRICS.names():
        try:
            cls = METRICS.get(name)
        except ImportError:  # a plugin whose module cannot load declares nothing
            continue
        for value, spec in getattr(cls, "values", {}).items():
            out.setdefault(value, spec)
    return out


def value_spec(name: str, higher_is_better: bool | None = None) -> Value | None:
    """The declaration of value ``name``; for a value no registered metric declares, the
    direction a record or baseline stored with the fallback tolerance (None if none stored)."""
    spec = declared_values().get(name)
    if spec is not None:
        return spec
    return None if higher_is_better is None else Value(higher_is_better)


class PerSampleMetric(Metric):
    """A metric that scores each (image, prompt) pair on its own and averages: reward models,
    CLIP score. Subclasses implement :meth:`load` and :meth:`score_batch`; the scoring driver
    streams images in chunks, shards them across ranks and combines the per-sample scores, so
    a subclass never sees the whole sample set."""

    needs = ("images", "prompts")
    batch_size: int = 16
    device: str | None = None

    def load(self, device: str | torch.device = "cpu") -> Any:
        """The scoring model(s), built once per process (weights resolved by :meth:`check`)."""
        raise NotImplementedError

    def score_batch(self, model: Any, images: Tensor, texts: list[str]) -> Tensor:
        """One score per pair: images uint8 [n, C, H, W] (C = 1 or 3), texts[i] the prompt of
        images[i] -> float64 [n] on the CPU."""
        raise NotImplementedError

    def reduce(self, scores: Tensor) -> dict[str, float]:
        """Values from all per-sample scores (float64 [N], manifest order): the mean."""
        (value,) = self.values
        return {value: float(scores.sum() / max(len(scores), 1))}

    def scores(
        self, images: Tensor, texts: list[str], device: str | torch.device = "cpu"
    ) -> Tensor:
        """Per-sample scores of images[i] for texts[i] in batches of ``batch_size``."""
        if images.shape[0] != len(texts):
            raise ValueError(f"{images.shape[0]} images but {len(texts)} prompts")
        model = self.load(device)
        out = [
            self.score_batch(
                model, images[i : i + self.batch_size], texts[i : i + self.batch_size]
            ).to(torch.float64)
            for i in range(0, len(texts), self.batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)

    def compute(self, data: EvalSet) -> dict[str, float]:
        device = self.device or str(getattr(data.backbone, "device", "cpu"))
        return self.reduce(self.scores(data.images, [p.text for p in data.prompts], device))


class PerPromptMetric(Metric):
    """A metric over the images of each prompt (intra-prompt diversity: LPIPS, Vendi): one
    score per prompt from its ``per_prompt`` images, averaged over prompts. The driver shards
    whole prompts across ranks."""

    needs = ("images", "prompts")
    device: str | None = None

    def load(self, device: str | torch.device = "cpu") -> Any:
        raise NotImplementedError

    def too_few(self, prompts: int, per_prompt: int) -> str | None:
        # a prompt's images are compared with each other: one image per prompt has no score
        return None if per_prompt >= 2 else "at least 2 samples per prompt; raise --num-samples"

    def score_group(self, model: Any, images: Tensor, text: str) -> float:
        """The score of the k >= 2 images (uint8 [k, C, H, W]) generated for one prompt."""
        raise NotImplementedError

    def reduce(self, scores: Tensor) -> dict[str, float]:
        """Values from the per-prompt scores (float64 [P], prompt order): the mean."""
        (value,) = self.values
        return {value: float(scores.sum() / max(len(scores), 1))}

    def compute(self, data: EvalSet) -> dict[str, float]:
        device = self.device or str(getattr(data.backbone, "device", "cpu"))
        model = self.load(device)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(data.prompts):
            groups.setdefault(p.id, []).append(i)
        texts = {p.id: p.text for p in data.prompts}
        scores = [
            self.score_group(model, data.images[idx], texts[pid])
            for pid, idx in groups.items()
            if len(idx) >= 2
        ]
        return self.reduce(torch.tensor(scores, dtype=torch.float64))


class FeatureSet:
    """The features of one sample set, [n_i, D] chunks in manifest order, read on demand.

    The scoring driver hands a metric the chunks it (and other ranks) extracted; in memory
    (:meth:`of`) it is one chunk. Metrics that need only statistics stream :meth:`moments`;
    k-NN metrics take :meth:`all`.
    """

    def __init__(self, chunks: Callable[[], Iterator[Tensor]], n: int) -> None:
        self._chunks, self.n = chunks, n

    @classmethod
    def of(cls, features: Tensor) -> FeatureSet:
        return cls(lambda: iter([features]), int(features.shape[0]))

    def __iter__(self) -> Iterator[Tensor]:
        return self._chunks()

    def all(self) -> Tensor:
        """Every feature row, [N, D] float32."""
        return torch.cat([torch.as_tensor(c) for c in self])

    def moments(self) -> Moments:
        """Float64 moments over the chunks in order (:func:`~cdmbench.metrics.frechet.chunk_moments`)."""
        return chunk_moments(self)


class FeatureMetric(Metric):
    """A metric of the sample set's features in one feature space (FID, precision/recall).

    The scoring driver extracts each (sample set, feature network) once, shared by every
    metric whose :meth:`extractor` has the same id and config, sharded across ranks and cached
    per chunk; then rank 0 calls :meth:`from_features`. :meth:`compute` does the same in memory.
    """

    needs = ("images", "reference")
    all_features: ClassVar[bool] = False  # needs every feature row at once (k-NN), not moments
    device: str | torch.device | None = None

    def extractor(self, backbone: Backbone) -> ImageFeatures:
        """The feature network this metric scores in on ``backbone``."""
        raise NotImplementedError

    def from_features(self, features: FeatureSet, data: EvalSet) -> dict[str, float]:
        """Values from the generated set's features (``data.images`` is empty here)."""
        raise NotImplementedError

    def compute(self, data: EvalSet) -> dict[str, float]:
        ext = self.extractor(data.backbone)
        ext.check()
        ext.to(self.device if self.device is not None else data.backbone.device)
        return self.from_features(FeatureSet.of(ext(data.images)), data)
