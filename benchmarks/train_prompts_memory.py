"""Does training memory grow with the number of training prompts? Peak RSS per prompt count.

Trains tiny-sd3 for a few iterations (``cdmbench train``, each run a fresh process) on
generated JSONL prompt files of 300, 10,000 and 200,000 prompts (``backbone.train_prompts``)
and reads each child's peak resident set size (``ru_maxrss`` of ``os.wait4``). Training
prompts are read on demand (an index of byte offsets, 16 bytes per prompt) and embeddings
are kept in a bounded LRU, so the peak should not depend on the file: the figure of merit is
peak(n) / peak(300), target <= 1.1 (issue 13). ``dmd`` also builds its teacher-sample set,
sized from the run (iterations x batch) and keyed by the file's content hash.

A control shows the measurement can see growth: a bare process that reads each file whole
(``load_prompt_set``, what training did before) against one that opens it on demand
(``PromptFile``), the same way (peak RSS of a fresh child).

    python benchmarks/train_prompts_memory.py                       # cdm and dmd, 3 sizes
    python benchmarks/train_prompts_memory.py --methods cdm --sizes 300,10000

Prints a markdown table and writes results/benchmarks/train_prompts_memory.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

TARGET = 1.1
WORDS = (
    "red blue green golden misty quiet ancient tiny enormous glowing wooden marble "
    "cat lighthouse bicycle teapot mountain harbour violin robot garden library "
    "at dawn under rain in fog beside a river on a table in the snow at night"
).split()


def write_prompts(path: Path, n: int) -> int:
    """``n`` distinct JSONL prompts of 8 to 40 words; the file's size in bytes."""
    with open(path, "w") as f:
        for i in range(n):
            k = 8 + (i * 7919) % 33
            words = [WORDS[(i * 31 + j * 17) % len(WORDS)] for j in range(k)]
            f.write(json.dumps({"id": f"p{i}", "text": f"{' '.join(words)} number {i}"}) + "\n")
    return path.stat().st_size


def peak_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(peak RSS of the child in MiB, wall seconds, exit status)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, proc.returncode


# a child that opens a prompt set after its imports: growth of peak and held RSS, in MiB
# (writing 5 to clear_refs resets the peak, VmHWM, to the current RSS)
CONTROL = """
from cdmbench.prompts_io import {call}
def kb(key):
    return int(next(ln for ln in open("/proc/self/status") if ln.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")
before = kb("VmRSS:")
prompts = {call}({path!r})
print((kb("VmHWM:") - before) / 1024, (kb("VmRSS:") - before) / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="cdm,dmd")
    ap.add_argument("--sizes", default="300,10000,200000")
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/benchmarks/train_prompts_memory.csv")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": str(args.threads),
    }
    info = bu.machine_info(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-prompts-") as tmp:
        files = {n: Path(tmp) / f"prompts-{n}.jsonl" for n in sizes}
        file_bytes = {n: write_prompts(p, n) for n, p in files.items()}
        for method in [m for m in args.methods.split(",") if m]:
            base = None
            for n in sizes:
                cmd = [
                    sys.executable,
                    "-m",
                    "cdmbench.cli",
                    "train",
                    method,
                    "--backbone",
                    "tiny-sd3",
                    "--iters",
                    str(args.iters),
                    "--batch",
                    str(args.batch),
                    "--out",
                    str(Path(tmp) / f"runs-{method}-{n}"),
                    "--set",
                    f"backbone.train_prompts={files[n]}",
                    "--set",
                    "train.log_to=none",
                ]
                mb, secs, rc = peak_rss_mb(cmd, env)
                base = mb if base is None else base
                rows.append(
                    {
                        "method": method,
                        "prompts": n,
                        "file_mb": round(file_bytes[n] / 2**20, 2),
                        "iters": args.iters,
                        "batch": args.batch,
                        "peak_rss_mb": round(mb, 1),
                        "ratio_to_first": round(mb / base, 4),
                        "ok": "yes" if rc == 0 and mb / base <= TARGET else "no",
                        "exit": rc,
                        "wall_s": round(secs, 1),
                    }
                )
                print(
                    f"{method:4s} {n:>7d} prompts ({file_bytes[n] / 2**20:6.1f} MB file): "
                    f"peak RSS {mb:7.1f} MiB, x{mb / base:.3f}, {secs:5.1f} s, exit {rc}",
                    flush=True,
                )
        for how, call in (
            ("control: read whole", "load_prompt_set"),
            ("control: on demand", "PromptFile"),
        ):
            for n in sizes:
                code = CONTROL.format(call=call, path=str(files[n]))
                out = subprocess.run(
                    [sys.executable, "-c", code], env=env, capture_output=True, text=True
                )
                peak, held = (float(v) for v in out.stdout.split())
                rows.append(
                    {
                        "method": how,
                        "prompts": n,
                        "file_mb": round(file_bytes[n] / 2**20, 2),
                        "growth_peak_mb": round(peak, 1),
                        "growth_held_mb": round(held, 1),
                        "exit": out.returncode,
                    }
                )
                print(
                    f"{how} {n:>7d}: RSS growth peak {peak:7.1f} MiB, held {held:7.1f} MiB",
                    flush=True,
                )
    path = bu.write_csv(args.out, rows, info)
    print()
    print("| method | prompts | file MB | peak RSS MiB | ratio to first | ok |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        if "peak_rss_mb" not in r:
            continue
        print(
            f"| {r['method']} | {r['prompts']} | {r['file_mb']} | {r['peak_rss_mb']} | "
            f"{r['ratio_to_first']} | {r['ok']} |"
        )
    print(f"\n{bu.describe(info)}; target ratio <= {TARGET}; wrote {path}")


if __name__ == "__main__":
    main()
