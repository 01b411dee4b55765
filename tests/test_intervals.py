"""Seeds in the results: t-intervals, selection of a cell's configuration and seeds, best marks
only where intervals separate, compute views from the records' training cost."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from cdmbench.report import best_cells, build_report, pivot, render_markdown, separated_best
from cdmbench.results import ResultStore, cell_stats, latest_values, load_records, t_interval


def rec(
    method: str,
    value: float,
    *,
    seed: int = 0,
    steps: int = 1,
    metric: str = "fd_digits",
    variant: str = "tuned",
    config: str = "cfg",
    t: int = 0,
    cost: dict[str, Any] | None = None,
    guidance: float = 1.0,
) -> dict[str, Any]:
    teacher = method == "teacher"
    return {
        "run_id": f"{method}-{variant}-{config}-{seed}" if not teacher else "teacher-x",
        "backbone": "digits",
        "method": method,
        "variant": "" if teacher else variant,
        "train_seed": None if teacher else seed,
        "config_key": "teacher-x" if teacher else f"{method}-{variant}-{config}",
        "train_cost": cost or {},
        "steps": steps,
        "guidance": guidance,
        "metric": metric,
        "value": value,
        "higher_is_better": metric != "fd_digits" and metric != "latency_ms",
        "prompt_set": "digits-abc",
        "seed": seed,
        "time": f"2026-01-01T00:{t // 60:02d}:{t % 60:02d}+0000",
    }


def store(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    ResultStore(tmp_path / "r").append(records)
    return tmp_path / "r"


def frame(tmp_path: Path, records: list[dict[str, Any]]):
    return load_records(store(tmp_path, records))[0]


def test_t_interval_matches_hand_computed_values():
    mean, ci, n = t_interval([1.0, 2.0, 3.0])
    # std 1, n 3: t_{0.975, 2} = 4.302653
    assert (mean, n) == (2.0, 3) and ci == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    mean, ci, n = t_interval([10.0, 14.0])
    assert ci == pytest.approx(12.706205 * 2.0, rel=1e-6)  # t_{0.975, 1} x std / sqrt(2)
    mean, ci, n = t_interval([5.0])
    assert (mean, n) == (5.0, 1) and math.isnan(ci)  # one sample: no interval
    # a diverged sample is counted, never dropped: the mean is not finite, no interval
    mean, ci, n = t_interval([5.0, math.nan])
    assert math.isnan(mean) and math.isnan(ci) and n == 2
    mean, ci, n = t_interval([5.0, 6.0, math.inf])
    assert mean == math.inf and math.isnan(ci) and n == 3


def test_a_diverged_seed_makes_its_cell_non_finite(tmp_path):
    recs = three("cdm", 10.0, 1.0)
    recs[1]["value"] = math.nan  # seed 1 diverged
    st = cell_stats(frame(tmp_path, recs)).iloc[0]
    assert math.isnan(st["mean"]) and math.isnan(st["ci"]) and math.isnan(st["std"])
    assert st["n"] == 3
    assert math.isnan(latest_values(frame(tmp_path / "b", recs))["value"].iloc[0])
    recs[1]["value"] = math.inf
    st = cell_stats(frame(tmp_path / "c", recs)).iloc[0]
    assert st["mean"] == math.inf and math.isnan(st["ci"]) and st["n"] == 3
    # the report shows the cell as not finite, not as the mean of the other seeds
    md = render_markdown(pivot(frame(tmp_path / "d", recs)))
    assert "| digits | cdm (tuned) | 1 | 3 | inf |" in md


def test_training_seeds_of_one_config_aggregate_and_a_newer_config_replaces(tmp_path):
    df = frame(
        tmp_path,
        [
            rec("cdm", 99.0, seed=0, config="old", t=0),
            rec("cdm", 10.0, seed=0, config="new", t=1),
            rec("cdm", 12.0, seed=1, config="new", t=2),
            rec("cdm", 14.0, seed=2, config="new", t=3),
            rec("cdm", 50.0, seed=0, variant="paper", config="p", t=4),
        ],
    )
    st = cell_stats(df)
    tuned = st[st["variant"] == "tuned"].iloc[0]
    assert (tuned["mean"], tuned["n"], tuned["config_key"]) == (12.0, 3, "cdm-tuned-new")
    assert tuned["std"] == pytest.approx(2.0)
    assert tuned["ci"] == pytest.approx(4.302653 * 2.0 / math.sqrt(3), rel=1e-6)
    assert tuned["lo"] == pytest.approx(12.0 - tuned["ci"])
    # the variants are separate rows; the old config of tuned is gone
    assert sorted(st["variant"]) == ["paper", "tuned"]
    assert set(latest_values(df)["value"]) == {12.0, 50.0}
    # every configuration on request (for budgets compared at matched compute)
    allc = cell_stats(df, all_configs=True)
    assert sorted(allc["config_key"]) == ["cdm-paper-p", "cdm-tuned-new", "cdm-tuned-old"]
    table = pivot(df)
    assert list(zip(table["method"], table["variant"], table["n"], strict=True)) == [
        ("cdm", "paper", 1),
        ("cdm", "tuned", 3),
    ]
    md = render_markdown(table)
    assert "| digits | cdm (tuned) | 1 | 3 | **12.00 ± 4.97** |" in md  # the paper point is outside
    assert "| digits | cdm (paper) | 1 | 1 | 50.00 |" in md


def test_training_and_eval_seeds_are_samples_and_reevaluations_collapse(tmp_path):
    recs = [rec("cdm", 10.0, seed=0, t=0), rec("cdm", 20.0, seed=0, t=1)]  # re-evaluated
    r = rec("cdm", 30.0, seed=0, t=2)
    r["seed"] = 1  # training seed 0 at evaluation seed 1: another sample
    st = cell_stats(frame(tmp_path, recs + [r]))
    assert (st["mean"].iloc[0], st["n"].iloc[0]) == (25.0, 2)


def old_style(r: dict[str, Any]) -> dict[str, Any]:
    """``r`` as written before variants, training seeds, configurations and costs."""
    return {k: v for k, v in r.items() if k not in ("variant", "train_seed", "config_key")}


def test_old_records_without_variant_or_seeds_still_load(tmp_path):
    old = old_style(rec("cdm", 10.0))
    del old["train_cost"]
    newer = dict(old, run_id="cdm-other", value=20.0, time="2026-01-01T00:00:09+0000")
    df = frame(tmp_path, [old, newer])
    # cdm has tuned settings for digits: its default variant
    assert df["variant"].iloc[0] == "tuned" and df["train_seed"].iloc[0] == "0"
    assert df["config_key"].iloc[0] == "cdm-tuned-cfg-0" and df["train_cost"].iloc[0] == {}
    st = cell_stats(df)  # one run = one configuration: the newer run replaces the older
    assert (st["mean"].iloc[0], st["n"].iloc[0]) == (20.0, 1)


def test_old_records_take_their_methods_default_variant(tmp_path):
    other = dict(old_style(rec("cdm", 1.0)), backbone="other")  # no tuned settings there
    unknown = old_style(rec("nosuchmethod", 2.0))  # not registered: tuned
    teacher = old_style(rec("teacher", 3.0))
    df = frame(tmp_path, [other, unknown, teacher])
    got = dict(zip(df["method"] + "@" + df["backbone"], df["variant"], strict=True))
    assert got == {"cdm@other": "paper", "nosuchmethod@digits": "tuned", "teacher@digits": ""}


def test_a_newer_config_supersedes_a_record_written_before_variants(tmp_path):
    old = old_style(rec("cdm", 99.0, t=0))
    new = three("cdm", 10.0, 1.0, t=5)
    st = cell_stats(frame(tmp_path, [old, *new]))
    # one cell, the tuned one: the stale record is not a row of its own
    assert list(zip(st["variant"], st["mean"], st["n"], strict=True)) == [("tuned", 10.0, 3)]
    assert list(pivot(frame(tmp_path / "b", [old, *new]))["variant"]) == ["tuned"]


def test_old_and_new_teacher_records_of_one_evaluation_are_one_sample(tmp_path):
    new = rec("teacher", 30.0, seed=4, t=5)  # train_seed None
    old = old_style(rec("teacher", 30.0, seed=4))
    df = frame(tmp_path, [old, new])
    assert list(df["train_seed"]) == ["", ""]
    st = cell_stats(df).iloc[0]
    assert (st["mean"], st["n"]) == (30.0, 1)


def three(method: str, centre: float, spread: float, **kw: Any) -> list[dict[str, Any]]:
    return [rec(method, centre + spread * (s - 1), seed=s, **kw) for s in range(3)]


def test_overlapping_intervals_mark_no_best_and_separated_ones_do(tmp_path):
    # fd (lower is better): cdm 10 ± 4.3, dmd 12 ± 4.3 overlap
    overlap = pivot(frame(tmp_path / "a", three("cdm", 10.0, 1.0) + three("dmd", 12.0, 1.0)))
    assert best_cells(overlap) == set()
    assert "**" not in render_markdown(overlap)
    # cdm 10 ± 0.43, dmd 12 ± 0.43: separated, cdm marked
    sep = pivot(frame(tmp_path / "b", three("cdm", 10.0, 0.1) + three("dmd", 12.0, 0.1)))
    marked = {(sep.loc[i, "method"], c) for i, c in best_cells(sep)}
    assert marked == {("cdm", "fd_digits ↓")}
    assert "| cdm (tuned) | 1 | 3 | **10.00 ± 0.25** |" in render_markdown(sep)


def test_a_single_seed_best_is_never_marked():
    # the best has no interval: not marked, however far ahead
    assert separated_best([1.0, 9.0], [math.nan, 0.1], [1, 3], higher_is_better=False) is None
    # another value with one seed counts as a point outside the best's interval: marked
    assert separated_best([1.0, 9.0], [0.1, math.nan], [3, 1], higher_is_better=False) == 0
    # a third model whose wide interval reaches the best: a tie
    assert separated_best([1.0, 2.0, 5.0], [0.1, 0.1, 4.5], [3, 3, 3], False) is None
    assert separated_best([0.9, 0.5], [0.05, 0.05], [3, 3], higher_is_better=True) == 0


COST = {
    "flops": 2.0e12,
    "wall_s": 100.0,
    "images": 6400,
    "teacher_nfe": 12800,
    "forward": {"teacher": 200, "student": 100},
    "backward": {"student": 100},
    "iters": 100,
    "world": 1,
}


def test_report_compute_views(tmp_path):
    cheap = dict(COST, flops=1.0e12)
    recs = (
        three("teacher", 30.0, 1.0, guidance=2.0)
        + three("cdm", 10.0, 0.5, cost=COST)
        + three("dmd", 12.0, 0.5, cost=cheap)
        + three("cdm", 3.0, 0.5, metric="latency_ms", cost=COST)
        + three("cdm", 6.0, 0.5, steps=2, cost=COST)
    )
    out = build_report(store(tmp_path, recs), tmp_path / "out", samples_per_cell=0)
    md = out.markdown.read_text()
    # each run's cost
    assert "| cdm (tuned) | 0 | cdm-tuned-cfg-0 | 100 | 6400 | 12800 | 2e+12 | – | 100 |" in md
    assert "| student 100, teacher 200 | student 100 |" in md
    # the frontier: the teacher runs CFG (guidance 2): 2 NFE per step; cdm's latency shown
    assert "| model | steps | NFE / sample | latency_ms ↓ | fd_digits ↓ |" in md
    assert "| teacher | 1 | 2 | – | 30.00 ± 2.48 (n=3) |" in md
    assert "| cdm (tuned) | 1 | 1 | 3.000 ± 1.242 (n=3) | 10.00 ± 1.24 (n=3) |" in md
    # one budget per method: no compute-matched table, and the report says how to get one
    assert "no run of cdm (tuned) near 1e+12 FLOPs" in md
    assert "compute-matched table needs runs at matched budgets" in md
    page = out.html.read_text()
    assert "vs training FLOPs" in page and "speed-quality frontier" in page
    # a cdm run at the cheaper budget (older configuration) makes the matched table
    recs += three("cdm", 11.0, 0.5, config="short", cost=dict(COST, flops=1.05e12), t=-1)
    for r in recs[-3:]:
        r["time"] = "2025-12-31T00:00:00+0000"
    out = build_report(store(tmp_path / "m", recs), tmp_path / "out2", samples_per_cell=0)
    md = out.markdown.read_text()
    assert "target: 1e+12 FLOPs" in md
    assert "| cdm (tuned) | 1.05e+12 | 1.05 | 11.00 ± 1.24 (n=3) | – |" in md
    assert "| dmd (tuned) | 1e+12 | 1.00 | 12.00 ± 1.24 (n=3) | – |" in md
