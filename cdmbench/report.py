"""Report: pivot the results store into tables, plots and sample grids (DESIGN.md section 7).

    records.jsonl --load_records--> tidy records --pivot--> (backbone, method, steps) x metric
        report.md    tables + provenance (versions, git revisions, devices, samples, configs)
        report.csv   the pivot, plain numbers (metric names without arrows)
        report.tex   booktabs tables
        report.html  one self-contained page: tables, metric-versus-steps plots, sample grids

Selection is :func:`cdmbench.results.select`. With ``latest=True`` several seeds of the newest
run show as mean ± std; with ``latest=False`` every run and seed is its own row, plus a
"mean ± std" row for each run evaluated with several seeds. Directions (arrows) and which
metrics measure the machine (timings, shown last) come from the metrics' value declarations.

Best values are marked per step count: within each (backbone, prompt set, steps) group, the best
value of each metric among all models (ties all marked; nothing marked where only one model
was evaluated at that step count or all values tie). Unreadable record lines become warnings in
the report.
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
    ResultStore,
    filter_records,
    is_missing,
    load_records,
    method_key,
    name_list,
    order_rows,
    select,
)

UP, DOWN = "↑", "↓"
SUMMARY_SEED = "mean ± std"
MIN_PX, MAX_PX = 48, 128  # sample thumbnails: tiny images upscaled (nearest), large ones shrunk
MAX_SAMPLE_PIXELS = 64 * 1024 * 1024  # a sample larger than this is skipped, not decoded

CAPTION = (
    "↑ higher is better, ↓ lower is better. Bold: the best value at that step count among "
    "all models evaluated at it (per backbone and prompt set; not marked where only one "
    "model was evaluated or all values tie)."
)
CAPTION_STD = " a ± b: mean ± standard deviation over seeds."


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


def _std_col(metric: str) -> str:
    return f"{metric} std"


def pivot(records_df: pd.DataFrame, latest: bool = True) -> pd.DataFrame:
    """Rows (backbone, [prompt_set,] method, steps[, run_id, seed]), one column per metric.

    Metric columns are headed "name ↑" / "name ↓"; a "name std" column follows a metric where
    several seeds were averaged, and "seeds" counts them. ``prompt_set`` is a row key only where a
    backbone has several. The teacher comes first, then methods alphabetically, steps ascending.
    ``attrs`` holds row_keys, metrics (name -> header) and higher_is_better (name -> bool/None).
    """
    sel = select(records_df, latest)
    if sel.empty:
        return pd.DataFrame(columns=["backbone", "method", "steps"])
    multi_ps = bool(sel.groupby("backbone")["prompt_set"].nunique().max() > 1)
    row_keys = ["backbone"] + (["prompt_set"] if multi_ps else []) + ["method", "steps"]
    if not latest:
        row_keys += ["run_id", "seed"]
    metrics = _metric_order(sel)
    hib = {m: sel.loc[sel["metric"] == m, "higher_is_better"].iloc[-1] for m in metrics}
    hib = {m: (v if isinstance(v, bool) else None) for m, v in hib.items()}
    heads = {m: header(m, hib[m]) for m in metrics}
    rows = [
        _pivot_row(dict(zip(row_keys, key, strict=True)), g, heads)
        for key, g in sel.groupby(row_keys, sort=False)
    ]
    if not latest:  # a mean ± std row for each run evaluated with several seeds
        for key, g in sel.groupby(row_keys[:-1], sort=False):
            if g["seed"].nunique() > 1:
                rows.append(
                    _pivot_row(
                        {**dict(zip(row_keys[:-1], key, strict=True)), "seed": SUMMARY_SEED},
                        g,
                        heads,
                    )
                )
    out = pd.DataFrame(rows)
    cols = list(row_keys)
    if "seeds" in out.columns and (out["seeds"] > 1).any():
        cols.append("seeds")
    for m in metrics:
        if heads[m] in out.columns:
            cols.append(heads[m])
            if _std_col(m) in out.columns and out[_std_col(m)].notna().any():
                cols.append(_std_col(m))
    out = out.reindex(columns=cols)
    extra = {}
    if not latest:
        first = sel.groupby("run_id")["_t"].min()
        extra["run_id"] = out["run_id"].map(lambda r: (str(first.get(r)), r))
        extra["seed"] = out["seed"].map(lambda s: (1, s) if s == SUMMARY_SEED else (0, s))
    out = order_rows(out, row_keys, extra)
    out.attrs = {"row_keys": row_keys, "latest": latest, "metrics": heads, "higher_is_better": hib}
    return out


def _pivot_row(row: dict[str, Any], g: pd.DataFrame, heads: dict[str, str]) -> dict[str, Any]:
    for m, gm in g.groupby("metric", sort=False):
        vals = gm["value"].astype(float)
        row[heads[str(m)]] = float(vals.mean())
        row[_std_col(str(m))] = float(vals.std()) if vals.notna().sum() > 1 else math.nan
    row["seeds"] = int(g["seed"].nunique())
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


def best_cells(df: pd.DataFrame) -> set[tuple[int, str]]:
    """(row position, header) of the best value per metric at each step count (see module doc)."""
    group = [c for c in ("backbone", "prompt_set", "steps") if c in df.columns]
    model = [c for c in ("method", "run_id") if c in df.columns]
    plain = ~df["seed"].eq(SUMMARY_SEED) if "seed" in df.columns else pd.Series(True, df.index)
    out: set[tuple[int, str]] = set()
    for col, (_, hib) in metric_columns(df).items():
        if hib is None:
            continue
        vals = pd.to_numeric(df[col], errors="coerce")
        ok = plain & vals.notna() & vals.map(lambda v: math.isfinite(v))
        for _, idx in df[ok].groupby(group, sort=False).groups.items():
            if len(df.loc[idx, model].drop_duplicates()) < 2:
                continue
            if vals[idx].nunique() < 2:
                continue  # all tied: nothing to point out
            best = vals[idx].max() if hib else vals[idx].min()
            tol = 1e-12 * max(1.0, abs(best))
            out |= {(int(df.index.get_loc(i)), col) for i in idx if abs(vals[i] - best) <= tol}
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
    """Headers and formatted cells of a pivot, std merged into its metric's cell as ±."""
    metrics = metric_columns(df)
    std = {h: _std_col(name) for h, (name, _) in metrics.items()}
    keys = [c for c in df.columns if c not in metrics and c not in std.values() and c not in drop]
    decimals = {
        h: _decimals([float(x) for x in pd.to_numeric(df[h], errors="coerce")]) for h in metrics
    }
    best = best_cells(df)
    headers = keys + list(metrics)
    rows = []
    for pos in range(len(df)):
        r = df.iloc[pos]
        cells = [
            _Cell("" if is_missing(r[k]) else str(r[k]), numeric=k in ("steps", "seeds"))
            for k in keys
        ]
        for h in metrics:
            text = _fmt(r[h], decimals[h])
            if std[h] in df.columns and not is_missing(r[std[h]]):
                text += f" ± {_fmt(r[std[h]], decimals[h])}"
            cells.append(_Cell(text, (pos, h) in best, True))
        rows.append(cells)
    return headers, rows


def _caption(df: pd.DataFrame) -> str:
    has_std = any(str(c).endswith(" std") for c in df.columns)
    return CAPTION + (CAPTION_STD if has_std else "")


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


def plot_metric(df: pd.DataFrame, col: str) -> str:
    """Metric versus steps (log x), one line per method, teacher dashed; a PNG data URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    name, hib = metric_columns(df)[col]
    data = df[~df["seed"].eq(SUMMARY_SEED)] if "seed" in df.columns else df
    fig = Figure(figsize=(4.8, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps: set[int] = set()
    methods = sorted(data["method"].unique(), key=method_key)
    for method in methods:
        s = data[data["method"] == method].groupby("steps")[col].mean().dropna()
        if s.empty:
            continue
        steps |= {int(x) for x in s.index}
        teacher = method == "teacher"
        ax.plot(
            s.index,
            s.values,
            "--" if teacher else "-",
            marker="o",
            ms=4,
            label=method,
            color="black" if teacher else None,
        )
    if len(steps) > 1 and min(steps) > 0:
        ax.set_xscale("log")
    if steps:
        ax.set_xticks(sorted(steps))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    direction = "" if hib is None else (" (higher is better)" if hib else " (lower is better)")
    ax.set_xlabel("steps")
    ax.set_ylabel(name + direction, fontsize=9)
    ax.set_title(col, fontsize=10)
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
    sections = []
    for bb in backbones:
        sub = pivot(df[df["backbone"] == bb], latest)
        sections.append((bb, sub, sel[sel["backbone"] == bb]))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
    mode = "latest result per model, step count and seed" if latest else "all runs and seeds"
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
    for bb, sub, _ in sections:
        md += [f"## {bb}", "", render_markdown(sub, drop=["backbone"]), ""]
    md += ["## Provenance", ""]
    for title, lines in prov:
        md += [f"### {title}", ""] + [f"- {x}" for x in lines] + [""]
    md += ["Plots and sample grids: report.html.", ""]
    late_warn: list[str] = []  # grids add warnings; collected before writing any file

    # ---- html
    parts = []
    for bb, sub, sub_sel in sections:
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
            + (f"<h3>Samples</h3>{grid}" if grid else "")
        )
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
    for bb, sub, _ in sections:
        tex.append(
            render_latex(sub, f"{bb}. {_caption(sub)}", f"tab:cdmbench-{bb}", drop=["backbone"])
        )

    # ---- csv: plain metric names, plain numbers
    plain = {h: name for h, (name, _) in metric_columns(table).items()}
    plain.update({c: c.replace(" std", "_std") for c in table.columns if str(c).endswith(" std")})
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
