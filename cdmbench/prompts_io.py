"""Prompt sets: the packaged ones, the user's own files, and standard benchmarks.

``load_prompt_set(name_or_path)`` returns ``(set_id, prompts)``. ``set_id`` is the set's
name and a content hash, e.g. ``general-1a2b3c4d5e6f``: sha256 over the (id, text) pairs of
the prompts returned (after ``limit``), first 12 hex digits. Same prompts, same id.

Names: ``digits`` (``prompts/digits.txt``, ids ``digit-<class>``, label = class),
``general`` (``prompts/general.jsonl``, 300 prompts in 12 categories of 25), its two
disjoint halves ``general-test`` (the prompts at odd positions of the file, gen-0001,
gen-0003, ...: the text-to-image backbones' evaluation prompts) and ``general-train`` (the
even positions, gen-0002, ...: their default training prompts), each category split about
half and half, and ``default`` (the backbone's ``prompts("test")`` when a backbone is
given, named after it; else ``general``).

Files (``fmt`` picks the format; otherwise it is detected from the suffix and content):

- ``txt``: one prompt per line; blank lines and ``#`` comments skipped.
- ``jsonl``: one object per line with ``text``, ``prompt`` or ``caption``, optional ``id``
  (a bare JSON string is a prompt too). A ``.json`` file holding a list of such items works.
- ``csv``: a ``.csv`` or ``.tsv`` file (tab-separated when the header has a tab) with a
  ``prompt``, ``text`` or ``caption`` column (any case), optional ``id`` column.

Ids not given in the file are ``<file stem>-<line number>``, 1-based as in an editor (for a
CSV, the line where the row starts, which is its row number in a spreadsheet).

Standard sets, read from a file the user downloads, keep their own ids:

- ``coco``: COCO captions JSON (``captions_val2014.json``): ``coco-<annotation id>``; by
  default one caption per image, the first annotation of each ``image_id`` in file order.
- ``drawbench``: CSV with columns ``Prompts, Category``: ``drawbench-<row>``.
- ``parti``: PartiPrompts TSV (``Prompt, Category, Challenge, Note``): ``parti-<row>``.
- ``geneval``: ``evaluation_metadata.jsonl`` (``prompt``, ``tag``, ...): ``geneval-<line>``.

``<row>`` and ``<line>`` there count the set's prompts from 0 (header and blank lines not
counted), as those benchmarks index them: ``geneval-0`` is the prompt of GenEval's
``00000`` folder.

Every problem with a file raises :class:`~cdmbench.errors.UserError` with one line naming
the file, the line where there is one, and what to do.

Training prompt files can be of any size: :func:`open_prompt_source` serves a txt, JSONL or
CSV/TSV file through :class:`PromptFile`, which keeps only each prompt's byte offset and
line number and reads a prompt when it is drawn.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from cdmbench.errors import UserError

PACKAGE = "cdmbench.prompts"
NAMES = ("digits", "general", "general-train", "general-test", "default")
FORMATS = ("coco", "drawbench", "parti", "geneval", "txt", "jsonl", "csv")
TEXT_KEYS = ("text", "prompt", "caption")  # jsonl fields, in order of preference
TEXT_COLUMNS = ("prompt", "text", "caption", "prompts")  # csv columns, matched in any case
_SUFFIXES = ".txt, .jsonl, .json, .csv or .tsv"


@dataclass
class Prompt:
    id: str
    text: str
    label: int | None = None  # the class on class-conditional backbones


class PromptSource(Protocol):
    """What ``default`` reads prompts from: a backbone (its test prompts, named after it).

    A class-conditional backbone also has ``prompt_label(prompt) -> int | None``, the class
    a prompt's text names (None: none); :func:`load_prompt_set` labels a file's prompts with
    it, so class-based metrics score a user's prompt file as they score the packaged set."""

    name: str

    def prompts(self, split: str = "train") -> list[Prompt]: ...


# An item read from a file: (where it is, e.g. "line 3", for error messages; the prompt).
_Item = tuple[str, Prompt]


def load_prompt_set(
    name_or_path: str | os.PathLike,
    backbone: PromptSource | None = None,
    limit: int | None = None,
    *,
    fmt: str | None = None,
    captions_per_image: int | None = 1,
) -> tuple[str, list[Prompt]]:
    """(set id, prompts) of a packaged set name or a prompt file; see the module docstring.

    ``limit`` keeps the first ``limit`` prompts; ``fmt`` forces a file format (one of
    :data:`FORMATS`); ``captions_per_image`` is for COCO (``None``: every caption).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(
            f"prompt limit must be a positive whole number, got {limit!r}; "
            "pass e.g. 100, or None for the whole set"
        )
    if fmt is not None and fmt not in FORMATS:
        raise UserError(
            f"unknown prompt format '{fmt}' for {os.fspath(name_or_path)}; "
            f"use one of {', '.join(FORMATS)}, or leave it out to detect it"
        )
    key = os.fspath(name_or_path)
    if key in NAMES:
        name, prompts = _packaged(key, backbone)
    else:
        name, prompts = _from_file(Path(key).expanduser(), fmt, captions_per_image)
    if backbone is not None:
        prompts = _labelled(prompts, backbone, key)
    if limit is not None:
        prompts = prompts[:limit]
    return f"{name}-{prompt_set_hash(prompts)}", prompts


def prompt_set_hash(prompts: Sequence[Prompt]) -> str:
    """First 12 hex digits of sha256 over the prompts' (id, text) pairs, in order."""
    pairs = [[p.id, p.text] for p in prompts]
    blob = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


# ------------------------------------------------------------------------ packaged sets
def _packaged(name: str, backbone: PromptSource | None) -> tuple[str, list[Prompt]]:
    """The prompts of ``digits``, ``general`` or ``default``."""
    if name == "default":
        if backbone is None:
            return _packaged("general", None)
        prompts = list(backbone.prompts("test"))
        if not prompts:
            raise UserError(
                f"backbone '{backbone.name}' has no test prompts; "
                "pass a prompt set name or file instead of 'default'"
            )
        return backbone.name, prompts
    if name in ("general-train", "general-test"):
        prompts = _packaged("general", None)[1]
        return name, prompts[name == "general-train" :: 2]  # test: 1st, 3rd, ...; train: 2nd, ...
    filename = "digits.txt" if name == "digits" else "general.jsonl"
    source = f"{PACKAGE}/{filename}"
    try:
        text = resources.files(PACKAGE).joinpath(filename).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise UserError(
            f"{source}: packaged prompt set missing ({type(e).__name__}); reinstall cdmbench"
        ) from None
    if name == "digits":
        items = [
            (where, Prompt(id=f"digit-{c}", text=p.text, label=c))
            for c, (where, p) in enumerate(_parse_txt(text, "digits"))
        ]
    else:
        items = _parse_jsonl(text, source, "general")
    return name, _finish(items, source)


# --------------------------------------------------------------------------------- files
def _from_file(path: Path, fmt: str | None, per_image: int | None) -> tuple[str, list[Prompt]]:
    """Read a prompt file in ``fmt`` (detected when None); the name is the file's stem."""
    if not path.exists():
        raise UserError(
            f"prompt set {path}: no such file; pass {', '.join(NAMES)}, "
            f"or the path of a {_SUFFIXES} prompt file"
        )
    if path.is_dir():
        raise UserError(f"prompt set {path} is a directory; pass a {_SUFFIXES} file in it")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except UnicodeDecodeError as e:
        raise _error(
            str(path), "", f"not UTF-8 text (byte {e.start})", "save the file as UTF-8"
        ) from None
    except OSError as e:
        raise _error(
            str(path), "", f"cannot read it ({e.strerror})", "check the file's permissions"
        ) from None
    source, stem = str(path), _slug(path.stem)
    if not text.strip():
        raise _error(source, "", "the file is empty", "add at least one prompt")
    fmt = fmt or _detect(path, text)
    if fmt == "txt":
        items = _parse_txt(text, stem)
    elif fmt in ("jsonl", "geneval"):
        one_per_line = path.suffix.lower() in (".jsonl", ".ndjson")
        if fmt == "jsonl" and not one_per_line and text.lstrip()[:1] == "[":
            items = _parse_json_list(text, source, stem)
        else:
            items = _parse_jsonl(text, source, stem, geneval=fmt == "geneval")
    elif fmt == "coco":
        items = _parse_coco(text, source, per_image)
    else:
        items = _parse_table(text, source, stem, fmt, tabs=path.suffix.lower() == ".tsv")
    return stem, _finish(items, source)


def _detect(path: Path, text: str) -> str:
    """The format of a file, from its suffix, then its content."""
    suffix, head = path.suffix.lower(), text.lstrip()[:1]
    if suffix == ".txt":
        return "txt"
    if suffix in (".csv", ".tsv"):
        return _table_kind(text, tabs=suffix == ".tsv")
    if suffix == ".json" or (suffix not in (".jsonl", ".ndjson") and head == "["):
        return "coco" if head == "{" else "jsonl"
    if suffix in (".jsonl", ".ndjson") or head == "{":
        if suffix not in (".jsonl", ".ndjson") and _is_coco(text):
            return "coco"
        return "geneval" if _is_geneval(text) else "jsonl"
    return _table_kind(text) if _header_has_text_column(text) else "txt"


def _is_coco(text: str) -> bool:
    """Whether the whole text is one JSON object with an 'annotations' list."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and isinstance(data.get("annotations"), list)


def _is_geneval(text: str) -> bool:
    """Whether the first record looks like GenEval metadata ({"prompt", "tag", ...})."""
    for line in text.split("\n"):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(obj, dict) and "prompt" in obj and "tag" in obj
    return False


def _header(text: str, tabs: bool = False) -> list[str]:
    first = text.split("\n", 1)[0].rstrip("\r")
    return [c.strip().strip('"').strip() for c in first.split(_delimiter(text, tabs))]


def _delimiter(text: str, tabs: bool = False) -> str:
    """A tab for a .tsv file or a tab in the header line, else a comma."""
    return "\t" if tabs or "\t" in text.split("\n", 1)[0] else ","


def _header_has_text_column(text: str) -> bool:
    return any(c.lower() in TEXT_COLUMNS for c in _header(text))


def _table_kind(text: str, tabs: bool = False) -> str:
    """``drawbench``, ``parti`` or ``csv``, from the header."""
    cols = set(_header(text, tabs))
    if {"Prompts", "Category"} <= cols:
        return "drawbench"
    if {"Prompt", "Category", "Challenge"} <= cols:
        return "parti"
    return "csv"


# ------------------------------------------------------------------------------- parsers
def _parse_txt(text: str, stem: str) -> list[_Item]:
    """One prompt per line; ids ``<stem>-<line number>``."""
    items = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            items.append((f"line {n}", Prompt(id=f"{stem}-{n}", text=line)))
    return items


def _parse_jsonl(text: str, source: str, stem: str, geneval: bool = False) -> list[_Item]:
    """One JSON object (or string) per line; GenEval ids count records from 0."""
    items = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _error(
                source,
                where,
                f"malformed JSON ({e.msg}, column {e.colno})",
                "write one JSON object per line",
            ) from None
        if geneval:
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise _error(
                    source,
                    where,
                    "GenEval record without a 'prompt' string",
                    "pass GenEval's evaluation_metadata.jsonl unchanged",
                )
            items.append(
                (
                    where,
                    Prompt(id=f"geneval-{len(items)}", text=_text(obj["prompt"], source, where)),
                )
            )
        else:
            items.append((where, _record(obj, source, where, f"{stem}-{n}")))
    return items


def _parse_json_list(text: str, source: str, stem: str) -> list[_Item]:
    """A JSON list of prompt strings or objects; ids ``<stem>-<item number>``, from 1."""
    data = _load_json(text, source)
    if not isinstance(data, list):
        raise _error(
            source,
            "",
            "expected a JSON list of prompts",
            "write a list of strings or of objects with a 'text' field",
        )
    return [
        (f"item {i}", _record(obj, source, f"item {i}", f"{stem}-{i}"))
        for i, obj in enumerate(data, 1)
    ]


def _record(obj: Any, source: str, where: str, default_id: str) -> Prompt:
    """A prompt from a JSON string or an object with text/prompt/caption and optional id."""
    if isinstance(obj, str):
        return Prompt(id=default_id, text=_text(obj, source, where))
    if not isinstance(obj, dict):
        raise _error(
            source,
            where,
            f"expected a JSON object, got {type(obj).__name__}",
            'write objects like {"id": "p1", "text": "a red bicycle"}',
        )
    key = next((k for k in TEXT_KEYS if k in obj), None)
    if key is None:
        raise _error(
            source, where, "no 'text', 'prompt' or 'caption' field", 'add the prompt as "text"'
        )
    pid = _id(obj["id"], source, where) if "id" in obj else default_id
    return Prompt(id=pid, text=_text(obj[key], source, where))


def _parse_coco(text: str, source: str, per_image: int | None) -> list[_Item]:
    """COCO captions: ``coco-<annotation id>``, ``per_image`` captions per image in file order."""
    if per_image is not None and (
        isinstance(per_image, bool) or not isinstance(per_image, int) or per_image < 1
    ):
        raise UserError(
            f"captions_per_image must be a positive whole number or None, "
            f"got {per_image!r}; pass e.g. 1 for {source}"
        )
    data = _load_json(text, source)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise _error(
            source,
            "",
            "no 'annotations' list",
            "pass a COCO captions file such as annotations/captions_val2014.json",
        )
    items: list[_Item] = []
    taken: dict[Any, int] = {}
    for i, ann in enumerate(anns):
        where = f"annotation {i}"
        if not isinstance(ann, dict) or not all(k in ann for k in ("image_id", "id", "caption")):
            raise _error(
                source,
                where,
                "needs 'image_id', 'id' and 'caption'",
                "pass the COCO captions file unchanged",
            )
        image = _id(ann["image_id"], source, where)
        if per_image is not None and taken.get(image, 0) >= per_image:
            continue
        taken[image] = taken.get(image, 0) + 1
        caption = " ".join(_text(ann["caption"], source, where).split())
        items.append((where, Prompt(id=f"coco-{_id(ann['id'], source, where)}", text=caption)))
    return items


def _parse_table(text: str, source: str, stem: str, kind: str, tabs: bool = False) -> list[_Item]:
    """CSV/TSV rows: DrawBench/PartiPrompts ids count rows from 0, others use the line."""
    delim = _delimiter(text, tabs)
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL  # TSV has no quoting
    reader = csv.reader(
        io.StringIO(text, newline=""), delimiter=delim, quoting=quoting, strict=True
    )
    rows: list[tuple[int, list[str]]] = []
    start = 1  # the line where the row being read starts
    try:
        header = [c.strip() for c in next(reader, [])]
        start = reader.line_num + 1
        for row in reader:
            if any(c.strip() for c in row):
                rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as e:
        raise _error(
            source, f"line {start}", f"malformed CSV ({e})", "check the quotes in that row"
        ) from None
    if not any(header):
        raise _error(
            source, "", "no header row", "add a first line naming the columns, e.g. prompt,id"
        )
    lower = [c.lower() for c in header]
    wanted = {"drawbench": ("prompts",), "parti": ("prompt",)}.get(kind, TEXT_COLUMNS)
    col = next((lower.index(w) for w in wanted if w in lower), None)
    if col is None:
        names = " or ".join(f"'{w}'" for w in wanted)
        raise _error(
            source,
            "line 1",
            f"no {names} column among {header}",
            "name the prompt column 'prompt' in the header",
        )
    id_col = lower.index("id") if kind == "csv" and "id" in lower else None
    items = []
    for i, (line, row) in enumerate(rows):
        where = f"line {line}"
        cell = row[col] if col < len(row) else ""
        pid = f"{kind}-{i}" if kind != "csv" else f"{stem}-{line}"
        if id_col is not None and id_col < len(row) and row[id_col].strip():
            pid = row[id_col].strip()
        items.append((where, Prompt(id=pid, text=_text(cell, source, where))))
    return items


# ------------------------------------------------------------------------------- helpers
def _labelled(prompts: list[Prompt], backbone: PromptSource, source: str) -> list[Prompt]:
    """``prompts`` with the class each names on a class-conditional ``backbone`` (one with
    ``prompt_label``); a prompt that names none is a :class:`UserError` before any work."""
    label_of = getattr(backbone, "prompt_label", None)
    if label_of is None:
        return prompts
    out = []
    for p in prompts:
        label = p.label if p.label is not None else label_of(p)
        if label is None:
            example = backbone.prompts("train")[-1].text
            text = p.text if len(p.text) <= 40 else p.text[:37] + "..."
            raise UserError(
                f"prompt set {source}: prompt {p.id} ('{text}') names no class of backbone "
                f"'{backbone.name}'; write prompts like '{example}'"
            )
        out.append(p if label == p.label else Prompt(p.id, p.text, label))
    return out


def _finish(items: list[_Item], source: str) -> list[Prompt]:
    """The prompts, once the set is known to be non-empty with unique ids."""
    if not items:
        raise _error(source, "", "contains no prompts", "add at least one prompt")
    seen: dict[str, str] = {}
    for where, p in items:
        if p.id in seen:
            raise _error(
                source,
                where,
                f"duplicate id '{p.id}' (first at {seen[p.id]})",
                "give every prompt its own id",
            )
        seen[p.id] = where
    return [p for _, p in items]


def _load_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise _error(
            source,
            f"line {e.lineno}",
            f"malformed JSON ({e.msg}, column {e.colno})",
            "fix the file or download it again",
        ) from None


def _text(value: Any, source: str, where: str) -> str:
    """A prompt's text: a non-empty string, stripped."""
    if not isinstance(value, str):
        raise _error(
            source,
            where,
            f"prompt text is {type(value).__name__}, not a string",
            "write the prompt as a string",
        )
    if not value.strip():
        raise _error(source, where, "empty prompt text", "write a prompt or remove the entry")
    return value.strip()


def _id(value: Any, source: str, where: str) -> str:
    """A prompt id from a string or an integer."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise _error(
            source,
            where,
            f"id {value!r} is not a non-empty string or integer",
            'write ids like "p1" or 1',
        )
    return str(value).strip()


def _slug(stem: str) -> str:
    """A file stem safe inside ids and set names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "prompts"


def _error(source: str, where: str, what: str, todo: str) -> UserError:
    """A one-line UserError: '<file>, <where>: <what>; <what to do>'."""
    msg = f"{source}{', ' + where if where else ''}: {what}; {todo}"
    return UserError(" ".join(msg.split()))


# ----------------------------------------------------------------------------- streaming
STREAM_FORMATS = ("txt", "jsonl", "geneval", "csv", "drawbench", "parti")  # a record per line
_BOM = b"\xef\xbb\xbf"
_HEAD = 1 << 16  # bytes read to detect a file's format


def open_prompt_source(name_or_path: str | os.PathLike) -> Sequence[Prompt]:
    """The prompts of a packaged set name or a file, for drawing training prompts: a
    :class:`PromptFile` (read on demand) for a txt, JSONL or CSV/TSV file, else the whole
    set as :func:`load_prompt_set` reads it (packaged sets, COCO, JSON lists)."""
    key = os.fspath(name_or_path)
    if key not in NAMES:
        path = Path(key).expanduser()
        if path.is_file() and _streamable(path) is not None:
            return PromptFile(path)
    return load_prompt_set(key)[1]


def _streamable(path: Path) -> str | None:
    """The format of ``path`` when :class:`PromptFile` can serve it, else None."""
    with open(path, "rb") as f:
        head = f.read(_HEAD).removeprefix(_BOM).decode("utf-8", errors="replace")
    fmt = _detect(path, head)
    suffix, first = path.suffix.lower(), head.lstrip()[:1]
    if fmt not in STREAM_FORMATS:
        return None
    if fmt == "jsonl" and suffix not in (".jsonl", ".ndjson"):
        if first == "[":
            return None  # a JSON list
        try:  # a suffix-less file opening with "{": a JSON object per line, or one document
            json.loads(head.split("\n", 1)[0])
        except json.JSONDecodeError:
            return None
    return fmt


class PromptFile(Sequence[Prompt]):
    """The prompts of a txt, JSONL or CSV/TSV file of any size, read when drawn.

    Opening reads the file once, line by line: it checks every record (the errors are
    :func:`load_prompt_set`'s) and keeps, per prompt, only the byte offset and line number of
    its record (16 bytes: 3.2 MB for 200k prompts) and the file's sha256. ``prompts[i]``
    reads and parses record ``i`` alone. Ids and texts are those :func:`load_prompt_set`
    gives; duplicate ids are not looked for (that would hold every id). A file changed
    after opening is an error at the next read.
    """

    def __init__(self, path: str | os.PathLike, fmt: str | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise UserError(
                f"prompt set {self.path}: no such file; pass the path of a {_SUFFIXES} file"
            )
        self.source, self.name = str(self.path), _slug(self.path.stem)
        self.fmt = fmt or _streamable(self.path)
        if self.fmt not in STREAM_FORMATS:
            raise UserError(
                f"{self.source}: a {self.fmt or 'JSON list or COCO'} file is read whole; "
                "write the training prompts as .txt, .jsonl or .csv to stream them"
            )
        self.delimiter, self.header, self.columns = ",", [], (0, None)
        self.offsets, self.lines = array("q"), array("q")  # per prompt
        self.sha256 = self._scan()
        if not self.offsets:
            raise _error(self.source, "", "contains no prompts", "add at least one prompt")
        st = self.path.stat()
        self._stamp = (st.st_size, st.st_mtime_ns)

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"prompt {i} of {n}")
        i %= n
        st = self.path.stat()
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise UserError(
                f"{self.source} changed while in use; keep training prompt files unchanged "
                "during a run"
            )
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return self._prompt(i, self._read_record(f))

    def __iter__(self) -> Iterator[Prompt]:
        with open(self.path, "rb") as f:
            for i, off in enumerate(self.offsets):
                f.seek(off)
                yield self._prompt(i, self._read_record(f))

    # -- reading
    def _quoted(self) -> bool:
        return self.fmt in ("csv", "drawbench", "parti") and self.delimiter == ","

    def _read_record(self, f) -> str:
        """The record at the file position: one line, or for quoted CSV the lines up to
        the one that closes its quotes."""
        text = f.readline().decode("utf-8")
        while self._quoted() and text.count('"') % 2:
            more = f.readline()
            if not more:
                break
            text += more.decode("utf-8")
        return text

    def _row(self, text: str, where: str) -> list[str]:
        quoting = csv.QUOTE_MINIMAL if self._quoted() else csv.QUOTE_NONE
        try:
            reader = csv.reader(
                io.StringIO(text, newline=""),
                delimiter=self.delimiter,
                quoting=quoting,
                strict=True,
            )
            return next(reader, [])
        except csv.Error as e:
            raise _error(
                self.source, where, f"malformed CSV ({e})", "check the quotes in that row"
            ) from None

    def _prompt(self, i: int, text: str) -> Prompt:
        """Prompt ``i`` from its record's text (ids as :func:`load_prompt_set` makes them)."""
        line = self.lines[i]
        where = f"line {line}"
        if self.fmt == "txt":
            return Prompt(id=f"{self.name}-{line}", text=text.strip())
        if self.fmt in ("jsonl", "geneval"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise _error(
                    self.source,
                    where,
                    f"malformed JSON ({e.msg}, column {e.colno})",
                    "write one JSON object per line",
                ) from None
            if self.fmt == "jsonl":
                return _record(obj, self.source, where, f"{self.name}-{line}")
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise _error(
                    self.source,
                    where,
                    "GenEval record without a 'prompt' string",
                    "pass GenEval's evaluation_metadata.jsonl unchanged",
                )
            return Prompt(id=f"geneval-{i}", text=_text(obj["prompt"], self.source, where))
        row = self._row(text, where)
        col, id_col = self.columns
        pid = f"{self.fmt}-{i}" if self.fmt != "csv" else f"{self.name}-{line}"
        if id_col is not None and id_col < len(row) and row[id_col].strip():
            pid = row[id_col].strip()
        return Prompt(id=pid, text=_text(row[col] if col < len(row) else "", self.source, where))

    # -- the one pass over the file
    def _scan(self) -> str:
        """Record every prompt's offset and line number, checking it; the file's sha256."""
        digest = hashlib.sha256()
        table = self.fmt in ("csv", "drawbench", "parti")
        pending: tuple[int, int, str] | None = None  # a quoted CSV record spanning lines
        pos = 0
        try:
            with open(self.path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    digest.update(raw)
                    start, pos = pos, pos + len(raw)
                    if n == 1 and raw.startswith(_BOM):
                        start, raw = start + len(_BOM), raw[len(_BOM) :]
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise _error(
                            self.source,
                            f"line {n}",
                            f"not UTF-8 text (byte {start + e.start})",
                            "save the file as UTF-8",
                        ) from None
                    if not table:
                        self._scan_line(start, n, line)
                        continue
                    if pending is not None:
                        start, n0, line = pending[0], pending[1], pending[2] + line
                    else:
                        n0 = n
                    if self._quoted() and line.count('"') % 2:
                        pending = (start, n0, line)
                        continue
                    pending = None
                    self._scan_row(start, n0, line)
        except OSError as e:
            raise _error(
                self.source, "", f"cannot read it ({e.strerror})", "check the file's permissions"
            ) from None
        if pending is not None:
            self._scan_row(pending[0], pending[1], pending[2])
        if table and not self.header:
            raise _error(self.source, "", "the file is empty", "add at least one prompt")
        return digest.hexdigest()

    def _scan_line(self, start: int, n: int, line: str) -> None:
        s = line.strip()
        if not s or (self.fmt == "txt" and s.startswith("#")):
            return
        self.offsets.append(start)
        self.lines.append(n)
        self._prompt(len(self.offsets) - 1, line)  # checks the record

    def _scan_row(self, start: int, n: int, text: str) -> None:
        if not self.header:  # the first record names the columns
            if self.path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0]:
                self.delimiter = "\t"
            self.header = [c.strip() for c in self._row(text, "line 1")] or [""]
            if not any(self.header):
                raise _error(
                    self.source,
                    "",
                    "no header row",
                    "add a first line naming the columns, e.g. prompt,id",
                )
            lower = [c.lower() for c in self.header]
            wanted = {"drawbench": ("prompts",), "parti": ("prompt",)}.get(self.fmt, TEXT_COLUMNS)
            col = next((lower.index(w) for w in wanted if w in lower), None)
            if col is None:
                names = " or ".join(f"'{w}'" for w in wanted)
                raise _error(
                    self.source,
                    "line 1",
                    f"no {names} column among {self.header}",
                    "name the prompt column 'prompt' in the header",
                )
            id_col = lower.index("id") if self.fmt == "csv" and "id" in lower else None
            self.columns = (col, id_col)
            return
        if not any(c.strip() for c in self._row(text, f"line {n}")):
            return
        self.offsets.append(start)
        self.lines.append(n)
        self._prompt(len(self.offsets) - 1, text)


def prompt_overlap(train: Sequence[Prompt], test: Sequence[Prompt]) -> int:
    """How many of the ``test`` prompts' texts (compared case- and space-insensitively) are
    also among the ``train`` prompts; ``train`` is read once, in order."""
    wanted = {" ".join(p.text.casefold().split()) for p in test}
    found = set()
    for p in train:
        key = " ".join(p.text.casefold().split())
        if key in wanted:
            found.add(key)
            if len(found) == len(wanted):
                break
    return len(found)
