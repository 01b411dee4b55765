"""Evaluation stage on digits: content-keyed samples, resume, no recompute, records, CLI."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from cdmbench.backbones import get_backbone
from cdmbench.config import resolve
from cdmbench.evaluate import (
    EvalPlan,
    ensure_samples,
    load_images,
    run_candidates,
    run_eval,
    teacher_candidate,
)
from cdmbench.registry import METHODS
from cdmbench.results import RECORD_FIELDS, ResultStore, make_record
from cdmbench.training.run import train_run


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    bb = get_backbone("digits")
    for name in ("cdm", "dmd2"):
        cls = METHODS.get(name)
        tc, mc = resolve(cls, "digits", iters=2, batch=8)
        train_run(cls(mc), bb, tc, root, sample_steps=(1,))
    return root


def _plan(
    tmp: Path, runs_root: Path, metrics=("fd_digits", "prompt_acc"), per_prompt=6, steps=(1, 2)
):
    bb = get_backbone("digits")
    cands = [teacher_candidate(bb)] + run_candidates(runs_root, bb)
    return EvalPlan(
        bb,
        cands,
        list(steps),
        list(metrics),
        bb.prompts(),
        "digits",
        per_prompt,
        0,
        tmp / "samples",
        ResultStore(tmp / "results"),
        batch_size=16,
        teacher_default=False,
    )


def test_records_for_every_model_and_step(tmp_path, runs_root):
    new = run_eval(_plan(tmp_path, runs_root))
    keys = {(r["method"], r["steps"], r["metric"]) for r in new}
    for m in ("teacher", "cdm", "dmd2"):
        for n in (1, 2):
            assert {(m, n, "fd_digits"), (m, n, "prompt_acc")} <= keys
    r = next(r for r in new if r["method"] == "teacher" and r["steps"] == 2)
    assert r["schedule"] == [1.0, 0.5, 0.0] and r["guidance"] == 2.0 and r["n_samples"] == 60
    for field in (
        "versions",
        "git_rev",
        "device",
        "metric_config",
        "checkpoint",
        "seed",
        "time",
        "run_id",
    ):
        assert r[field] not in (None, "", {})
    stored = ResultStore(tmp_path / "results").read()
    assert len(stored.records) == len(new) and not stored.problems
    assert all(list(r) == list(RECORD_FIELDS) for r in new)  # the schema, nothing else
    assert all(set(r) == set(RECORD_FIELDS) for r in stored.records)


def test_make_record_takes_exactly_the_schema():
    fields = {k: 0 for k in RECORD_FIELDS if k not in ("versions", "git_rev", "time")}
    rec = make_record(**fields)
    assert list(rec) == list(RECORD_FIELDS) and rec["versions"]["python"] and rec["time"]
    with pytest.raises(TypeError, match="missing"):
        make_record(**{k: v for k, v in fields.items() if k != "seed"})
    with pytest.raises(TypeError, match="unknown"):
        make_record(**fields, colour="red")


def test_metric_config_hashes_stay_those_of_the_committed_records(tmp_path):
    """Stored records are reused by (sample key, metric, metric config hash): these are the
    hashes in results/records.jsonl; a change recomputes every committed number."""
    bb = get_backbone("digits")
    plan = EvalPlan(
        bb,
        [teacher_candidate(bb)],
        [1],
        ["fd_digits", "prompt_acc", "precision_recall", "latency"],
        bb.prompts(),
        "digits",
        1,
        0,
        tmp_path / "samples",
        ResultStore(tmp_path / "results"),
        batch_size=16,
        teacher_default=False,
    )
    hashes = {r["metric_name"]: r["metric_config_hash"] for r in run_eval(plan)}
    assert hashes == {
        "fd_digits": "df60c9f131d9",
        "prompt_acc": "400e018dfe5e",
        "precision_recall": "bae5896041b9",
        "latency": "4a2ae0e3196e",
    }


def test_rerun_computes_nothing_and_half_deleted_folder_regenerates_half(tmp_path, runs_root):
    plan = _plan(tmp_path, runs_root, per_prompt=4, steps=(1,))
    first = run_eval(plan)
    assert run_eval(plan) == []
    cand = next(c for c in plan.candidates if c.name == "cdm")
    sset = ensure_samples(
        plan.backbone, cand, 1, plan.prompts, plan.prompt_set, 0, 4, plan.samples_root
    )
    assert sset.generated == 0
    before = load_images(sset)
    for f in sset.files[::2]:
        (sset.folder / f).unlink()
    again = ensure_samples(
        plan.backbone, cand, 1, plan.prompts, plan.prompt_set, 0, 4, plan.samples_root
    )
    assert again.generated == len(sset.files) // 2
    assert torch.equal(load_images(again), before)  # regenerated PNGs are bit-identical
    assert len(first) > 0


def test_batch_size_does_not_change_samples(tmp_path, runs_root):
    bb = get_backbone("digits")
    cand = [c for c in run_candidates(runs_root, bb) if c.name == "dmd2"][0]  # stochastic sampler
    a = ensure_samples(bb, cand, 2, bb.prompts(), "digits", 3, 3, tmp_path / "a", batch_size=7)
    b = ensure_samples(bb, cand, 2, bb.prompts(), "digits", 3, 3, tmp_path / "b", batch_size=30)
    assert torch.equal(load_images(a), load_images(b))


def test_same_seed_same_records(tmp_path, runs_root):
    vals = []
    for sub in ("x", "y"):
        new = run_eval(_plan(tmp_path / sub, runs_root, per_prompt=3, steps=(1,)))
        vals.append(sorted((r["method"], r["metric"], r["value"]) for r in new))
    assert vals[0] == vals[1]


def test_manifest_names_seed_and_schedule(tmp_path, runs_root):
    plan = _plan(tmp_path, runs_root, per_prompt=2, steps=(4,))
    run_eval(plan)
    folder = next((tmp_path / "samples" / "digits").glob("cdm-4-*"))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["schedule"] == [1.0, 0.75, 0.5, 0.25, 0.0] and meta["guidance"] == 1.0
    lines = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and {"prompt_id", "prompt", "index", "seed", "file"} <= set(lines[0])
    assert len({x["seed"] for x in lines}) == 20


def _writer(root: str, tag: int, n: int) -> None:
    store = ResultStore(root)
    for i in range(n):
        store.append([{"metric": "m", "value": float(i), "writer": tag, "pad": "x" * 2000}])


def test_two_concurrent_writers_lose_nothing(tmp_path):
    procs = [
        mp.get_context("spawn").Process(target=_writer, args=(str(tmp_path), t, 150))
        for t in (0, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    rep = ResultStore(tmp_path).read()
    assert not rep.problems
    assert sorted((r["writer"], r["value"]) for r in rep.records) == sorted(
        (t, float(i)) for t in (0, 1) for i in range(150)
    )


def test_truncated_line_is_reported_and_skipped(tmp_path):
    store = ResultStore(tmp_path)
    store.append([{"metric": "a", "value": 1.0}])
    with open(store.path, "a") as f:
        f.write('{"metric": "b", "val')  # a writer killed mid-line
    store.append([{"metric": "c", "value": 3.0}])
    rep = store.read()
    assert [r["metric"] for r in rep.records] == ["a", "c"]
    assert len(rep.problems) == 1 and ":2:" in rep.problems[0]


def test_compiled_eval_reports_compile_time_and_keeps_samples_apart(tmp_path):
    """--compile: torch.compile (inductor) on the denoiser, compile time as its own value, samples
    keyed apart from eager ones and equal to them up to kernel rounding."""
    bb = get_backbone("digits")
    eager = _plan(
        tmp_path / "eager",
        tmp_path / "none",
        metrics=("fd_digits", "latency"),
        per_prompt=3,
        steps=(2,),
    )
    eager.candidates = [teacher_candidate(bb)]
    compiled = _plan(
        tmp_path / "compiled",
        tmp_path / "none",
        metrics=("fd_digits", "latency"),
        per_prompt=3,
        steps=(2,),
    )
    compiled.candidates = [teacher_candidate(bb)]
    compiled.samples_root = eager.samples_root  # one samples folder: the keys must keep them apart
    compiled.compile = "default"
    keys = set(compiled.candidates[0].model.state_dict())
    a = {r["metric"]: r for r in run_eval(eager)}
    b = {r["metric"]: r for r in run_eval(compiled)}
    assert "compile_s" not in a and b["compile_s"]["value"] > 0
    assert b["latency_ms"]["metric_config"]["compile"] == "default"
    assert a["latency_ms"]["metric_config_hash"] != b["latency_ms"]["metric_config_hash"]
    assert a["fd_digits"]["eval_key"] != b["fd_digits"]["eval_key"]
    assert (
        set(compiled.candidates[0].model.state_dict()) == keys
    )  # compiled in place: same weights, same names
    assert abs(a["fd_digits"]["value"] - b["fd_digits"]["value"]) < 1e-2 * a["fd_digits"]["value"]
    folders = sorted((eager.samples_root / "digits").glob("teacher-2-*"))
    imgs = [
        load_images(ensure_samples(bb, c, 2, bb.prompts(), "digits", 0, 3, eager.samples_root))
        for c in (eager.candidates[0], compiled.candidates[0])
    ]
    assert len(folders) == 2 and (imgs[0].int() - imgs[1].int()).abs().max() <= 1


def test_recompute_measures_a_recorded_metric_again(tmp_path, runs_root):
    plan = _plan(tmp_path, runs_root, metrics=("prompt_acc", "latency"), per_prompt=2, steps=(1,))
    plan.candidates = plan.candidates[:1]
    first = run_eval(plan)
    assert run_eval(plan) == []
    plan.recompute = ("latency",)
    again = run_eval(plan)
    assert {r["metric_name"] for r in again} == {"latency"}
    assert len(again) == len([r for r in first if r["metric_name"] == "latency"])


@pytest.mark.parametrize(
    "metric, prompts, per_prompt, ok",
    [
        ("fd_digits", 1, 1, False),  # a covariance of one sample
        ("fd_digits", 1, 2, True),
        ("prompt_acc", 1, 1, True),
        ("precision_recall", 1, 3, False),  # k = 3 neighbours need 4 samples
        ("precision_recall", 2, 2, True),
    ],
)
def test_too_few_samples_stop_before_generating(tmp_path, capsys, metric, prompts, per_prompt, ok):
    from tests.cli_run import run

    words = ["zero", "one", "two"]
    pfile = tmp_path / "p.txt"
    pfile.write_text("".join(f"a handwritten digit {w}\n" for w in words[:prompts]))
    samples = tmp_path / "samples"
    argv = ["eval", "--methods", "teacher", "--steps", "1", "--metrics", metric]
    argv += ["--prompts", str(pfile), "--num-samples", str(per_prompt)]
    argv += ["--samples", str(samples), "--results", str(tmp_path / "r"), "--runs", str(tmp_path)]
    if not ok:  # checked from the metric's declaration before any sample is generated
        code, _, err = run(capsys, *argv)
        assert code == 2 and len(err.strip().splitlines()) == 1 and metric in err, err
        assert not any(samples.rglob("*.png"))
        return
    from cdmbench.evaluate import build_metrics

    (m,) = build_metrics([metric], get_backbone("digits")).values()
    assert m.too_few(prompts, per_prompt) is None


def test_eval_takes_every_seed_of_the_newest_configuration(tmp_path, capsys):
    """Two training seeds of one configuration are both evaluated, an older configuration of
    the same variant is not, and --run-seeds evaluates each at its own seed (the teacher at
    each of them)."""
    from tests.cli_run import run

    runs, res = str(tmp_path / "runs"), tmp_path / "res"
    for argv in (["--iters", "1"], ["--iters", "2"], ["--iters", "2", "--seed", "1"]):
        code, _, err = run(capsys, "train", "cd", "--out", runs, "--device", "cpu", *argv)
        assert code == 0, err
    common = ["--steps", "1", "--num-samples", "1", "--metrics", "prompt_acc", "--device", "cpu"]
    common += ["--runs", runs, "--samples", str(tmp_path / "s"), "--results", str(res)]
    assert run(capsys, "eval", "--run-seeds", *common)[0] == 0
    recs = [json.loads(line) for line in (res / "records.jsonl").read_text().splitlines()]
    students = sorted((r["train_seed"], r["seed"]) for r in recs if r["method"] == "cd")
    assert students == [(0, 0), (1, 1)]  # the 1-iteration configuration is not evaluated
    assert {r["config_key"] for r in recs if r["method"] == "cd"} == {
        json.loads(p.read_text())["config_key"]
        for p in (tmp_path / "runs" / "digits").glob("cd-*/run.json")
        if json.loads(p.read_text())["iters"] == 2
    }
    assert sorted({r["seed"] for r in recs if r["method"] == "teacher"}) == [0, 1]
