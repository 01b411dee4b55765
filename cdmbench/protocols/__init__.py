"""Evaluation protocols: named, versioned presets, one TOML file each, shipped with the package.

A protocol fixes a prompt set and how it is read and subset, the samples per prompt, the
reference set and how its images are resized and cropped, and the metrics; its header comment
cites where each choice comes from (the paper's official code, byliutao/cdm, where it has
one). ``cdmbench eval --protocol A,B`` runs each as one (prompt set -> metrics) pair;
``cdmbench protocols`` lists them. Tables of a protocol file:

- ``[protocol]``: ``name``, ``version``, ``description``, ``metrics``, ``samples_per_prompt``,
  ``backbones`` (those it applies to; empty: any).
- ``[prompts]``: ``set`` (a packaged prompt set) or ``input`` (a file the user supplies),
  ``format`` (forced :mod:`cdmbench.prompts_io` format), ``subset`` (how many prompts),
  ``rule`` (``rank``: the prompts of smallest sha256 rank under ``seed``, see
  :func:`cdmbench.metrics.reference.ranked_subset`; ``linspace``: the prompts at
  ``np.linspace(0, N - 1, subset, dtype=int)``, byliutao/cdm's diversity rule), ``seed``.
- ``[reference]`` (optional): ``backbone`` (a split of the backbone's real data) or ``input``
  (a folder of images or a clean-fid ``.npz``), ``pairs`` (with a COCO captions JSON as the
  prompt input: the images of the selected captions), ``size``, ``resize``, ``filter``.
- ``[inputs.<name>]``: each file the user supplies: ``path`` (its default place under the
  data folder) and ``about`` (what it is and where to get it).

Inputs are found as ``--data NAME=PATH``, else at ``<data dir>/<path>``; a missing one is a
one-line :class:`~cdmbench.errors.UserError` naming it and where to get it. ``--limit N``
keeps the N prompts of smallest rank (for COCO pairs, of the image ids, and the reference
keeps the same images). A record names the protocol and version in its ``prompt_set``:
``<name>@<version>-<hash of the prompts>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cdmbench.errors import UserError
from cdmbench.prompts_io import FORMATS, Prompt, load_prompt_set, prompt_set_hash

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROTOCOL_DIR = Path(__file__).parent
RULES = ("rank", "linspace")
TABLES = {
    "protocol": ("name", "version", "description", "metrics", "samples_per_prompt", "backbones"),
    "prompts": ("set", "input", "format", "subset", "rule", "seed"),
    "reference": ("backbone", "input", "pairs", "size", "resize", "filter"),
    "inputs": (),
}
# the type of every key that is not an integer checked on its own (version, sizes, seeds)
_STR, _STRS = "a string", "a list of strings"
KEY_TYPES = {
    "name": _STR, "description": _STR, "metrics": _STRS, "backbones": _STRS, "set": _STR,
    "input": _STR, "format": _STR, "rule": _STR, "backbone": _STR,
    "resize": _STR, "filter": _STR, "path": _STR, "about": _STR,
}  # fmt: skip


@dataclass(frozen=True)
class Input:
    """A file or folder the user supplies: its default place under the data folder."""

    name: str
    path: str
    about: str


@dataclass(frozen=True)
class Protocol:
    """One preset: prompts, subset, samples per prompt, reference, resize/crop, metrics."""

    name: str
    version: int
    description: str
    metrics: tuple[str, ...]
    samples_per_prompt: int
    backbones: tuple[str, ...]
    prompts: dict[str, Any]
    reference: dict[str, Any] | None
    inputs: dict[str, Input]
    path: Path

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class EvalPair:
    """One (prompt set -> metrics) pair of an evaluation, resolved and checked."""

    prompt_set: str  # recorded with every value: protocol@version-<prompts hash>
    prompts: list[Prompt]
    metrics: list[str]
    per_prompt: int
    reference: str  # a reference string cdmbench.metrics.reference.resolve_reference reads
    protocol: str | None = None  # name@version
    inputs: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------ loading
def names() -> list[str]:
    """The shipped protocols, by name."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.toml"))


def load(name: str) -> Protocol:
    """The shipped protocol ``name``, or a protocol TOML file's path."""
    path = Path(name).expanduser()
    if not path.is_file():
        if name not in names():
            from cdmbench.registry import suggest

            close = suggest(name, names())
            hint = f" — did you mean '{close}'?" if close else ""
            raise UserError(
                f"unknown protocol '{name}'{hint} (`cdmbench protocols` lists them; "
                "or pass a protocol TOML file)"
            )
        path = PROTOCOL_DIR / f"{name}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"protocol file {path} is not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"protocol file {path} cannot be read: {e.strerror}") from None
    return parse(path, data)


def parse(path: Path, data: dict[str, Any]) -> Protocol:
    """A protocol from a parsed TOML file, every key checked."""

    def bad(what: str) -> UserError:
        return UserError(f"protocol file {path}: {what}")

    for table, value in data.items():
        if not isinstance(value, dict):
            raise bad(f"'{table}' must be a table ([{table}]), got {type(value).__name__}")
    tables = [data.get("protocol", {}), data.get("prompts", {}), data.get("reference") or {}]
    tables += list(data.get("inputs", {}).values())
    for t in tables:
        if not isinstance(t, dict):
            raise bad("each [inputs.NAME] must be a table")
        for key, value in t.items():
            kind = KEY_TYPES.get(key)
            ok = (
                kind is None
                or kind == _STR
                and isinstance(value, str)
                or kind == _STRS
                and isinstance(value, list)
                and all(isinstance(v, str) for v in value)
            )
            if key in ("subset", "seed"):  # counts: a whole number, not a bool
                ok = not isinstance(value, bool) and isinstance(value, int) and value >= 0
                kind = "a whole number >= 0"
            if not ok:
                raise bad(f"'{key}' must be {kind}, got {value!r}")
    for table, keys in TABLES.items():
        if table not in data:
            continue
        if table != "inputs":
            unknown = [k for k in data[table] if k not in keys]
            if unknown:
                raise bad(f"unknown key '{unknown[0]}' in [{table}]; use {', '.join(keys)}")
    unknown = [t for t in data if t not in TABLES]
    if unknown:
        raise bad(f"unknown table [{unknown[0]}]; use {', '.join(TABLES)}")
    head, prompts = data.get("protocol", {}), dict(data.get("prompts", {}))
    version, per_prompt = head.get("version", 1), head.get("samples_per_prompt", 1)
    for key, v in (("version", version), ("samples_per_prompt", per_prompt)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"[protocol] {key} must be a positive integer")
    if ("set" in prompts) == ("input" in prompts):
        raise bad("[prompts] needs exactly one of 'set' (a packaged set) and 'input'")
    if prompts.get("rule", "rank") not in RULES:
        raise bad(f"[prompts] rule must be one of {', '.join(RULES)}")
    if prompts.get("format") is not None and prompts["format"] not in FORMATS:
        raise bad(f"[prompts] format must be one of {', '.join(FORMATS)}")
    inputs = {
        n: Input(n, str(t.get("path", "")), str(t.get("about", "")))
        for n, t in data.get("inputs", {}).items()
    }
    ref = data.get("reference")
    for table, spec in (("prompts", prompts), ("reference", ref or {})):
        if "input" in spec and spec["input"] not in inputs:
            raise bad(f"[{table}] input '{spec['input']}' has no [inputs.{spec['input']}] table")
    if ref is not None:
        from cdmbench.metrics.reference import ReferenceSpec

        ReferenceSpec(  # checks resize, filter and size
            size=ref.get("size"),
            resize=ref.get("resize", "none"),
            filter=ref.get("filter", "lanczos"),
        )
    return Protocol(
        name=str(head.get("name", path.stem)),
        version=version,
        description=str(head.get("description", "")),
        metrics=tuple(head.get("metrics", ())),
        samples_per_prompt=per_prompt,
        backbones=tuple(head.get("backbones", ())),
        prompts=prompts,
        reference=ref,
        inputs=inputs,
        path=path,
    )


def shipped() -> list[Protocol]:
    """Every shipped protocol, by name."""
    return [load(n) for n in names()]


# ----------------------------------------------------------------------------- resolving
def parse_data(items: Sequence[str] | None) -> dict[str, Path]:
    """``NAME=PATH`` items of ``--data``."""
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UserError(f"--data {item}: use NAME=PATH, e.g. coco_captions=captions.json")
        out[name.strip()] = Path(value.strip()).expanduser()
    return out


def find_input(proto: Protocol, name: str, data: dict[str, Path], data_dir: Path) -> Path:
    """Where input ``name`` of ``proto`` is; one line naming it when it is nowhere."""
    spec = proto.inputs[name]
    path = data.get(name, Path(data_dir) / spec.path)
    if not path.exists():
        how = "passed as --data" if name in data else f"looked for under --data-dir {data_dir}"
        raise UserError(
            f"protocol {proto.id} needs {name} ({how}): {path} not found; it is {spec.about}; "
            f"pass --data {name}=PATH"
        )
    return path


def subset(prompts: list[Prompt], n: int | None, rule: str, seed: int) -> list[Prompt]:
    """``n`` of ``prompts`` by ``rule`` (see the module docstring); all when n is None."""
    from cdmbench.metrics.reference import ranked_subset

    if n is None or n >= len(prompts):
        return list(prompts)
    if rule == "linspace":  # byliutao/cdm scripts/eval.py generate_diversity_for_dataset
        import numpy as np

        return [prompts[i] for i in np.linspace(0, len(prompts) - 1, n, dtype=int).tolist()]
    return ranked_subset(prompts, n, seed, key=lambda p: p.id)


def resolve(
    proto: Protocol,
    backbone,
    data: dict[str, Path],
    data_dir: Path,
    limit: int | None = None,
    n_ref: int | None = None,
) -> EvalPair:
    """The protocol's pair on ``backbone``: prompts read and subset, reference named, every
    input checked to exist (nothing is generated)."""
    from cdmbench.metrics.reference import ReferenceSpec, select_coco

    if proto.backbones and backbone.name not in proto.backbones:
        raise UserError(
            f"protocol {proto.id} is for backbone {', '.join(proto.backbones)}, "
            f"not '{backbone.name}'"
        )
    p, seed = proto.prompts, int(proto.prompts.get("seed", 0))
    n = p.get("subset")
    n = min(n, limit) if (n is not None and limit is not None) else (limit or n)
    used: dict[str, str] = {}
    ref = proto.reference or {}
    coco = None
    if "set" in p:
        prompts = load_prompt_set(p["set"], backbone=backbone)[1]
    else:
        path = find_input(proto, p["input"], data, data_dir)
        used[p["input"]] = str(path)
        if ref.get("pairs") and path.suffix.lower() == ".json":
            coco = path
            prompts = [x.prompt for x in select_coco(path, n, seed)]
        else:
            prompts = load_prompt_set(path, fmt=p.get("format"))[1]
    if coco is None:
        prompts = subset(prompts, p.get("subset"), p.get("rule", "rank"), seed)
        prompts = subset(prompts, limit, "rank", seed)
    if not prompts:
        raise UserError(f"protocol {proto.id}: no prompts selected")
    if "input" in ref:
        rpath = find_input(proto, ref["input"], data, data_dir)
        used[ref["input"]] = str(rpath)
        spec = ReferenceSpec(
            path=str(rpath.resolve()),
            captions=str(coco.resolve()) if coco is not None else "",
            select=n if coco is not None else None,
            n=n_ref if n_ref is not None else (limit if coco is None else None),
            seed=seed,
            size=ref.get("size"),
            resize=ref.get("resize", "none"),
            filter=ref.get("filter", "lanczos"),
            label=proto.id,
        )
        reference = spec.encode()
    else:
        split = ref.get("backbone", "test")
        split = "" if split == "test" else split
        reference = ReferenceSpec(path=split, n=n_ref).encode() if n_ref else split
    return EvalPair(
        prompt_set=f"{proto.id}-{prompt_set_hash(prompts)}",
        prompts=prompts,
        metrics=list(proto.metrics),
        per_prompt=proto.samples_per_prompt,
        reference=reference,
        protocol=proto.id,
        inputs=used,
    )


def check_pair(pair: EvalPair, backbone) -> None:
    """Fail before any generation: every metric registered (did-you-mean otherwise) and its
    weights there (``Metric.check``), and the reference readable where a metric needs one."""
    from cdmbench.evaluate import build_metrics
    from cdmbench.metrics.reference import resolve_reference
    from cdmbench.registry import METRICS

    for m in pair.metrics:
        METRICS.entry(m)
    build_metrics(pair.metrics, backbone)
    if any("reference" in getattr(METRICS.get(m), "needs", ()) for m in pair.metrics):
        resolve_reference(pair.reference, backbone)


def eval_pairs(
    backbone,
    protocols: str | None,
    *,
    prompts: str | None = None,
    metrics: str | None = None,
    num_samples: int | None = None,
    reference: str | None = None,
    data: Sequence[str] | None = None,
    data_dir: Path = Path("data"),
    limit: int | None = None,
    n_ref: int | None = None,
) -> list[EvalPair]:
    """The pairs ``cdmbench eval`` runs, every one checked before anything is generated:
    one per protocol of the comma-separated ``protocols``, else the one given by ``prompts``,
    ``metrics``, ``num_samples`` and ``reference`` (the backbone's defaults where None)."""
    for name, v in (("--limit", limit), ("--n-ref", n_ref)):
        if v is not None and v < (2 if name == "--n-ref" else 1):
            raise UserError(f"{name} must be at least {2 if name == '--n-ref' else 1}, got {v}")
    given = parse_data(data)
    if protocols:
        clash = [
            opt
            for opt, v in (
                ("--prompts", prompts),
                ("--metrics", metrics),
                ("--num-samples", num_samples),
                ("--reference", reference),
            )
            if v is not None
        ]
        if clash:
            raise UserError(
                f"{clash[0]} with --protocol: a protocol fixes it; pass its files with "
                "--data NAME=PATH, or drop --protocol"
            )
        protos = [load(n.strip()) for n in protocols.split(",") if n.strip()]
        known = {i for pr in protos for i in pr.inputs}
        stray = [k for k in given if k not in known]
        if stray:
            raise UserError(
                f"--data {stray[0]}: no protocol of this run reads it; its inputs are "
                f"{', '.join(sorted(known)) or 'none'}"
            )
        pairs = [resolve(pr, backbone, given, data_dir, limit, n_ref) for pr in protos]
    else:
        if given:
            raise UserError("--data names a protocol's input; use it with --protocol")
        s = backbone.settings
        set_id, plist = load_prompt_set(prompts or s.eval_prompts, backbone=backbone)
        if limit is not None and limit < len(plist):
            plist = subset(plist, limit, "rank", 0)
            set_id = f"{set_id.rsplit('-', 1)[0]}-{prompt_set_hash(plist)}"
        ref = s.fid_reference if reference is None else reference
        if n_ref is not None:
            from cdmbench.metrics.reference import ReferenceSpec

            base = ReferenceSpec.parse(ref) if ref.lstrip().startswith("{") else None
            ref = (replace(base, n=n_ref) if base else ReferenceSpec(path=ref, n=n_ref)).encode()
        names_ = [m.strip() for m in metrics.split(",")] if metrics else list(s.eval_metrics)
        pairs = [EvalPair(set_id, plist, names_, num_samples or s.eval_samples, ref)]
    for pair in pairs:
        check_pair(pair, backbone)
    return pairs


__all__ = [
    "EvalPair",
    "Input",
    "Protocol",
    "check_pair",
    "eval_pairs",
    "find_input",
    "load",
    "names",
    "parse",
    "parse_data",
    "resolve",
    "shipped",
    "subset",
]
