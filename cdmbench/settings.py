"""Typed settings: one dataclass per owner (the training core, a method, a backbone).

A field declares its default, its type and, in :func:`setting` metadata, its choices and
whether it changes what a run computes (``hashed``). Values from a TOML file or
``--set KEY=VALUE`` are checked and coerced here, once: an unknown key is a
:class:`~cdmbench.errors.UserError` with the closest known name, a bad value one naming
the setting and the expected type.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import MISSING, field, fields, replace
from typing import Any

from cdmbench.errors import UserError


def setting(default: Any, *, hashed: bool = True, choices: tuple | None = None) -> Any:
    """A dataclass field with metadata: ``hashed=False`` for settings that do not change
    results (batch sizes, evaluation defaults), so they stay out of a run's hash;
    ``choices``: the only values accepted."""
    return field(default=default, metadata={"hashed": hashed, "choices": choices})


def unhashed(cls: type) -> set[str]:
    """Names of the fields declared ``hashed=False`` anywhere in ``cls``'s bases: a subclass
    that only changes such a field's default keeps it out of the hash."""
    return {
        f.name
        for c in cls.__mro__
        for f in getattr(c, "__dataclass_fields__", {}).values()
        if not f.metadata.get("hashed", True)
    }


def coerce(value: Any, current: Any, annotation: Any, key: str) -> Any:
    """``value`` (text from the command line, or a TOML value) as the setting's type."""
    if isinstance(value, list):  # TOML arrays, JSON lists
        return tuple(value)
    if not isinstance(value, str):
        return value
    kind = type(current) if current is not None else None
    hints = typing.get_args(annotation) if typing.get_args(annotation) else (annotation,)
    try:
        if kind is None and type(None) in hints and value.lower() == "none":
            return None
        if kind is bool or annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if kind is int:
            return int(value)
        if kind is tuple or typing.get_origin(annotation) is tuple:
            elem = hints[0] if hints and hints[0] in (int, float) else None
            parts = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple((elem or (float if "." in v else int))(v) for v in parts)
        if kind is float or float in hints:
            return None if value.lower() == "none" else float(value)
        if kind is None and int in hints:
            return int(value)
        return value
    except ValueError:
        raise UserError(
            f"bad value '{value}' for '{key}': expected {kind.__name__ if kind else annotation}"
        ) from None


def apply(obj: Any, updates: Mapping[str, Any], section: str) -> Any:
    """A copy of the dataclass ``obj`` with ``updates`` checked, coerced and applied."""
    if not updates:
        return obj
    known = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    clean = {}
    for k, v in updates.items():
        if k not in known:
            from cdmbench.registry import suggest

            close = suggest(k, list(known))
            hint = f" — did you mean '{section}.{close}'?" if close else ""
            raise UserError(f"unknown setting '{section}.{k}'{hint}")
        value = coerce(v, getattr(obj, k), hints.get(k), f"{section}.{k}")
        choices = known[k].metadata.get("choices")
        if choices is not None and value not in choices:
            raise UserError(
                f"bad value '{v}' for '{section}.{k}': use one of {', '.join(map(str, choices))}"
            )
        clean[k] = value
    return replace(obj, **clean)


def defaults_of(cls: type) -> dict[str, Any]:
    """The declared defaults of a settings dataclass, by field name."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def as_dict(obj: Any, hashed_only: bool = False) -> dict[str, Any]:
    """Field values as plain JSON values (tuples as lists); ``hashed_only``: only the
    settings that change results."""
    out = {}
    skip = unhashed(type(obj)) if hashed_only else set()
    for f in fields(obj):
        if f.name in skip:
            continue
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
