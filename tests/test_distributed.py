"""Two CPU processes (gloo, launched by torchrun as accelerate would) give the same results."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cdmbench(args: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "cdmbench.cli", *args]
    else:
        cmd = [
            "torchrun",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_port()),
            "-m",
            "cdmbench.cli",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _values(results: Path) -> list[tuple]:
    recs = [json.loads(x) for x in (results / "records.jsonl").read_text().splitlines()]
    return sorted((r["method"], r["steps"], r["metric"], r["value"], r["eval_key"]) for r in recs)


def test_two_process_train_and_eval_match_one_process(tmp_path):
    train = [
        "train",
        "dmd2",
        "--iters",
        "4",
        "--batch",
        "4",
        "--set",
        "train.ckpt_every=2",
        "--out",
        "runs",
    ]
    cdmbench(train, 2, tmp_path)
    run_dir = next((tmp_path / "runs" / "digits").glob("dmd2-*"))
    info = json.loads((run_dir / "run.json").read_text())
    ratio = info["method_config"]["update_ratio"]  # the generator steps at it % ratio == 0
    student = len([it for it in range(4) if it % ratio == 0])
    assert info["iters"] == 4 and info["updates"] == {"fake": 4, "student": student}
    manifest = json.loads((run_dir / "checkpoint" / "manifest.json").read_text())
    assert manifest["it"] == 4

    ev = [
        "eval",
        "--methods",
        "dmd2,teacher",
        "--steps",
        "1,2",
        "--metrics",
        "fd_digits,prompt_acc",
        "--num-samples",
        "4",
        "--batch-size",
        "7",
    ]
    cdmbench([*ev, "--results", "r1", "--samples", "s1"], 1, tmp_path)
    cdmbench([*ev, "--results", "r2", "--samples", "s2"], 2, tmp_path)
    one, two = _values(tmp_path / "r1"), _values(tmp_path / "r2")
    assert len(one) == 10 and one == two
    pngs = sorted(p.relative_to(tmp_path / "s1") for p in (tmp_path / "s1").rglob("*.png"))
    assert pngs == sorted(p.relative_to(tmp_path / "s2") for p in (tmp_path / "s2").rglob("*.png"))
    for p in pngs:
        assert (tmp_path / "s1" / p).read_bytes() == (tmp_path / "s2" / p).read_bytes()
