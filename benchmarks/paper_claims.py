"""The seed paper's claims, measured on `digits` (3 seeds, 95 % t-intervals over seeds).

CDM (arXiv 2605.06376) claims that (a) its continuous random-length schedule makes one student
hold at any step count, including counts it never trained on; (b) distribution matching's
reverse KL is mode-seeking, which the continuous-time objective alleviates; (c) it needs no
GAN: CDM without auxiliary objectives competes with DMD2 with its GAN head. This script
measures each on the embedded backbone with the harness's own commands:

1. ``cdmbench bench --seeds S --variants tuned,paper`` (reuses any finished run in --runs);
2. ``cdmbench train dmd2 --set method.gan=...`` for every seed: DMD2 tuned with its GAN head
   switched the other way (classifier on the fake score's features, real digits, official
   loss weights), so DMD2 is measured with and without it;
3. ``cdmbench eval --steps 1..8 --run-seeds`` of every student and the teacher, each at its
   own training seed, with domain FD, prompt accuracy, recall and per-class recall;

4. every tuned method at the cheapest one's full training FLOPs (from the recorded cost), into
   ``RESULTS-matched`` (the compute-matched table, beside the iteration-matched one);

then writes ``claims.md`` (tables with mean ± 95 % interval and a verdict per claim, computed
from the intervals, never asserted), ``claims.csv`` and ``fd_vs_steps.png`` into --results,
beside the records and the ``cdmbench report`` of everything.

    python benchmarks/paper_claims.py                         # 3 seeds, full budgets
    python benchmarks/paper_claims.py --runs /tmp/x/runs      # reuse bench_walltime's runs

A claim that does not hold at this scale is a finding, reported as such.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

METRICS = "fd_digits,prompt_acc,precision_recall,class_recall"
ALL_STEPS = "1,2,3,4,5,6,7,8"


def sh(*args: str) -> None:
    """Run one cdmbench command, echoing it; stop on failure."""
    cmd = [sys.executable, "-m", "cdmbench.cli", *args]
    print("$ cdmbench " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="runs")
    ap.add_argument("--samples", default="runs/samples")
    ap.add_argument("--results", default="results/claims")
    ap.add_argument("--workers", default="2")
    ap.add_argument("--skip-train", action="store_true", help="only analyse stored records")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = ["--runs", args.runs, "--samples", args.samples, "--results", args.results]
    if not args.skip_train:
        sh(
            "bench", "--backbone", "digits", "--seeds", args.seeds, "--variants", "tuned,paper",
            "--metrics", METRICS, "--workers", args.workers, *common,
        )  # fmt: skip
        from cdmbench.registry import METHODS

        other = not METHODS.get("dmd2").default_config("digits").gan  # tuned's GAN, flipped
        for s in seeds:
            sh(
                "train", "dmd2", "--backbone", "digits", "--seed", str(s),
                "--set", f"method.gan={str(other).lower()}", "--out", args.runs, "--device", "cpu",
            )  # fmt: skip
        # every student of the runs folder (each variant's newest configuration, every seed)
        # and the teacher, at 1-8 steps, each at its own training seed
        sh(
            "eval", "--backbone", "digits", "--steps", ALL_STEPS, "--metrics", METRICS,
            "--run-seeds", "--device", "cpu", *common,
        )  # fmt: skip
        sh("report", "--results", args.results)
        compute_matched(args, seeds)
    analyse(Path(args.results))


def compute_matched(args, seeds: list[int]) -> None:
    """Every tuned method at the cheapest one's full training FLOPs (the iterations
    ``bench --match-compute`` gives, from the runs' recorded cost, data included; the
    cheapest at its full budget), trained into RUNS-matched and reported in RESULTS-matched."""
    import json

    from cdmbench.bench import Unit, matched_units

    dirs, iters = {}, {}  # the cheapest at its full budget; every method at every seed
    for info in sorted((Path(args.runs) / "digits").glob("*/run.json")):
        r = json.loads(info.read_text())
        if r.get("variant") == "tuned" and r.get("train_seed") in seeds and r.get("cost"):
            dirs[Unit(r["method"], "tuned", r["train_seed"])] = info.parent
            iters[r["method"]] = r["iters"]
    budget, matched, notes = matched_units(dirs)
    for note in notes:
        print(note, flush=True)
    iters |= {u.method: u.iters for u in matched}
    print(f"compute-matched budget: {budget:.3g} FLOPs, iterations {iters}", flush=True)
    out_runs, out_res = f"{args.runs}-matched", f"{args.results}-matched"
    for u in [Unit(m, "tuned", s, iters[m]) for m in sorted(iters) for s in seeds]:
        sh(
            "train", u.method, "--backbone", "digits", "--seed", str(u.seed), "--iters",
            str(u.iters), "--out", out_runs, "--device", "cpu",
        )  # fmt: skip
    sh(
        "eval", "--backbone", "digits", "--steps", "1,2,4", "--metrics", METRICS, "--run-seeds",
        "--device", "cpu", "--runs", out_runs, "--samples", args.samples, "--results", out_res,
    )  # fmt: skip
    sh("report", "--results", out_res)


def analyse(results: Path) -> None:
    from cdmbench.results import cell_stats, load_records

    df, _ = load_records(results)
    cells = cell_stats(df)
    cells = cells[cells["backbone"] == "digits"].copy()
    cells["label"] = [_label(r) for r in cells.to_dict("records")]
    out = []
    out.append("# The seed paper's claims on `digits`\n")
    out.append(
        f"Records: `{results / 'records.jsonl'}`. Every cell: mean ± half-width of the 95 % "
        "t-interval over (training seed, evaluation seed) pairs, n given. Lower FD is "
        "better. A difference counts only where the intervals do not overlap.\n"
    )
    out += claim_steps(cells)
    out += claim_modes(cells)
    out += claim_gan(cells)
    (results / "claims.md").write_text("\n".join(out) + "\n", encoding="utf-8")
    cells.drop(columns=[c for c in ("train_cost",) if c in cells.columns]).to_csv(
        results / "claims.csv", index=False
    )
    plot_steps(cells, results / "fd_vs_steps.png")
    print("\n".join(out))


def _label(row) -> str:
    from cdmbench.report import model_label

    return model_label(row["method"], row.get("variant") or "")


def _fmt(row) -> str:
    if row is None:
        return "—"
    ci = row["ci"]
    return f"{row['mean']:.3g}" if not ci or math.isnan(ci) else f"{row['mean']:.3g} ± {ci:.2g}"


def _get(cells: pd.DataFrame, label: str, steps: int, metric: str):
    hit = cells[(cells["label"] == label) & (cells["steps"] == steps) & (cells["metric"] == metric)]
    return None if hit.empty else hit.iloc[-1]


def _separated(a, b, lower_better: bool = True) -> int:
    """+1 if a is better than b with non-overlapping intervals, -1 if worse, 0 if tied."""
    if a is None or b is None:
        return 0
    if a["hi"] < b["lo"]:
        return 1 if lower_better else -1
    if b["hi"] < a["lo"]:
        return -1 if lower_better else 1
    return 0


def _table(cells: pd.DataFrame, labels: list[str], steps: list[int], metric: str) -> list[str]:
    head = "| model | " + " | ".join(f"{s} step{'s' * (s > 1)}" for s in steps) + " |"
    rows = [head, "|---|" + "---:|" * len(steps)]
    for lab in labels:
        rows.append(
            f"| {lab} | " + " | ".join(_fmt(_get(cells, lab, s, metric)) for s in steps) + " |"
        )
    return rows


def _labels(cells: pd.DataFrame) -> list[str]:
    from cdmbench.results import method_key

    labs = cells.drop_duplicates("label")[["method", "label"]]
    return [
        lab
        for _, lab in sorted(
            zip(labs["method"], labs["label"], strict=True), key=lambda t: (method_key(t[0]), t[1])
        )
    ]


def claim_steps(cells: pd.DataFrame) -> list[str]:
    steps = sorted(int(s) for s in cells[cells["metric"] == "fd_digits"]["steps"].unique())
    tuned = [lab for lab in _labels(cells) if lab == "teacher" or lab.endswith("(tuned)")]
    out = ["## (a) One student at every step count\n"]
    out.append(
        "FD of each tuned student at 1-8 steps. CDM trains on random schedules of 1 to n_max "
        "steps and samples at 4 steps on its evaluation list, uniformly elsewhere; DMD2 trains "
        "on its 4-step list only; CD (one phase) is LCM's any-step sampler; DMD is one-step.\n"
    )
    out += _table(cells, tuned, steps, "fd_digits")
    verdict = []
    for lab in tuned:
        if lab == "teacher":
            continue
        rows = [_get(cells, lab, s, "fd_digits") for s in steps]
        rows = [r for r in rows if r is not None]
        if len(rows) < 2:
            continue
        best = min(rows, key=lambda r: r["mean"])
        worse = [int(r["steps"]) for r in rows if r["steps"] > 1 and _separated(best, r) == 1
                 and r["mean"] > 1.5 * best["mean"]]  # fmt: skip
        verdict.append(
            f"- {lab}: best FD {best['mean']:.3g} at {int(best['steps'])} steps; "
            + (
                f"more than 1.5x worse (intervals separated) at {', '.join(map(str, worse))} steps"
                if worse
                else "within 1.5x of its best at every count past 1 (or tied with it)"
            )
        )
    out += ["", *verdict, ""]
    return out


def claim_modes(cells: pd.DataFrame) -> list[str]:
    labels = [lab for lab in _labels(cells) if lab == "teacher" or "(tuned" in lab]
    out = ["## (b) Mode seeking\n"]
    out.append(
        "Recall (pooled over classes) and per-class recall (mean, and the worst class) at 1, 2 "
        "and 4 steps. Reverse-KL distribution matching (cdm, dmd, dmd2) is expected to cover "
        "fewer modes than consistency distillation (cd) and the 50-step teacher.\n"
    )
    for metric in ("recall", "class_recall_mean", "class_recall_min"):
        out += [f"\n**{metric}** (higher is better)\n"]
        out += _table(cells, labels, [1, 2, 4], metric)
    out.append("")
    for s in (1, 2, 4):
        cd = _get(cells, "cd (tuned)", s, "recall")
        for lab in labels:
            if lab.startswith(("cdm", "dmd")):
                r = _get(cells, lab, s, "recall")
                sep = _separated(r, cd, lower_better=False)
                word = {1: "higher than", -1: "lower than", 0: "tied with"}[sep]
                if r is not None and cd is not None:
                    out.append(
                        f"- {s} step{'s' * (s > 1)}: {lab} recall {_fmt(r)} is {word} cd's {_fmt(cd)}"
                    )
    out.append("")
    return out


def claim_gan(cells: pd.DataFrame) -> list[str]:
    from cdmbench.registry import METHODS

    labs = _labels(cells)
    tuned_gan = METHODS.get("dmd2").default_config("digits").gan
    flipped = [lab for lab in labs if lab.startswith("dmd2 (tuned,") and "gan=" in lab]
    with_gan = "dmd2 (tuned)" if tuned_gan else (flipped[0] if flipped else None)
    without = (flipped[0] if flipped else None) if tuned_gan else "dmd2 (tuned)"
    rows = [r for r in ("cdm (tuned)", without, with_gan, "dmd2 (paper)") if r in labs]
    out = ["## (c) No GAN needed\n"]
    out.append(
        "CDM (no auxiliary objective) against DMD2 without and with its GAN head (classifier "
        "branch on the fake score's features, real digits, official loss weights 5e-3 / 1e-2).\n"
    )
    out += _table(cells, rows, [1, 2, 4], "fd_digits")
    out.append("")
    word = {1: "better than", -1: "worse than", 0: "tied with"}
    for s in (1, 2, 4):
        c = _get(cells, "cdm (tuned)", s, "fd_digits")
        g = _get(cells, with_gan, s, "fd_digits") if with_gan else None
        n = _get(cells, without, s, "fd_digits") if without else None
        if c is not None and g is not None:
            out.append(f"- {s} step{'s' * (s > 1)}: cdm (tuned) {_fmt(c)} is {word[_separated(c, g)]} DMD2 "
                       f"with its GAN head {_fmt(g)}")  # fmt: skip
        if g is not None and n is not None:
            out.append(f"- {s} step{'s' * (s > 1)}: DMD2 with the GAN head {_fmt(g)} is "
                       f"{word[_separated(g, n)]} DMD2 without it {_fmt(n)}")  # fmt: skip
    out.append("")
    return out


def plot_steps(cells: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fd = cells[(cells["metric"] == "fd_digits") & (cells["steps"] <= 8)]  # not the 50-step teacher
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for lab in _labels(fd):
        g = fd[fd["label"] == lab].sort_values("steps")
        if g["steps"].nunique() < 4:
            continue
        ax.errorbar(g["steps"], g["mean"], yerr=g["ci"].fillna(0), marker="o", capsize=3, label=lab)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("FD (digits classifier features), lower is better")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("digits: FD vs step count (mean ± 95 % interval over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
