"""Does distillation work on `digits`? Train every method with its default budget for several
seeds, then score students and the teacher at 1, 2 and 4 steps by domain Fréchet distance
(classifier features, against the held-out real test split) and prompt accuracy.

    python benchmarks/distill_digits.py                       # 4 methods x 3 seeds
    python benchmarks/distill_digits.py --methods cdm --seeds 0 --set method.update_ratio=3

Prints a table (mean ± std over seeds) and writes results/benchmarks/distill_digits.csv.
The pass criterion of the project: each method's 1- and 2-step FD at most half the teacher's
at the same step count (teacher at CFG 1, its best few-step setting; CFG 2 shown too).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

from cdmbench import flow
from cdmbench.backbones import get_backbone
from cdmbench.config import resolve
from cdmbench.generate import generate
from cdmbench.metrics.digits import DigitsJudge
from cdmbench.registry import METHODS
from cdmbench.training.method import SamplerSpec
from cdmbench.training.run import load_run, train_run


def score(bb, judge, model, spec, per_class: int, seed: int) -> dict[str, float]:
    prompts = bb.prompts()
    ps = [p for p in prompts for _ in range(per_class)]
    seeds = [flow.sample_seed(seed, p.id, i) for p in prompts for i in range(per_class)]
    lat = generate(bb, model, ps, seeds, spec)
    return judge.score(bb.decode(lat), torch.tensor([p.label for p in ps]))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", default="cdm,dmd,dmd2,cd")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", default="1,2,4")
    ap.add_argument("--per-class", type=int, default=200, help="samples per class (x10 in all)")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--out", default="runs/bench-distill")
    ap.add_argument("--csv", default="results/benchmarks/distill_digits.csv")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    bb = get_backbone("digits")
    judge = DigitsJudge(bb)
    rows: list[dict] = []
    teacher = bb.load_teacher()
    for w in (1.0, 2.0):
        for n in steps:
            for seed in seeds:
                r = score(
                    bb,
                    judge,
                    teacher,
                    SamplerSpec(flow.uniform_schedule(n, bb.shift), guidance=w),
                    args.per_class,
                    seed,
                )
                rows.append(
                    {"model": f"teacher (cfg {w:g})", "seed": seed, "steps": n, **r, "train_s": 0.0}
                )
    for name in args.methods.split(","):
        cls = METHODS.get(name)
        for seed in seeds:
            tc, mc = resolve(cls, "digits", sets=args.sets, seed=seed, threads=args.threads)
            t0 = time.perf_counter()
            res = train_run(cls(mc), bb, tc, args.out, sample_steps=tuple(steps))
            train_s = time.perf_counter() - t0
            run = load_run(res.run_dir)
            for n in steps:
                r = score(
                    bb, judge, run.student, run.method.sampler(n, bb.shift), args.per_class, seed
                )
                rows.append(
                    {"model": name, "seed": seed, "steps": n, **r, "train_s": round(train_s, 1)}
                )
            print(
                f"{name} seed {seed}: "
                + ", ".join(
                    f"{x['steps']}-step FD {x['fd_digits']:.1f}"
                    for x in rows
                    if x["model"] == name and x["seed"] == seed
                ),
                f"(train {train_s:.0f}s, {res.run_dir})",
                flush=True,
            )
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    models = list(dict.fromkeys(r["model"] for r in rows))
    print(f"\n| model | {' | '.join(f'FD {n}-step' for n in steps)} | prompt acc (min) | train s |")
    print("|---" * (len(steps) + 3) + "|")
    for m in models:
        cells = []
        for n in steps:
            v = [r["fd_digits"] for r in rows if r["model"] == m and r["steps"] == n]
            cells.append(f"{statistics.mean(v):.1f} ± {statistics.pstdev(v):.1f}")
        acc = min(r["prompt_acc"] for r in rows if r["model"] == m)
        ts = statistics.mean(r["train_s"] for r in rows if r["model"] == m)
        print(f"| {m} | {' | '.join(cells)} | {acc:.3f} | {ts:.0f} |")


if __name__ == "__main__":
    main()
