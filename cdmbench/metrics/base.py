"""The metric plugin interface.

A metric declares its name, its direction, what it needs, and the exact model and
convention it uses (``config``); every number it produces is stored with that config. A
metric may return several named values (``precision`` and ``recall`` come from one k-NN
pass); each value's direction is given by ``directions``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor

from cdmbench.backbones.base import Backbone, Prompt
from cdmbench.errors import UserError


class MissingWeightsError(UserError, RuntimeError):
    """Pretrained weights a metric needs are not on this machine; the message says what to fetch."""


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
    directions: ClassVar[dict[str, bool]] = {}  # value name -> higher is better
    needs: ClassVar[tuple[str, ...]] = ("images",)  # images, prompts, labels, reference, timer
    backbones: ClassVar[tuple[str, ...] | None] = None  # None: any backbone

    def config(self) -> dict[str, Any]:
        """The exact model, weights and convention; stored with every value."""
        return {}

    def check(self, backbone=None) -> None:
        """Raise MissingWeightsError (one line: what to fetch, where to put it) before any work."""

    def run_config(self) -> dict[str, Any]:
        """``config()`` plus what the last ``compute`` used (e.g. N_ref); stored, not hashed."""
        return self.config()

    def compute(self, data: EvalSet) -> dict[str, float]:
        raise NotImplementedError
