"""The method plugin interface, and how a method's student samples at evaluation."""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, ClassVar

from torch import Tensor, nn

from cdmbench import flow


@dataclass
class SamplerSpec:
    """How a student generates at a step count: the post-shift sigmas and the update rule."""

    sigmas: list[float]
    stochastic: bool = False  # re-noise with fresh noise between steps (DMD2-style)
    guidance: float = 1.0  # students have guidance distilled in


class Method:
    """Base class for distillation methods (one module per method in ``methods/``).

    Subclasses set ``name``, ``Config`` (a dataclass of the method's options with the
    reference defaults) and ``backbone_defaults`` (per-backbone overrides of those options,
    and of the core's ``TrainConfig`` under the key ``"train"``).
    """

    name: ClassVar[str] = "method"
    Config: ClassVar[type] = object
    backbone_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, config=None) -> None:
        self.cfg = config if config is not None else self.Config()

    @classmethod
    def default_config(cls, backbone: str):
        """The method's config with the backbone's scaled defaults applied."""
        over = {k: v for k, v in cls.backbone_defaults.get(backbone, {}).items() if k != "train"}
        return replace(cls.Config(), **over)

    @classmethod
    def default_train(cls, backbone: str) -> dict[str, Any]:
        return dict(cls.backbone_defaults.get(backbone, {}).get("train", {}))

    # -- what the core calls
    def build(self, core) -> dict[str, nn.Module]:
        """Auxiliary models (fake score, targets); the student and its EMA exist already."""
        return {}

    def optim_groups(self, core) -> dict:
        raise NotImplementedError

    def groups_to_update(self, it: int) -> list[str]:
        return list(self.optim_groups_names)

    def losses(self, group: str, it: int, batch, core) -> dict[str, Tensor]:
        raise NotImplementedError

    def after_step(self, group: str, it: int, core) -> None:
        pass

    def sampler(self, steps: int, shift: float) -> SamplerSpec:
        """The schedule this method's student uses at ``steps`` (default: uniform Euler)."""
        return SamplerSpec(flow.uniform_schedule(steps, shift))

    optim_groups_names: ClassVar[tuple[str, ...]] = ("student",)


def config_to_dict(cfg) -> dict[str, Any]:
    if not is_dataclass(cfg):
        return {}
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}
