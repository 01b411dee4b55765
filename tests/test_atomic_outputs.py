"""Interrupted writers and interrupted training: `export` and `report` killed with SIGKILL at
random points never leave an output that looks complete but is not, and their rerun leaves no
temporary behind; Ctrl-C and SIGTERM during `train` (also before training starts) exit 130/143
with one line and continue to the uninterrupted student; a run whose every step is non-finite
is not a success."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from cli_run import run

from cdmbench.methods.cdm import CDM
from cdmbench.registry import METHODS, Entry

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cdmbench.cli", *args]


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _kill_at(
    args: list[str], cwd: Path, ready: Callable[[], bool], rng: random.Random
) -> tuple[bool, bool]:
    """Start the command, SIGKILL it a random few milliseconds after ``ready()`` holds (or
    after a random delay, for half the attempts); (killed, ready when killed)."""
    p = subprocess.Popen(_cmd(args), cwd=cwd, env=ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + rng.uniform(0.5, 4.0) if rng.random() < 0.5 else None
    while p.poll() is None and not ready():
        if deadline is not None and time.monotonic() > deadline:
            break
        time.sleep(0.001)
    # a file is written in milliseconds: right after ready() the kill must come at once to
    # land while it is written, later when a deadline (not ready()) ended the wait
    time.sleep(rng.uniform(0, 0.002 if ready() else 0.02))
    if p.poll() is not None:
        return False, False
    was_ready = ready()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    return True, was_ready


# ------------------------------------------------------------------------------ export
@pytest.mark.slow
def test_export_killed_at_random_points_is_absent_or_complete(tmp_path, capsys):
    code, _, err = run(capsys, "train", "cdm", "--backbone", "tiny-sd3", "--iters", "2",
                       "--device", "cpu", "--out", str(tmp_path / "runs"))  # fmt: skip
    assert code == 0, err
    run_dir = str(next((tmp_path / "runs" / "tiny-sd3").glob("cdm-*")))
    # the reference in a process of its own, as every export runs (a process that used the
    # tokenizers before exports them with their padding state)
    p = subprocess.run(_cmd(["export", run_dir, "--out", "ref"]), cwd=tmp_path, env=ENV,
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 0, p.stderr
    ref = _tree(tmp_path / "ref")
    out = tmp_path / "out"

    def temps() -> list[Path]:
        return list(tmp_path.glob(".out.*.tmp"))

    rng = random.Random(0)
    kills = during = 0
    for _ in range(6):
        args = ["export", run_dir, "--out", "out"] + (["--overwrite"] if out.exists() else [])
        killed, ready = _kill_at(args, tmp_path, lambda: bool(temps()), rng)
        kills, during = kills + killed, during + ready
        assert not out.exists() or _tree(out) == ref  # absent, or whole
    print(f"export: {kills} kills, {during} while writing")
    assert kills >= 4 and during >= 2
    args = ["export", run_dir, "--out", "out"] + (["--overwrite"] if out.exists() else [])
    p = subprocess.run(_cmd(args), cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert _tree(out) == ref and not temps()
    # a finished export is never merged into: the same command again is refused, in one line
    p = subprocess.run(_cmd(args[:4]), cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert p.returncode == 2 and "--overwrite" in _one_line(p.stderr)
    assert _tree(out) == ref and not temps()


# ------------------------------------------------------------------------------ report
STAMP = re.compile(rb"Generated \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}")
REPORTS = ("report.md", "report.csv", "report.tex", "report.html")


def _report_files(results: Path) -> dict[str, bytes | None]:
    def read(p: Path) -> bytes | None:
        return STAMP.sub(b"Generated <time>", p.read_bytes()) if p.exists() else None

    return {name: read(results / name) for name in REPORTS}


def test_report_killed_at_random_points_keeps_each_file_whole(tmp_path, capsys, monkeypatch):
    """Each report file is always the previous report's or the new one's, whole."""
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    results.mkdir()
    records = Path(__file__).parents[1] / "results" / "records.jsonl"
    (results / "records.jsonl").write_bytes(records.read_bytes())
    old_args = ("report", "--results", "results", "--metrics", "fd_digits")
    new_args = ("report", "--results", "results")
    assert run(capsys, *new_args)[0] == 0
    new = _report_files(results)
    assert run(capsys, *old_args)[0] == 0
    old = _report_files(results)
    assert all(new[n] != old[n] for n in REPORTS if n != "report.csv") and None not in old.values()

    def temps() -> list[Path]:
        return list(results.glob(".report.*.tmp"))

    rng = random.Random(1)
    kills = during = 0
    for _ in range(8):
        killed, ready = _kill_at(list(new_args), tmp_path, lambda: bool(temps()), rng)
        kills, during = kills + killed, during + ready
        now = _report_files(results)
        assert all(now[n] in (old[n], new[n]) for n in REPORTS), [
            n for n in REPORTS if now[n] not in (old[n], new[n])
        ]
        if not killed:  # finished: back to the previous report for the next attempt
            assert run(capsys, *old_args)[0] == 0
    print(f"report: {kills} kills, {during} while writing")
    assert kills >= 5 and during >= 1
    p = subprocess.run(_cmd(list(new_args)), cwd=tmp_path, env=ENV, capture_output=True)
    assert p.returncode == 0, p.stderr
    assert _report_files(results) == new and not temps()
    assert sorted(p.name for p in results.iterdir()) == sorted(["records.jsonl", *REPORTS])


# ------------------------------------------------------------------------ interrupts
TRAIN = ["train", "cdm", "--iters", "150", "--batch", "2", "--set", "train.log_every=1", "--out"]


def test_ctrl_c_before_training_starts_is_one_line_and_130(tmp_path):
    """Ctrl-C while the command starts (importing torch, building the models): exit 130 and
    one line, never a traceback; landing in training instead, its own line."""
    before = 0
    for i, delay in enumerate((0.3, 0.6, 1.0, 1.4)):
        p = subprocess.Popen(_cmd([*TRAIN, f"r{i}"]), cwd=tmp_path, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        # 130, or ended by the SIGINT itself after the message (a Ctrl-C that lands while the
        # interpreter winds down): a shell reports both as $? = 130
        assert p.returncode in (130, -signal.SIGINT), err
        line = _one_line(err)
        assert line.startswith(("interrupted (Ctrl-C)", "stopped by SIGINT")), line
        before += line.startswith("interrupted")
        assert not list((tmp_path / f"r{i}").rglob("student.safetensors"))
    assert before >= 1


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> bytes:
    """The uninterrupted run's student."""
    root = tmp_path_factory.mktemp("whole")
    p = subprocess.run(_cmd([*TRAIN, "whole"]), cwd=root, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return next(root.glob("whole/digits/cdm-*/student.safetensors")).read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_training_says_so_in_one_line_and_continues(tmp_path, whole, sig):
    p = subprocess.Popen(_cmd([*TRAIN, "cut"]), cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while True:
        logs = list((tmp_path / "cut").glob("digits/cdm-*/log.jsonl"))
        if logs and len(logs[0].read_text().splitlines()) >= 3:
            break
        assert p.poll() is None and time.time() < deadline, p.communicate()
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    run_dir = logs[0].parent
    assert p.returncode == 128 + sig, err
    stop = json.loads((run_dir / "checkpoint" / "manifest.json").read_text())["it"]
    assert _one_line(err).startswith(f"stopped by {signal.Signals(sig).name} at iteration {stop}")
    assert not (run_dir / "student.safetensors").exists()
    rerun = subprocess.run(_cmd([*TRAIN, "cut"]), cwd=tmp_path, env=ENV, capture_output=True)
    assert rerun.returncode == 0, rerun.stderr
    assert (run_dir / "student.safetensors").read_bytes() == whole
    assert not list(run_dir.rglob("*.tmp"))


# ------------------------------------------------------------------------ non-finite
class AllNaN(CDM):
    """CDM whose every loss term is NaN: no step can ever update anything."""

    name = "allnan"

    def losses(self, group, it, batch, state, core):
        terms = super().losses(group, it, batch, state, core)
        return {k: v * torch.tensor(float("nan")) for k, v in terms.items()}


@pytest.mark.parametrize("on_nan", ["skip", "stop"])
def test_every_step_non_finite_is_not_a_success(tmp_path, capsys, monkeypatch, on_nan):
    METHODS.names()  # entry points first, so the test method is not shadowed
    monkeypatch.setitem(METHODS._entries, "allnan", Entry("allnan", AllNaN, ""))
    code, out, err = run(capsys, "train", "allnan", "--iters", "3", "--on-nan", on_nan,
                         "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    assert code == 2, out + err
    line = _one_line(err)
    assert ("no update of the student" if on_nan == "skip" else "non-finite") in line
    assert not list(tmp_path.rglob("student.safetensors"))
    assert not list(tmp_path.rglob("*.tmp"))
