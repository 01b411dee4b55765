"""Backbones: model families behind one contract (see :mod:`cdmbench.backbones.base`)."""

from typing import Any

from cdmbench.backbones.base import Backbone, BackboneSettings, Cond
from cdmbench.prompts_io import Prompt
from cdmbench.registry import BACKBONES


def get_backbone(name: str, device: str = "cpu", settings: Any = None, **kwargs: Any) -> Backbone:
    """Instantiate a registered backbone by name (raises UnknownNameError with a suggestion).

    ``settings``: the backbone's ``Settings``, or a mapping of its fields; keyword settings
    are applied on top.
    """
    return BACKBONES.get(name)(device=device, settings=settings, **kwargs)


__all__ = ["Backbone", "BackboneSettings", "Cond", "Prompt", "get_backbone", "BACKBONES"]
