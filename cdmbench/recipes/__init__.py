"""Versioned training recipes shipped with the package: one TOML file per recipe.

A recipe is a config file (``[train]``, ``[method]`` and ``[backbone]`` tables, see
:mod:`cdmbench.config`) with a ``[recipe]`` table naming it: ``name``, ``version``,
``method``, ``backbone`` and a one-line ``description``; its header comment says where each
value comes from (paper, official code) and which ones had to be chosen. ``cdmbench train
--config NAME`` (or a path to such a file) reproduces it; ``--set`` overrides any value.
A run records the recipe's name and version in its ``config.json``; the run's hash is over
the resolved values, so a recipe and the same values given by hand name the same run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdmbench.errors import UserError

RECIPE_DIR = Path(__file__).parent
RECIPE_KEYS = ("name", "version", "method", "backbone", "description")


@dataclass(frozen=True)
class Recipe:
    """The ``[recipe]`` table of a config file, and where the file is."""

    name: str
    version: int
    method: str | None
    backbone: str | None
    description: str
    path: Path

    def record(self) -> dict[str, Any]:
        """What a run's config.json keeps of the recipe it came from."""
        return {"name": self.name, "version": self.version, "path": str(self.path)}


def names() -> list[str]:
    """The shipped recipes, by name."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def find(spec: str | Path) -> Path:
    """The config file ``spec`` names: an existing path, else a shipped recipe's name. An
    unknown name is a :class:`UserError` with the closest shipped one."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"config file {path} is a directory; pass a TOML file")
    text = str(spec)
    if text in names():
        return RECIPE_DIR / f"{text}.toml"
    if path.suffix == ".toml" or "/" in text or "\\" in text:
        raise UserError(f"config file {path} not found")
    from cdmbench.registry import suggest

    close = suggest(text, names())
    hint = f" — did you mean '{close}'?" if close else ""
    raise UserError(
        f"unknown recipe '{text}'{hint} (`cdmbench recipes` lists them; or pass a TOML file path)"
    )


def recipe_of(path: Path, data: dict[str, Any]) -> Recipe | None:
    """The ``[recipe]`` table of a parsed config file, checked; None when it has none."""
    table = data.get("recipe")
    if table is None:
        return None
    unknown = [k for k in table if k not in RECIPE_KEYS]
    if unknown:
        raise UserError(
            f"config file {path}: unknown key '{unknown[0]}' in [recipe]; use "
            f"{', '.join(RECIPE_KEYS)}"
        )
    version = table.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"config file {path}: [recipe] version must be an integer")
    return Recipe(
        name=str(table.get("name", path.stem)),
        version=version,
        method=table.get("method"),
        backbone=table.get("backbone"),
        description=str(table.get("description", "")),
        path=path,
    )


def load(spec: str | Path) -> Recipe | None:
    """The recipe of the config file ``spec`` names (see :func:`find`); None for a plain
    config file without a ``[recipe]`` table."""
    from cdmbench.config import read_toml

    path = find(spec)
    return recipe_of(path, read_toml(path))


def shipped() -> list[Recipe]:
    """Every shipped recipe, by name."""
    return [r for r in (load(n) for n in names()) if r is not None]
