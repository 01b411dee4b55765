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


def _kill_loop(args: list[str], cwd: Path, done: callable, seed: int, lo: float, hi: float) -> int:
    """Start the command and SIGKILL it after a random delay, KILLS times (or until done)."""
    rng = random.Random(seed)
    kills = 0
    while kills < KILLS and not done():
        p = subprocess.Popen(_cmd(args), cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(lo, hi))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
    return kills


def test_train_survives_kills(tmp_path):
    args = ["train", "cdm", "--iters", "120", "--batch", "32", "--set", "train.ckpt_every=7",
            "--set", "method.n_max=4", "--set", "method.update_ratio=2"]
    _run([*args, "--out", "a"], tmp_path)
    done = lambda: any((tmp_path / "b" / "digits").glob("*/run.json"))  # noqa: E731
    kills = _kill_loop([*args, "--out", "b"], tmp_path, done, seed=0, lo=2.0, hi=7.0)
    _run([*args, "--out", "b"], tmp_path)
    a = next((tmp_path / "a" / "digits").glob("cdm-*"))
    b = next((tmp_path / "b" / "digits").glob("cdm-*"))
    assert a.name == b.name
    assert (a / "student.safetensors").read_bytes() == (b / "student.safetensors").read_bytes()
    assert json.loads((b / "run.json").read_text())["iters"] == 120
    assert kills >= 5, f"only {kills} kills landed"
    assert not list(b.rglob("*.tmp"))  # no temporary file left trusted or lying around


def _records(results: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (results / "records.jsonl").read_text().splitlines() if x.strip()]
    return sorted((r["method"], r["steps"], r["metric"], r["value"], r["eval_key"]) for r in recs)


def test_eval_survives_kills(tmp_path):
    args = ["eval", "--methods", "teacher", "--steps", "1,2,4,8", "--metrics", "fd_digits,prompt_acc",
            "--num-samples", "40", "--batch-size", "20"]
    _run([*args, "--results", "ra", "--samples", "sa"], tmp_path)
    done = lambda: (tmp_path / "rb" / "records.jsonl").is_file() and len(  # noqa: E731
        (tmp_path / "rb" / "records.jsonl").read_text().splitlines()) >= 10
    kills = _kill_loop([*args, "--results", "rb", "--samples", "sb"], tmp_path, done, seed=1, lo=2.5, hi=6.0)
    _run([*args, "--results", "rb", "--samples", "sb"], tmp_path)
    assert _records(tmp_path / "ra") == _records(tmp_path / "rb")
    assert kills >= 3, f"only {kills} kills landed"
    pa = sorted(p.relative_to(tmp_path / "sa") for p in (tmp_path / "sa").rglob("*.png"))
    pb = sorted(p.relative_to(tmp_path / "sb") for p in (tmp_path / "sb").rglob("*.png"))
    assert pa == pb and not list((tmp_path / "sb").rglob("*.tmp"))
