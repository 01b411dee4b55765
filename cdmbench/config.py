"""Typed run configuration: dataclass defaults < backbone defaults < TOML file < --set.

Three sections: ``train`` (the core's :class:`TrainConfig`), ``method`` (the method's
``Config``) and ``backbone`` (the backbone's ``Settings``); each is a TOML table and a
``--set SECTION.KEY=VALUE`` prefix, checked and coerced by :mod:`cdmbench.settings`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdmbench.errors import UserError
from cdmbench.settings import MAX_STEPS, apply, as_dict

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from cdmbench.training.core import TrainConfig
from cdmbench.training.method import config_to_dict

if TYPE_CHECKING:
    from cdmbench.backbones.base import Backbone, BackboneSettings

SECTIONS = ("train", "method", "backbone")


def parse_steps(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; rejects empty items, non-integers, values < 1 and duplicates."""
    items = [t.strip() for t in str(text).split(",")]
    if not text or any(t == "" for t in items):
        raise UserError(
            f"bad step list '{text}': use comma-separated positive integers, e.g. 1,2,4"
        )
    steps = []
    for t in items:
        try:
            steps.append(int(t))
        except ValueError:
            raise UserError(
                f"bad step list '{text}': '{t}' is not an integer; use e.g. 1,2,4"
            ) from None
    if any(s < 1 or s > MAX_STEPS for s in steps):
        raise UserError(f"bad step list '{text}': step counts must be >= 1 and <= {MAX_STEPS}")
    if len(set(steps)) != len(steps):
        raise UserError(f"bad step list '{text}': duplicate step counts")
    return steps


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


def read_toml(config_file: str | Path) -> dict[str, Any]:
    """The tables of a TOML config file, or of the shipped recipe of that name
    (:mod:`cdmbench.recipes`); a missing or malformed file is a UserError."""
    from cdmbench.recipes import find, recipe_of

    path = find(config_file)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory; pass a TOML file") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"config file {path}: cannot read it ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None
    recipe_of(path, data)  # checks the [recipe] table
    tables = (*SECTIONS, "recipe")
    for key, value in data.items():
        if not isinstance(value, dict):
            where = "[train]" if key in {f.name for f in fields(TrainConfig)} else "a table"
            raise UserError(
                f"config file {path}: '{key}' is outside any table; put it under {where} "
                f"({', '.join(f'[{s}]' for s in SECTIONS)})"
            )
        if key not in tables:
            from cdmbench.registry import suggest

            close = suggest(key, list(tables))
            hint = f" — did you mean [{close}]?" if close else ""
            raise UserError(
                f"config file {path}: unknown table [{key}]{hint}; use "
                f"{', '.join(f'[{s}]' for s in SECTIONS)}"
            )
    return data


def _section_of(key: str, train_fields: set[str], method_name: str | None) -> tuple[str, str]:
    """('train' | 'method' | 'backbone', name) of a --set key; a bare key is the core's
    setting if it is one, else the method's."""
    section, _, name = key.rpartition(".")
    if section == "":
        section = "train" if name in train_fields else "method"
    if method_name is not None and section == method_name:
        section = "method"
    if section not in SECTIONS:
        from cdmbench.registry import suggest

        close = suggest(section, list(SECTIONS))
        hint = f" — did you mean '{close}.{name}'?" if close else ""
        raise UserError(
            f"unknown section '{section}' in '{key}'{hint}; use train.KEY, method.KEY or "
            "backbone.KEY"
        )
    return section, name


def resolve(
    method_cls,
    backbone: str,
    config_file: str | None = None,
    sets: list[str] | None = None,
    variant: str = "tuned",
    **train_overrides: Any,
) -> tuple[TrainConfig, Any]:
    """TrainConfig and the method's config for ``backbone``: the ``variant``'s defaults
    ("tuned" or "paper", :meth:`Method.variant_overrides`) with every override applied
    (``backbone.`` keys are :func:`backbone_settings`' to check)."""
    train = replace(TrainConfig(), **method_cls.default_train(backbone, variant))
    method = method_cls.default_config(backbone, variant)
    layers: list[dict[str, Any]] = []
    if config_file:
        data = read_toml(config_file)
        layers.append({f"train.{k}": v for k, v in data.get("train", {}).items()})
        layers.append({f"method.{k}": v for k, v in data.get("method", {}).items()})
    layers.append({f"train.{k}": v for k, v in train_overrides.items() if v is not None})
    layers.append(parse_sets(sets))
    train_fields = {f.name for f in fields(TrainConfig)}
    for layer in layers:
        up: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for key, v in layer.items():
            section, name = _section_of(key, train_fields, method_cls.name)
            up[section][name] = v
        train = apply(train, up["train"], "train")
        method = apply(method, up["method"], "method")
    return train, method


def backbone_settings(
    backbone_cls: type[Backbone],
    config_file: str | None = None,
    sets: list[str] | None = None,
    only_backbone: bool = False,
) -> BackboneSettings:
    """The backbone's ``Settings``: declared defaults < TOML ``[backbone]`` < ``--set
    backbone.KEY=VALUE``. ``only_backbone``: other sections are an error (eval, sample and
    bench configure no training)."""
    settings = backbone_cls.Settings()
    layers = []
    if config_file:
        layers.append(read_toml(config_file).get("backbone", {}))
    pairs = parse_sets(sets)
    ups = {}
    for key, v in pairs.items():
        section, name = _section_of(key, set(), None) if "." in key else ("", key)
        if section != "backbone":
            if only_backbone:
                raise UserError(
                    f"--set {key}: only backbone.KEY settings apply here, e.g. "
                    "--set backbone.resolution=512"
                )
            continue
        ups[name] = v
    layers.append(ups)
    for layer in layers:
        settings = apply(settings, layer, "backbone")
    return settings


def config_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :12
    ]


def config_key(payload: dict[str, Any]) -> str:
    """Hash of a run's payload without its seed: runs that differ only in seed share it, and
    a report aggregates them as seeds of one configuration."""
    train = {k: v for k, v in payload.get("train", {}).items() if k != "seed"}
    return config_hash({**payload, "train": train})


def run_payload(
    method: str,
    backbone: Backbone,
    train: TrainConfig,
    method_cfg,
    teacher_weights: str | None = None,
) -> dict[str, Any]:
    """What identifies a training run; its hash names the run directory.

    The backbone's settings that change results are part of it, and so is the identity of
    the weights it loads (:meth:`Backbone.teacher_id`): a different model never reuses a
    finished run. The package version is part of it: a release that changes a method's
    maths trains anew instead of silently continuing (or reusing) a run made by the
    previous code.
    """
    from cdmbench import __version__

    t = as_dict(train, hashed_only=True)  # the settings declared to change results
    return {
        "method": method,
        "backbone": backbone.name,
        "backbone_settings": backbone.run_settings(),
        "train": t,
        "method_config": config_to_dict(method_cfg),
        "teacher": backbone.teacher_id(teacher_weights),
        "cdmbench": __version__,
    }
