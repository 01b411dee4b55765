"""Fault injection: SIGKILL `cdmbench train` and `cdmbench eval` at random points, rerun, and
check that the finished results equal an uninterrupted run's — nothing lost, nothing redone
wrongly, nothing half-written trusted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

KILLS = 10

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cdmbench.cli", *args]


def _run(args: list[str], cwd: Path) -> None:
    p = subprocess.run(_cmd(args), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]


def _kill_loop(args: list[str], cwd: Path, progress: callable, total: int, seed: int) -> int:
    """Start the command and SIGKILL it at a random point of its progress, KILLS times.

    Each attempt is killed once ``progress()`` (iterations logged, PNGs written, ...) has moved
    a random 0..total/12 units past where the attempt started, plus a random few milliseconds
    (so some kills land during start-up, some mid-write); the runs are never allowed to finish.
    """
    rng = random.Random(seed)
    kills = 0
    while kills < KILLS:
        start = progress()
        target = start + rng.randint(0, max(1, total // 12))
        p = subprocess.Popen(
            _cmd(args), cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while p.poll() is None and progress() < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        if p.poll() is not None:
            break  # finished before the kill: nothing more to interrupt
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        kills += 1
    return kills


def _lines(path: Path) -> int:
    try:
        return len(path.read_bytes().splitlines())
    except FileNotFoundError:
        return 0


def test_train_survives_kills(tmp_path):
    args = [
        "train",
        "cdm",
        "--iters",
        "120",
        "--batch",
        "32",
        "--set",
        "train.ckpt_every=7",
        "--set",
        "train.log_every=1",
        "--set",
        "method.n_max=4",
        "--set",
        "method.update_ratio=2",
    ]
    _run([*args, "--out", "a"], tmp_path)
    a = next((tmp_path / "a" / "digits").glob("cdm-*"))

    def progress() -> int:  # iterations logged so far (lines repeat after a resume: still monotone)
        return sum(_lines(p) for p in (tmp_path / "b" / "digits").glob("cdm-*/log.jsonl"))

    kills = _kill_loop([*args, "--out", "b"], tmp_path, progress, 120, seed=0)
    _run([*args, "--out", "b"], tmp_path)
    b = next((tmp_path / "b" / "digits").glob("cdm-*"))
    assert a.name == b.name
    assert (a / "student.safetensors").read_bytes() == (b / "student.safetensors").read_bytes()
    assert json.loads((b / "run.json").read_text())["iters"] == 120
    assert kills == KILLS
    assert not list(b.rglob("*.tmp"))  # no temporary file left trusted or lying around


def _records(results: Path) -> list[tuple]:
    recs = [
        json.loads(x) for x in (results / "records.jsonl").read_text().splitlines() if x.strip()
    ]
    return sorted((r["method"], r["steps"], r["metric"], r["value"], r["eval_key"]) for r in recs)


def test_eval_survives_kills(tmp_path):
    args = [
        "eval",
        "--methods",
        "teacher",
        "--steps",
        "1,2,4,8",
        "--metrics",
        "fd_digits,prompt_acc",
        "--num-samples",
        "40",
        "--batch-size",
        "20",
    ]
    _run([*args, "--results", "ra", "--samples", "sa"], tmp_path)

    def progress() -> int:  # PNGs written plus records appended
        return len(list((tmp_path / "sb").rglob("*.png"))) + _lines(
            tmp_path / "rb" / "records.jsonl"
        )

    kills = _kill_loop(
        [*args, "--results", "rb", "--samples", "sb"], tmp_path, progress, 5 * 400, seed=1
    )
    _run([*args, "--results", "rb", "--samples", "sb"], tmp_path)
    assert _records(tmp_path / "ra") == _records(tmp_path / "rb")
    assert kills == KILLS
    pa = sorted(p.relative_to(tmp_path / "sa") for p in (tmp_path / "sa").rglob("*.png"))
    pb = sorted(p.relative_to(tmp_path / "sb") for p in (tmp_path / "sb").rglob("*.png"))
    assert pa == pb and not list((tmp_path / "sb").rglob("*.tmp"))
