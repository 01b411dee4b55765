"""Backbones: model families behind one contract (see :mod:`cdmbench.backbones.base`)."""

from cdmbench.backbones.base import Backbone, Cond, Prompt
from cdmbench.registry import BACKBONES


def get_backbone(name: str, **kwargs) -> Backbone:
    """Instantiate a registered backbone by name (raises UnknownNameError with a suggestion)."""
    return BACKBONES.get(name)(**kwargs)


__all__ = ["Backbone", "Cond", "Prompt", "get_backbone", "BACKBONES"]
