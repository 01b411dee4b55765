"""Several processes in one project folder: two `cdmbench train` of one configuration, two
`cdmbench eval` into one sample folder, and locks left by killed processes.

Each pair must finish (exit 0) with the students, sample files and records of one process
run after the other. ``CDMBENCH_CONCURRENCY_TRIALS`` sets how many pairs of each kind run
(benchmarks/concurrency.py runs 10).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdmbench.io import atomic_path, remove_stale_temps
from cdmbench.locks import LockBusy, file_lock

TRIALS = int(os.environ.get("CDMBENCH_CONCURRENCY_TRIALS", "1"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TRAIN = ["train", "cdm", "--iters", "4", "--batch", "8", "--out", "runs"]
TRAIN += ["--set", "train.ckpt_every=1", "--set", "train.log_to=none"]  # checkpoint every step
EVAL = ["eval", "--methods", "teacher", "--steps", "1,2", "--metrics", "fd_digits,prompt_acc"]
EVAL += ["--num-samples", "20", "--samples", "samples", "--results", "results"]


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "cdmbench.cli", *args]


def _together(args: list[str], cwd: Path, n: int = 2) -> list[subprocess.CompletedProcess]:
    """Start ``n`` identical commands at once in ``cwd``; wait for all."""
    cwd.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen(
            _cmd(args), cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but logs and timings, by relative path."""
    skip = {"log.jsonl", "run.json", "records.jsonl"}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in skip and "checkpoint" not in p.parts
    }


def _records(path: Path) -> list[str]:
    """The records, without what differs between any two runs (time, wall clock)."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        r.pop("time")
        out.append(json.dumps(r, sort_keys=True))
    return sorted(out)


def _no_leftovers(root: Path) -> None:
    left = [p for p in root.rglob(".*") if p.suffix in (".lock", ".tmp")]
    assert not left, left


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    """One train, then one eval, alone: what every concurrent pair must reproduce."""
    root = tmp_path_factory.mktemp("sequential")
    for args in (TRAIN, EVAL):
        p = subprocess.run(_cmd(args), cwd=root, env=ENV, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
    return root


def test_two_trains_of_one_configuration(sequential, tmp_path):
    """The second waits for the first, then reuses its run: both exit 0, one student."""
    ref = _tree(sequential / "runs")
    for trial in range(TRIALS):
        root = tmp_path / f"trial{trial}"
        procs = _together(TRAIN, root)
        for p in procs:
            assert p.returncode == 0, p.stderr[-2000:]
        said = [p.stdout for p in procs]
        assert sum("already trained" in s for s in said) == 1, said
        assert _tree(root / "runs") == ref
        _no_leftovers(root)


def test_two_evals_into_one_sample_folder(sequential, tmp_path):
    """Both exit 0; samples and records are those of one eval run after the other."""
    ref_samples = _tree(sequential / "samples")
    ref_records = _records(sequential / "results" / "records.jsonl")
    for trial in range(TRIALS):
        root = tmp_path / f"trial{trial}"
        procs = _together(EVAL, root)
        for p in procs:
            assert p.returncode == 0, p.stderr[-2000:]
        assert _tree(root / "samples") == ref_samples
        assert _records(root / "results" / "records.jsonl") == ref_records  # none twice
        _no_leftovers(root)


_HOLD = """
import sys, time
from cdmbench.locks import file_lock
with file_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(path: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(path)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    """A holder killed with SIGKILL leaves its lock file; the next process takes it at once
    (the kernel released the lock), and removes it when done."""
    path = tmp_path / "folder" / ".run.lock"
    p = _holder(path)
    with pytest.raises(LockBusy) as busy:
        with file_lock(path, timeout=0.3):
            pass
    assert f"pid {p.pid} " in busy.value.holder and "test holder" in busy.value.holder
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert path.exists()  # the dead holder's file is still there
    t0 = time.monotonic()
    with file_lock(path, timeout=5):
        assert f"pid {os.getpid()} " in path.read_text()
    assert time.monotonic() - t0 < 2
    assert not path.exists()
    with file_lock(tmp_path / "new" / "sub" / ".a.lock"):  # folders made only for the lock
        pass
    assert not (tmp_path / "new").exists()


def test_train_that_may_not_wait_names_the_holder(sequential, tmp_path):
    """With train.lock_wait_s=0 a second train stops with one line naming the process that
    trains the configuration; once that one is killed, the same command proceeds."""
    (run_dir,) = (sequential / "runs" / "digits").iterdir()
    lock = tmp_path / "runs" / "digits" / f".{run_dir.name}.lock"
    args = [*TRAIN, "--set", "train.lock_wait_s=0"]
    p = _holder(lock)
    try:
        q = subprocess.run(_cmd(args), cwd=tmp_path, env=ENV, capture_output=True, text=True)
        assert q.returncode == 2, q.stderr[-2000:]
        lines = q.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {p.pid} " in lines[0] and "is training" in lines[0]
        assert not (tmp_path / "runs" / "digits" / run_dir.name).exists()
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    q = subprocess.run(_cmd(args), cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert q.returncode == 0, q.stderr[-2000:]
    assert _tree(tmp_path / "runs") == _tree(sequential / "runs")
    _no_leftovers(tmp_path)


def test_cleanup_spares_temporary_files_of_live_writers(tmp_path):
    """Only temporaries whose writer has died are stale: a live process's in-flight file
    survives another process's cleanup of the folder."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with atomic_path(tmp_path / "mine.png") as mine:
        mine.write_bytes(b"in flight")
        host = mine.name.split("@", 1)[1].rsplit(".", 2)[0]
        orphan = tmp_path / f".x.png.p{dead.pid}@{host}.abcd1234.tmp"
        orphan.write_bytes(b"half")
        legacy = tmp_path / ".y.png.k2j3h4g5.tmp"  # no owner recorded
        legacy.write_bytes(b"half")
        assert remove_stale_temps(tmp_path) == 2
        assert mine.exists() and not orphan.exists() and not legacy.exists()
    assert (tmp_path / "mine.png").read_bytes() == b"in flight"


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_a_launch_of_two_processes_waits_longer_than_its_collective_timeout(sequential, tmp_path):
    """Two processes of one launch wait for a lock held elsewhere longer than their collective
    timeout (8 s here): rank 0 polls and the ranks meet in short broadcasts, so neither times
    out, and the launch trains once the holder is gone."""
    (run_dir,) = (sequential / "runs" / "digits").iterdir()
    lock = tmp_path / "runs" / "digits" / f".{run_dir.name}.lock"
    p = _holder(lock)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = ["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    launch += ["--master_port", str(port), "-m", "cdmbench.cli", *TRAIN]
    launch += ["--set", "train.dist_timeout_s=8"]
    q = subprocess.Popen(
        launch, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(20)  # more than twice the collective timeout
        assert q.poll() is None, q.communicate()[1][-3000:]
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    _, err = q.communicate(timeout=600)
    assert q.returncode == 0, err[-3000:]
    assert f"waiting for pid {p.pid} " in err
    assert (tmp_path / "runs" / "digits" / run_dir.name / "student.safetensors").is_file()
