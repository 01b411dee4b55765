"""Typed settings: one dataclass per owner (the training core, a method, a backbone).

A field declares its default, its type and, in :func:`setting` metadata, its choices, its
range and whether it changes what a run computes (``hashed``). Values from a TOML file,
``--set KEY=VALUE`` or a command-line option are coerced and checked here, once, before
anything is written: an unknown key is a :class:`~cdmbench.errors.UserError` with the
closest known name, a bad value (wrong type, out of range, not finite, not a choice, an
empty list, an inverted range) one naming the setting, the value and what is allowed.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields, replace
from typing import Any

from cdmbench.errors import UserError

# The largest iteration, step and sample count a setting accepts: far beyond any real run,
# small enough that a mistyped value fails here instead of allocating until the kernel kills
# the process.
MAX_COUNT = 10_000_000
MAX_STEPS = 10_000  # sampler steps: far past any reference sampler's 28-1000


def setting(
    default: Any,
    *,
    hashed: bool = True,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    at_most: str | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field with metadata: ``hashed=False`` for settings that do not change
    results (batch sizes, evaluation defaults), so they stay out of a run's hash;
    ``choices``: the only values accepted; ``ge``/``gt``/``le``/``lt``: the range of a number
    (of each element of a tuple); ``at_most``: the name of a field of the same dataclass this
    one may not exceed (a lower end of a range); ``check``: a function returning what is
    wrong with a value, or None."""
    meta: dict[str, Any] = {"hashed": hashed, "choices": choices}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["range"] = bounds
    if at_most is not None:
        meta["at_most"] = at_most
    if check is not None:
        meta["check"] = check
    return field(default=default, metadata=meta)


def unhashed(cls: type) -> set[str]:
    """Names of the fields declared ``hashed=False`` anywhere in ``cls``'s bases: a subclass
    that only changes such a field's default keeps it out of the hash."""
    return {
        f.name
        for c in cls.__mro__
        for f in getattr(c, "__dataclass_fields__", {}).values()
        if not f.metadata.get("hashed", True)
    }


def declared(cls: type, name: str) -> dict[str, Any]:
    """The declaration of field ``name`` across ``cls``'s bases: a subclass that changes a
    field's default keeps the range, choices and checks its base declared, unless it declares
    its own."""
    meta: dict[str, Any] = {}
    for c in reversed(cls.__mro__):
        f = getattr(c, "__dataclass_fields__", {}).get(name)
        if f is not None:
            meta.update({k: v for k, v in f.metadata.items() if v is not None})
    return meta


_OPS = {
    "ge": (">=", float.__ge__),
    "gt": (">", float.__gt__),
    "le": ("<=", float.__le__),
    "lt": ("<", float.__lt__),
}


def describe_range(bounds: Mapping[str, float], whole: bool = False) -> str:
    """'a whole number >= 1 and <= 10000000' for ``{"ge": 1, "le": 1e7}``."""
    kind = "a whole number" if whole else "a finite number"
    parts = [f"{_OPS[k][0]} {_num(v)}" for k, v in bounds.items()]
    return f"{kind} {' and '.join(parts)}" if parts else kind


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _conforms(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the declared type (bool is no number; an int is a float)."""
    origin = typing.get_origin(annotation)
    if annotation is Any or annotation is None and value is None:
        return True
    if annotation is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_conforms(v, args[0]) for v in value)
        return len(args) == len(value) and all(map(_conforms, value, args))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation: Any) -> str:
    """What a user reads for a type: 'a whole number', 'a list of numbers', 'true or false'."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(annotation)]
        return " or ".join(dict.fromkeys(names))
    if origin is tuple:
        args = typing.get_args(annotation)
        inner = _type_name(args[0]) if args else "value"
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {inner.removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {inner.removeprefix('a ').removeprefix('an ')}s"
    return {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "a string",
        type(None): "none",
    }.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _show(value: Any) -> str:
    text = repr(list(value)) if isinstance(value, tuple) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_value(value: Any, meta: Mapping[str, Any], annotation: Any, key: str) -> None:
    """Raise a one-line :class:`UserError` unless ``value`` suits the declaration ``meta``
    (:func:`declared`) and the type ``annotation``: its type,
    its range (every element of a tuple), its choices, its ``check``; a tuple must not be
    empty and a number must be finite."""

    def bad(what: str) -> UserError:
        return UserError(f"bad value {_show(value)} for '{key}': {what}")

    if annotation is not None and not _conforms(value, annotation):
        raise bad(f"expected {_type_name(annotation)}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise bad(f"use one of {', '.join(map(str, choices))}")
    if isinstance(value, tuple) and not value:
        raise bad("give at least one value")
    bounds = meta.get("range", {})
    each = "every value " if isinstance(value, tuple) else ""
    for v in value if isinstance(value, tuple) else (value,):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        whole = isinstance(v, int)
        if not math.isfinite(v):
            raise bad(f"expected {each}{describe_range(bounds, whole)}")
        for op, limit in bounds.items():
            if not _OPS[op][1](float(v), float(limit)):
                raise bad(f"expected {each}{describe_range(bounds, whole)}")
    check = meta.get("check")
    if check is not None and value is not None:
        problem = check(value)
        if problem:
            raise bad(problem)


def check_option(
    flag: str, value: Any, owner: type | None = None, name: str | None = None, **bounds: float
) -> None:
    """Check the command-line option ``flag``'s ``value`` (None: unset, passes) against the
    declaration of the setting ``owner.name`` it stands for, or against ``bounds`` (``ge``,
    ``gt``, ``le``, ``lt``) where it stands for none; the message names the option."""
    if value is None:
        return
    if owner is not None:
        meta, annotation = declared(owner, name), typing.get_type_hints(owner)[name]
    else:
        meta, annotation = {"range": bounds}, type(value)
    check_value(value, meta, annotation, flag)


def validate(obj: Any, section: str) -> None:
    """Check every field of the settings dataclass ``obj`` against its declaration, then the
    declared orderings: what :func:`apply` checks of the values it sets."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        check_value(
            getattr(obj, f.name),
            declared(type(obj), f.name),
            hints.get(f.name),
            f"{section}.{f.name}",
        )
    check_order(obj, section)


def check_order(obj: Any, section: str) -> None:
    """The declared orderings (``at_most``) of ``obj``'s fields: no inverted range."""
    for f in fields(obj):
        upper = declared(type(obj), f.name).get("at_most")
        if upper is None:
            continue
        lo, hi = getattr(obj, f.name), getattr(obj, upper)
        if lo is not None and hi is not None and lo > hi:
            raise UserError(
                f"bad values for '{section}.{f.name}' ({_show(lo)}) and '{section}.{upper}' "
                f"({_show(hi)}): {f.name} must be <= {upper}"
            )


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
            elem = hints[0] if hints and hints[0] in (int, float, str) else None
            parts = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
            return tuple((elem or (float if "." in v else int))(v) for v in parts)
        if kind is float or float in hints:
            return None if value.lower() == "none" else float(value)
        if kind is None and int in hints:
            return int(value)
        return value
    except ValueError:
        expected = _type_name(annotation) if annotation is not None else kind.__name__
        raise UserError(f"bad value {_show(value)} for '{key}': expected {expected}") from None


def apply(obj: Any, updates: Mapping[str, Any], section: str) -> Any:
    """A copy of the dataclass ``obj`` with ``updates`` coerced, checked against their
    declarations (:func:`check_value`) and applied, then the orderings checked."""
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
        check_value(value, declared(type(obj), k), hints.get(k), f"{section}.{k}")
        clean[k] = value
    new = replace(obj, **clean)
    check_order(new, section)
    return new


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
