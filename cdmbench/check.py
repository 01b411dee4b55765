"""Regression check: compare the latest results with a baseline file (DESIGN.md section 7).

Baseline file: CSV with columns backbone, method, steps, metric, value, higher_is_better, and
optional ``variant``, ``n``, ``std`` and per-row ``tolerance``. ``write_baseline`` writes it from
the latest results: the numbers the report shows (per cell (backbone, method, variant, steps,
metric) the newest configuration on the newest prompt set, mean over its seeds, with their
number and standard deviation), with an empty tolerance column to fill in where the default does
not fit. Cells are keyed by variant too, so a paper and a tuned run are never compared with each
other; a changed configuration or budget replaces the old one in the results (see
:func:`cdmbench.results.select`). A baseline row without a variant (files written before
variants) matches its method's default variant on its backbone
(:func:`cdmbench.results.default_variant`: "tuned" where the method has tuned settings for it,
else "paper"), or else the cell without a variant, or else the method's only variant. A cell is
compared with one baseline row: where two claim it (a row with its variant before one without),
the second is "missing" with a note naming the first, and a warning.

Tolerance: how much worse than the baseline a value may get, in the metric's direction, either
absolute ("0.5") or relative to the baseline's magnitude ("10%"). The first that applies wins:
the caller's ``tolerances`` (metric -> tolerance), the row's tolerance column, the default its
metric declares (``Metric.values``; :func:`tolerance_help` lists them), and FALLBACK_TOLERANCE
for a value no registered metric declares. Values that measure the machine as much as the
model (latency) declare no default: they are skipped unless the caller or the row gives one.

Seed spread: where the baseline or the current cell has several seeds, the gate is on the mean
and the allowed change is max(tolerance, k × combined standard error), the standard error being
sqrt(std_baseline² / n_baseline + std_now² / n_now) over the sides with n ≥ 2. ``spread_k``
(default SPREAD_K = 2, about a 95 % two-sided normal bound on the difference of two means)
sets k; 0 turns the spread scaling off.

Verdicts: "ok" (within tolerance), "better" (improved by more than the tolerance), "REGRESSION"
(worse by more than the tolerance, or the current value is not finite), "missing" (a baseline
row with no current value), "skipped" (machine-dependent without a tolerance) and "new" (a
current value the baseline lacks; informational). ``exit_code`` is 1 on any REGRESSION or
missing, else 0; bad input raises UserError (the CLI exits 2).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from cdmbench.errors import UserError
from cdmbench.io import atomic_write_text
from cdmbench.metrics.base import FALLBACK_TOLERANCE, declared_values, value_spec
from cdmbench.report import DOWN, UP, model_label
from cdmbench.results import (
    declared_direction,
    default_variant,
    latest_values,
    load_records,
    method_key,
)

BASELINE_COLUMNS = [
    "backbone",
    "method",
    "variant",
    "steps",
    "metric",
    "value",
    "n",
    "std",
    "higher_is_better",
    "tolerance",
]
OPTIONAL_COLUMNS = ("variant", "n", "std", "higher_is_better", "tolerance")
SPREAD_K = 2.0  # allowed change >= k x the standard error of the difference of the means
FAILING = ("REGRESSION", "missing")


@dataclass(frozen=True)
class Tolerance:
    """How much worse a value may get: ``amount`` absolute, or a fraction of |baseline|."""

    amount: float
    relative: bool

    def allowed(self, baseline: float) -> float:
        return self.amount * abs(baseline) if self.relative else self.amount

    def __str__(self) -> str:
        return f"{self.amount * 100:g}%" if self.relative else f"{self.amount:g}"


def parse_tolerance(text: str | float | int) -> Tolerance:
    """ "10%" -> relative 0.10; "0.5" (or 0.5) -> absolute 0.5; UserError otherwise."""
    raw = str(text).strip()
    relative = raw.endswith("%")
    try:
        amount = float(raw[:-1].strip() if relative else raw)
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount) or amount < 0:
        raise UserError(
            f"bad tolerance '{text}': use an absolute amount like 0.5 or a relative one like 10%"
        )
    return Tolerance(amount / 100 if relative else amount, relative)


def default_tolerance(metric: str) -> str | None:
    """The tolerance value ``metric``'s metric declares (FALLBACK_TOLERANCE for a value no
    registered metric declares); None where it measures the machine (not checked)."""
    spec = value_spec(metric)
    return FALLBACK_TOLERANCE if spec is None else spec.tolerance


def tolerance_help() -> str:
    """The default tolerances in words, from the registered metrics' declarations."""
    by_tol: dict[str, list[str]] = {}
    unchecked = []
    for name, spec in declared_values().items():
        if spec.tolerance is None:
            unchecked.append(name)
        else:
            by_tol.setdefault(spec.tolerance, []).append(name)
    parts = [f"{', '.join(names)} {tol}" for tol, names in by_tol.items()]
    text = "; ".join(parts) + f"; any other value {FALLBACK_TOLERANCE}."
    if unchecked:
        text += f" Not checked unless a tolerance is given: {', '.join(unchecked)}."
    return text


@dataclass
class CheckRow:
    """One compared number."""

    backbone: str
    method: str
    steps: int
    metric: str
    higher_is_better: bool
    baseline: float | None
    now: float | None
    change: float | None  # now - baseline
    tolerance: str  # as applied, e.g. "15%", "0.02", "0.8 (2 SE)"; "" when skipped
    verdict: str
    note: str = ""
    variant: str = ""
    n_baseline: int = 1  # seeds behind the baseline value
    n_now: int = 1  # seeds behind the current value

    @property
    def change_pct(self) -> float | None:
        if self.change is None or not self.baseline:
            return None
        return 100.0 * self.change / abs(self.baseline)


@dataclass
class CheckResult:
    """Rows compared against the baseline, warnings, and the verdict as an exit code."""

    rows: list[CheckRow]
    baseline_path: Path
    warnings: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if r.verdict in FAILING]

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def counts(self) -> Counter[str]:
        return Counter(r.verdict for r in self.rows)

    def summary(self) -> str:
        """One line: passed/failed and how many rows had each verdict."""
        order = ["REGRESSION", "missing", "ok", "better", "skipped", "new"]
        c = self.counts()
        parts = ", ".join(f"{c[v]} {v}" for v in order if c[v])
        head = "check FAILED" if self.exit_code else "check passed"
        return f"{head}: {parts or 'nothing compared'} (baseline {self.baseline_path})"

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{**asdict(r), "change_pct": r.change_pct} for r in self.rows])

    def render_rich(self, only_changes: bool = False):
        """A rich diff table; ``only_changes`` hides the ok/skipped rows."""
        return render_rich(self, only_changes)


_STYLE = {
    "REGRESSION": "bold red",
    "missing": "red",
    "better": "green",
    "ok": "",
    "skipped": "dim",
    "new": "cyan",
}


def _num(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "–"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    d = 4 if a < 1 else 3 if a < 10 else 2 if a < 1000 else 0
    return f"{v:+.{d}f}" if signed else f"{v:.{d}f}"


def render_rich(result: CheckResult, only_changes: bool = False):
    """The diff table: baseline, now, change (and %), tolerance, verdict, coloured."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"check against {escape(str(result.baseline_path))}", caption=escape(result.summary())
    )
    for name, right in (
        ("backbone", False),
        ("method", False),
        ("steps", True),
        ("metric", False),
        ("baseline", True),
        ("now", True),
        ("change", True),
        ("tolerance", True),
        ("verdict", False),
        ("note", False),
    ):
        table.add_column(name, justify="right" if right else "left")
    for r in result.rows:
        if only_changes and r.verdict in ("ok", "skipped"):
            continue
        pct = r.change_pct
        change = _num(r.change, signed=True) + (f" ({pct:+.1f}%)" if pct is not None else "")
        style = _STYLE.get(r.verdict, "")
        verdict = f"[{style}]{r.verdict}[/{style}]" if style else r.verdict
        arrow = UP if r.higher_is_better else DOWN
        table.add_row(
            r.backbone,
            escape(model_label(r.method, r.variant)),
            str(r.steps),
            escape(f"{r.metric} {arrow}"),
            _num(r.baseline) + (f" (n={r.n_baseline})" if r.n_baseline > 1 else ""),
            _num(r.now) + (f" (n={r.n_now})" if r.n_now > 1 else ""),
            change,
            r.tolerance,
            verdict,
            escape(r.note),
        )
    return table


# ------------------------------------------------------------------------------ baseline
def _parse_bool(v: str) -> bool | None:
    s = v.strip().lower()
    if s in ("true", "1", "yes", "y", "t"):
        return True
    if s in ("false", "0", "no", "n", "f"):
        return False
    return None


def read_baseline(path: str | Path) -> pd.DataFrame:
    """The baseline rows, validated: UserError with a one-line message on any bad input."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"baseline file {p} not found; write one from the current results first")
    try:
        raw = pd.read_csv(p, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read baseline {p}: {first}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    need = [c for c in BASELINE_COLUMNS if c not in OPTIONAL_COLUMNS]
    lacking = [c for c in need if c not in raw.columns]
    if lacking:
        raise UserError(
            f"baseline {p} lacks column(s) {', '.join(lacking)} "
            f"(needs {', '.join(need)}; {', '.join(OPTIONAL_COLUMNS)} optional)"
        )
    if raw.empty:
        raise UserError(f"baseline {p} has no rows")
    rows, seen = [], {}
    for i, r in raw.iterrows():
        line = int(i) + 2  # header is line 1
        where = f"{p}:{line}"
        try:
            steps = int(str(r["steps"]).strip())
        except ValueError:
            raise UserError(f"{where}: bad steps '{r['steps']}'") from None
        try:
            value = float(str(r["value"]).strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"{where}: bad value '{r['value']}' (need a finite number)")
        hib_text = str(r.get("higher_is_better", "")).strip()
        hib = _parse_bool(hib_text) if hib_text else None
        if hib_text and hib is None:
            raise UserError(f"{where}: bad higher_is_better '{hib_text}' (use true or false)")
        n_text, std_text = str(r.get("n", "")).strip(), str(r.get("std", "")).strip()
        try:
            n = int(float(n_text)) if n_text else 1
        except ValueError:
            n = 0
        if n < 1:
            raise UserError(f"{where}: bad n '{n_text}' (need a positive integer)")
        try:
            std = float(std_text) if std_text else math.nan
        except ValueError:
            std = -1.0
        if not (math.isnan(std) or (math.isfinite(std) and std >= 0)):
            raise UserError(f"{where}: bad std '{std_text}' (need a number >= 0, or empty)")
        tol = str(r.get("tolerance", "")).strip()
        if tol:
            try:
                parse_tolerance(tol)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        row = {
            "backbone": str(r["backbone"]).strip(),
            "method": str(r["method"]).strip(),
            "variant": str(r.get("variant", "")).strip(),
            "steps": steps,
            "metric": str(r["metric"]).strip(),
            "value": value,
            "n": n,
            "std": std,
            "higher_is_better": hib,
            "tolerance": tol,
            "line": line,
        }
        if not row["backbone"] or not row["method"] or not row["metric"]:
            raise UserError(f"{where}: empty backbone, method or metric")
        key = (row["backbone"], row["method"], row["variant"], steps, row["metric"])
        if key in seen:
            raise UserError(f"{where}: duplicate of line {seen[key]} ({'/'.join(map(str, key))})")
        seen[key] = line
        rows.append(row)
    return pd.DataFrame(rows)


def write_baseline(
    results_dir: str | Path, path: str | Path, backbone: str | None = None
) -> pd.DataFrame:
    """Write the latest results (of ``backbone``; all if None) as a baseline CSV; return its rows.

    Non-finite values are left out. The tolerance column is written empty (defaults apply).
    """
    df, _ = load_records(results_dir)
    if df.empty:
        raise UserError(f"no readable results in {results_dir}; run cdmbench eval first")
    if backbone is not None:
        have = sorted(df["backbone"].unique())
        df = df[df["backbone"] == backbone]
        if df.empty:
            raise UserError(
                f"no results for backbone {backbone} in {results_dir} (have: {', '.join(have)})"
            )
    vals = latest_values(df)
    vals = vals[vals["value"].map(math.isfinite)]
    if vals.empty:
        raise UserError(f"no finite results to write a baseline from in {results_dir}")
    vals = vals.rename(columns={"n_seeds": "n"})
    out = vals[BASELINE_COLUMNS[:-1]].copy()
    out["higher_is_better"] = out.apply(
        lambda r: (
            r["higher_is_better"]
            if isinstance(r["higher_is_better"], bool)
            else bool(declared_direction(r["metric"]))
        ),
        axis=1,
    )
    out["tolerance"] = ""
    out = out.reset_index(drop=True)
    atomic_write_text(path, out.to_csv(index=False))
    return out


# --------------------------------------------------------------------------------- check
def check(
    results_dir: str | Path,
    baseline_csv: str | Path,
    tolerances: Mapping[str, str | float] | None = None,
    backbone: str | None = None,
    spread_k: float = SPREAD_K,
) -> CheckResult:
    """Compare the latest results under ``results_dir`` with the baseline file; ``spread_k``
    scales the seed spread into the allowed change (see the module docstring)."""
    if not (math.isfinite(spread_k) and spread_k >= 0):
        raise UserError(f"bad spread k {spread_k}: need a number >= 0 (0: no spread scaling)")
    base = read_baseline(baseline_csv)
    if backbone is not None:
        have = sorted(base["backbone"].unique())
        base = base[base["backbone"] == backbone]
        if base.empty:
            raise UserError(
                f"baseline {baseline_csv} has no rows for backbone {backbone} "
                f"(it has: {', '.join(have)})"
            )
    overrides = {str(m).strip(): str(parse_tolerance(t)) for m, t in (tolerances or {}).items()}
    df, warnings = load_records(results_dir)
    if df.empty:
        warnings.append(f"no readable results in {results_dir}")
    for m in overrides:
        if m not in set(base["metric"]):
            warnings.append(f"tolerance for {m} unused: the baseline has no {m} rows")
    df = df[df["backbone"].isin(set(base["backbone"]))] if not df.empty else df
    now = latest_values(df)
    current = {
        (r.backbone, r.method, r.variant, int(r.steps), r.metric): r for r in now.itertuples()
    }
    # each cell is claimed by one baseline row: rows naming their variant first
    claims: dict[tuple, int] = {}  # cell -> the baseline line compared with it
    claimed: dict[int, tuple] = {}  # baseline line -> its cell
    for b in sorted(base.itertuples(), key=lambda b: (not b.variant, b.line)):
        claimed[b.line] = key = _match(current, b)
        claims.setdefault(key, b.line)
    rows = []
    for b in base.itertuples():
        key = claimed[b.line]
        first = claims[key]
        cur = current.get(key) if first == b.line else None
        hib = b.higher_is_better
        if hib is None:
            cur_hib = getattr(cur, "higher_is_better", None) if cur is not None else None
            hib = cur_hib if isinstance(cur_hib, bool) else declared_direction(b.metric)
            if hib is None:
                raise UserError(
                    f"{baseline_csv}:{b.line}: higher_is_better missing and {b.metric} "
                    "has no known direction"
                )
        elif (
            cur is not None
            and isinstance(cur.higher_is_better, bool)
            and cur.higher_is_better != hib
        ):
            warnings.append(
                f"{b.metric}: the baseline says higher_is_better={hib}, the results "
                f"say {cur.higher_is_better}; using the baseline's"
            )
        tol = overrides.get(b.metric) or b.tolerance or default_tolerance(b.metric)
        now_v = None if cur is None else float(cur.value)
        row = _compare(b.backbone, b.method, int(b.steps), b.metric, bool(hib), b.value, now_v, tol)
        row.variant = b.variant or ("" if cur is None else cur.variant)
        if first != b.line:  # a second claimant of a cell: said, never silently missing
            what = "/".join(map(str, (key[0], model_label(key[1], key[2]), key[3], key[4])))
            note = f"its cell {what} is compared with line {first}; give this row a variant"
            warnings.append(f"{baseline_csv}:{b.line}: {note}")
            if row.verdict == "missing":
                row.note = note
        row.n_baseline = int(b.n)
        row.n_now = 0 if cur is None else int(cur.n_seeds)
        if cur is not None:
            _widen(row, spread_k, b.std, int(b.n), float(cur.std), int(cur.n_seeds))
        rows.append(row)
    for (bb, method, variant, steps, metric), cur in current.items():
        if (bb, method, variant, steps, metric) in claims:
            continue
        rows.append(
            CheckRow(
                bb,
                method,
                steps,
                metric,
                variant=variant,
                n_now=int(cur.n_seeds),
                higher_is_better=bool(cur.higher_is_better),
                baseline=None,
                now=float(cur.value),
                change=None,
                tolerance="",
                verdict="new",
                note="not in the baseline",
            )
        )
    rows.sort(key=lambda r: (r.backbone, method_key(r.method), r.variant, r.steps, r.metric))
    return CheckResult(rows, Path(baseline_csv), warnings)


def _match(current: Mapping[tuple, object], b) -> tuple:
    """The current cell a baseline row compares with: the same variant; a row without one
    (written before variants) takes its method's default variant on its backbone, or else the
    cell without a variant, or else the method's only variant (the default one when none
    exists, so the row is missing)."""
    key = (b.backbone, b.method, b.variant, int(b.steps), b.metric)
    if b.variant:
        return key
    default = (b.backbone, b.method, default_variant(b.method, b.backbone), key[3], key[4])
    if default in current:
        return default
    if key in current:
        return key
    have = sorted(
        k[2] for k in current if (k[0], k[1], k[3], k[4]) == (b.backbone, b.method, key[3], key[4])
    )
    if len(have) == 1:
        return (b.backbone, b.method, have[0], key[3], key[4])
    return default


def spread_allowance(k: float, std_a: float, n_a: int, std_b: float, n_b: int) -> float:
    """k x the standard error of the difference of two means, over the sides with a spread
    (n >= 2 and a finite std); 0 where neither has one."""
    var = sum(s * s / n for s, n in ((std_a, n_a), (std_b, n_b)) if n >= 2 and math.isfinite(s))
    return k * math.sqrt(var)


def _widen(row: CheckRow, k: float, std_b: float, n_b: int, std_n: float, n_n: int) -> None:
    """Re-judge a compared row with the allowed change widened to k standard errors of the
    difference of the means, where that exceeds the tolerance."""
    if row.verdict not in ("ok", "better", "REGRESSION") or row.now is None or not row.tolerance:
        return
    if not math.isfinite(row.now):
        return
    spread = spread_allowance(k, std_b, n_b, std_n, n_n)
    base = float(row.baseline or 0.0)
    tol = parse_tolerance(row.tolerance).allowed(base)
    if spread <= tol:
        return
    row.tolerance = f"{_num(spread)} ({k:g} SE)"
    worse_by = (base - row.now) if row.higher_is_better else (row.now - base)
    allowed = spread + 1e-12 * max(1.0, abs(base))
    row.verdict, row.note = "ok", ""
    if worse_by > allowed:
        row.verdict = "REGRESSION"
        row.note = f"worse by {_num(worse_by)} > allowed {_num(spread)} ({k:g} SE of the seeds)"
    elif -worse_by > allowed:
        row.verdict = "better"


def _compare(
    backbone: str,
    method: str,
    steps: int,
    metric: str,
    hib: bool,
    base: float,
    now: float | None,
    tol_text: str | None,
) -> CheckRow:
    row = CheckRow(
        backbone,
        method,
        steps,
        metric,
        hib,
        base,
        now,
        None if now is None else now - base,
        "",
        "ok",
    )
    if tol_text is None:
        row.verdict, row.note = "skipped", "machine-dependent; give a tolerance to check it"
        return row
    tol = parse_tolerance(tol_text)
    row.tolerance = str(tol)
    if now is None:
        row.verdict, row.note = "missing", "no current result"
        return row
    if not math.isfinite(now):
        row.verdict, row.note = "REGRESSION", "current value is not finite"
        return row
    worse_by = (base - now) if hib else (now - base)
    allowed = tol.allowed(base) + 1e-12 * max(1.0, abs(base))  # float noise never fails
    if worse_by > allowed:
        row.verdict = "REGRESSION"
        row.note = f"worse by {_num(worse_by)} > allowed {_num(tol.allowed(base))}"
    elif -worse_by > allowed:
        row.verdict = "better"
    return row
