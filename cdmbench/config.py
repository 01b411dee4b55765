"""Typed run configuration: dataclass defaults < backbone defaults < TOML file < --set."""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from cdmbench.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from cdmbench.training.core import TrainConfig
from cdmbench.training.method import config_to_dict


def parse_steps(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; rejects empty items, non-integers, values < 1 and duplicates."""
    items = [t.strip() for t in str(text).split(",")]
    if not text or any(t == "" for t in items):
        raise UserError(f"bad step list '{text}': use comma-separated positive integers, e.g. 1,2,4")
    steps = []
    for t in items:
        try:
            steps.append(int(t))
        except ValueError:
            raise UserError(f"bad step list '{text}': '{t}' is not an integer; use e.g. 1,2,4") from None
    if any(s < 1 for s in steps):
        raise UserError(f"bad step list '{text}': step counts must be >= 1")
    if len(set(steps)) != len(steps):
        raise UserError(f"bad step list '{text}': duplicate step counts")
    return steps


def _coerce(value: str | Any, current: Any, annotation: Any, key: str) -> Any:
    if isinstance(value, list):  # TOML arrays
        return tuple(value)
    if not isinstance(value, str):
        return value
    kind = type(current) if current is not None else None
    hints = typing.get_args(annotation) if typing.get_args(annotation) else (annotation,)
    try:
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
        return value
    except ValueError:
        raise UserError(f"bad value '{value}' for '{key}': expected {kind.__name__ if kind else annotation}") from None


def _apply(obj, updates: dict[str, Any], section: str):
    known = {f.name: f for f in fields(obj)}
    clean = {}
    for k, v in updates.items():
        if k not in known:
            from cdmbench.registry import suggest

            close = suggest(k, list(known))
            hint = f" — did you mean '{section}.{close}'?" if close else ""
            raise UserError(f"unknown setting '{section}.{k}'{hint}")
        hints = typing.get_type_hints(type(obj))
        clean[k] = _coerce(v, getattr(obj, k), hints.get(k), f"{section}.{k}")
    return replace(obj, **clean)


def parse_pairs(items: list[str] | None, flag: str, usage: str) -> dict[str, str]:
    """['k=v', ...] -> {k: v}; an item without '=' is a UserError quoting ``usage``."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"bad {flag} '{item}': {usage}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_sets(sets: list[str] | None) -> dict[str, str]:
    return parse_pairs(sets, "--set", "use key=value, e.g. --set train.iters=500")


def resolve(method_cls, backbone: str, config_file: str | None = None, sets: list[str] | None = None,
            **train_overrides: Any) -> tuple[TrainConfig, Any]:
    """TrainConfig and the method's config for ``backbone``, with every override applied."""
    train = replace(TrainConfig(), **method_cls.default_train(backbone))
    method = method_cls.default_config(backbone)
    layers: list[dict[str, Any]] = []
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"config file {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        layers.append({f"train.{k}": v for k, v in data.get("train", {}).items()})
        layers.append({f"method.{k}": v for k, v in data.get("method", {}).items()})
    layers.append({f"train.{k}": v for k, v in train_overrides.items() if v is not None})
    layers.append(parse_sets(sets))
    train_fields = {f.name for f in fields(TrainConfig)}
    for layer in layers:
        t_up, m_up = {}, {}
        for key, v in layer.items():
            section, _, name = key.rpartition(".")
            if section == "":  # bare key: core setting if it is one, else the method's
                section = "train" if name in train_fields else "method"
            if section == "train":
                t_up[name] = v
            elif section in ("method", method_cls.name):
                m_up[name] = v
            else:
                raise UserError(f"unknown section '{section}' in '{key}': use train.KEY or method.KEY")
        train = _apply(train, t_up, "train")
        method = _apply(method, m_up, "method")
    return train, method


def config_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_payload(method: str, backbone: str, train: TrainConfig, method_cfg, teacher: str) -> dict[str, Any]:
    """What identifies a training run; its hash names the run directory.

    The package version is part of it: a release that changes a method's maths trains anew
    instead of silently continuing (or reusing) a run made by the previous code.
    """
    from cdmbench import __version__

    t = config_to_dict(train)
    for k in ("device", "threads", "log_every", "ckpt_every", "on_nan", "shard"):  # do not change results
        t.pop(k, None)
    return {"method": method, "backbone": backbone, "train": t, "method_config": config_to_dict(method_cfg),
            "teacher": teacher, "cdmbench": __version__}
