"""Two processes in one project folder, N trials of each: two `cdmbench train` of one
configuration, and two `cdmbench eval` into one sample folder.

Each trial starts both commands at once in a fresh folder and compares what they leave with
one sequential train and eval (tests/test_concurrency.py's commands): the exit statuses, the
student and sample files (sha256), and the records (without their time stamps; a record
appended twice counts as a difference).

    python benchmarks/concurrency.py                 # 10 trials of each
    python benchmarks/concurrency.py --trials 3

The commands run with the ``cdmbench`` that ``python -m cdmbench.cli`` imports (set
PYTHONPATH to compare another checkout). Prints a markdown table: trials, processes that
died (exit status not 0), trials whose outputs differ from the sequential run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_concurrency import EVAL, TRAIN, _records, _together, _tree  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    import subprocess

    from test_concurrency import ENV, _cmd

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seq = tmp / "sequential"
        seq.mkdir()
        for cmd in (TRAIN, EVAL):
            subprocess.run(_cmd(cmd), cwd=seq, env=ENV, capture_output=True, check=True)
        ref = {
            "train": lambda r: _tree(r / "runs"),
            "eval": lambda r: (_tree(r / "samples"), _records(r / "results" / "records.jsonl")),
        }
        rows = []
        for kind, cmd in (("train", TRAIN), ("eval", EVAL)):
            want = ref[kind](seq)
            died = differ = 0
            errors: set[str] = set()
            t0 = time.perf_counter()
            for trial in range(args.trials):
                root = tmp / f"{kind}{trial}"
                procs = _together(cmd, root)
                bad = [p for p in procs if p.returncode != 0]
                died += len(bad)
                errors |= {p.stderr.strip().splitlines()[-1] for p in bad if p.stderr.strip()}
                try:
                    differ += ref[kind](root) != want
                except (OSError, ValueError):
                    differ += 1
            rows.append((kind, args.trials, died, differ, time.perf_counter() - t0, errors))
    print("| pair | trials | processes died | trials differing | wall s |")
    print("|---|---|---|---|---|")
    for kind, n, died, differ, wall, _ in rows:
        print(f"| two `{kind}` | {n} | {died} of {2 * n} | {differ} | {wall:.0f} |")
    for kind, *_, errors in rows:
        for e in sorted(errors):
            print(f"{kind}: {e}")


if __name__ == "__main__":
    main()
