"""The results store: one tidy table of records, append-only JSON lines.

Every record is one number with its provenance (DESIGN.md section 7): run id, backbone,
method, checkpoint hash, steps, schedule, guidance, prompt set, sample count, metric, value,
direction, metric config, seed, device, package versions, git revision, time.

Appends take a file lock (so concurrent ``cdmbench eval`` processes lose nothing) and write
whole lines in one call; a line cut short by a crash is reported with its location and
skipped by readers, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

RECORDS = "records.jsonl"

COLUMNS = [
    "run_id", "backbone", "method", "checkpoint", "steps", "schedule", "guidance", "prompt_set",
    "n_samples", "metric", "value", "higher_is_better", "metric_config", "seed", "device",
    "versions", "git_rev", "time", "eval_key",
]


@lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """Versions of the packages a number depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("cdmbench", "torch", "diffusers", "transformers", "open_clip_torch", "clean-fid", "torchmetrics"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The cdmbench source tree's git revision ('+dirty' if modified), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class ReadReport:
    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "file:line: what" for skipped lines


class ResultStore:
    """Append-only JSON-lines store under a results directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.path = self.root / RECORDS

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.path) + ".lock", timeout=120)

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append records atomically with respect to other writers; returns how many."""
        lines = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in records)
        if not lines:
            return 0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with self._lock():
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    if os.fstat(fd).st_size and not _ends_with_newline(self.path):
                        lines = "\n" + lines  # a previous writer died mid-line: start fresh
                    os.write(fd, lines.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            raise self._not_writable(e) from None
        return lines.count("\n") - lines.startswith("\n")

    def check_writable(self) -> None:
        """Fail before any work if records could not be appended here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a"):
                pass
        except OSError as e:
            raise self._not_writable(e) from None

    def _not_writable(self, e: OSError) -> Exception:
        from cdmbench.errors import UserError

        return UserError(f"results directory {self.root} is not writable ({e.strerror}); pass --results DIR")

    def read(self) -> ReadReport:
        """All well-formed records; problems name each skipped line."""
        rep = ReadReport()
        if not self.path.is_file():
            return rep
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rep.problems.append(f"{self.path}:{n}: unreadable record skipped ({e.msg})")
                    continue
                if not isinstance(rec, dict) or "metric" not in rec or "value" not in rec:
                    rep.problems.append(f"{self.path}:{n}: record without metric/value skipped")
                    continue
                rep.records.append(rec)
        return rep

    def dataframe(self):
        import pandas as pd

        rep = self.read()
        return pd.DataFrame(rep.records, columns=None if rep.records else COLUMNS), rep.problems

    def done_keys(self) -> set[tuple[str, str, str]]:
        """(eval_key, metric, metric config hash) of every stored record: what needs no recompute."""
        return {(r.get("eval_key", ""), r.get("metric_name", r["metric"]), r.get("metric_config_hash", ""))
                for r in self.read().records}


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
