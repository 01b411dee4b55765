"""The results store: one tidy table of records, append-only JSON lines.

Every record is one number with its provenance (DESIGN.md section 7); :class:`Record` is the
schema and :func:`make_record` the one way to build one.

Appends take a file lock (so concurrent ``cdmbench eval`` processes lose nothing) and write
whole lines in one call; a line cut short by a crash is reported with its location and
skipped by readers, and the next append starts on a fresh line.

Selection, shared by the report and the regression check. ``select(latest=True)`` keeps the
newest record (by time, then run id) per (backbone, method, steps, metric, prompt set, seed),
and of those only the run that produced the newest one (another run id is another model);
``latest_values`` averages its seeds into one number per (backbone, method, steps, metric) on
the newest prompt set. ``select(latest=False)`` keeps every run and seed (re-evaluations of the
same run, seed and step count collapse to the newest). A record without a stored direction
takes the one its metric declares (:func:`cdmbench.metrics.base.value_spec`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, TypedDict

import pandas as pd

from cdmbench.errors import UserError

RECORDS = "records.jsonl"
LATEST_KEYS = ["backbone", "method", "steps", "metric", "prompt_set", "seed"]
VALUE_KEYS = ["backbone", "method", "steps", "metric"]


class Record(TypedDict):
    """One number with its provenance: a line of records.jsonl."""

    run_id: str  # the training run directory's name, or teacher-<weights hash>
    backbone: str
    method: str  # the method's name, or "teacher"
    checkpoint: str  # content hash of the weights
    steps: int
    schedule: list[float]  # the sigmas sampled at, after the backbone's shift
    stochastic: bool  # the update rule: fresh noise at each step
    guidance: float
    prompt_set: str
    n_samples: int
    metric: str  # the value's name, e.g. "recall"
    value: float
    higher_is_better: bool
    metric_name: str  # the metric that produced the value, e.g. "precision_recall"
    metric_config: dict[str, Any]  # the metric's run_config(), plus the compile mode of timings
    metric_config_hash: str  # hash of metric name, config, device (and compile mode of timings)
    seed: int
    device: str  # e.g. "cpu (x86_64, 2 threads)"
    dtype: str
    versions: dict[str, str]  # of the packages a number depends on
    git_rev: str
    time: str  # ISO 8601, local time with offset
    eval_key: str  # content key of the sample set
    samples: str  # the sample folder


RECORD_FIELDS: tuple[str, ...] = tuple(Record.__annotations__)
PROVENANCE = ("versions", "git_rev", "time")  # what make_record adds


def make_record(**fields: Any) -> Record:
    """A record from every field of :class:`Record` but versions, git revision and time, which
    it adds; a missing or unknown field is a TypeError."""
    wanted = set(RECORD_FIELDS) - set(PROVENANCE)
    if set(fields) != wanted:
        raise TypeError(
            f"make_record: missing {sorted(wanted - set(fields))}, "
            f"unknown {sorted(set(fields) - wanted)}"
        )
    full = {**fields, "versions": versions(), "git_rev": git_revision(), "time": now()}
    return Record(**{k: full[k] for k in RECORD_FIELDS})  # type: ignore[typeddict-item]


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of the packages a number depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in (
        "cdmbench",
        "torch",
        "diffusers",
        "transformers",
        "open_clip_torch",
        "clean-fid",
        "torchmetrics",
    ):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The cdmbench source tree's git revision ('+dirty' if modified), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class ReadReport:
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "file:line: what" for skipped lines


class ResultStore:
    """Append-only JSON-lines store under a results directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / RECORDS

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.path) + ".lock", timeout=120)

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append records atomically with respect to other writers; returns how many."""
        lines = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)
        if not lines:
            return 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock():
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    if os.fstat(fd).st_size and not _ends_with_newline(self.path):
                        lines = "\n" + lines  # a previous writer died mid-line: start fresh
                    os.write(fd, lines.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            raise self._not_writable(e) from None
        return lines.count("\n") - lines.startswith("\n")

    def check_writable(self) -> None:
        """Fail before any work if records could not be appended here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a"):
                pass
        except OSError as e:
            raise self._not_writable(e) from None

    def _not_writable(self, e: OSError) -> Exception:
        from cdmbench.errors import UserError

        return UserError(
            f"results directory {self.root} is not writable ({e.strerror}); pass --results DIR"
        )

    def read(self) -> ReadReport:
        """All well-formed records; problems name each skipped line."""
        rep = ReadReport()
        if not self.path.is_file():
            return rep
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rep.problems.append(f"{self.path}:{n}: unreadable record skipped ({e.msg})")
                    continue
                if not isinstance(rec, dict) or "metric" not in rec or "value" not in rec:
                    rep.problems.append(f"{self.path}:{n}: record without metric/value skipped")
                    continue
                rep.records.append(rec)
        return rep

    def dataframe(self) -> tuple[pd.DataFrame, list[str]]:
        rep = self.read()
        columns = None if rep.records else list(RECORD_FIELDS)
        return pd.DataFrame(rep.records, columns=columns), rep.problems

    def done_keys(self) -> set[tuple[str, str, str]]:
        """(eval_key, metric, metric config hash) of every stored record: what needs no recompute."""
        return {
            (
                r.get("eval_key", ""),
                r.get("metric_name", r["metric"]),
                r.get("metric_config_hash", ""),
            )
            for r in self.read().records
        }


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ------------------------------------------------------------------------------ selection
def declared_direction(metric: str) -> bool | None:
    """The direction the metric producing value ``metric`` declares; None if none does."""
    from cdmbench.metrics.base import value_spec

    spec = value_spec(metric)
    return None if spec is None else spec.higher_is_better


def is_missing(v: Any) -> bool:
    """None, "", or NaN: a record field without a value."""
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def load_records(results_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """All usable records as a DataFrame sorted oldest first, and warnings for skipped ones.

    Never raises on bad content: unreadable lines and records without backbone, method, steps or
    a numeric value are skipped with a warning. Directions are made consistent per metric.
    """
    store = ResultStore(results_dir)
    rep = store.read()
    df, warnings = records_frame(rep.records, str(store.path))
    return df, list(rep.problems) + warnings


def _as_bool(v: Any) -> bool | None:
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    return None


def _text(v: Any) -> str:
    if is_missing(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def records_frame(
    records: Sequence[dict[str, Any]], source: str = "records"
) -> tuple[pd.DataFrame, list[str]]:
    """Records (dicts) as the normalised DataFrame the report and check work on, and warnings."""
    warnings: list[str] = []
    rows = []
    for i, r in enumerate(records, 1):
        try:
            row = dict(r)
            for k in ("backbone", "method", "metric", "steps"):
                if is_missing(r.get(k)):
                    raise KeyError(k)
            row["backbone"], row["method"] = str(r["backbone"]), str(r["method"])
            row["metric"], row["steps"] = str(r["metric"]), int(r["steps"])
            row["value"] = math.nan if is_missing(r.get("value")) else float(r["value"])
        except (KeyError, TypeError, ValueError) as e:
            what = f"no {e}" if isinstance(e, KeyError) else str(e)
            warnings.append(f"{source}: record {i} ({r.get('metric')}) skipped: {what}")
            continue
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("run_id", "prompt_set", "time", "seed", "samples", "checkpoint"):
        df[col] = [_text(v) for v in df[col]] if col in df.columns else ""
    df["higher_is_better"] = (
        [_as_bool(v) for v in df["higher_is_better"]] if "higher_is_better" in df.columns else None
    )
    if df.empty:
        for col in VALUE_KEYS + ["value"]:
            if col not in df.columns:
                df[col] = pd.Series(dtype=object)
        df["_t"] = pd.Series(dtype="datetime64[ns, UTC]")
        return df, warnings
    df["_t"] = pd.to_datetime(df["time"], utc=True, errors="coerce", format="ISO8601")
    df = df.sort_values(["_t", "time", "run_id"], na_position="first", kind="stable")
    df = df.reset_index(drop=True)
    hib = df["higher_is_better"].astype(object)
    for metric, idx in df.groupby("metric", sort=False).groups.items():
        given = [v for v in hib[idx] if isinstance(v, bool)]
        if len(set(given)) > 1:
            warnings.append(
                f"metric {metric}: records disagree on its direction; "
                f"using the newest (higher_is_better={given[-1]})"
            )
        hib[idx] = given[-1] if given else declared_direction(str(metric))
    df["higher_is_better"] = hib
    return df, warnings


def _normalised(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as records_frame makes it (a raw ResultStore.dataframe() is accepted too)."""
    if "_t" in df.columns:
        return df
    return records_frame(df.to_dict("records"))[0]


def select(df: pd.DataFrame, latest: bool = True) -> pd.DataFrame:
    """The records a report shows (see the module docstring), oldest first."""
    df = _normalised(df)
    if df.empty:
        return df
    df = df.sort_values(["_t", "time", "run_id"], na_position="first", kind="stable")
    if not latest:
        return df.drop_duplicates(LATEST_KEYS[:-1] + ["run_id", "seed"], keep="last")
    df = df.drop_duplicates(LATEST_KEYS, keep="last")
    newest_run = df.groupby(LATEST_KEYS[:-1], sort=False)["run_id"].transform("last")
    return df[df["run_id"] == newest_run]


def latest_values(df: pd.DataFrame) -> pd.DataFrame:
    """One number per (backbone, method, steps, metric): the latest selection, newest prompt set,
    mean over seeds. Columns: those keys, value, std, n_seeds, higher_is_better, prompt_set."""
    cols = VALUE_KEYS + ["value", "std", "n_seeds", "higher_is_better", "prompt_set"]
    sel = select(df, latest=True)
    if sel.empty:
        return pd.DataFrame(columns=cols)
    newest_ps = sel.groupby(VALUE_KEYS, sort=False)["prompt_set"].transform("last")
    sel = sel[sel["prompt_set"] == newest_ps]
    rows = []
    for key, g in sel.groupby(VALUE_KEYS, sort=False):
        v = g["value"]
        hib = [h for h in g["higher_is_better"] if isinstance(h, bool)]
        rows.append(
            {
                **dict(zip(VALUE_KEYS, key, strict=True)),
                "value": float(v.mean()),
                "std": float(v.std()) if len(v) > 1 else math.nan,
                "n_seeds": int(g["seed"].nunique()),
                "higher_is_better": hib[-1] if hib else None,
                "prompt_set": g["prompt_set"].iloc[-1],
            }
        )
    out = pd.DataFrame(rows, columns=cols)
    return order_rows(out, ["backbone", "method", "steps", "metric"])


def method_key(m: Any) -> tuple[int, str]:
    """Sort key of a method: the teacher first, then methods alphabetically."""
    return (0 if m == "teacher" else 1, str(m))


def order_rows(
    df: pd.DataFrame, by: list[str], extra: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Sort with the teacher first, methods alphabetically, numbers numerically."""
    if df.empty:
        return df.reset_index(drop=True)
    keys = {}
    for col in by:
        if col == "method":
            keys[col] = df[col].map(method_key)
        elif extra and col in extra:
            keys[col] = extra[col]
        else:
            keys[col] = df[col]
    order = sorted(range(len(df)), key=lambda i: tuple(_sortable(keys[c].iloc[i]) for c in by))
    return df.iloc[order].reset_index(drop=True)


def _sortable(v: Any) -> tuple:
    if isinstance(v, tuple):
        return tuple(_sortable(x) for x in v)
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return (0, float(v), "")
    try:
        return (0, float(v), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(v))


def name_list(v: str | Sequence[str] | None) -> list[str] | None:
    """ "a, b" or ["a", "b"] -> ["a", "b"]; None where nothing is named."""
    if v is None:
        return None
    if isinstance(v, str):
        v = v.split(",")
    out = [s.strip() for s in v if s and s.strip()]
    return out or None


def filter_records(
    df: pd.DataFrame,
    backbone: str | None = None,
    methods: str | Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Records of the given backbone, methods and metrics; UserError naming what exists if a
    filter value matches nothing."""

    def need(col: str, wanted: list[str] | None, d: pd.DataFrame, what: str) -> pd.DataFrame:
        if wanted is None:
            return d
        have = sorted(d[col].unique(), key=method_key)
        unknown = [w for w in wanted if w not in have]
        if unknown:
            where = f" for backbone {backbone}" if backbone and col != "backbone" else ""
            raise UserError(
                f"no results for {what} {', '.join(unknown)}{where} "
                f"(have: {', '.join(map(str, have)) or 'nothing'})"
            )
        return d[d[col].isin(wanted)]

    df = need("backbone", [backbone] if backbone else None, df, "backbone")
    df = need("method", name_list(methods), df, "method")
    df = need("metric", name_list(metrics), df, "metric")
    if df.empty:
        raise UserError("no results match the chosen backbone, methods and metrics together")
    return df
