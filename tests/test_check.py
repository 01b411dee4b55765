"""Regression check: baseline round trip, tolerances, directions, missing rows, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cdmbench.check import check, parse_tolerance, read_baseline, write_baseline
from cdmbench.errors import UserError
from cdmbench.results import ResultStore

BASE = {
    ("teacher", 1, "fd_digits"): 100.0,
    ("teacher", 1, "prompt_acc"): 0.90,
    ("cdm", 1, "fd_digits"): 40.0,
    ("cdm", 1, "prompt_acc"): 0.80,
    ("cdm", 2, "fd_digits"): 20.0,
    ("cdm", 2, "prompt_acc"): 0.95,
    ("cdm", 1, "latency_ms"): 3.0,
}
HIB = {"fd_digits": False, "prompt_acc": True, "latency_ms": False}


def recs(
    values: dict[tuple[str, int, str], float],
    t: int = 0,
    backbone: str = "digits",
    hib: dict[str, bool] = HIB,
) -> list[dict[str, Any]]:
    return [
        {
            "run_id": f"{m}-run",
            "backbone": backbone,
            "method": m,
            "steps": s,
            "metric": k,
            "value": v,
            "higher_is_better": hib[k],
            "prompt_set": "digits",
            "seed": 0,
            "time": f"2026-01-01T00:00:{t:02d}+0000",
            "n_samples": 10,
        }
        for (m, s, k), v in values.items()
    ]


def results_dir(
    tmp: Path, name: str, values: dict[tuple[str, int, str], float], hib: dict[str, bool] = HIB
) -> Path:
    ResultStore(tmp / name).append(recs(values, hib=hib))
    return tmp / name


@pytest.fixture
def baseline(tmp_path: Path) -> Path:
    path = tmp_path / "baseline.csv"
    rows = write_baseline(results_dir(tmp_path, "base", BASE), path, "digits")
    assert len(rows) == len(BASE)
    return path


def changed(**kw: float) -> dict[tuple[str, int, str], float]:
    """BASE with cdm @ 1 step metrics replaced."""
    return {**BASE, **{("cdm", 1, k): v for k, v in kw.items()}}


def verdict(result, method: str = "cdm", steps: int = 1, metric: str = "fd_digits") -> str:
    return next(
        r.verdict for r in result.rows if (r.method, r.steps, r.metric) == (method, steps, metric)
    )


def test_baseline_file_format(baseline):
    df = pd.read_csv(baseline, keep_default_na=False)
    assert list(df.columns) == [
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
    assert (df["tolerance"] == "").all() and (df["n"] == 1).all() and (df["std"] == "").all()
    assert df.iloc[0][["method", "steps"]].tolist() == ["teacher", 1]  # teacher first
    assert len(read_baseline(baseline)) == len(BASE)


def test_unchanged_rerun_passes(baseline, tmp_path):
    res = tmp_path / "base"
    ResultStore(res).append(recs(BASE, t=30))  # a rerun with identical numbers, newer
    result = check(res, baseline)
    assert result.exit_code == 0
    assert {r.verdict for r in result.rows} == {"ok", "skipped"}
    assert verdict(result, metric="latency_ms") == "skipped"  # machine-dependent by default
    assert result.summary().startswith("check passed")


def test_degraded_beyond_tolerance_fails(baseline, tmp_path):
    res = results_dir(tmp_path, "worse", changed(fd_digits=48.0))  # 20% worse, default 15%
    result = check(res, baseline)
    assert result.exit_code == 1 and verdict(result) == "REGRESSION"
    assert [(r.method, r.steps, r.metric) for r in result.failures] == [("cdm", 1, "fd_digits")]
    row = result.failures[0]
    assert row.baseline == 40.0 and row.now == 48.0 and row.change == 8.0
    assert row.change_pct == pytest.approx(20.0) and row.tolerance == "15%"
    assert "FAILED" in result.summary()


def test_degraded_within_tolerance_passes(baseline, tmp_path):
    res = results_dir(tmp_path, "bitworse", changed(fd_digits=44.0, prompt_acc=0.79))
    result = check(res, baseline)
    assert result.exit_code == 0
    assert verdict(result) == "ok" and verdict(result, metric="prompt_acc") == "ok"


def test_direction_respected(baseline, tmp_path):
    up = check(results_dir(tmp_path, "up", changed(prompt_acc=0.90, fd_digits=30.0)), baseline)
    assert verdict(up, metric="prompt_acc") == "better" and verdict(up) == "better"
    assert up.exit_code == 0
    down = check(results_dir(tmp_path, "down", changed(prompt_acc=0.70)), baseline)
    assert verdict(down, metric="prompt_acc") == "REGRESSION" and down.exit_code == 1


def test_parse_tolerance():
    rel, ab = parse_tolerance("10%"), parse_tolerance("0.5")
    assert rel.relative and rel.amount == pytest.approx(0.10) and rel.allowed(-40) == 4.0
    assert not ab.relative and ab.amount == 0.5 and ab.allowed(1000.0) == 0.5
    assert parse_tolerance(" 2.5 % ").allowed(100) == pytest.approx(2.5)
    assert str(rel) == "10%" and str(ab) == "0.5" and parse_tolerance(0.1).amount == 0.1
    for bad in ("abc", "-1", "", "%", "nan", "5%%"):
        with pytest.raises(UserError, match="bad tolerance"):
            parse_tolerance(bad)


def test_caller_and_row_tolerances(baseline, tmp_path):
    res = results_dir(tmp_path, "plus1", changed(fd_digits=41.0, latency_ms=3.5))
    assert verdict(check(res, baseline)) == "ok"  # default 15% of 40 = 6
    assert verdict(check(res, baseline, {"fd_digits": "0.5"})) == "REGRESSION"  # absolute
    assert verdict(check(res, baseline, {"fd_digits": "2%"})) == "REGRESSION"  # 0.8 < 1
    assert verdict(check(res, baseline, {"fd_digits": "3%"})) == "ok"  # 1.2 >= 1
    assert verdict(check(res, baseline, {"fd_digits": 1.5})) == "ok"
    # latency is checked once a tolerance is given: 3.0 -> 3.5 ms
    assert verdict(check(res, baseline, {"latency_ms": "10%"}), metric="latency_ms") == "REGRESSION"
    assert verdict(check(res, baseline, {"latency_ms": "1.0"}), metric="latency_ms") == "ok"
    # a per-row tolerance in the file overrides the default; the caller's overrides the row
    df = pd.read_csv(baseline, keep_default_na=False)
    df.loc[
        (df["method"] == "cdm") & (df["steps"] == 1) & (df["metric"] == "fd_digits"), "tolerance"
    ] = "0.1"
    df.loc[df["metric"] == "latency_ms", "tolerance"] = "20%"
    df.to_csv(baseline, index=False)
    row_tol = check(res, baseline)
    assert verdict(row_tol) == "REGRESSION" and verdict(row_tol, metric="latency_ms") == "ok"
    assert verdict(check(res, baseline, {"fd_digits": "10%"})) == "ok"


def test_missing_rows_fail(baseline, tmp_path):
    values = {k: v for k, v in BASE.items() if k != ("cdm", 2, "prompt_acc")}
    result = check(results_dir(tmp_path, "partial", values), baseline)
    assert verdict(result, steps=2, metric="prompt_acc") == "missing"
    assert result.exit_code == 1
    empty = check(tmp_path / "nothing", baseline)
    assert empty.exit_code == 1 and any("no readable results" in w for w in empty.warnings)
    assert {r.verdict for r in empty.rows} == {"missing", "skipped"}


def test_new_rows_reported_not_failing(baseline, tmp_path):
    values = {**BASE, ("cdm", 4, "fd_digits"): 15.0}
    result = check(results_dir(tmp_path, "more", values), baseline)
    assert verdict(result, steps=4) == "new" and result.exit_code == 0


def test_non_finite_value_is_a_regression(baseline, tmp_path):
    result = check(results_dir(tmp_path, "nan", changed(fd_digits=float("nan"))), baseline)
    assert verdict(result) == "REGRESSION" and result.exit_code == 1


def test_backbone_filter(tmp_path):
    res = tmp_path / "two"
    ResultStore(res).append(recs(BASE) + recs({("teacher", 1, "fd_digits"): 9.0}, backbone="toy"))
    path = tmp_path / "all.csv"
    write_baseline(res, path)
    assert set(pd.read_csv(path)["backbone"]) == {"digits", "toy"}
    assert {r.backbone for r in check(res, path, backbone="toy").rows} == {"toy"}
    with pytest.raises(UserError, match=r"no rows for backbone sd15 \(it has: digits, toy\)"):
        check(res, path, backbone="sd15")
    with pytest.raises(UserError, match="no results for backbone sd15"):
        write_baseline(res, tmp_path / "x.csv", "sd15")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("", "cannot read baseline"),
        ('backbone,method,steps,metric,value\n"digits,cdm,1\n', "cannot read baseline"),
        ("backbone,method,value\ndigits,cdm,1\n", "lacks column"),
        ("backbone,method,steps,metric,value\n", "no rows"),
        ("backbone,method,steps,metric,value\ndigits,cdm,one,fd_digits,1\n", "bad steps"),
        ("backbone,method,steps,metric,value\ndigits,cdm,1,fd_digits,x\n", "bad value"),
        (
            "backbone,method,steps,metric,value,tolerance\ndigits,cdm,1,fd_digits,1,lots\n",
            "bad tolerance",
        ),
        (
            "backbone,method,steps,metric,value,higher_is_better\ndigits,cdm,1,fd_digits,1,maybe\n",
            "bad higher_is_better",
        ),
        (
            "backbone,method,steps,metric,value\ndigits,cdm,1,fd_digits,1\ndigits,cdm,1,fd_digits,2\n",
            "duplicate of line 2",
        ),
    ],
)
def test_bad_baseline_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "b.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message) as e:
        check(results_dir(tmp_path, "r", BASE), path)
    assert "\n" not in str(e.value)


def test_bad_caller_tolerance_is_a_user_error(baseline, tmp_path):
    with pytest.raises(UserError, match="bad tolerance"):
        check(results_dir(tmp_path, "r", BASE), baseline, {"fd_digits": "ten"})


def test_direction_from_defaults_when_column_absent(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("backbone,method,steps,metric,value\ndigits,cdm,1,fd_digits,40\n")
    result = check(results_dir(tmp_path, "r", changed(fd_digits=30.0)), path)
    assert verdict(result) == "better"


def test_render_rich(baseline, tmp_path):
    from rich.console import Console

    result = check(results_dir(tmp_path, "worse", changed(fd_digits=48.0)), baseline)
    console = Console(record=True, width=160)
    console.print(result.render_rich())
    text = console.export_text()
    assert "REGRESSION" in text and "+8.000 (+20.0%)" in text and "fd_digits ↓" in text
    console.print(result.render_rich(only_changes=True))


# ------------------------------------------------------------ tolerances the metrics declare
DECLARED = {
    "fd_digits": "15%",
    "fid": "10%",
    "prompt_acc": "0.02",
    "precision": "0.05",
    "recall": "0.05",
    "clip_score": "1.0",
    "image_reward": "0.1",
}
TIMINGS = ("latency_ms", "latency_p90_ms", "denoiser_ms", "latency_batch_ms", "compile_s")


def test_default_tolerances_are_the_metrics_declarations():
    from cdmbench.check import FALLBACK_TOLERANCE, default_tolerance
    from cdmbench.metrics.base import value_spec

    for name, tol in DECLARED.items():
        assert default_tolerance(name) == tol, name
        assert not value_spec(name).machine_dependent
    for name in TIMINGS:
        spec = value_spec(name)
        assert default_tolerance(name) is None and spec.machine_dependent
        assert spec.higher_is_better is False
    # a value no registered metric declares: the fallback, whatever its name looks like
    assert default_tolerance("sharpness_ms") == FALLBACK_TOLERANCE == "10%"
    assert value_spec("sharpness_ms") is None
    assert value_spec("sharpness_ms", higher_is_better=True).higher_is_better is True


def test_undeclared_metric_uses_the_stored_direction_and_the_fallback(tmp_path):
    hib = {"sharpness": True}  # a third-party metric's value: only the records know it
    path = tmp_path / "b.csv"
    write_baseline(results_dir(tmp_path, "base", {("cdm", 1, "sharpness"): 10.0}, hib), path)
    assert read_baseline(path)["higher_is_better"].tolist() == [True]
    worse = check(results_dir(tmp_path, "worse", {("cdm", 1, "sharpness"): 8.9}, hib), path)
    ok = check(results_dir(tmp_path, "ok", {("cdm", 1, "sharpness"): 9.1}, hib), path)
    assert verdict(worse, metric="sharpness") == "REGRESSION"  # 11% lower, 10% allowed
    assert verdict(ok, metric="sharpness") == "ok"
    assert worse.rows[0].tolerance == "10%"


def test_check_help_lists_the_declared_tolerances(capsys):
    from cdmbench.cli import main

    try:
        main(["check", "--help"])
    except SystemExit as e:
        assert e.code in (0, None)
    text = " ".join(capsys.readouterr().out.split())
    for name, tol in DECLARED.items():
        assert f"{name} {tol}" in text or f"{name}, " in text, name
    assert "precision, recall 0.05" in text and "any other value 10%" in text
    assert "{tolerances}" not in text
    assert all(t in text for t in TIMINGS)


def test_check_uses_only_public_names_of_report():
    import ast

    import cdmbench.check

    tree = ast.parse(Path(cdmbench.check.__file__).read_text())
    private = [
        a.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for a in node.names
        if a.name.startswith("_")
    ]
    assert private == []


# ------------------------------------------------------------------ seeds and variants
def seeded(
    tmp: Path, name: str, values: dict[int, float], variant: str = "tuned", t: int = 0
) -> Path:
    """cdm @ 1 step fd_digits of one configuration at several training seeds (seed -> value)."""
    out = []
    for seed, v in values.items():
        r = recs({("cdm", 1, "fd_digits"): v}, t=t)[0]
        r.update(
            run_id=f"cdm-{variant}-{seed}",
            seed=seed,
            train_seed=seed,
            variant=variant,
            config_key=f"cfg-{variant}",
        )
        out.append(r)
    ResultStore(tmp / name).append(out)
    return tmp / name


def test_baseline_carries_seeds_and_spread_widens_the_tolerance(tmp_path):
    base_dir = seeded(tmp_path, "base", {0: 38.0, 1: 40.0, 2: 42.0})
    path = tmp_path / "b.csv"
    rows = write_baseline(base_dir, path)
    assert rows[["variant", "n"]].values.tolist() == [["tuned", 3]]
    assert rows["std"].iloc[0] == pytest.approx(2.0)
    b = read_baseline(path).iloc[0]
    assert (b["variant"], b["n"], b["std"]) == ("tuned", 3, pytest.approx(2.0))
    # mean 48 vs 40 (+20 %): 2 SE = 2 sqrt(4/3 + 4/3) = 3.27 is below the 15 % tolerance (6.0),
    # which applies: a regression
    worse = seeded(tmp_path, "worse", {0: 46.0, 1: 48.0, 2: 50.0})
    assert verdict(check(worse, path)) == "REGRESSION"
    # a noisy current run: std 10, n 3 -> 2 SE = 2 sqrt(4/3 + 100/3) = 11.8 > 6.0 tolerance
    noisy = seeded(tmp_path, "noisy", {0: 38.0, 1: 48.0, 2: 58.0})
    res = check(noisy, path)
    row = next(r for r in res.rows if r.metric == "fd_digits")
    assert row.verdict == "ok" and row.tolerance.endswith("(2 SE)") and row.n_now == 3
    assert float(row.tolerance.split()[0]) == pytest.approx(2 * (4 / 3 + 100 / 3) ** 0.5, 1e-3)
    assert verdict(check(noisy, path, spread_k=0)) == "REGRESSION"  # off: the 15 % applies
    with pytest.raises(UserError, match="spread k"):
        check(noisy, path, spread_k=-1)


def test_variants_are_separate_cells_and_an_old_baseline_matches_tuned(tmp_path):
    res = seeded(tmp_path, "r", {0: 40.0, 1: 40.0}, variant="tuned")
    ResultStore(res).append(
        ResultStore(seeded(tmp_path, "p", {0: 90.0, 1: 90.0}, variant="paper")).read().records
    )
    path = tmp_path / "b.csv"
    write_baseline(res, path)
    result = check(res, path)
    assert {(r.variant, r.verdict) for r in result.rows} == {("tuned", "ok"), ("paper", "ok")}
    # a baseline written before variants: its cdm row is compared with the tuned cell
    old = tmp_path / "old.csv"
    old.write_text("backbone,method,steps,metric,value\ndigits,cdm,1,fd_digits,40.0\n")
    rows = check(res, old).rows
    assert [(r.variant, r.verdict) for r in rows if r.baseline is not None] == [("tuned", "ok")]
    assert [(r.variant, r.verdict) for r in rows if r.baseline is None] == [("paper", "new")]


@pytest.mark.parametrize("col, bad", [("n", "0"), ("std", "-1")])
def test_bad_seed_columns_are_user_errors(tmp_path, col, bad):
    path = tmp_path / "b.csv"
    path.write_text(f"backbone,method,steps,metric,value,{col}\ndigits,cdm,1,fd_digits,1.0,{bad}\n")
    with pytest.raises(UserError, match=f"bad {col}"):
        read_baseline(path)


def test_a_diverged_seed_is_a_regression(tmp_path):
    base_dir = seeded(tmp_path, "base", {0: 38.0, 1: 40.0, 2: 42.0})
    path = tmp_path / "b.csv"
    write_baseline(base_dir, path)
    # seeds 0 and 2 as before, seed 1 diverged: not the mean of the other two
    for bad in (float("nan"), float("inf")):
        now = seeded(tmp_path, f"now-{bad}", {0: 38.0, 1: bad, 2: 42.0})
        row = next(r for r in check(now, path).rows if r.metric == "fd_digits")
        assert row.verdict == "REGRESSION" and row.note == "current value is not finite"
        assert row.n_now == 3


def test_records_before_variants_are_superseded_by_the_new_cell(tmp_path):
    res = tmp_path / "r"
    ResultStore(res).append(recs({("cdm", 1, "fd_digits"): 40.0}))  # no variant: old style
    old = tmp_path / "old.csv"
    old.write_text("backbone,method,steps,metric,value\ndigits,cdm,1,fd_digits,40.0\n")
    assert [(r.variant, r.verdict) for r in check(res, old).rows] == [("tuned", "ok")]
    # a newer tuned configuration that regressed: compared, not "new" beside a stale cell
    ResultStore(res).append(ResultStore(seeded(tmp_path, "n", {0: 60.0}, t=30)).read().records)
    rows = check(res, old).rows
    assert [(r.variant, r.verdict, r.now) for r in rows] == [("tuned", "REGRESSION", 60.0)]


def test_an_old_baseline_row_takes_the_default_variant(tmp_path):
    res = seeded(tmp_path, "r", {0: 40.0}, variant="tuned")
    ResultStore(res).append(ResultStore(seeded(tmp_path, "p", {0: 90.0}, "paper")).read().records)
    for r in ResultStore(res).read().records:
        r["backbone"] = "other"  # cdm has no tuned settings there: paper is its default
        ResultStore(tmp_path / "o").append([r])
    old = tmp_path / "old.csv"
    old.write_text("backbone,method,steps,metric,value\nother,cdm,1,fd_digits,90.0\n")
    rows = check(tmp_path / "o", old).rows
    assert {(r.variant, r.verdict) for r in rows} == {("paper", "ok"), ("tuned", "new")}


def test_two_baseline_rows_never_claim_one_cell_silently(tmp_path):
    res = seeded(tmp_path, "r", {0: 40.0}, variant="tuned")
    both = tmp_path / "both.csv"
    both.write_text(
        "backbone,method,variant,steps,metric,value\n"
        "digits,cdm,,1,fd_digits,40.0\n"
        "digits,cdm,tuned,1,fd_digits,41.0\n"
    )
    result = check(res, both)
    got = sorted((r.variant, r.verdict, r.baseline) for r in result.rows)
    assert got == [("", "missing", 40.0), ("tuned", "ok", 41.0)]
    row = next(r for r in result.rows if r.verdict == "missing")
    assert "compared with line 3" in row.note and "give this row a variant" in row.note
    assert any(f"{both}:2:" in w and "line 3" in w for w in result.warnings)
