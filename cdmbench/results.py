"""The results store: one tidy table of records, append-only JSON lines.

Every record is one number with its provenance (DESIGN.md section 7); :class:`Record` is the
schema and :func:`make_record` the one way to build one.

Appends take a file lock (so concurrent ``cdmbench eval`` processes lose nothing) and write
whole lines in one call; a line cut short by a crash is reported with its location and
skipped by readers, and the next append starts on a fresh line.

Selection, shared by the report and the regression check. A *cell* is (backbone, method,
variant, steps, metric) on one prompt set. ``select(latest=True)`` keeps, per cell, the records
of the newest configuration (``config_key``: a run's settings and budget without its seed; a
changed configuration or budget replaces the old one, so records of different budgets are never
mixed), and of those the newest record per (training seed, evaluation seed): the seeds of one
configuration are its samples. ``select(latest=False)`` keeps every run and seed
(re-evaluations of the same run, seed and step count collapse to the newest).
:func:`cell_stats` aggregates a cell: mean, sample standard deviation, n (the number of
(training seed, evaluation seed) samples) and the 95 % Student t-interval over them.
A cell with a non-finite sample (a diverged seed) has a non-finite mean and no interval: the
sample is counted, never dropped. ``latest_values`` is its short form on each cell's newest
prompt set. Records written before variants and seeds were recorded load as their method's
default variant on their backbone (:func:`default_variant`: "tuned" where the method has tuned
settings for it, else "paper"; the teacher's is ""), training seed = their seed ("" for the
teacher, as its newer records) and configuration = their run, so a newer configuration of the
cell replaces them. A record without a stored direction takes the one its metric declares
(:func:`cdmbench.metrics.base.value_spec`).
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
CELL_KEYS = ["backbone", "method", "variant", "steps", "metric"]
SAMPLE_KEYS = ["train_seed", "seed"]  # the samples of one cell
VALUE_KEYS = CELL_KEYS
CONFIDENCE = 0.95  # of the intervals over seeds


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
    variant: str  # run.json "variant" ("tuned", "paper", ...); "" for the teacher
    train_seed: int | None  # run.json "train_seed"; None for the teacher
    config_key: str  # run.json "config_key" (settings without the seed); the teacher's run id
    train_cost: dict[str, Any]  # run.json "cost" (FLOPs, images, passes, ...); {} if none


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


TEACHER = "teacher"


@lru_cache(maxsize=256)
def default_variant(method: str, backbone: str) -> str:
    """The variant a run of ``method`` on ``backbone`` gets by default: "tuned" where the
    method has tuned settings for the backbone (or where the method cannot be looked up),
    else "paper"; "" for the teacher."""
    if method == TEACHER:
        return ""
    try:
        from cdmbench.registry import METHODS

        cls = METHODS.get(method)
        return "tuned" if backbone in cls.backbone_defaults else "paper"
    except Exception:  # an unregistered or broken method: the default most runs have
        return "tuned"


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
    for col in ("run_id", "prompt_set", "time", "seed", "samples", "checkpoint", "variant"):
        df[col] = [_text(v) for v in df[col]] if col in df.columns else ""
    # records from before variants and seeds were recorded: the method's default variant, one
    # run = one configuration, and the evaluation seed stands for a student's training seed
    df["variant"] = [
        v or default_variant(r["method"], r["backbone"])
        for r, v in zip(rows, df["variant"], strict=True)
    ]
    df["train_seed"] = [
        _text(r["train_seed"]) if "train_seed" in r else "" if r["method"] == TEACHER else s
        for r, s in zip(rows, df["seed"], strict=True)
    ]
    df["config_key"] = [
        _text(r.get("config_key")) or run for r, run in zip(rows, df["run_id"], strict=True)
    ]
    df["train_cost"] = [
        r.get("train_cost") if isinstance(r.get("train_cost"), dict) else {} for r in rows
    ]
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
    cell = CELL_KEYS + ["prompt_set"]
    if not latest:
        return df.drop_duplicates(cell + ["run_id", "seed"], keep="last")
    newest_config = df.groupby(cell, sort=False)["config_key"].transform("last")
    df = df[df["config_key"] == newest_config]
    return df.drop_duplicates(cell + SAMPLE_KEYS, keep="last")


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def _samples(values: Sequence[Any]) -> list[float]:
    """The values as floats, a missing one (None) as NaN: every sample counts."""
    return [math.nan if x is None else float(x) for x in values]


def sample_std(values: Sequence[float]) -> float:
    """The sample standard deviation (n - 1); NaN below two values or with a non-finite one."""
    v = _samples(values)
    n = len(v)
    if n < 2 or not all(math.isfinite(x) for x in v):
        return math.nan
    mean = sum(v) / n
    return math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided Student t-interval, n) of the values.

    Every value is a sample: a non-finite one (a diverged seed; None counts as NaN) makes the
    mean non-finite (NaN, or ±inf as the values give it) and the half-width NaN, and is
    counted in n. The half-width is NaN below two values too (one sample says nothing about
    the spread)."""
    v = _samples(values)
    n = len(v)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(v) / n
    sd = sample_std(v)
    if not math.isfinite(sd):
        return mean, math.nan, n
    return mean, t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n), n


STAT_COLUMNS = CELL_KEYS + [
    "prompt_set",
    "mean",
    "std",
    "n",
    "ci",
    "lo",
    "hi",
    "higher_is_better",
    "config_key",
    "train_cost",
    "n_runs",
]


def cell_stats(
    df: pd.DataFrame,
    newest_prompt_set: bool = False,
    all_configs: bool = False,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """One row per cell (and prompt set): the statistics over its (training seed, evaluation
    seed) samples. Columns: STAT_COLUMNS — mean, sample std (NaN for n = 1), n, ci (half-width
    of the 95 % Student t-interval, n - 1 degrees of freedom; NaN for n = 1), lo/hi (mean -/+
    ci), train_cost (the cost of the cell's newest run, its COST_MEANS fields averaged over
    the cell's runs) and n_runs. A non-finite sample makes mean,
    std and ci non-finite (see :func:`t_interval`); n counts it.

    ``newest_prompt_set``: only each cell's newest prompt set (one row per cell).
    ``all_configs``: every configuration of a cell is its own row (as for budgets compared at
    matched compute); by default only the newest, as :func:`select` keeps.
    """
    df = _normalised(df)
    if df.empty:
        return pd.DataFrame(columns=STAT_COLUMNS)
    cell = CELL_KEYS + ["prompt_set"]
    if all_configs:
        df = df.sort_values(["_t", "time", "run_id"], na_position="first", kind="stable")
        sel = df.drop_duplicates(cell + ["config_key"] + SAMPLE_KEYS, keep="last")
        group = cell + ["config_key"]
    else:
        sel = select(df, latest=True)
        group = cell
    if newest_prompt_set:
        newest_ps = sel.groupby(CELL_KEYS, sort=False)["prompt_set"].transform("last")
        sel = sel[sel["prompt_set"] == newest_ps]
    rows = []
    for key, g in sel.groupby(group, sort=False):
        vals = [float(x) for x in g["value"]]
        mean, ci, n = t_interval(vals, confidence)  # a non-finite sample: a non-finite mean
        std = sample_std(vals)
        hib = [h for h in g["higher_is_better"] if isinstance(h, bool)]
        row = dict(zip(group, key, strict=True))
        rows.append(
            {
                **row,
                "mean": mean,
                "std": std,
                "n": n,
                "ci": ci,
                "lo": mean - ci,
                "hi": mean + ci,
                "higher_is_better": hib[-1] if hib else None,
                "config_key": g["config_key"].iloc[-1],
                "train_cost": run_cost(g),
                "n_runs": int(g["run_id"].nunique()),
            }
        )
    out = pd.DataFrame(rows, columns=STAT_COLUMNS)
    return order_rows(out, ["backbone", "method", "variant", "steps", "metric"])


# the variant note of runs trained at another model's training FLOPs (`bench --match-compute`)
COMPUTE_MATCHED = "compute-matched"
# averaged over a cell's runs
COST_MEANS = ("flops", "train_flops", "wall_s", "images", "teacher_nfe")


def run_cost(g: pd.DataFrame) -> dict[str, Any]:
    """The training cost of a cell's records: the newest run's, with the COST_MEANS fields
    averaged over its runs (seeds of one configuration cost about the same)."""
    costs = [c for c in g.drop_duplicates("run_id", keep="last")["train_cost"] if c]
    if not costs:
        return {}
    out = dict(costs[-1])
    for k in COST_MEANS:
        nums = [float(c[k]) for c in costs if isinstance(c.get(k), (int, float))]
        if nums:
            out[k] = sum(nums) / len(nums)
    return out


def latest_values(df: pd.DataFrame) -> pd.DataFrame:
    """One number per cell (backbone, method, variant, steps, metric) on its newest prompt set:
    the mean over the newest configuration's seeds. Columns: those keys, value, std, n_seeds
    (the number of samples), ci, higher_is_better, prompt_set."""
    cols = VALUE_KEYS + ["value", "std", "n_seeds", "ci", "higher_is_better", "prompt_set"]
    st = cell_stats(df, newest_prompt_set=True)
    if st.empty:
        return pd.DataFrame(columns=cols)
    out = st.rename(columns={"mean": "value", "n": "n_seeds"})
    return out[cols].reset_index(drop=True)


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
