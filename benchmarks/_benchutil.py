"""Shared plumbing of the overhead benchmarks: machine description, interleaved timing, output.

Not a benchmark itself. Each script compares a harness path (A) against a hand-written bare
path (B) doing the same work, so both are timed in the same process, interleaved, so that
load from other jobs on the machine hits both alike:

    warm-up A, B; then pairs in the order A B, B A, A B, ... (ABBA: neither side is always first)

One sample = ``number`` back-to-back calls timed with ``time.perf_counter`` (``number`` is
calibrated so a sample lasts about ``target_s``), reported per call; the garbage collector is
off inside a sample, as in ``timeit``. The figure of merit is the ratio of the medians of the
wall times, median(A) / median(B); the interquartile range of the per-pair ratios A_i / B_i
shows how noisy the machine was. The process CPU time of each sample (``time.process_time``)
is recorded too: on a machine shared with other CPU-heavy jobs, time spent descheduled
inflates wall time but not CPU time, so the CPU-time ratio is the steadier estimate of the
work each side does (with one torch thread, all of it runs on the calling thread).
"""

from __future__ import annotations

import csv
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


# ------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(threads: int) -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": threads,
        "loadavg_start": loadavg(),
    }


def describe(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), "
        f"torch {info['torch']}, python {info['python']}, torch threads {info['torch_threads']}, "
        f"load average at start {info['loadavg_start']} (1/5/15 min)"
    )


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (only possible once per process)
        pass


# -------------------------------------------------------------------------------- timing
def _sample2(fn: Callable[[], Any], number: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call over ``number`` calls."""
    gc_was = gc.isenabled()
    gc.disable()
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(number):
            fn()
        t1, c1 = time.perf_counter(), time.process_time()
        return (t1 - t0) / number, (c1 - c0) / number
    finally:
        if gc_was:
            gc.enable()


def _sample(fn: Callable[[], Any], number: int) -> float:
    return _sample2(fn, number)[0]


def calibrate(fns: Sequence[Callable[[], Any]], target_s: float, max_number: int = 100_000) -> int:
    """Calls per sample so the slowest of ``fns`` takes about ``target_s`` per sample."""
    for fn in fns:  # warm-up (first-call allocations, lazy initialisation)
        _sample(fn, 1)
    probe = 1
    while True:
        per_call = max(_sample(fn, probe) for fn in fns)
        if per_call * probe >= 0.2 * target_s or probe >= max_number:
            break
        probe *= 4
    return int(min(max_number, max(1, round(target_s / max(per_call, 1e-9)))))


class Samples(list):
    """Per-call wall seconds of each sample; ``.cpu`` holds the matching process CPU seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.cpu: list[float] = []

    def add(self, wall_cpu: tuple[float, float]) -> None:
        self.append(wall_cpu[0])
        self.cpu.append(wall_cpu[1])


def interleaved(
    a: Callable[[], Any], b: Callable[[], Any], reps: int, number: int, warmup: int = 2
) -> tuple[Samples, Samples]:
    """Per-call seconds of ``a`` and ``b``, ``reps`` samples each, sampled in ABBA order."""
    for _ in range(warmup):
        _sample(a, number)
        _sample(b, number)
    ta, tb = Samples(), Samples()
    for i in range(reps):
        if i % 2 == 0:
            ta.add(_sample2(a, number))
            tb.add(_sample2(b, number))
        else:
            tb.add(_sample2(b, number))
            ta.add(_sample2(a, number))
    return ta, tb


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return min(xs), max(xs)
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def summarize(ta: Samples, tb: Samples) -> dict[str, float]:
    """Medians (ms), the ratio of medians, quartiles of the pair ratios, and the CPU-time ratio."""
    ma, mb = statistics.median(ta), statistics.median(tb)
    pair = [x / y for x, y in zip(ta, tb, strict=True)]
    lo, hi = quartiles(pair)
    out = {
        "harness_ms": 1e3 * ma,
        "bare_ms": 1e3 * mb,
        "ratio": ma / mb,
        "pair_ratio_q1": lo,
        "pair_ratio_q3": hi,
        "ratio_min": min(ta) / min(tb),
    }
    ca, cb = getattr(ta, "cpu", None), getattr(tb, "cpu", None)
    if ca and cb:
        out |= {
            "harness_cpu_ms": 1e3 * statistics.median(ca),
            "bare_cpu_ms": 1e3 * statistics.median(cb),
            "cpu_ratio": statistics.median(ca) / max(statistics.median(cb), 1e-12),
        }
    return out


# -------------------------------------------------------------------------------- output
def write_csv(path: str | Path, rows: list[dict[str, Any]], info: dict[str, Any]) -> Path:
    """Rows plus the machine columns, written to a temporary file and renamed (atomic)."""
    from cdmbench.io import atomic_path

    path = Path(path)
    info = {**info, "loadavg_end": loadavg()}
    full = [{**r, **info} for r in rows]
    fields = list(dict.fromkeys(k for r in full for k in r))
    with atomic_path(path, fsync=False) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(full)
    return path


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:  # nan
            return "n/a"
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(
    rows: list[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    headers = list(headers or columns)
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)


def print_row(
    row: dict[str, Any], columns: Sequence[str], headers: Sequence[str] | None = None
) -> None:
    """One table row as soon as it is measured (the whole table is printed at the end)."""
    print(markdown([row], columns, headers).splitlines()[-1], flush=True)


def finish(
    csv_path: str | Path,
    csv_rows: list[dict[str, Any]],
    info: dict[str, Any],
    title: str,
    body: str,
    footer: str,
) -> Path:
    """Write the CSV, then print the report: title, machine, ``body`` (the tables), ``footer``."""
    path = write_csv(csv_path, csv_rows, info)
    print(f"\n## {title}\n")
    print(describe(info) + "\n")
    print(body)
    print(f"\n{footer}\nwrote {path}")
    return path
