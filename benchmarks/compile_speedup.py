"""What `--compile` buys: eager versus torch.compile'd generation, and what compiling costs.

For each backbone and batch size: the teacher's generation call (``cdmbench.generate.generate``
at the given step count and the backbone's default guidance, the path `cdmbench eval` runs),
with the model compiled by ``cdmbench.evaluate.compile_candidate`` (``nn.Module.compile`` in
place, warmed up at the batch sizes evaluation uses: the generation batch and 1) against an
eager copy made before compiling, timed side by side (interleaved ABBA, medians). Reported per
row: the compile time as `cdmbench eval --compile` records it (``compile_s``), eager and
compiled milliseconds per call, the speedup, and the largest difference between eager and
compiled samples (kernel rounding). Compilation is per process and architecture; a second candidate of the
same architecture reuses the compiled code (its compile time is reported too).

    python benchmarks/compile_speedup.py --cold   # empty inductor cache: first-use compile time
    python benchmarks/compile_speedup.py          # inductor's on-disk cache as found (a repeat)
    python benchmarks/compile_speedup.py --backbones digits --steps 4 --digits-batches 1,256

Inductor keeps compiled kernels in an on-disk cache across processes, so the compile time of
a second process on the same machine is a fraction of the first; ``--cold`` points the cache
at an empty temporary directory to measure the first use.

Prints a markdown table and writes results/benchmarks/compile_speedup.csv.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
COLD = "--cold" in sys.argv
if COLD:  # before torch is imported: inductor reads it once
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="cdmbench-inductor-")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _benchutil as bu  # noqa: E402

from cdmbench.backbones import get_backbone  # noqa: E402
from cdmbench.evaluate import compile_candidate, teacher_candidate  # noqa: E402
from cdmbench.generate import generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backbones", default="digits,tiny-sd3")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--digits-batches", default="1,256")
    ap.add_argument("--sd3-batches", default="1,4")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--csv", default="results/benchmarks/compile_speedup.csv")
    ap.add_argument("--cold", action="store_true", help="start from an empty inductor cache")
    args = ap.parse_args()
    bu.setup_threads(args.threads)
    info = bu.machine_info(args.threads)
    print(bu.describe(info), flush=True)
    rows = []
    for name in args.backbones.split(","):
        bb = get_backbone(name)
        prompts = bb.prompts("test")
        batches = [
            int(b) for b in {"digits": args.digits_batches}.get(name, args.sd3_batches).split(",")
        ]
        cand = teacher_candidate(bb)
        spec = cand.sampler(args.steps)

        def call(b: int, model, bb=bb, prompts=prompts, spec=spec) -> torch.Tensor:
            ps = [prompts[i % len(prompts)] for i in range(b)]
            return generate(bb, model, ps, list(range(b)), spec, batch_size=b)

        model = cand.model
        eager_model = copy.deepcopy(model)  # stays eager: both timed side by side after compiling
        ref = {b: call(b, model) for b in batches}
        compile_s = compile_candidate(bb, cand, prompts, [max(batches), 1], args.mode)
        second = teacher_candidate(bb)  # same architecture, new module: reuses the compiled code
        compile_s2 = compile_candidate(bb, second, prompts, [max(batches), 1], args.mode)
        for b in batches:
            a = lambda b=b, m=model: call(b, m)  # noqa: E731
            e = lambda b=b, m=eager_model: call(b, m)  # noqa: E731
            tc, te = bu.interleaved(a, e, args.reps, 1, warmup=2)
            st = bu.summarize(tc, te)
            diff = float((call(b, model) - ref[b]).abs().max())
            r = {
                "backbone": name,
                "batch": b,
                "steps": args.steps,
                "guidance": spec.guidance,
                "mode": args.mode or "default",
                "inductor_cache": "cold" if COLD else "as found",
                "compile_s": compile_s,
                "second_model_compile_s": compile_s2,
                "eager_ms": st["bare_ms"],
                "compiled_ms": st["harness_ms"],
                "speedup": 1 / st["ratio"],
                "max_abs_diff": diff,
            }
            rows.append(r)
            bu.print_row(r, COLS, HEADERS)
    bu.finish(
        args.csv,
        rows,
        info,
        "torch.compile: eager vs compiled generation (teacher, default guidance)",
        bu.markdown(rows, COLS, HEADERS),
        f"compile s = warm-up wall time minus the same calls compiled (what `cdmbench eval --compile` "
        f"records as compile_s); medians of {args.reps} interleaved calls per side",
    )


COLS = [
    "backbone",
    "batch",
    "steps",
    "guidance",
    "mode",
    "inductor_cache",
    "compile_s",
    "second_model_compile_s",
    "eager_ms",
    "compiled_ms",
    "speedup",
    "max_abs_diff",
]
HEADERS = [
    "backbone",
    "batch",
    "steps",
    "cfg",
    "mode",
    "inductor cache",
    "compile s",
    "2nd model compile s",
    "eager ms",
    "compiled ms",
    "speedup",
    "max |diff|",
]

if __name__ == "__main__":
    main()
