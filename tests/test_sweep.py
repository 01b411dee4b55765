"""`cdmbench sweep`: declared search spaces, seeded draws, the val split, reproducible and
reusable trials, the summary the report shows, and the CLI's input errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cdmbench.backbones.digits import load_split, split_indices
from cdmbench.registry import METHODS
from cdmbench.sweep import (
    SweepConfig,
    SweepStore,
    best_params,
    contains,
    render_html,
    render_markdown,
    run_sweep,
    space_problems,
    summarize,
    summary,
    trial_params,
)
from cdmbench.training.method import config_to_dict
from tests.cli_run import run

BUILTIN = ("cdm", "dmd", "dmd2", "cd")
LINE_FIELDS = {
    "key",
    "method",
    "backbone",
    "seed",
    "trials",
    "trial",
    "base",
    "params",
    "variant",
    "train_iters",
    "train_batch",
    "train_seed",
    "eval_seed",
    "per_prompt",
    "steps",
    "reference",
    "metric",
    "fd",
    "objective",
    "error",
    "run_id",
    "config_key",
    "train_s",
    "wall_s",
    "versions",
    "git_rev",
    "time",
}


@pytest.mark.parametrize("name", BUILTIN)
def test_spaces_hold_paper_and_tuned_values(name):
    cls = METHODS.get(name)
    assert 3 <= len(cls.search_space) <= 5
    # names are Config fields; every range holds Config's (paper) default and both variants'
    assert space_problems(cls, "digits") == []
    paper = config_to_dict(cls.Config())
    for k, spec in cls.search_space.items():
        assert contains(spec, paper[k])


def test_space_problems_catch_a_bad_space():
    cls = METHODS.get("cdm")

    class Bad(cls):
        search_space = {
            "student_lr": ("log", 1e-3, 1e-2),  # misses the paper's 1e-5
            "not_a_setting": ("uniform", 0.0, 1.0),
            "n_max": ("int", 5, 3),
        }

    problems = space_problems(Bad, "digits")
    assert any("student_lr" in p and "paper default" in p for p in problems)
    assert any("not_a_setting" in p for p in problems)
    assert any("n_max" in p and "lo < hi" in p for p in problems)


def test_val_split_is_part_of_train_and_disjoint_from_test():
    train, val, test = (split_indices(s) for s in ("train", "val", "test"))
    # the teacher's train split and the reports' test split are unchanged
    assert len(train) == 1352 and len(test) == 445
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 1797
    assert len(val) == 451
    assert np.setdiff1d(val, train).size == 0
    assert np.intersect1d(val, test).size == 0
    _, y = load_split("all")
    for c in range(10):  # per class, in file order, position % 4 == 1
        idx = np.flatnonzero(y.numpy() == c)
        assert list(np.intersect1d(idx, val)) == list(idx[1::4])
    x_val, y_val = load_split("val")
    assert x_val.shape == (451, 1, 8, 8) and set(y_val.tolist()) == set(range(10))


@pytest.mark.parametrize("name", BUILTIN)
def test_draws_are_seeded_per_trial(name):
    cls = METHODS.get(name)
    # trial 0 is the base variant's configuration, the paper's by default
    base = config_to_dict(cls.default_config("digits", "paper"))
    t0 = trial_params(cls, "digits", 0, 0, "paper")
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in t0.items()} == {
        k: base[k] for k in cls.search_space
    }
    tuned = config_to_dict(cls.default_config("digits", "tuned"))
    t0_tuned = trial_params(cls, "digits", 0, 0, "tuned")
    assert all(t0_tuned[k] == tuned[k] or list(tuned[k]) == t0_tuned[k] for k in t0_tuned)
    a = [trial_params(cls, "digits", 3, i, "paper") for i in range(1, 6)]
    b = [trial_params(cls, "digits", 3, i, "paper") for i in range(1, 6)]
    c = [trial_params(cls, "digits", 4, i, "paper") for i in range(1, 6)]
    assert a == b
    assert a != c
    assert len({json.dumps(p, sort_keys=True) for p in a}) == 5  # distinct trials
    for p in a + c:
        assert list(p) == list(cls.search_space)
        assert all(contains(cls.search_space[k], v) for k, v in p.items())


def _student_mtimes(runs):
    return {p.parent.name: p.stat().st_mtime_ns for p in runs.rglob("student.safetensors")}


def test_same_seed_reproduces_trials_and_scores(tmp_path):
    cfg = SweepConfig(
        method="cd",
        trials=3,
        seed=5,
        iters=3,
        per_prompt=5,
        workers=1,
        results=tmp_path / "a" / "results",
        runs=tmp_path / "a" / "runs",
    )
    first = run_sweep(cfg)
    assert [line["trial"] for line in first] == [0, 1, 2]
    for line in first:
        assert set(line) == LINE_FIELDS
        assert line["error"] is None and line["reference"] == "digits val split"
        assert line["train_iters"] == 3 and line["eval_seed"] == 5 + 10_000
        assert set(line["fd"]) == {"1", "2", "4"}
        assert line["objective"] == np.mean(list(line["fd"].values()))
    assert first[0]["variant"] == "paper"
    assert len({line["run_id"] for line in first}) == 3
    store = SweepStore(cfg.results)
    assert len(store.lines()) == 3
    mtimes = _student_mtimes(cfg.runs)
    assert len(mtimes) == 3

    # rerun: every trial reused, nothing retrained or rescored
    again = run_sweep(cfg)
    assert again == first
    assert len(store.lines()) == 3
    assert _student_mtimes(cfg.runs) == mtimes

    # the same sweep elsewhere, in two worker processes: the same trials and scores, bitwise
    other = SweepConfig(
        **{
            **cfg.__dict__,
            "workers": 2,
            "results": tmp_path / "b" / "results",
            "runs": tmp_path / "b" / "runs",
        }
    )
    fresh = run_sweep(other)
    for x, y in zip(first, fresh, strict=True):
        assert x["params"] == y["params"] and x["run_id"] == y["run_id"]
        assert x["fd"] == y["fd"] and x["objective"] == y["objective"]

    # summary for the report
    s = summary(cfg.results)
    assert len(s) == 1
    row = s.iloc[0]
    objectives = [line["objective"] for line in first]
    assert row["K"] == 3 and row["failed"] == 0
    assert row["best"] == min(objectives) and row["worst"] == max(objectives)
    assert row["median"] == float(np.median(objectives))
    assert row["paper"] == first[0]["objective"]
    best = first[int(np.argmin(objectives))]
    assert row["best_params"] == best["params"] and row["best_run_id"] == best["run_id"]
    assert best_params(cfg.results, "cd", "digits") == best["params"]
    assert best_params(cfg.results, "cdm", "digits") is None
    md = render_markdown(s)
    assert md.count("\n") == 3 and "| cd | 3 | 3 |" in md
    assert "<td>cd</td>" in render_html(s)


def test_summary_ranks_a_failed_trial_last():
    base = {"backbone": "digits", "method": "dmd", "seed": 0, "base": "paper"}
    base |= {"train_iters": 300, "per_prompt": 50, "run_id": "r", "wall_s": 60.0}
    lines = [
        {**base, "trial": 0, "objective": 9.0, "params": {"a": 0}},
        {**base, "trial": 1, "objective": None, "params": {"a": 1}},
        {**base, "trial": 2, "objective": 7.0, "params": {"a": 2}},
    ]
    row = summarize(lines).iloc[0]
    assert row["failed"] == 1 and row["best"] == 7.0 and row["best_params"] == {"a": 2}
    assert row["median"] == 9.0 and math.isinf(row["worst"]) and row["paper"] == 9.0
    assert "failed" in render_markdown(summarize(lines))


def test_best_params_picks_the_largest_sweep_and_breaks_ties_by_trial(tmp_path):
    def line(trial, objective, *, seed=0, base="paper", iters=300, t=0):
        return {
            "key": f"{seed}-{base}-{iters}-{trial}",
            "method": "dmd",
            "backbone": "digits",
            "seed": seed,
            "trials": 3,
            "trial": trial,
            "base": base,
            "params": {"seed": seed, "base": base, "iters": iters, "trial": trial},
            "train_iters": iters,
            "per_prompt": 50,
            "objective": objective,
            "run_id": f"r{trial}",
            "wall_s": 1.0,
            "time": f"2026-01-01T00:00:{t:02d}+0000",
        }

    lines = [line(i, v) for i, v in enumerate([5.0, 3.0, 3.0])]  # K 3, tie: trial 1
    lines += [line(i, 1.0, seed=1, t=50) for i in range(2)]  # seed 1: K 2, newer
    lines += [line(i, 2.0, base="tuned", t=40) for i in range(3)]  # tuned base: K 3, newer
    lines += [line(i, 9.0 - i, iters=100, t=10) for i in range(3)]  # shorter budget: K 3
    (tmp_path / "sweeps.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[::-1]))

    def best(**kw):
        p = best_params(tmp_path, "dmd", "digits", **kw)
        return None if p is None else (p["seed"], p["base"], p["iters"], p["trial"])

    assert best() == (0, "tuned", 300, 0)  # largest K; of equal K the newest sweep
    assert best(base="paper") == (0, "paper", 100, 2)  # newest of the paper sweeps of K 3
    assert best(seed=0, base="paper") == (0, "paper", 100, 2)
    assert best(seed=1) == (1, "paper", 300, 0)  # a tie at 1.0: the lower trial
    assert best(seed=2) is None and best_params(tmp_path, "cdm") is None
    # the summary's best trial agrees, whatever order the lines come in
    s = summarize(lines[:3][::-1])
    assert int(s["best_trial"].iloc[0]) == 1


@pytest.mark.parametrize(
    "args, says",
    [
        (["nope"], "unknown method"),
        (["cdm", "--trials", "0"], "--trials"),
        (["cdm", "--trials", "-2"], "--trials"),
        (["cdm", "--seed", "-1"], "--seed"),
        (["cdm", "--seed", str(2**31)], "--seed"),
        (["cdm", "--variant-base", "best"], "--variant-base"),
        (["cdm", "--backbone", "tiny-sd3"], "val split"),
    ],
)
def test_cli_input_errors(tmp_path, capsys, args, says):
    code, out, err = run(capsys, "sweep", *args, "--results", str(tmp_path / "r"))
    assert code == 2
    assert says in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "sweeps.jsonl").exists()


def test_cli_help_explains(capsys):
    code, out, _ = run(capsys, "sweep", "--help")
    assert code == 0
    for word in ("--trials", "--seed", "--variant-base", "validation", "sweeps.jsonl"):
        assert word in out
