"""The main job in one call: train every method, evaluate at 1, 2, 4 steps, write the report.

A unit of work is (method, variant, seed): ``seeds`` trains every method in every variant once
per training seed, and each run is evaluated with the evaluation seed equal to its training
seed (the teacher at every one of those seeds), so the report's intervals cover both.

``match_compute`` adds the compute-matched comparison: after the default budgets, every
other (method, variant) is trained again at the cheapest one's full-budget FLOPs (its
recorded cost, data made before training included), for every seed, at the iterations
whose cost scaled from the first seed's is nearest (:func:`iters_for`). Those runs are
labelled variant "<variant>, compute-matched" (hashed into the run, so that ``eval`` and
``report`` keep them apart from the default budget) and evaluated beside the others; the
report's compute-matched table reads them.

Every stage is content-keyed and resumable: a second run reuses finished training runs,
sample folders and records, and an interrupted one continues where it stopped. On CPU the
methods train in parallel worker processes (one thread each), which on small networks beats
one process with all threads.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import queue
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cdmbench.results import COMPUTE_MATCHED

QUICK_FACTOR = 5  # --quick trains for 1/5 of the default iterations


@dataclass
class BenchConfig:
    backbone: str = "digits"
    methods: tuple[str, ...] = ("cdm", "dmd", "dmd2", "cd")
    steps: tuple[int, ...] = (1, 2, 4)
    quick: bool = False  # CI budget: 1/5 of the iterations, the backbone's eval_samples_quick
    seeds: tuple[int, ...] = (0,)  # training seeds; each run is evaluated at its own seed
    variants: tuple[str, ...] = ("tuned",)  # each method in each variant (VARIANTS)
    runs: Path = Path("runs")
    samples: Path = Path("runs/samples")
    results: Path = Path("results")
    workers: int = 2  # parallel training processes on CPU
    per_prompt: int | None = None  # samples per prompt (None: the backbone's eval settings)
    metrics: tuple[str, ...] | None = None
    device: str = "cpu"
    iters: int | None = None  # override every method's iterations (None: its default budget)
    compile: str | None = None  # torch.compile mode for evaluation; None: eager
    match_compute: bool = False  # also train every model at the cheapest one's FLOPs
    backbone_settings: dict[str, Any] = field(default_factory=dict)  # backbone.KEY settings


@dataclass(frozen=True)
class Unit:
    """One training run of the bench: a method in a variant at a training seed."""

    method: str
    variant: str
    seed: int
    iters: int | None = None  # a compute-matched run's iterations; None: the default budget

    @property
    def note(self) -> str | None:
        """The run's variant note: compute-matched runs are told apart from the default."""
        return COMPUTE_MATCHED if self.iters is not None else None

    @property
    def label(self) -> str:
        extra = f", {self.note}" if self.note else ""
        return f"{self.method} ({self.variant}, seed {self.seed}{extra})"


def units(cfg: BenchConfig) -> list[Unit]:
    """Every (method, variant, seed) the bench trains, seeds outermost (a partial bench has
    whole seeds of every method)."""
    return [Unit(m, v, s) for s in cfg.seeds for m in cfg.methods for v in cfg.variants]


def _train_one(
    method: str,
    backbone: str,
    quick: bool,
    seed: int,
    runs: str,
    device: str,
    threads: int,
    q=None,
    iters: int | None = None,
    settings: dict[str, Any] | None = None,
    variant: str = "tuned",
    label: str | None = None,
    note: str | None = None,
) -> str:
    """Train (or reuse) one method's default run in ``variant``; returns the run directory.
    Progress messages name it by ``label`` (the method by default); ``note`` is added to the
    run's variant label (run.json)."""
    if threads:
        torch.set_num_threads(threads)
    from cdmbench.backbones import get_backbone
    from cdmbench.config import resolve
    from cdmbench.registry import METHODS
    from cdmbench.training.run import train_run

    cls = METHODS.get(method)
    tc, mc = resolve(cls, backbone, variant=variant, seed=seed, device=device, iters=iters)
    if quick and iters is None:
        from dataclasses import replace

        tc = replace(tc, iters=max(1, tc.iters // QUICK_FACTOR))

    name = label or method

    def progress(it: int, logs: dict[str, float]) -> None:
        if q is not None:
            q.put((name, it, tc.iters))

    res = train_run(
        cls(mc),
        get_backbone(backbone, device=device, settings=settings),
        tc,
        runs,
        progress=progress,
        variant_note=note,
    )
    if q is not None:
        q.put((name, tc.iters, tc.iters))
    return str(res.run_dir)


def train_all(
    cfg: BenchConfig,
    on_progress: Callable[[str, int, int], None] | None = None,
    todo: Sequence[Unit] | None = None,
) -> dict[Unit, Path]:
    """Train ``todo`` (every (method, variant, seed) of ``cfg`` by default); in parallel
    processes on CPU, one after another on GPU. Progress is reported per unit, by its label."""
    todo = list(units(cfg) if todo is None else todo)

    def args(u: Unit, threads: int, q) -> tuple:
        return (
            u.method,
            cfg.backbone,
            cfg.quick,
            u.seed,
            str(cfg.runs),
            cfg.device,
            threads,
            q,
            u.iters if u.iters is not None else cfg.iters,
            cfg.backbone_settings,
            u.variant,
            u.label,
            u.note,
        )

    if cfg.device != "cpu" or cfg.workers <= 1 or len(todo) == 1:
        return {u: Path(_train_one(*args(u, 0, _Relay(on_progress)))) for u in todo}
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            futures = {u: pool.submit(_train_one, *args(u, 1, q)) for u in todo}
            while not all(f.done() for f in futures.values()):
                try:
                    msg = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                if on_progress is not None:
                    on_progress(*msg)
            return {u: Path(f.result()) for u, f in futures.items()}


class _Relay:
    """Queue-like adapter that forwards progress messages straight to a callback."""

    def __init__(self, fn: Callable[[str, int, int], None] | None) -> None:
        self.fn = fn

    def put(self, msg: tuple[str, int, int]) -> None:
        if self.fn is not None:
            self.fn(*msg)


def cost_at(cost: dict[str, Any], iters: int) -> float:
    """A run's recorded FLOPs (run.json "cost") scaled to ``iters`` iterations: the training
    loop's per iteration, data of a fixed size as is, data sized by the run's length
    (``per_iter``) for ``iters`` iterations up to its cap."""
    from cdmbench.training.teacher_data import MAX_SAMPLES

    train = cost.get("train_flops", cost["flops"])  # runs recorded before data accounting
    total = train / cost["iters"] * iters
    for d in (cost.get("data") or {}).values():
        if d.get("per_iter") and d.get("samples"):
            total += min(MAX_SAMPLES, iters * d["per_iter"]) * d["flops"] / d["samples"]
        else:
            total += d.get("flops", 0.0)
    return total


def iters_for(cost: dict[str, Any], target: float) -> int | None:
    """The iterations whose cost (:func:`cost_at`) is nearest ``target``; None where even one
    iteration costs more than twice the target (its data alone, say)."""
    lo, hi = 1, max(1, int(cost["iters"]))
    while cost_at(cost, hi) < target:  # the target may lie beyond the recorded run
        hi *= 2
    if cost_at(cost, 1) > 2 * target:
        return None
    while lo < hi:  # the first iteration count at or above the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if cost_at(cost, mid) < target else (lo, mid)
    if lo > 1 and target - cost_at(cost, lo - 1) < cost_at(cost, lo) - target:
        return lo - 1
    return lo


def matched_units(run_dirs: dict[Unit, Path]) -> tuple[float, list[Unit], list[str]]:
    """The compute-matched runs of a bench: (target FLOPs, units, notes). The target is the
    cheapest (method, variant)'s full-budget cost at the first seed; every other one gets the
    iterations that spend it (:func:`iters_for`), at every seed. Notes say what cannot be
    matched."""
    first = min(u.seed for u in run_dirs)
    costs = {}
    for u, d in run_dirs.items():
        if u.seed == first and u.iters is None:
            cost = json.loads((Path(d) / "run.json").read_text()).get("cost") or {}
            if cost.get("flops") and cost.get("iters"):
                costs[(u.method, u.variant)] = cost
    if len(costs) < 2:
        return math.nan, [], ["fewer than two runs with a recorded cost: nothing to match"]
    target = min(c["flops"] for c in costs.values())
    seeds = sorted({u.seed for u in run_dirs})
    out, notes = [], []
    for (m, v), c in costs.items():
        if c["flops"] <= target * (1 + 1e-9):
            continue  # the cheapest: its full budget is the target
        iters = iters_for(c, target)
        if iters is None:
            notes.append(f"{m} ({v}): one iteration costs more than {target:.3g} FLOPs")
        elif iters < c["iters"]:
            out += [Unit(m, v, s, iters) for s in seeds]
    return target, out, notes


def run_bench(
    cfg: BenchConfig,
    on_train: Callable[[str, int, int], None] | None = None,
    on_eval: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[Unit, Path], list[dict]]:
    """Train and evaluate (each seed's runs and the teacher at that evaluation seed); returns
    the run directories and the new records."""
    from cdmbench.backbones import get_backbone
    from cdmbench.evaluate import EvalPlan, candidates_from_dirs, run_eval, teacher_candidate
    from cdmbench.prompts_io import load_prompt_set
    from cdmbench.results import ResultStore

    run_dirs = train_all(cfg, on_train)
    if cfg.match_compute:
        _, matched, notes = matched_units(run_dirs)
        for note in notes:
            print(f"--match-compute: {note}", file=sys.stderr, flush=True)
        if matched:
            run_dirs |= train_all(cfg, on_train, matched)
    bb = get_backbone(cfg.backbone, device=cfg.device, settings=cfg.backbone_settings)
    s = bb.settings  # the backbone's evaluation defaults
    prompt_set, prompts = load_prompt_set(s.eval_prompts, backbone=bb)
    per_prompt = cfg.per_prompt or (s.eval_samples_quick if cfg.quick else s.eval_samples)
    teacher = teacher_candidate(bb)
    new: list[dict] = []
    for seed in cfg.seeds:
        dirs = [d for u, d in run_dirs.items() if u.seed == seed]
        plan = EvalPlan(
            bb,
            [teacher] + candidates_from_dirs(list(dict.fromkeys(dirs)), cfg.device),
            list(cfg.steps),
            list(cfg.metrics or s.eval_metrics),
            prompts,
            prompt_set,
            per_prompt,
            seed,
            cfg.samples,
            ResultStore(cfg.results),
            batch_size=s.eval_batch,
            reference=s.fid_reference,
            compile=cfg.compile,
        )
        tell = on_eval
        if on_eval is not None and len(cfg.seeds) > 1:
            tell = lambda label, k, n, seed=seed: on_eval(f"[seed {seed}] {label}", k, n)  # noqa: E731
        new += run_eval(plan, tell)
    return run_dirs, new


def methods_arg(text: str | None, all_methods: Sequence[str]) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",")) if text else tuple(all_methods)


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); rejects empty items, non-integers, negatives and duplicates."""
    from cdmbench.errors import UserError
    from cdmbench.training.core import MAX_SEED

    items = [t.strip() for t in str(text).split(",")]
    usage = "use comma-separated seeds, e.g. 0,1,2"
    if not str(text).strip() or any(t == "" for t in items):
        raise UserError(f"bad seed list '{text}': {usage}")
    seeds = []
    for t in items:
        try:
            seeds.append(int(t))
        except ValueError:
            raise UserError(f"bad seed list '{text}': '{t}' is not an integer; {usage}") from None
    if any(x < 0 or x > MAX_SEED for x in seeds):
        raise UserError(f"bad seed list '{text}': seeds must be >= 0 and <= {MAX_SEED}")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"bad seed list '{text}': duplicate seeds")
    return tuple(seeds)


def parse_variants(text: str) -> tuple[str, ...]:
    """'tuned,paper' -> ('tuned', 'paper'); each must be one of VARIANTS, no duplicates."""
    from cdmbench.errors import UserError
    from cdmbench.training.method import VARIANTS

    items = [t.strip() for t in str(text).split(",")]
    bad = [t for t in items if t not in VARIANTS]
    if not str(text).strip() or bad:
        what = f"'{bad[0]}' is not a variant" if bad and bad[0] else "empty item"
        raise UserError(f"bad variant list '{text}': {what}; use {','.join(VARIANTS)} or one")
    if len(set(items)) != len(items):
        raise UserError(f"bad variant list '{text}': duplicate variants")
    return tuple(items)
