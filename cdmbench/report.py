"""Report: pivot the results store into tables, plots and sample grids (DESIGN.md section 7).

    records.jsonl --load_records--> tidy records --pivot--> (backbone, method, steps) x metric
        report.md    tables + provenance (versions, git revisions, devices, samples, configs)
        report.csv   the pivot, plain numbers (metric names without arrows)
        report.tex   booktabs tables
        report.html  one self-contained page: tables, metric-versus-steps plots, sample grids

Selection is :func:`cdmbench.results.select`. With ``latest=True`` a row is a cell (method,
variant, steps): the seeds of its newest configuration as mean ± the half-width of the 95 %
Student t-interval over seeds, with n; with ``latest=False`` every run and seed is its own row,
plus a "mean ± ci" row for each run evaluated with several seeds. Rows name their model as
"method (variant)". Directions (arrows) and which metrics measure the machine (timings, shown
last) come from the metrics' value declarations.

Best values are marked per step count: within each (backbone, prompt set, steps) group, the best
mean of each metric is bold only where its 95 % interval is separated from every other model's
(:func:`separated_best`). Overlapping intervals are a tie and get no mark; a single-seed best
has no interval and is never marked. Plots draw the intervals as error bars.

Compute views (:func:`compute_section`), from the training cost the records carry: each run's
cost, quality versus training FLOPs, a compute-matched table (every student at the cheapest
one's full budget, where runs at matched budgets exist) and the speed-quality frontier (quality
against NFE per sample and measured latency). Where ``RESULTS/sweeps.jsonl`` holds tuning
sweeps (``cdmbench sweep``), each backbone's section ends with their summary
(:func:`sweep_section`). Unreadable record lines become warnings in the report; a cell with a
non-finite sample (a diverged seed) shows "nan" (or "inf").
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cdmbench.errors import UserError
from cdmbench.io import atomic_path, remove_stale_temps
from cdmbench.metrics.base import value_spec
from cdmbench.results import (
    COMPUTE_MATCHED,
    ResultStore,
    cell_stats,
    filter_records,
    is_missing,
    load_records,
    method_key,
    name_list,
    order_rows,
    sample_std,
    select,
    t_interval,
)

UP, DOWN = "↑", "↓"
SUMMARY_SEED = "mean ± ci"
MIN_PX, MAX_PX = 48, 128  # sample thumbnails: tiny images upscaled (nearest), large ones shrunk
MAX_SAMPLE_PIXELS = 64 * 1024 * 1024  # a sample larger than this is skipped, not decoded
MATCH_TOLERANCE = 0.25  # compute-matched: a run within 25 % of the target FLOPs matches it
AUX = ("std", "ci", "n")  # per-metric columns beside the mean: "<metric> std", ...

CAPTION = (
    "↑ higher is better, ↓ lower is better. Each cell: mean ± half-width of the 95 % "
    "t-interval over seeds (Student t, n − 1 degrees of freedom; n: training seed × "
    "evaluation seed samples, column n, or (n=k) in a cell that differs); a value alone is a "
    "single seed. Bold: the best mean at that step count, its 95 % interval separated from "
    "every other model's (per backbone and prompt set); no mark: overlapping intervals (a tie), "
    "a single-seed best, or a single model."
)


@dataclass
class ReportOutputs:
    """Paths of the written report files, the pivot table and the warnings."""

    markdown: Path
    csv: Path
    latex: Path
    html: Path
    table: pd.DataFrame
    warnings: list[str] = field(default_factory=list)
    n_records: int = 0

    @property
    def files(self) -> list[Path]:
        return [self.markdown, self.csv, self.latex, self.html]


# ------------------------------------------------------------------------------- pivot
def _metric_order(df: pd.DataFrame) -> list[str]:
    """Metrics in order of appearance, those that measure the machine (timings) last."""
    seen = list(dict.fromkeys(df["metric"]))
    timing = {m for m in seen if (spec := value_spec(m)) is not None and spec.machine_dependent}
    return [m for m in seen if m not in timing] + [m for m in seen if m in timing]


def header(metric: str, higher_is_better: bool | None) -> str:
    """Column header of a metric: its name and direction arrow."""
    if higher_is_better is None:
        return metric
    return f"{metric} {UP if higher_is_better else DOWN}"


def _aux(metric: str, what: str) -> str:
    return f"{metric} {what}"


def _std_col(metric: str) -> str:
    return _aux(metric, "std")


def model_label(method: Any, variant: Any = "") -> str:
    """How a row names its model: "cdm (tuned)", "cdm (paper)", "teacher"; a variant label
    with its changes in parentheses reads "dmd2 (tuned, gan=False)"."""
    if is_missing(variant):
        return str(method)
    v = str(variant)
    if v.endswith(")") and " (" in v:
        base, _, changes = v.partition(" (")
        v = f"{base}, {changes[:-1]}"
    return f"{method} ({v})"


def pivot(records_df: pd.DataFrame, latest: bool = True) -> pd.DataFrame:
    """Rows (backbone, [prompt_set,] method, variant, steps[, run_id, seed]), one column per
    metric (the mean), each followed by "<metric> std", "<metric> ci" (half-width of the 95 %
    t-interval over seeds) and "<metric> n" (samples); "n" counts a row's samples.

    Metric columns are headed "name ↑" / "name ↓". ``prompt_set`` is a row key only where a
    backbone has several. With ``latest`` a row aggregates the seeds of its cell
    (:func:`cdmbench.results.cell_stats`); otherwise every run and seed is a row, plus a
    SUMMARY_SEED row for each run evaluated with several seeds. The teacher comes first, then
    methods alphabetically, steps ascending. ``attrs`` holds row_keys, metrics (name -> header)
    and higher_is_better (name -> bool/None).
    """
    sel = select(records_df, latest)
    if sel.empty:
        return pd.DataFrame(columns=["backbone", "method", "variant", "steps"])
    multi_ps = bool(sel.groupby("backbone")["prompt_set"].nunique().max() > 1)
    row_keys = ["backbone"] + (["prompt_set"] if multi_ps else []) + ["method", "variant", "steps"]
    metrics = _metric_order(sel)
    hib = {m: sel.loc[sel["metric"] == m, "higher_is_better"].iloc[-1] for m in metrics}
    hib = {m: (v if isinstance(v, bool) else None) for m, v in hib.items()}
    heads = {m: header(m, hib[m]) for m in metrics}
    rows: list[dict[str, Any]] = []
    newest_ps: dict[tuple, str] = {}  # cell -> its newest prompt set (what the plots show)
    if latest:
        st = cell_stats(records_df)
        for r in cell_stats(records_df, newest_prompt_set=True).itertuples():
            newest_ps[(r.backbone, r.method, r.variant, int(r.steps), r.metric)] = r.prompt_set
        for key, g in st.groupby(row_keys, sort=False):
            row = dict(zip(row_keys, key, strict=True))
            for r in g.itertuples():
                row[heads[str(r.metric)]] = r.mean
                for a in AUX:
                    row[_aux(str(r.metric), a)] = getattr(r, a)
            row["n"] = int(g["n"].max())
            rows.append(row)
    else:
        row_keys += ["run_id", "seed"]
        for key, g in sel.groupby(row_keys, sort=False):
            rows.append(_pivot_row(dict(zip(row_keys, key, strict=True)), g, heads))
        for key, g in sel.groupby(row_keys[:-1], sort=False):
            if g["seed"].nunique() > 1:  # a summary row for each run evaluated with several seeds
                row = {**dict(zip(row_keys[:-1], key, strict=True)), "seed": SUMMARY_SEED}
                rows.append(_pivot_row(row, g, heads))
    out = pd.DataFrame(rows)
    cols = list(row_keys) + ["n"]
    for m in metrics:
        if heads[m] in out.columns:
            cols += [heads[m]] + [_aux(m, a) for a in AUX]
    out = out.reindex(columns=cols)
    extra = {}
    if not latest:
        first = sel.groupby("run_id")["_t"].min()
        extra["run_id"] = out["run_id"].map(lambda r: (str(first.get(r)), r))
        extra["seed"] = out["seed"].map(lambda s: (1, s) if s == SUMMARY_SEED else (0, s))
    out = order_rows(out, row_keys, extra)
    out.attrs = {
        "row_keys": row_keys,
        "latest": latest,
        "metrics": heads,
        "higher_is_better": hib,
        "newest_prompt_set": newest_ps,
    }
    return out


def _pivot_row(row: dict[str, Any], g: pd.DataFrame, heads: dict[str, str]) -> dict[str, Any]:
    n_row = 0
    for m, gm in g.groupby("metric", sort=False):
        vals = [float(v) for v in gm["value"]]
        mean, ci, n = t_interval(vals)  # a non-finite sample: a non-finite mean
        row[heads[str(m)]] = mean
        row[_aux(str(m), "std")] = sample_std(vals)
        row[_aux(str(m), "ci")] = ci
        row[_aux(str(m), "n")] = n
        n_row = max(n_row, n)
    row["n"] = n_row
    return row


def metric_columns(df: pd.DataFrame) -> dict[str, tuple[str, bool | None]]:
    """Header -> (metric name, higher_is_better) for the metric columns of a pivot."""
    out = {}
    for col in df.columns:
        col = str(col)
        if col.endswith(f" {UP}") or col.endswith(f" {DOWN}"):
            out[col] = (col[:-2], col.endswith(UP))
        elif col in df.attrs.get("metrics", {}):
            out[col] = (col, None)
    return out


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def _count(v: Any) -> int:
    x = _num(v)
    return int(x) if math.isfinite(x) else 0


def separated_best(
    means: Sequence[float], cis: Sequence[float], ns: Sequence[int], higher_is_better: bool
) -> int | None:
    """Index of the best mean if its 95 % interval is separated from every other's, else None.

    The best needs n >= 2 (one seed has no interval); another value with n < 2 counts as a
    point. Overlapping or touching intervals are a tie: None.
    """
    idx = [i for i, m in enumerate(means) if math.isfinite(m)]
    if len(idx) < 2:
        return None
    sign = 1.0 if higher_is_better else -1.0
    best = max(idx, key=lambda i: sign * means[i])
    if ns[best] < 2 or not math.isfinite(cis[best]):
        return None
    lo, hi = means[best] - cis[best], means[best] + cis[best]
    for i in idx:
        if i == best:
            continue
        half = cis[i] if ns[i] >= 2 and math.isfinite(cis[i]) else 0.0
        olo, ohi = means[i] - half, means[i] + half
        if lo <= ohi and olo <= hi:
            return None  # overlapping: a tie
    return best


def best_cells(df: pd.DataFrame) -> set[tuple[int, str]]:
    """(row position, header) of the best value per metric at each step count (see CAPTION)."""
    group = [c for c in ("backbone", "prompt_set", "steps") if c in df.columns]
    cand = df["seed"].eq(SUMMARY_SEED) if "seed" in df.columns else pd.Series(True, df.index)
    out: set[tuple[int, str]] = set()
    for col, (name, hib) in metric_columns(df).items():
        if hib is None:
            continue
        means = df[col].map(_num)
        ok = cand & means.map(math.isfinite)
        for _, idx in df[ok].groupby(group, sort=False).groups.items():
            idx = list(idx)
            cis = [_num(df.at[i, _aux(name, "ci")]) for i in idx]
            ns = [_count(df.at[i, _aux(name, "n")]) for i in idx]
            b = separated_best([means[i] for i in idx], cis, ns, hib)
            if b is not None:
                out.add((int(df.index.get_loc(idx[b])), col))
    return out


# -------------------------------------------------------------------------- formatting
def _decimals(values: Sequence[float]) -> int:
    finite = [abs(v) for v in values if isinstance(v, float) and math.isfinite(v)]
    m = max(finite, default=0.0)
    if m == 0.0:
        return 3
    if m < 0.1:
        return min(8, 2 - math.floor(math.log10(m)))
    return 3 if m < 10 else 2 if m < 100 else 1 if m < 1000 else 0


def _fmt(v: Any, d: int) -> str:
    if is_missing(v):
        return "–"
    return f"{float(v):.{d}f}"


@dataclass
class _Cell:
    text: str
    best: bool = False
    numeric: bool = False


def _display(df: pd.DataFrame, drop: Sequence[str] = ()) -> tuple[list[str], list[list[_Cell]]]:
    """Headers and formatted cells of a pivot: method and variant as one model label, each
    metric as "mean ± ci" with "(n=k)" where its n differs from the row's."""
    metrics = metric_columns(df)
    aux = {_aux(name, a) for name, _ in metrics.values() for a in AUX}
    skip = set(metrics) | aux | set(drop) | {"variant"}
    keys = [c for c in df.columns if c not in skip]
    decimals = {
        h: _decimals([float(x) for x in pd.to_numeric(df[h], errors="coerce")]) for h in metrics
    }
    best = best_cells(df)
    headers = keys + list(metrics)
    rows = []
    for pos in range(len(df)):
        r = df.iloc[pos]
        cells = []
        for k in keys:
            v = r[k]
            if k == "method" and "variant" in df.columns:
                v = model_label(v, r["variant"])
            if k == "n" and _count(v) == 0:
                v = ""
            cells.append(_Cell("" if is_missing(v) else str(v), numeric=k in ("steps", "n")))
        for h, (name, _) in metrics.items():
            ci, n = r.get(_aux(name, "ci")), _count(r.get(_aux(name, "n")))
            text = "nan" if n and is_missing(r[h]) else _fmt(r[h], decimals[h])
            if not is_missing(r[h]) and not is_missing(ci):
                text += f" ± {_fmt(ci, decimals[h])}"
            if not is_missing(r[h]) and "n" in df.columns and n and n != _count(r["n"]):
                text += f" (n={n})"
            cells.append(_Cell(text, (pos, h) in best, True))
        rows.append(cells)
    return headers, rows


def _caption(df: pd.DataFrame) -> str:
    return CAPTION


def render_markdown(df: pd.DataFrame, drop: Sequence[str] = ()) -> str:
    """A markdown table of a pivot, best values in bold, caption below."""
    headers, rows = _display(df, drop)

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [
        "| " + " | ".join(esc(h) for h in headers) + " |",
        "|" + "|".join("---:" if c.numeric else "---" for c in rows[0]) + "|"
        if rows
        else "|" + "---|" * len(headers),
    ]
    for cells in rows:
        lines.append(
            "| " + " | ".join(f"**{esc(c.text)}**" if c.best else esc(c.text) for c in cells) + " |"
        )
    return "\n".join(lines) + f"\n\n*{_caption(df)}*\n"


def render_html_table(df: pd.DataFrame, drop: Sequence[str] = ()) -> str:
    """An HTML table of a pivot, best values in bold."""
    headers, rows = _display(df, drop)
    out = [
        f"<table class='results'><caption>{html.escape(_caption(df))}</caption>",
        "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr></thead>",
        "<tbody>",
    ]
    for cells in rows:
        tds = []
        for c in cells:
            text = html.escape(c.text)
            cls = " class='num'" if c.numeric else ""
            tds.append(f"<td{cls}><b>{text}</b></td>" if c.best else f"<td{cls}>{text}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


_TEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def _tex(s: str) -> str:
    s = "".join(_TEX.get(ch, ch) for ch in s)
    return (
        s.replace(UP, r"$\uparrow$")
        .replace(DOWN, r"$\downarrow$")
        .replace("±", r"$\pm$")
        .replace("–", "--")
    )


def render_latex(df: pd.DataFrame, caption: str, label: str, drop: Sequence[str] = ()) -> str:
    """A booktabs table of a pivot (needs \\usepackage{booktabs}), best values in bold."""
    headers, rows = _display(df, drop)
    align = "".join("r" if c.numeric else "l" for c in rows[0]) if rows else "l" * len(headers)
    out = [
        r"\begin{table}[t]",
        r"\centering",
        f"\\caption{{{_tex(caption)}}}",
        f"\\label{{{label}}}",
        f"\\begin{{tabular}}{{{align}}}",
        r"\toprule",
        " & ".join(_tex(h) for h in headers) + r" \\",
        r"\midrule",
    ]
    mcol = headers.index("method") if "method" in headers else None
    prev = None
    for cells in rows:
        method = cells[mcol].text if mcol is not None else None
        if prev is not None and method != prev:
            out.append(r"\midrule" if prev == "teacher" else r"\addlinespace")
        prev = method
        out.append(
            " & ".join(f"\\textbf{{{_tex(c.text)}}}" if c.best else _tex(c.text) for c in cells)
            + r" \\"
        )
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def render_rich(df: pd.DataFrame, title: str | None = None):
    """A rich Table of a pivot for the terminal: best values bold and starred (*)."""
    from rich.table import Table

    drop = ["backbone"] if "backbone" in df.columns and df["backbone"].nunique() == 1 else []
    if title is None and drop:
        title = f"{df['backbone'].iloc[0]}"
    headers, rows = _display(df, drop)
    table = Table(title=title, caption=_caption(df).replace("Bold:", "Bold and *:"))
    for h, c in zip(headers, rows[0] if rows else [_Cell("")] * len(headers), strict=True):
        table.add_column(h, justify="right" if c.numeric else "left")
    for cells in rows:
        table.add_row(
            *[f"[bold]{_rich_esc(c.text)}*[/bold]" if c.best else _rich_esc(c.text) for c in cells]
        )
    return table


def _rich_esc(s: str) -> str:
    from rich.markup import escape

    return escape(s)


# -------------------------------------------------------------------------- provenance
def _counted(values: Sequence[Any], unit: str = "record") -> list[str]:
    counts = Counter(v for v in values if not is_missing(v))
    return [f"{v} ({n} {unit}{'s' if n > 1 else ''})" for v, n in counts.most_common()]


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else str(v)


def provenance(sel: pd.DataFrame) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Sections (title, lines) describing where the selected numbers come from, and warnings."""
    warnings: list[str] = []
    col = lambda c: list(sel[c]) if c in sel.columns else []  # noqa: E731
    times = sorted(t for t in col("time") if t)
    runs = sel.drop_duplicates(["backbone", "method", "run_id"])
    secs = [
        (
            "Records",
            [
                f"{len(sel)} records from {sel['run_id'].nunique()} runs"
                + (f", {times[0]} to {times[-1]}" if times else "")
            ],
        )
    ]
    secs.append(
        (
            "Package versions",
            _counted(
                [
                    ", ".join(f"{k} {v}" for k, v in sorted(d.items()))
                    if isinstance(d, dict)
                    else d
                    for d in col("versions")
                ]
            ),
        )
    )
    secs.append(("Git revisions", _counted(col("git_rev"))))
    dev = [
        f"{d}, {t}" if not is_missing(t) else d
        for d, t in zip(col("device"), col("dtype") or [None] * len(sel), strict=False)
    ]
    secs.append(("Devices", _counted(dev)))
    secs.append(("Prompt sets", _counted(col("prompt_set"))))
    if "n_samples" in sel.columns:
        per = sel.drop_duplicates(["backbone", "method", "steps", "n_samples"])
        secs.append(
            (
                "Samples per evaluation",
                _counted(
                    [
                        str(int(n)) if isinstance(n, (int, float)) and math.isfinite(n) else n
                        for n in per["n_samples"]
                    ],
                    "evaluation",
                ),
            )
        )
    secs.append(
        (
            "Runs",
            [
                f"{r.backbone} / {r.method}: {r.run_id}"
                + (f" (checkpoint {r.checkpoint})" if r.checkpoint else "")
                for r in order_rows(runs, ["backbone", "method"]).itertuples()
            ],
        )
    )
    lines = []
    if "metric_config" in sel.columns:
        name = sel["metric_name"] if "metric_name" in sel.columns else sel["metric"]
        name = [m if not is_missing(m) else v for m, v in zip(name, sel["metric"], strict=True)]
        for m in dict.fromkeys(name):
            cfgs = list(
                dict.fromkeys(
                    _json(c)
                    for c, n in zip(sel["metric_config"], name, strict=True)
                    if n == m and not is_missing(c)
                )
            )
            lines += [f"{m}: {c}" for c in cfgs]
            if len(cfgs) > 1:
                warnings.append(
                    f"metric {m} was computed with {len(cfgs)} different configs in "
                    "this report; its numbers may not be comparable"
                )
    secs.append(("Metric configs", lines))
    return [(t, ls) for t, ls in secs if ls], warnings


# -------------------------------------------------------------------- plots and grids
def _png_b64(img_or_fig: Any) -> str:
    buf = io.BytesIO()
    if hasattr(img_or_fig, "savefig"):
        img_or_fig.savefig(buf, format="png")
    else:
        img_or_fig.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _series(df: pd.DataFrame, col: str) -> dict[str, pd.DataFrame]:
    """Model label -> rows (steps, mean, ci) of a pivot's metric column: the cells of a latest
    pivot, or the t-intervals over the rows of an --all pivot."""
    name = metric_columns(df)[col][0]
    data = df[~df["seed"].eq(SUMMARY_SEED)] if "seed" in df.columns else df
    if _aux(name, "n") in data.columns:  # rows holding this metric (a diverged seed too)
        data = data[data[_aux(name, "n")].map(_count) > 0]
    newest_ps = df.attrs.get("newest_prompt_set") or {}
    if "seed" not in df.columns and "prompt_set" in data.columns and newest_ps:
        keep = [
            newest_ps.get((r.backbone, r.method, r.variant, int(r.steps), name)) == r.prompt_set
            for r in data.itertuples()
        ]
        data = data[keep]  # each cell on its newest prompt set, as the tables' cell_stats
    labels = [
        model_label(m, v)
        for m, v in zip(
            data["method"], data["variant"] if "variant" in data else [""] * len(data), strict=True
        )
    ]
    data = data.assign(_label=labels)
    out = {}
    order = sorted(
        dict.fromkeys(zip(data["method"], data["_label"], strict=True)),
        key=lambda k: (method_key(k[0]), k[1]),
    )
    for _, label in order:
        g = data[data["_label"] == label]
        pts = []
        for n, gs in g.groupby("steps"):
            if "seed" in df.columns:
                mean, ci, _ = t_interval(list(gs[col]))
            else:
                mean, ci = _num(gs[col].iloc[-1]), _num(gs[_aux(name, "ci")].iloc[-1])
            if math.isfinite(mean):
                pts.append((int(n), mean, ci if math.isfinite(ci) else 0.0))
        if pts:
            out[label] = pd.DataFrame(pts, columns=["steps", "mean", "ci"])
    return out


def _new_axes(size: tuple[float, float] = (4.8, 3.2)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _hib(v: Any) -> bool | None:
    """A stored direction as a bool (numpy's too); None where there is none."""
    return bool(v) if type(v).__name__ in ("bool", "bool_") else None


def _direction(hib: bool | None) -> str:
    return "" if hib is None else (" (higher is better)" if hib else " (lower is better)")


def plot_metric(df: pd.DataFrame, col: str) -> str:
    """Metric versus steps (log x), one line per model, teacher dashed, error bars the 95 %
    t-intervals over seeds; a PNG data URI."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    name, hib = metric_columns(df)[col]
    fig, ax = _new_axes()
    steps: set[int] = set()
    for label, s in _series(df, col).items():
        steps |= set(s["steps"])
        teacher = label == "teacher"
        ax.errorbar(
            s["steps"],
            s["mean"],
            yerr=s["ci"],
            fmt="--o" if teacher else "-o",
            ms=4,
            capsize=3,
            label=label,
            color="black" if teacher else None,
        )
    if len(steps) > 1 and min(steps) > 0:
        ax.set_xscale("log")
    if steps:
        ax.set_xticks(sorted(steps))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("steps")
    ax.set_ylabel(name + _direction(hib), fontsize=9)
    ax.set_title(f"{col} (error bars: 95 % t-interval over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png_b64(fig)


def _resolve_folder(p: str, results_dir: Path) -> Path | None:
    if not p:
        return None
    path = Path(p)
    for cand in (
        [path] if path.is_absolute() else [path, results_dir.parent / path, results_dir / path]
    ):
        if cand.is_dir():
            return cand
    return None


def _first_samples(folder: Path, k: int, warnings: list[str]) -> list[dict[str, Any]]:
    """k manifest entries, one per prompt in turn (sample 0 of every prompt, then sample 1, ...),
    so a grid cell shows the variety of the prompt set; sorted PNG names without a manifest."""
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        warnings.append(f"{folder}: no manifest.jsonl; showing PNGs in name order")
        return [{"file": p.name} for p in sorted(folder.glob("*.png"))[:k]]
    out = []
    with open(manifest, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            try:
                e = json.loads(line)
                if not _sample_entry(e):
                    raise ValueError("not a sample entry")
            except ValueError:
                warnings.append(f"{manifest}:{n}: unreadable manifest line skipped")
                continue
            out.append(e)
    order = {pid: i for i, pid in enumerate(dict.fromkeys(e.get("prompt_id") for e in out))}
    out.sort(key=lambda e: (e.get("index", 0), order[e.get("prompt_id")]))
    return out[:k]


def _sample_entry(e: Any) -> bool:
    """A manifest line as ensure_samples writes it: a PNG name inside the folder, an integer
    index, a string prompt id."""
    return (
        isinstance(e, dict)
        and isinstance(e.get("file"), str)
        and Path(e["file"]).name == e["file"] not in ("", ".", "..")
        and isinstance(e.get("index", 0), int)
        and isinstance(e.get("prompt_id", ""), str)
    )


def _thumb_size(w: int, h: int) -> tuple[int, int]:
    m = max(w, h)
    if m < MIN_PX:
        f = math.ceil(MIN_PX / m)
        return w * f, h * f
    if m > MAX_PX:
        return max(1, round(w * MAX_PX / m)), max(1, round(h * MAX_PX / m))
    return w, h


def sample_cell(folder: Path, entries: list[dict[str, Any]], warnings: list[str]) -> str | None:
    """The entries' images tiled (up to 5 a row) into one PNG data URI; None if none load."""
    from PIL import Image

    imgs = []
    for e in entries:
        try:
            with Image.open(folder / str(e["file"])) as im:
                if im.width * im.height > MAX_SAMPLE_PIXELS:  # read nothing of a huge image
                    raise ValueError(f"{im.width}x{im.height} pixels, over {MAX_SAMPLE_PIXELS}")
                imgs.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            warnings.append(f"{folder / str(e['file'])}: cannot read sample ({err})")
    if not imgs:
        return None
    tw, th = _thumb_size(*imgs[0].size)
    tiles = []
    for im in imgs:
        small = max(im.size) < MIN_PX
        tiles.append(
            im.resize((tw, th), Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS)
        )
    cols, gap = min(len(tiles), 5), 2
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * tw + (cols - 1) * gap, rows * th + (rows - 1) * gap), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * (tw + gap), (i // cols) * (th + gap)))
    return _png_b64(sheet)


def sample_grid(sel: pd.DataFrame, results_dir: Path, k: int, warnings: list[str]) -> str:
    """HTML grid method x steps of the first k samples of each model's sample folder."""
    if k <= 0 or "samples" not in sel.columns:
        return ""
    newest = sel.drop_duplicates(["method", "steps"], keep="last")
    methods = sorted(newest["method"].unique(), key=method_key)
    steps = sorted(int(s) for s in newest["steps"].unique())
    ref: tuple[str, list[tuple]] | None = None
    ref_entries: list[dict[str, Any]] = []
    body = []
    for m in methods:
        tds = [f"<th>{html.escape(str(m))}</th>"]
        for n in steps:
            row = newest[(newest["method"] == m) & (newest["steps"] == n)]
            if row.empty:
                tds.append("<td></td>")
                continue
            src = str(row["samples"].iloc[-1])
            folder = _resolve_folder(src, results_dir)
            if folder is None:
                if src:
                    warnings.append(f"sample folder of {m} @ {n} steps not found: {src}")
                tds.append("<td class='none'>no samples</td>")
                continue
            entries = _first_samples(folder, k, warnings)
            ident = [(e.get("prompt_id"), e.get("index"), e.get("seed")) for e in entries]
            if ref is None:
                ref, ref_entries = (f"{m} @ {n}", ident), entries
            elif ident != ref[1]:
                warnings.append(
                    f"sample grid: {m} @ {n} steps shows other prompts/seeds than {ref[0]} steps"
                )
            uri = sample_cell(folder, entries, warnings)
            alt = html.escape(f"{m}, {n} step{'s' if n > 1 else ''}")
            tds.append(
                f"<td><img src='{uri}' alt='{alt}' title='{alt}'></td>"
                if uri
                else "<td class='none'>no samples</td>"
            )
        body.append("<tr>" + "".join(tds) + "</tr>")
    if ref is None:
        return ""
    head = (
        "<tr><th>method \\ steps</th>"
        + "".join(f"<th>{n} step{'s' if n > 1 else ''}</th>" for n in steps)
        + "</tr>"
    )
    prompts = ""
    if any("prompt" in e for e in ref_entries):
        runs: list[list[Any]] = []  # consecutive samples of one prompt: [prompt, first, last]
        for e in ref_entries:
            if runs and runs[-1][0] == e.get("prompt", ""):
                runs[-1][2] = e.get("index", "")
            else:
                runs.append([e.get("prompt", ""), e.get("index", ""), e.get("index", "")])
        items = "; ".join(
            html.escape(f"{t} (#{a})" if a == b else f"{t} (#{a}–#{b})") for t, a, b in runs
        )
        prompts = f"<p class='note'>Each cell, left to right, top to bottom: {items}.</p>"
    return "<table class='grid'>" + head + "".join(body) + "</table>" + prompts


# ------------------------------------------------------------------------------ compute
def _table_md(headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str) -> list[str]:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out + ["", f"*{caption}*", ""]


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str) -> str:
    return (
        f"<table class='results'><caption>{html.escape(caption)}</caption><thead><tr>"
        + "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
        + "</tr></thead><tbody>"
        + "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
        )
        + "</tbody></table>"
    )


def _g(v: Any) -> str:
    """A count or FLOPs figure: 3 significant digits, '–' where unknown."""
    x = _num(v)
    if not math.isfinite(x):
        return "–"
    return f"{x:.3g}" if abs(x) >= 1e5 else f"{x:.0f}" if x == int(x) else f"{x:.1f}"


def _passes(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return "–"
    return ", ".join(f"{k} {_g(v)}" for k, v in d.items())


def _pm(mean: Any, ci: Any, n: Any, d: int) -> str:
    m, c = _num(mean), _num(ci)
    if not math.isfinite(m):
        return "–"
    text = f"{m:.{d}f}" + (f" ± {c:.{d}f}" if math.isfinite(c) else "")
    return text + f" (n={_count(n)})"


def primary_metric(sel: pd.DataFrame) -> str | None:
    """The metric the compute views plot: the first with a direction that measures the model
    (not the machine), in order of appearance; None if there is none."""
    for m in _metric_order(sel):
        spec = value_spec(m)
        hib = [h for h in sel.loc[sel["metric"] == m, "higher_is_better"] if isinstance(h, bool)]
        if hib and not (spec is not None and spec.machine_dependent):
            return m
    return None


def nfe_per_sample(steps: int, guidance: Any) -> int:
    """Network evaluations per sample: one per step, two where classifier-free guidance runs
    (guidance != 1)."""
    g = _num(guidance)
    return int(steps) * (2 if math.isfinite(g) and g != 1.0 else 1)


RAW = "-raw"  # the run id suffix of a student's raw-weights records (cdmbench.evaluate)


def training_run(run_id: Any) -> str:
    """The training run a record's run id names: a raw-weights run id without its suffix."""
    r = str(run_id)
    return r[: -len(RAW)] if r.endswith(RAW) else r


def compute_runs(sel: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The training cost of every training run shown, once: the raw-weights records of a run
    share its cost (runs without a recorded cost are left out)."""
    headers = [
        "model",
        "train seed",
        "run",
        "iters",
        "images",
        "teacher NFEs",
        "FLOPs",
        "data FLOPs",
        "wall s",
        "forward passes",
        "backward passes",
    ]
    rows = []
    runs = sel.assign(train_run=sel["run_id"].map(training_run))
    # a run's EMA records (where evaluated) name it, else its raw-weights ones
    raw = runs["run_id"] != runs["train_run"]
    runs = runs.iloc[sorted(range(len(runs)), key=lambda i: not raw.iloc[i])]
    runs = runs.drop_duplicates("train_run", keep="last")
    runs = order_rows(runs, ["method", "variant", "train_seed"])
    for r in runs.itertuples():
        c = r.train_cost if isinstance(r.train_cost, dict) else {}
        if not c:
            continue
        rows.append(
            [
                model_label(r.method, r.variant),
                str(r.train_seed),
                str(r.train_run),
                _g(c.get("iters")),
                _g(c.get("images")),
                _g(c.get("teacher_nfe")),
                _g(c.get("flops")),
                _g(_data_flops(c)),
                _g(c.get("wall_s")),
                _passes(c.get("forward")),
                _passes(c.get("backward")),
            ]
        )
    return headers, rows


def _data_flops(cost: dict) -> float | None:
    """FLOPs of the data a run made before training (included in its "flops"); None for
    runs recorded before that was counted."""
    data = cost.get("data")
    return (
        sum(float(d.get("flops", 0.0)) for d in data.values()) if isinstance(data, dict) else None
    )


def _flops(cost: Any) -> float:
    return _num(cost.get("flops")) if isinstance(cost, dict) else math.nan


def plot_quality_vs_flops(st: pd.DataFrame, metric: str, steps: int) -> str | None:
    """The metric at ``steps`` against training FLOPs (log x), one point per model with its
    95 % interval; None where no model recorded its cost."""
    pts = st[(st["metric"] == metric) & (st["steps"] == steps)]
    pts = pts[pts["train_cost"].map(lambda c: math.isfinite(_flops(c)) and _flops(c) > 0)]
    if pts.empty:
        return None
    fig, ax = _new_axes()
    for r in pts.itertuples():
        label = model_label(r.method, r.variant)
        ci = r.ci if math.isfinite(_num(r.ci)) else 0.0
        ax.errorbar([_flops(r.train_cost)], [r.mean], yerr=[ci], fmt="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (estimated)")
    hib = pts["higher_is_better"].iloc[-1]
    ax.set_ylabel(metric + _direction(_hib(hib)), fontsize=9)
    ax.set_title(
        f"{metric} at {steps} step{'s' if steps > 1 else ''} vs training compute", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png_b64(fig)


def _matched(variant: Any) -> bool:
    """A compute-matched run's variant ("tuned, compute-matched", also "..., raw weights")."""
    return COMPUTE_MATCHED in str(variant).split(", ")


def _unmatched(variant: Any) -> str:
    """The variant without its compute-matched note: the model a matched run is a budget of."""
    return ", ".join(p for p in str(variant).split(", ") if p != COMPUTE_MATCHED)


def compute_matched(
    records: pd.DataFrame, metric: str
) -> tuple[list[str], list[list[str]], str] | str:
    """Every student at the cheapest model's full training budget: for each model the
    configuration whose FLOPs are closest to it (within MATCH_TOLERANCE). Returns headers, rows
    and the target caption, or a line saying why there is no such table."""
    allc = cell_stats(records, newest_prompt_set=True, all_configs=True)
    allc = allc[(allc["metric"] == metric) & (allc["method"] != "teacher")]
    allc = allc[allc["train_cost"].map(lambda c: math.isfinite(_flops(c)) and _flops(c) > 0)]
    hint = (
        "compute-matched table needs runs at matched budgets: cdmbench bench --match-compute "
        "trains them"
    )
    if allc.empty:
        return "no training costs recorded; " + hint
    newest = cell_stats(records, newest_prompt_set=True)
    newest = newest[(newest["metric"] == metric) & (newest["method"] != "teacher")]
    full: dict[tuple[str, str], float] = {}
    for r in newest.itertuples():
        if math.isfinite(_flops(r.train_cost)) and not _matched(r.variant):
            full.setdefault((r.method, r.variant), _flops(r.train_cost))
    # a model's configurations, its compute-matched runs (`bench --match-compute`) among them:
    # config key -> (FLOPs, the variant its records carry)
    configs: dict[tuple[str, str], dict[str, tuple[float, str]]] = {}
    for r in allc.itertuples():
        model = (r.method, _unmatched(r.variant))
        configs.setdefault(model, {})[r.config_key] = (_flops(r.train_cost), r.variant)
    if len(full) < 2:
        return "fewer than two students with a recorded cost; " + hint
    target = min(full.values())
    picks, lacking = {}, []
    for model, cfgs in configs.items():
        key, (fl, _) = min(cfgs.items(), key=lambda kv: abs(math.log(kv[1][0] / target)))
        if abs(fl / target - 1) <= MATCH_TOLERANCE:
            picks[model] = key
        else:
            lacking.append(model_label(*model))
    if lacking:
        return f"no run of {', '.join(sorted(lacking))} near {_g(target)} FLOPs; " + hint
    steps = sorted(int(s) for s in allc["steps"].unique())
    d = _decimals([float(x) for x in allc["mean"]])
    hib = allc["higher_is_better"].iloc[-1]
    headers = ["model", "FLOPs", "of target"] + [
        f"{header(metric, _hib(hib))} @ {n}" for n in steps
    ]
    rows = []
    for model in sorted(picks, key=lambda k: (method_key(k[0]), k[1])):
        fl, variant = configs[model][picks[model]]
        cells = allc[
            (allc["method"] == model[0])
            & (allc["variant"] == variant)
            & (allc["config_key"] == picks[model])
        ]
        row = [model_label(*model), _g(fl), f"{fl / target:.2f}"]
        for n in steps:
            c = cells[cells["steps"] == n]
            row.append(
                _pm(c["mean"].iloc[-1], c["ci"].iloc[-1], c["n"].iloc[-1], d) if len(c) else "–"
            )
        rows.append(row)
    return headers, rows, f"target: {_g(target)} FLOPs, the cheapest student's full budget"


def frontier(
    records: pd.DataFrame, sel: pd.DataFrame, metric: str
) -> tuple[list[str], list[list[str]], list[dict[str, Any]]]:
    """The speed-quality frontier: every model at every step count, its NFE per sample, measured
    latency (where recorded) and the metric, each with its 95 % interval. Returns the table and
    the points (label, steps, nfe, mean, ci, lat, lat_ci) the plots use."""
    st = cell_stats(records, newest_prompt_set=True)
    q = st[st["metric"] == metric]
    lat = st[st["metric"] == "latency_ms"]
    guidance = {}
    if "guidance" in sel.columns:
        for r in sel.itertuples():
            guidance[(r.method, r.variant, int(r.steps))] = r.guidance
    d = _decimals([float(x) for x in q["mean"]])
    dl = _decimals([float(x) for x in lat["mean"]]) if len(lat) else 1
    hib = q["higher_is_better"].iloc[-1] if len(q) else None
    headers = [
        "model",
        "steps",
        "NFE / sample",
        "latency_ms ↓",
        header(metric, _hib(hib)),
    ]
    rows, pts = [], []
    for r in q.itertuples():
        nfe = nfe_per_sample(r.steps, guidance.get((r.method, r.variant, int(r.steps)), 1.0))
        lr = lat[
            (lat["method"] == r.method) & (lat["variant"] == r.variant) & (lat["steps"] == r.steps)
        ]
        lm, lc, ln = (
            (lr["mean"].iloc[-1], lr["ci"].iloc[-1], lr["n"].iloc[-1])
            if len(lr)
            else (math.nan, math.nan, 0)
        )
        label = model_label(r.method, r.variant)
        rows.append([label, str(r.steps), str(nfe), _pm(lm, lc, ln, dl), _pm(r.mean, r.ci, r.n, d)])
        pts.append(
            {
                "label": label,
                "method": r.method,
                "steps": int(r.steps),
                "nfe": nfe,
                "mean": r.mean,
                "ci": r.ci,
                "lat": _num(lm),
                "lat_ci": _num(lc),
            }
        )
    return headers, rows, pts


def plot_frontier(pts: list[dict[str, Any]], metric: str, x: str, hib: bool | None) -> str | None:
    """The metric against NFE per sample (``x="nfe"``) or latency (``x="lat"``), one line per
    model over its step counts, error bars the 95 % intervals; None without points."""
    pts = [p for p in pts if math.isfinite(_num(p[x])) and math.isfinite(_num(p["mean"]))]
    if not pts:
        return None
    fig, ax = _new_axes()
    labels = sorted(
        dict.fromkeys((p["method"], p["label"]) for p in pts),
        key=lambda k: (method_key(k[0]), k[1]),
    )
    for _, label in labels:
        ps = sorted((p for p in pts if p["label"] == label), key=lambda p: p[x])
        z = lambda v: v if math.isfinite(_num(v)) else 0.0  # noqa: E731
        teacher = label == "teacher"
        ax.errorbar(
            [p[x] for p in ps],
            [p["mean"] for p in ps],
            yerr=[z(p["ci"]) for p in ps],
            xerr=[z(p["lat_ci"]) for p in ps] if x == "lat" else None,
            fmt="--o" if teacher else "-o",
            ms=4,
            capsize=3,
            label=label,
            color="black" if teacher else None,
        )
    ax.set_xscale("log")
    ax.set_xlabel("NFE per sample" if x == "nfe" else "latency, ms per image (batch 1)")
    ax.set_ylabel(metric + _direction(hib), fontsize=9)
    ax.set_title(f"speed-quality frontier: {metric}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png_b64(fig)


COMPUTE_NOTE = (
    "Costs as recorded by training (run.json cost): FLOPs are an estimate from each network's "
    "per-call cost; teacher NFEs count per-sample teacher evaluations. Both include the "
    "teacher data a method makes before training (DMD's regression pairs, CD's teacher "
    'samples without real data; "data FLOPs"; '
    '"–" for runs recorded before it was counted), whether or not a cache held it. Wall '
    "time sums all sessions and leaves that data out. Intervals: 95 % t-interval over seeds."
)


def compute_section(records: pd.DataFrame, sel: pd.DataFrame) -> tuple[list[str], str]:
    """Markdown lines and HTML of a backbone's compute views: the runs' training cost, quality
    versus training FLOPs, the compute-matched table and the speed-quality frontier."""
    metric = primary_metric(sel)
    if metric is None:
        return [], ""
    md, parts = (
        ["### Compute", "", COMPUTE_NOTE, ""],
        [f"<h3>Compute</h3><p class='note'>{html.escape(COMPUTE_NOTE)}</p>"],
    )
    heads, rows = compute_runs(sel)
    cap = "Training cost of each run."
    if rows:
        md += _table_md(heads, rows, cap)
        parts.append(_table_html(heads, rows, cap))
    else:
        line = "No training costs recorded for these runs."
        md += [line, ""]
        parts.append(f"<p>{html.escape(line)}</p>")
    st = cell_stats(records, newest_prompt_set=True)
    plots = [
        plot_quality_vs_flops(st, metric, int(n))
        for n in sorted(int(s) for s in st.loc[st["method"] != "teacher", "steps"].unique())
    ]
    plots = [p for p in plots if p]
    if plots:
        parts.append(
            "<h4>Quality versus training compute</h4><div class='plots'>"
            + "".join(
                f"<img src='{p}' alt='{html.escape(metric)} vs training FLOPs'>" for p in plots
            )
            + "</div>"
        )
    matched = compute_matched(records, metric)
    md += ["#### Compute-matched", ""]
    parts.append("<h4>Compute-matched</h4>")
    if isinstance(matched, str):
        md += [matched, ""]
        parts.append(f"<p>{html.escape(matched)}</p>")
    else:
        h, r, cap = matched
        cap += "; 95 % t-interval over seeds."
        md += _table_md(h, r, cap)
        parts.append(_table_html(h, r, cap))
    h, r, pts = frontier(records, sel, metric)
    cap = (
        "Speed-quality frontier: every model at every step count. NFE per sample: steps, twice "
        "that where the sampler runs classifier-free guidance (guidance ≠ 1); latency where "
        "measured. 95 % t-interval over seeds."
    )
    md += ["#### Speed-quality frontier", ""] + _table_md(h, r, cap)
    given = [h for h in sel.loc[sel["metric"] == metric, "higher_is_better"] if isinstance(h, bool)]
    hib = given[-1] if given else None
    figs = [plot_frontier(pts, metric, x, hib) for x in ("nfe", "lat")]
    parts.append(
        "<h4>Speed-quality frontier</h4>"
        + _table_html(h, r, cap)
        + "<div class='plots'>"
        + "".join(f"<img src='{f}' alt='speed-quality frontier'>" for f in figs if f)
        + "</div>"
    )
    return md, "".join(parts)


# ------------------------------------------------------------------------------ sweeps
def sweep_summary(
    results_dir: str | Path,
    backbone: str | None = None,
    methods: str | Sequence[str] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """The tuning sweeps recorded under ``results_dir`` (:func:`cdmbench.sweep.summary`) of
    the given backbone and methods, and a warning where sweeps.jsonl cannot be summarised."""
    from cdmbench import sweep

    path = Path(results_dir) / sweep.SWEEPS
    if not path.is_file():
        return pd.DataFrame(columns=sweep.SUMMARY_COLUMNS), []
    try:
        s = sweep.summary(results_dir)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return pd.DataFrame(columns=sweep.SUMMARY_COLUMNS), [
            f"{path}: tuning sweeps not shown: unusable trial lines ({type(e).__name__}: {e})"
        ]
    if backbone is not None:
        s = s[s["backbone"] == backbone]
    wanted = name_list(methods)
    if wanted is not None:
        s = s[s["method"].isin(wanted)]
    s = s.assign(_m=s["method"].map(method_key)).sort_values(["_m", "seed"], kind="stable")
    return s.drop(columns="_m").reset_index(drop=True), []


def sweep_section(s: pd.DataFrame) -> tuple[list[str], str]:
    """Markdown lines and HTML of one backbone's tuning sweeps: per sweep the method, K, the
    best, median and worst objective, trial 0's and the best trial's settings."""
    from cdmbench import sweep

    if s.empty:
        return [], ""
    md = ["### Tuning sweeps", "", sweep.render_markdown(s).rstrip("\n"), ""]
    md += [f"*{sweep.CAPTION}*", ""]
    return md, "<h3>Tuning sweeps</h3>" + sweep.render_html(s)


# ------------------------------------------------------------------------------ driver
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;
max-width:1400px}
table{border-collapse:collapse;margin:1em 0}
th,td{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:bottom;font-size:85%;color:#555;text-align:left;padding-top:4px}
table.grid td,table.grid th{border:1px solid #eee;text-align:center;vertical-align:middle}
table.grid img{image-rendering:pixelated;display:block;margin:auto}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:6px 12px}
.note{font-size:85%;color:#555}
code{font-size:90%}
"""


def _html_list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in items) + "</ul>"


def build_report(
    results_dir: str | Path,
    out_dir: str | Path,
    backbone: str | None = None,
    methods: str | Sequence[str] | None = None,
    metrics: str | Sequence[str] | None = None,
    latest: bool = True,
    samples_per_cell: int = 10,
) -> ReportOutputs:
    """Write report.md, report.csv, report.tex and report.html under ``out_dir``.

    Raises UserError when there are no readable records or a filter value matches nothing;
    unreadable record lines become warnings (returned and shown in the report).
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    df, warnings = load_records(results_dir)
    store = ResultStore(results_dir)
    if df.empty:
        if not store.path.is_file():
            raise UserError(
                f"no results in {results_dir} (no {store.path.name}); "
                "run cdmbench eval first or pass --results DIR"
            )
        extra = f" ({len(warnings)} unusable, e.g. {warnings[0]})" if warnings else ""
        raise UserError(f"no readable records in {store.path}{extra}")
    df = filter_records(df, backbone, methods, metrics)
    table = pivot(df, latest)
    sel = select(df, latest)
    prov, prov_warn = provenance(sel)
    warnings += prov_warn
    backbones = sorted(df["backbone"].unique())
    sweeps, sweep_warn = sweep_summary(results_dir, backbone, methods)
    warnings += sweep_warn
    swept = {
        bb: sweep_section(sweeps[sweeps["backbone"] == bb])
        for bb in sorted(set(sweeps["backbone"]) | set(backbones))
    }
    sections = []
    for bb in backbones:
        sub = pivot(df[df["backbone"] == bb], latest)
        sections.append((bb, sub, sel[sel["backbone"] == bb], df[df["backbone"] == bb]))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    mode = (
        "the newest configuration of each model, mean over its seeds"
        if latest
        else "all runs and seeds"
    )
    filt = ", ".join(
        f"{k}: {', '.join(v) if isinstance(v, list) else v}"
        for k, v in (
            ("backbone", backbone),
            ("methods", name_list(methods)),
            ("metrics", name_list(metrics)),
        )
        if v
    )
    intro = (
        f"Generated {stamp} from `{store.path}` ({len(sel)} records shown: {mode}"
        + (f"; {filt}" if filt else "")
        + ")."
    )

    # ---- markdown
    md = ["# cdmbench report", "", intro, ""]
    computed = {bb: compute_section(recs, sub_sel) for bb, _, sub_sel, recs in sections}
    for bb, sub, _, _ in sections:
        md += [f"## {bb}", "", render_markdown(sub, drop=["backbone"]), ""] + computed[bb][0]
        md += swept[bb][0]
    for bb in sorted(set(swept) - set(backbones)):  # swept, no results yet
        md += [f"## {bb}", ""] + swept[bb][0]
    md += ["## Provenance", ""]
    for title, lines in prov:
        md += [f"### {title}", ""] + [f"- {x}" for x in lines] + [""]
    md += ["Plots and sample grids: report.html.", ""]
    late_warn: list[str] = []  # grids add warnings; collected before writing any file

    # ---- html
    parts = []
    for bb, sub, sub_sel, _ in sections:
        plots = "".join(
            f"<img src='{plot_metric(sub, h)}' alt='{html.escape(h)} vs steps'>"
            for h in metric_columns(sub)
        )
        grid = sample_grid(sub_sel, results_dir, samples_per_cell, late_warn)
        parts.append(
            f"<h2 id='{html.escape(bb)}'>{html.escape(bb)}</h2>"
            + render_html_table(sub, drop=["backbone"])
            + "<h3>Metric versus steps</h3><div class='plots'>"
            + plots
            + "</div>"
            + computed[bb][1]
            + swept[bb][1]
            + (f"<h3>Samples</h3>{grid}" if grid else "")
        )
    for bb in sorted(set(swept) - set(backbones)):
        if swept[bb][1]:
            parts.append(f"<h2 id='{html.escape(bb)}'>{html.escape(bb)}</h2>" + swept[bb][1])
    warnings += late_warn
    warn_md = ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""] if warnings else []
    md = md[:4] + warn_md + md[4:]
    prov_html = "".join(f"<h3>{html.escape(t)}</h3>{_html_list(ls)}" for t, ls in prov)
    warn_html = f"<div class='warn'><b>Warnings</b>{_html_list(warnings)}</div>" if warnings else ""
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<title>cdmbench report</title><style>" + _CSS + "</style></head><body>"
        f"<h1>cdmbench report</h1><p>{html.escape(intro.replace('`', ''))}</p>"
        + warn_html
        + "".join(parts)
        + "<h2>Provenance</h2>"
        + prov_html
        + "</body></html>\n"
    )

    # ---- latex
    tex = ["% cdmbench report; needs \\usepackage{booktabs}", f"% {intro.replace('`', '')}", ""]
    for bb, sub, _, _ in sections:
        tex.append(
            render_latex(sub, f"{bb}. {_caption(sub)}", f"tab:cdmbench-{bb}", drop=["backbone"])
        )

    # ---- csv: plain metric names, plain numbers
    plain = {h: name for h, (name, _) in metric_columns(table).items()}
    aux = {_aux(name, a): f"{name}_{a}" for name, _ in metric_columns(table).values() for a in AUX}
    plain.update({c: aux[c] for c in table.columns if c in aux})
    csv = table.rename(columns=plain).to_csv(index=False)

    out = ReportOutputs(
        out_dir / "report.md",
        out_dir / "report.csv",
        out_dir / "report.tex",
        out_dir / "report.html",
        table,
        warnings,
        len(sel),
    )
    write_all(
        out_dir,
        {out.markdown: "\n".join(md), out.csv: csv, out.latex: "\n".join(tex), out.html: page},
    )
    return out


def write_all(out_dir: Path, texts: dict[Path, str]) -> None:
    """Write every file to a temporary sibling first, then rename them all: a process killed
    while writing leaves the previous report whole (its temporaries go on the next run)."""
    remove_stale_temps(out_dir, recursive=False, prefix="report.")
    with contextlib.ExitStack() as stack:
        for path, text in texts.items():
            stack.enter_context(atomic_path(path)).write_text(text, encoding="utf-8")
