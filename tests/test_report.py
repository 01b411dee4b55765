"""Report: pivot (latest/all, order, arrows, intervals, best per step count where separated),
outputs, warnings, filters."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cdmbench.errors import UserError
from cdmbench.report import (
    SUMMARY_SEED,
    best_cells,
    build_report,
    pivot,
    render_markdown,
    render_rich,
)
from cdmbench.results import ResultStore, load_records

VERSIONS = {"cdmbench": "0.1.0", "torch": "2.4.0", "python": "3.11.7"}


def rec(
    method: str,
    steps: int,
    metric: str,
    value: float,
    *,
    backbone: str = "digits",
    seed: int = 0,
    t: int = 0,
    run_id: str | None = None,
    samples: str = "",
    prompt_set: str = "digits-abc",
) -> dict[str, Any]:
    """A record as cdmbench.evaluate writes it; ``t`` seconds after a fixed time."""
    hib = {"fd_digits": False, "prompt_acc": True, "latency_ms": False}[metric]
    return {
        "run_id": run_id or f"{method}-run",
        "backbone": backbone,
        "method": method,
        "checkpoint": f"sha256:{method}",
        "steps": steps,
        "schedule": [1.0, 0.0],
        "guidance": 1.0,
        "prompt_set": prompt_set,
        "n_samples": 20,
        "metric": metric,
        "value": value,
        "higher_is_better": hib,
        "metric_name": metric,
        "metric_config": {"features": "toy"},
        "metric_config_hash": "h",
        "seed": seed,
        "device": "cpu (test)",
        "dtype": "float32",
        "versions": VERSIONS,
        "git_rev": "abc123",
        "time": f"2026-01-01T00:{t // 60:02d}:{t % 60:02d}+0000",
        "eval_key": "k",
        "samples": samples,
    }


def make_samples(root: Path, name: str, n: int = 4, px: int = 8) -> str:
    """A sample folder of n tiny greyscale PNGs and its manifest; returns its path."""
    from PIL import Image

    folder = root / name
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        f = f"digit-{i % 2}-{i:05d}.png"
        Image.new("L", (px, px), color=30 * i).save(folder / f)
        lines.append(
            json.dumps(
                {
                    "prompt_id": f"digit-{i % 2}",
                    "prompt": f"digit {i % 2}",
                    "index": i,
                    "seed": 1000 + i,
                    "file": f,
                }
            )
        )
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


SEEDS = (0, 1, 2)


def jitter(v: float, seed: int) -> float:
    """Seed 0, 1, 2 of a value: -1 %, 0, +1 % (mean v, std 1 % of v)."""
    return v * (1 + 0.01 * (seed - 1))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Teacher and two students at 1 and 2 steps (teacher also at 50), three seeds each (1 %
    spread), with sample folders."""
    res = tmp_path / "results"
    samples = tmp_path / "samples"
    fd = {
        ("teacher", 1): 100.0,
        ("teacher", 2): 30.0,
        ("teacher", 50): 10.0,
        ("cdm", 1): 50.0,
        ("cdm", 2): 25.0,
        ("dmd", 1): 40.0,
        ("dmd", 2): 28.0,
    }
    acc = {
        ("teacher", 1): 0.5,
        ("teacher", 2): 0.9,
        ("teacher", 50): 0.99,
        ("cdm", 1): 0.8,
        ("cdm", 2): 0.95,
        ("dmd", 1): 0.85,
        ("dmd", 2): 0.95,
    }
    recs = []
    for t, (key, v) in enumerate(fd.items()):
        folder = make_samples(samples, f"{key[0]}-{key[1]}")
        for s in SEEDS:
            recs.append(rec(*key, "fd_digits", jitter(v, s), seed=s, t=2 * t, samples=folder))
            recs.append(
                rec(*key, "prompt_acc", jitter(acc[key], s), seed=s, t=2 * t + 1, samples=folder)
            )
    ResultStore(res).append(recs)
    return res


def _df(records: list[dict[str, Any]], tmp_path: Path) -> pd.DataFrame:
    ResultStore(tmp_path / "r").append(records)
    return load_records(tmp_path / "r")[0]


def test_pivot_order_arrows_and_values(results):
    df, warnings = load_records(results)
    table = pivot(df)
    assert warnings == []
    assert list(table.columns) == [
        "backbone",
        "method",
        "variant",
        "steps",
        "n",
        "fd_digits ↓",
        "fd_digits std",
        "fd_digits ci",
        "fd_digits n",
        "prompt_acc ↑",
        "prompt_acc std",
        "prompt_acc ci",
        "prompt_acc n",
    ]
    assert list(zip(table["method"], table["steps"], strict=True)) == [
        ("teacher", 1),
        ("teacher", 2),
        ("teacher", 50),
        ("cdm", 1),
        ("cdm", 2),
        ("dmd", 1),
        ("dmd", 2),
    ]
    row = table[(table["method"] == "dmd") & (table["steps"] == 1)].iloc[0]
    assert math.isclose(row["fd_digits ↓"], 40.0) and math.isclose(row["prompt_acc ↑"], 0.85)
    assert row["n"] == 3 and row["fd_digits n"] == 3
    assert math.isclose(row["fd_digits std"], 0.4)
    assert math.isclose(row["fd_digits ci"], 4.302653 * 0.4 / math.sqrt(3), rel_tol=1e-6)


def test_best_marked_per_step_count_not_per_column(results):
    table = pivot(load_records(results)[0])
    best = {
        (table.loc[i, "method"], int(table.loc[i, "steps"]), col) for i, col in best_cells(table)
    }
    # lowest fd at 1 step is dmd (40), at 2 steps cdm (25); teacher alone at 50: unmarked
    assert ("dmd", 1, "fd_digits ↓") in best and ("cdm", 2, "fd_digits ↓") in best
    assert not any(steps == 50 for _, steps, _ in best)
    # prompt_acc higher is better; the tie at 2 steps (overlapping intervals) marks nobody
    assert ("dmd", 1, "prompt_acc ↑") in best
    assert not {("cdm", 2, "prompt_acc ↑"), ("dmd", 2, "prompt_acc ↑")} & best
    assert ("teacher", 1, "fd_digits ↓") not in best
    md = render_markdown(table, drop=["backbone"])
    assert "| dmd (tuned) | 1 | 3 | **40.0 ± 1.0** | **0.850 ± 0.021** |" in md
    assert "| teacher | 50 | 3 | 10.0 ± 0.2 | 0.990 ± 0.025 |" in md
    assert "95 % t-interval over seeds" in md and "separated from" in md


def test_pivot_accepts_raw_store_dataframe(results):
    raw, problems = ResultStore(results).dataframe()
    assert problems == []
    assert pivot(raw).equals(pivot(load_records(results)[0]))


def test_all_tied_group_not_marked(tmp_path):
    df = _df([rec("teacher", 1, "prompt_acc", 1.0), rec("cdm", 1, "prompt_acc", 1.0)], tmp_path)
    assert best_cells(pivot(df)) == set()


def test_latest_keeps_newest_and_all_keeps_runs(tmp_path):
    df = _df(
        [
            rec("cdm", 1, "fd_digits", 60.0, t=0, run_id="cdm-old"),
            rec("cdm", 1, "fd_digits", 50.0, t=10, run_id="cdm-new"),
            rec("cdm", 1, "fd_digits", 55.0, t=5, run_id="cdm-old"),
        ],
        tmp_path,
    )
    latest = pivot(df, latest=True)
    assert len(latest) == 1 and latest["fd_digits ↓"].iloc[0] == 50.0
    every = pivot(df, latest=False)
    assert list(every["run_id"]) == ["cdm-old", "cdm-new"]  # oldest run first
    # the re-evaluation of cdm-old (seed 0) collapses to its newest value
    assert list(every["fd_digits ↓"]) == [55.0, 50.0]
    assert "seed" in every.columns


def test_seeds_mean_std(tmp_path):
    df = _df(
        [
            rec("cdm", 1, "fd_digits", 10.0, seed=0, t=1),
            rec("cdm", 1, "fd_digits", 14.0, seed=1, t=2),
            rec("cdm", 1, "fd_digits", 99.0, seed=2, t=0, run_id="older-model"),
        ],
        tmp_path,
    )
    latest = pivot(df)
    # seed 2 belongs to another (older) run: not averaged with the newest run's seeds
    assert latest["fd_digits ↓"].iloc[0] == 12.0
    assert math.isclose(latest["fd_digits std"].iloc[0], math.sqrt(8.0))
    assert latest["n"].iloc[0] == 2
    # n = 2: t_{0.975, 1} = 12.706205 times std / sqrt(2)
    assert math.isclose(latest["fd_digits ci"].iloc[0], 12.706205 * 2.0, rel_tol=1e-6)
    assert "12.00 ± 25.41" in render_markdown(latest)
    every = pivot(df, latest=False)
    summary = every[every["seed"] == SUMMARY_SEED]
    assert len(summary) == 1 and summary["fd_digits ↓"].iloc[0] == 12.0
    assert len(every) == 4 and every["seed"].iloc[-1] == SUMMARY_SEED


def test_build_report_outputs(results, tmp_path):
    out = build_report(results, tmp_path / "out", samples_per_cell=3)
    for f in out.files:
        assert f.is_file() and f.stat().st_size > 0
    assert not list((tmp_path / "out").glob(".*.tmp"))
    assert out.warnings == [] and out.n_records == 42
    md = out.markdown.read_text()
    for text in (
        "fd_digits ↓",
        "cdmbench 0.1.0",
        "abc123",
        "cpu (test)",
        "digits-abc",
        "Metric configs",
        "**25.0 ± 0.6**",
    ):
        assert text in md
    csv = pd.read_csv(out.csv)
    assert list(csv.columns) == ["backbone", "method", "variant", "steps", "n"] + [
        f"{m}{a}" for m in ("fd_digits", "prompt_acc") for a in ("", "_std", "_ci", "_n")
    ]
    assert csv["fd_digits"].dtype.kind == "f" and csv["fd_digits_ci"].dtype.kind == "f"
    assert set(csv["fd_digits_n"]) == {3}
    tex = out.latex.read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\textbf{25.0 $\\pm$ 0.6}" in tex
    assert "fd\\_digits $\\downarrow$" in tex
    page = out.html.read_text()
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.I)
    assert refs and all(r.startswith("data:") or r.startswith("#") for r in refs)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "url(" not in page
    assert "data:image/png;base64," in page
    imgs = re.findall(r"<img src='data:image/png;base64,([^']+)' alt='([^']*)'", page)
    plots = [a for _, a in imgs if "vs steps" in a]
    cells = {a: b for b, a in imgs if ", " in a}
    assert len(plots) == 2
    assert set(cells) == {
        "teacher, 1 step",
        "teacher, 2 steps",
        "teacher, 50 steps",
        "cdm, 1 step",
        "cdm, 2 steps",
        "dmd, 1 step",
        "dmd, 2 steps",
    }
    from PIL import Image

    sheet = Image.open(io.BytesIO(base64.b64decode(cells["cdm, 1 step"])))
    assert sheet.size == (3 * 48 + 2 * 2, 48)  # three 8 px samples upscaled to 48 px
    assert sheet.getpixel((0, 0)) == (0, 0, 0) and sheet.getpixel((50, 0)) == (30, 30, 30)
    assert "digit 0 (#0); digit 1 (#1); digit 0 (#2)" in page


def test_corrupt_line_is_a_warning(results, tmp_path):
    with open(results / "records.jsonl", "a") as f:
        f.write('{"metric": "fd_digits", "val\n')
    no_backbone = rec("cdm", 8, "fd_digits", 1.0)
    del no_backbone["backbone"]
    ResultStore(results).append([rec("cdm", 4, "fd_digits", 20.0, t=100), no_backbone])
    out = build_report(results, tmp_path / "out", samples_per_cell=0)
    assert any("records.jsonl:43" in w and "unreadable" in w for w in out.warnings)
    assert any("skipped: no 'backbone'" in w for w in out.warnings)
    assert "## Warnings" in out.markdown.read_text()
    assert "unreadable record" in out.html.read_text()
    assert ((out.table["method"] == "cdm") & (out.table["steps"] == 4)).any()


def test_missing_sample_folder_is_a_warning(tmp_path):
    ResultStore(tmp_path / "r").append([rec("cdm", 1, "fd_digits", 1.0, samples="/nope/x")])
    out = build_report(tmp_path / "r", tmp_path / "out")
    assert any("/nope/x" in w for w in out.warnings)
    assert out.html.is_file()


def test_filters(results, tmp_path):
    out = build_report(
        results,
        tmp_path / "o1",
        methods=["teacher", "dmd"],
        metrics=["fd_digits"],
        samples_per_cell=0,
    )
    assert set(out.table["method"]) == {"teacher", "dmd"}
    assert list(out.table.columns) == [
        "backbone",
        "method",
        "variant",
        "steps",
        "n",
        "fd_digits ↓",
        "fd_digits std",
        "fd_digits ci",
        "fd_digits n",
    ]
    out = build_report(
        results, tmp_path / "o2", backbone="digits", methods="cdm", samples_per_cell=0
    )
    assert set(out.table["method"]) == {"cdm"}
    with pytest.raises(UserError, match=r"method nope .*have: teacher, cdm, dmd"):
        build_report(results, tmp_path / "o3", methods=["cdm", "nope"])
    with pytest.raises(UserError, match="backbone sd15"):
        build_report(results, tmp_path / "o3", backbone="sd15")
    with pytest.raises(UserError, match="metric fid"):
        build_report(results, tmp_path / "o3", metrics=["fid"])
    with pytest.raises(UserError, match="no results in"):
        build_report(tmp_path / "empty", tmp_path / "o3")


def test_two_backbones_and_prompt_sets(tmp_path):
    res = tmp_path / "r"
    ResultStore(res).append(
        [
            rec("teacher", 1, "fd_digits", 5.0),
            rec("cdm", 1, "fd_digits", 4.0),
            rec("teacher", 1, "fd_digits", 7.0, prompt_set="other", t=1),
            rec("teacher", 1, "prompt_acc", 0.5, backbone="toy", t=2),
        ]
    )
    table = pivot(load_records(res)[0])
    assert "prompt_set" in table.columns and len(table) == 4
    out = build_report(res, tmp_path / "out", samples_per_cell=0)
    md = out.markdown.read_text()
    assert "## digits" in md and "## toy" in md
    assert "\\label{tab:cdmbench-toy}" in out.latex.read_text()


def test_render_rich_marks_best(results):
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(render_rich(pivot(load_records(results)[0])))
    text = console.export_text()
    assert "40.0 ± 1.0*" in text and "fd_digits ↓" in text and "10.0 ± 0.2*" not in text


def trial_line(method: str, trial: int, objective: float | None, **kw: Any) -> dict[str, Any]:
    """A sweeps.jsonl line as cdmbench.sweep.run_trial writes it."""
    line = {
        "key": f"{method}-{trial}",
        "method": method,
        "backbone": "digits",
        "seed": 0,
        "trials": 3,
        "trial": trial,
        "base": "paper",
        "params": {"lr": 0.001 * (trial + 1)},
        "variant": "paper" if trial == 0 else f"paper (lr={0.001 * (trial + 1):g})",
        "train_iters": 300,
        "train_batch": 64,
        "train_seed": 0,
        "eval_seed": 10_000,
        "per_prompt": 50,
        "steps": [1, 2, 4],
        "reference": "digits val split",
        "metric": "fd_digits",
        "fd": {"1": objective, "2": objective, "4": objective},
        "objective": objective,
        "error": None if objective is not None else "non-finite loss: x",
        "run_id": f"{method}-run-{trial}",
        "config_key": f"{method}-cfg-{trial}",
        "train_s": 50.0,
        "wall_s": 60.0,
        "versions": VERSIONS,
        "git_rev": "abc123",
        "time": f"2026-01-02T00:00:{trial:02d}+0000",
    }
    return {**line, **kw}


def test_report_shows_the_tuning_sweeps(results, tmp_path):
    lines = [trial_line("cdm", i, v) for i, v in enumerate([9.0, 7.5, None])]
    lines += [trial_line("dmd", i, v) for i, v in enumerate([8.0, 8.5, 6.25])]
    lines.append(trial_line("cdm", 0, 1.0, backbone="toy"))  # another backbone: not shown
    (results / "sweeps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = build_report(results, tmp_path / "out", backbone="digits", samples_per_cell=0)
    md = out.markdown.read_text()
    assert "### Tuning sweeps" in md
    head = (
        "| method | K | budget (iters) | best | median | worst | trial 0 | best trial's settings |"
    )
    assert head in md
    assert "| cdm | 3 (1 failed) | 300 | 7.50 | 9.00 | failed | 9.00 | lr=0.002 | 3.0 min |" in md
    assert "| dmd | 3 | 300 | 6.25 | 8.00 | 8.50 | 8.00 | lr=0.003 | 3.0 min |" in md
    assert "1.00" not in md.split("### Tuning sweeps")[1]
    assert "disjoint from the test split" in md
    page = out.html.read_text()
    assert "<h3>Tuning sweeps</h3>" in page and "<td>lr=0.003</td>" in page
    # without sweeps.jsonl there is no such section
    (results / "sweeps.jsonl").unlink()
    out = build_report(results, tmp_path / "out2", samples_per_cell=0)
    assert "Tuning sweeps" not in out.markdown.read_text()


def test_compute_runs_lists_a_run_once_with_its_raw_weights(tmp_path):
    from cdmbench.report import compute_runs
    from cdmbench.results import select

    cost = {"flops": 1e12, "iters": 100}
    ema = dict(rec("cdm", 1, "fd_digits", 5.0), train_cost=cost, run_id="cdm-abc")
    ema |= {"variant": "tuned", "train_seed": 0, "config_key": "k"}
    raw = dict(ema, run_id="cdm-abc-raw", variant="tuned, raw weights", config_key="k-raw")
    _, rows = compute_runs(select(_df([ema, raw], tmp_path)))
    assert [(r[0], r[2]) for r in rows] == [("cdm (tuned)", "cdm-abc")]
    _, rows = compute_runs(select(_df([raw], tmp_path / "raw")))  # raw weights evaluated only
    assert [(r[0], r[2]) for r in rows] == [("cdm (tuned, raw weights)", "cdm-abc")]


def test_compute_runs_show_the_data_made_before_training(tmp_path):
    from cdmbench.report import compute_runs
    from cdmbench.results import select

    data = {"teacher_samples": {"samples": 2048, "teacher_nfe": 204800, "flops": 3e11}}
    new = {"flops": 1.3e12, "train_flops": 1e12, "data": data, "iters": 100}
    old = {"flops": 1e12, "iters": 100}  # recorded before data was counted
    recs = []
    for m, cost in (("dmd", new), ("cdm", old)):
        r = dict(rec(m, 1, "fd_digits", 5.0), train_cost=cost, run_id=f"{m}-abc")
        recs.append(r | {"variant": "tuned", "train_seed": 0, "config_key": "k"})
    heads, rows = compute_runs(select(_df(recs, tmp_path)))
    col, flops = heads.index("data FLOPs"), heads.index("FLOPs")
    by_model = {r[0]: r for r in rows}
    assert by_model["dmd (tuned)"][col] == "3e+11" and by_model["dmd (tuned)"][flops] == "1.3e+12"
    assert by_model["cdm (tuned)"][col] == "–"


def test_plots_show_each_cell_on_its_newest_prompt_set(tmp_path):
    from cdmbench.report import _series

    recs = [
        rec("cdm", 1, "fd_digits", 4.0, prompt_set="a-new", t=5),
        rec("cdm", 1, "fd_digits", 9.0, prompt_set="b-old", t=1),
    ]
    table = pivot(_df(recs, tmp_path))
    assert list(table["prompt_set"]) == ["a-new", "b-old"]  # rows in name order
    series = _series(table, "fd_digits ↓")
    assert series["cdm (tuned)"]["mean"].tolist() == [4.0]


def test_compute_matched_takes_matched_runs_also_of_raw_weights(tmp_path):
    """`bench --match-compute` runs (variant "..., compute-matched") are budgets of their base
    model; evaluated with raw weights too, they stay budgets of the raw-weights model."""
    from cdmbench.report import compute_matched

    def r(method, variant, key, flops, value, run):
        out = dict(rec(method, 1, "fd_digits", value), run_id=run)
        return out | {
            "variant": variant,
            "train_seed": 0,
            "config_key": key,
            "train_cost": {"flops": flops, "iters": 10},
        }

    recs = [
        r("cd", "tuned", "c", 1e12, 5.0, "cd-a"),
        r("dmd2", "tuned", "d", 2e12, 7.0, "dmd2-a"),
        r("dmd2", "tuned, raw weights", "d-raw", 2e12, 9.0, "dmd2-a-raw"),
        r("dmd2", "tuned, compute-matched", "m", 1e12, 8.0, "dmd2-b"),
        r("dmd2", "tuned, compute-matched, raw weights", "m-raw", 1e12, 11.0, "dmd2-b-raw"),
    ]
    out = compute_matched(_df(recs, tmp_path), "fd_digits")
    assert not isinstance(out, str), out
    headers, rows, caption = out
    assert "target: 1e+12" in caption  # the cheapest full budget, not a matched run's
    by_model = {row[0]: row for row in rows}
    assert set(by_model) == {"cd (tuned)", "dmd2 (tuned)", "dmd2 (tuned, raw weights)"}
    assert by_model["dmd2 (tuned)"][3].startswith("8.0")  # the matched run's value
    assert by_model["dmd2 (tuned, raw weights)"][3].startswith("11.0")
