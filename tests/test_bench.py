"""`cdmbench bench` end to end on a tiny budget, then report and check on its results."""

from __future__ import annotations

import csv

import pytest

from cdmbench.bench import BenchConfig, parse_seeds, parse_variants, units
from cdmbench.cli import main
from cdmbench.errors import UserError


def _main(*argv: str) -> int:
    try:
        main(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def test_bench_report_check(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "bench",
        "--methods",
        "dmd2,cd",
        "--iters",
        "6",
        "--num-samples",
        "3",
        "--steps",
        "1,2",
        "--metrics",
        "fd_digits,prompt_acc",
        "--set",
        "backbone.eval_batch=7",
    ]  # a backbone setting that changes no result
    assert _main(*args) == 0
    html = (tmp_path / "results" / "report.html").read_text()
    assert "data:image/png;base64" in html and "dmd2" in html
    for f in ("report.md", "report.csv", "report.tex"):
        assert (tmp_path / "results" / f).is_file()
    n_records = len((tmp_path / "results" / "records.jsonl").read_text().splitlines())
    assert (
        n_records == 2 * 3 * 2 + 2
    )  # (teacher, dmd2, cd) x (1, 2) x 2 metrics + teacher at 50 steps

    capsys.readouterr()
    assert _main(*args) == 0  # second run reuses every stage
    assert "nothing new: every result of this bench was already recorded" in capsys.readouterr().out

    base = tmp_path / "baseline.csv"
    assert _main("check", "--write-baseline", "--baseline", str(base)) == 0
    assert _main("check", "--baseline", str(base)) == 0
    rows = list(csv.DictReader(base.open()))
    for r in rows:  # degrade every FD by 30%: a regression beyond the 15% default
        if r["metric"] == "fd_digits":
            r["value"] = str(float(r["value"]) / 1.3)
    with base.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert _main("check", "--baseline", str(base)) == 1


def test_seed_and_variant_lists():
    assert parse_seeds("0, 1,2") == (0, 1, 2) and parse_seeds("7") == (7,)
    for bad, why in (
        ("", "bad seed list"),
        ("0,,1", "bad seed list"),
        ("0,x", "'x' is not an integer"),
        ("-1", ">= 0"),
        ("1,1", "duplicate seeds"),
    ):
        with pytest.raises(UserError, match=why):
            parse_seeds(bad)
    assert parse_variants("tuned,paper") == ("tuned", "paper")
    for bad, why in (
        ("", "empty item"),
        ("tuned,best", "'best' is not a variant"),
        ("paper,paper", "duplicate"),
    ):
        with pytest.raises(UserError, match=why):
            parse_variants(bad)
    # the unit of work: every method in every variant at every seed, seeds outermost
    cfg = BenchConfig(methods=("cdm", "cd"), seeds=(0, 1), variants=("tuned", "paper"))
    got = [(u.method, u.variant, u.seed) for u in units(cfg)]
    assert got[:4] == [
        ("cdm", "tuned", 0),
        ("cdm", "paper", 0),
        ("cd", "tuned", 0),
        ("cd", "paper", 0),
    ]
    assert len(got) == 8 and {s for _, _, s in got[4:]} == {1}


def test_bad_seeds_option_is_one_line_exit_2(capsys):
    assert _main("bench", "--seeds", "0,a") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad seed list '0,a'" in err[0]
    assert _main("bench", "--variants", "tuned,nope") == 2


def test_bench_match_compute_trains_every_model_at_the_cheapest_budget(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    args = ["bench", "--methods", "dmd2,cd", "--iters", "6", "--seeds", "0,1"]
    args += ["--num-samples", "2", "--steps", "1", "--metrics", "fd_digits", "--match-compute"]
    assert _main(*args) == 0
    runs = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "digits").glob("*/run.json")]
    full = {r["method"]: r["cost"]["flops"] for r in runs if r["variant"] == "tuned"}
    matched = [r for r in runs if r["variant"] == "tuned, compute-matched"]
    assert len(runs) == 6 and len(matched) == 2  # the dearer method, at both seeds
    cheapest, dearer = min(full, key=full.get), max(full, key=full.get)
    assert {r["method"] for r in matched} == {dearer}
    assert {r["train_seed"] for r in matched} == {0, 1}
    assert all(r["variant_note"] == "compute-matched" for r in matched)  # hashed: own dirs
    for r in matched:  # its iterations spend the cheapest one's FLOPs, to within one iteration
        per_iter = r["cost"]["train_flops"] / r["iters"]
        assert r["iters"] < 6 and abs(r["cost"]["flops"] - full[cheapest]) <= per_iter
    recs = [
        json.loads(x) for x in (tmp_path / "results" / "records.jsonl").read_text().splitlines()
    ]
    assert {(r["method"], r["variant"]) for r in recs if r["method"] == dearer} == {
        (dearer, "tuned"),
        (dearer, "tuned, compute-matched"),
    }
    md = (tmp_path / "results" / "report.md").read_text()
    assert f"{dearer} (tuned, compute-matched)" in md  # its own row in the main table
    table = md[md.index("Compute-matched") :]
    assert "needs runs at matched budgets" not in md
    assert f"| {dearer} (tuned) |" in table and f"| {cheapest} (tuned) |" in table


def test_iters_for_spends_the_target_with_data_fixed_or_sized_by_the_run():
    from cdmbench.bench import cost_at, iters_for
    from cdmbench.training.teacher_data import MAX_SAMPLES

    # 100 iterations at 1e9 each, plus 2e10 of data of a fixed size
    fixed = {"flops": 1.2e11, "train_flops": 1e11, "iters": 100}
    fixed["data"] = {"teacher_samples": {"samples": 2048, "flops": 2e10}}
    assert iters_for(fixed, 6e10) == 40 and cost_at(fixed, 40) == 6e10
    assert iters_for(fixed, 6.04e10) == 40 and iters_for(fixed, 6.06e10) == 41  # nearest
    assert iters_for(fixed, 1e9) is None  # the data alone costs more than twice the target
    # the same run whose set was sized by its length: 8 samples per iteration, 2.5e7 each
    grown = {"flops": 1.2e11, "train_flops": 1e11, "iters": 100}
    grown["data"] = {"teacher_samples": {"samples": 800, "flops": 2e10, "per_iter": 8}}
    assert cost_at(grown, 50) == 50 * 1e9 + 400 * 2.5e7
    assert iters_for(grown, 6e10) == 50  # not 40: the set shrinks with the run
    # past the cap the set stops growing
    per_sample = 1e11 / MAX_SAMPLES
    capped = dict(grown, data={"t": {"samples": MAX_SAMPLES, "flops": 1e11, "per_iter": 200}})
    assert cost_at(capped, 3) == pytest.approx(3e9 + 600 * per_sample)
    assert cost_at(capped, 100) == cost_at(capped, 200) - 100 * 1e9
    # a run without data accounting: its FLOPs all train
    assert iters_for({"flops": 1e11, "iters": 100}, 2.5e10) == 25
