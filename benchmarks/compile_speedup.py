"""What `--compile` buys: eager versus torch.compile'd generation, and what compiling costs.

For each backbone and batch size: the teacher's generation call (``cdmbench.generate.generate``
at the given step count and the backbone's default guidance, the path `cdmbench eval` runs)
is timed eager, then the same model is compiled by ``cdmbench.evaluate.compile_candidate``
(``nn.Module.compile`` in place, warmed up at the batch sizes evaluation uses: the generation
batch and 1), and timed again. Reported per row: the compile time as `cdmbench eval --compile`
records it (``compile_s``), eager and compiled milliseconds per call (medians, interleaving is
impossible here because compiling is one-way, so eager is timed first and then compiled, each
after a warm-up), the speedup, and the largest difference between eager and compiled samples
(kernel rounding). Compilation is per process and architecture; a second candidate of the
same architecture reuses the compiled code (its compile time is reported too).

    python benchmarks/compile_speedup.py
    python benchmarks/compile_speedup.py --backbones digits --steps 4 --digits-batches 1,256

Prints a markdown table and writes results/benchmarks/compile_speedup.csv.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from cdmbench.backbones import get_backbone  # noqa: E402
from cdmbench.evaluate import compile_candidate, teacher_candidate  # noqa: E402
from cdmbench.generate import generate  # noqa: E402


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default="digits,tiny-sd3")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--digits-batches", default="1,256")
    ap.add_argument("--sd3-batches", default="1,4")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--csv", default="results/benchmarks/compile_speedup.csv")
    args = ap.parse_args()
    bu.setup_threads(args.threads)
    info = bu.machine_info(args.threads)
    print(bu.describe(info), flush=True)
    rows = []
    for name in args.backbones.split(","):
        bb = get_backbone(name)
        prompts = bb.prompts("test")
        batches = [int(b) for b in (args.digits_batches if name == "digits" else args.sd3_batches).split(",")]
        cand = teacher_candidate(bb)
        spec = cand.sampler(args.steps)

        def call(b: int, model, bb=bb, prompts=prompts, spec=spec) -> torch.Tensor:
            ps = [prompts[i % len(prompts)] for i in range(b)]
            return generate(bb, model, ps, list(range(b)), spec, batch_size=b)

        model = cand.model
        eager = {b: timed(lambda b=b, m=model: call(b, m), args.reps) for b in batches}
        ref = {b: call(b, model) for b in batches}
        compile_s = compile_candidate(bb, cand, prompts, [max(batches), 1], args.mode)
        second = teacher_candidate(bb)  # same architecture, new module: reuses the compiled code
        compile_s2 = compile_candidate(bb, second, prompts, [max(batches), 1], args.mode)
        for b in batches:
            comp = timed(lambda b=b, m=model: call(b, m), args.reps)
            diff = float((call(b, model) - ref[b]).abs().max())
            r = {"backbone": name, "batch": b, "steps": args.steps, "guidance": spec.guidance,
                 "mode": args.mode or "default", "compile_s": compile_s, "second_model_compile_s": compile_s2,
                 "eager_ms": 1e3 * eager[b], "compiled_ms": 1e3 * comp, "speedup": eager[b] / comp,
                 "max_abs_diff": diff}
            rows.append(r)
            print(bu.markdown([r], COLS, HEADERS).splitlines()[-1], flush=True)
    path = bu.write_csv(args.csv, rows, info)
    print("\n## torch.compile: eager vs compiled generation (teacher, default guidance)\n")
    print(bu.describe(info) + "\n")
    print(bu.markdown(rows, COLS, HEADERS))
    print(f"\ncompile s = warm-up wall time minus the same calls compiled (what `cdmbench eval --compile` "
          f"records as compile_s); medians of {args.reps} calls\nwrote {path}")


COLS = ["backbone", "batch", "steps", "guidance", "mode", "compile_s", "second_model_compile_s", "eager_ms",
        "compiled_ms", "speedup", "max_abs_diff"]
HEADERS = ["backbone", "batch", "steps", "cfg", "mode", "compile s", "2nd model compile s", "eager ms",
           "compiled ms", "speedup", "max |diff|"]

if __name__ == "__main__":
    main()
