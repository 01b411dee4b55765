"""The metric plugin interface.

A metric declares its name, what it needs, the exact model and convention it uses
(``config``), and for each named value it produces (``precision`` and ``recall`` come from one
k-NN pass) a :class:`Value`: direction, default regression tolerance, whether it measures the
machine. Every number is stored with the config; the report and ``cdmbench check`` read the
value declarations through :func:`value_spec`, nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from cdmbench.backbones.base import Backbone
from cdmbench.prompts_io import Prompt

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
