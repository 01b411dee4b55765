"""The main job in one call: train every method, evaluate at 1, 2, 4 steps, write the report.

Every stage is content-keyed and resumable: a second run reuses finished training runs,
sample folders and records, and an interrupted one continues where it stopped. On CPU the
methods train in parallel worker processes (one thread each), which on small networks beats
one process with all threads.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

QUICK_FACTOR = 5  # --quick trains for 1/5 of the default iterations


@dataclass
class BenchConfig:
    backbone: str = "digits"
    methods: tuple[str, ...] = ("cdm", "dmd", "dmd2", "cd")
    steps: tuple[int, ...] = (1, 2, 4)
    quick: bool = False  # CI budget: 1/5 of the iterations, the backbone's eval_samples_quick
    seed: int = 0
    runs: Path = Path("runs")
    samples: Path = Path("runs/samples")
    results: Path = Path("results")
    workers: int = 2  # parallel training processes on CPU
    per_prompt: int | None = None  # samples per prompt (None: the backbone's eval settings)
    metrics: tuple[str, ...] | None = None
    device: str = "cpu"
    iters: int | None = None  # override every method's iterations (None: its default budget)
    compile: str | None = None  # torch.compile mode for evaluation; None: eager
    backbone_settings: dict[str, Any] = field(default_factory=dict)  # backbone.KEY settings


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
) -> str:
    """Train (or reuse) one method's default run; returns the run directory."""
    if threads:
        torch.set_num_threads(threads)
    from cdmbench.backbones import get_backbone
    from cdmbench.config import resolve
    from cdmbench.registry import METHODS
    from cdmbench.training.run import train_run

    cls = METHODS.get(method)
    tc, mc = resolve(cls, backbone, seed=seed, device=device, iters=iters)
    if quick and iters is None:
        from dataclasses import replace

        tc = replace(tc, iters=max(1, tc.iters // QUICK_FACTOR))

    def progress(it: int, logs: dict[str, float]) -> None:
        if q is not None:
            q.put((method, it, tc.iters))

    res = train_run(
        cls(mc),
        get_backbone(backbone, device=device, settings=settings),
        tc,
        runs,
        progress=progress,
    )
    if q is not None:
        q.put((method, tc.iters, tc.iters))
    return str(res.run_dir)


def train_all(
    cfg: BenchConfig, on_progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Path]:
    """Train every method; in parallel processes on CPU, one after another on GPU."""
    if cfg.device != "cpu" or cfg.workers <= 1 or len(cfg.methods) == 1:
        return {
            m: Path(
                _train_one(
                    m,
                    cfg.backbone,
                    cfg.quick,
                    cfg.seed,
                    str(cfg.runs),
                    cfg.device,
                    0,
                    _Relay(on_progress),
                    cfg.iters,
                    cfg.backbone_settings,
                )
            )
            for m in cfg.methods
        }
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            futures = {
                m: pool.submit(
                    _train_one,
                    m,
                    cfg.backbone,
                    cfg.quick,
                    cfg.seed,
                    str(cfg.runs),
                    cfg.device,
                    1,
                    q,
                    cfg.iters,
                    cfg.backbone_settings,
                )
                for m in cfg.methods
            }
            while not all(f.done() for f in futures.values()):
                try:
                    msg = q.get(timeout=0.2)
                except queue.Empty:
                    continue
                if on_progress is not None:
                    on_progress(*msg)
            return {m: Path(f.result()) for m, f in futures.items()}


class _Relay:
    """Queue-like adapter that forwards progress messages straight to a callback."""

    def __init__(self, fn: Callable[[str, int, int], None] | None) -> None:
        self.fn = fn

    def put(self, msg: tuple[str, int, int]) -> None:
        if self.fn is not None:
            self.fn(*msg)


def run_bench(
    cfg: BenchConfig,
    on_train: Callable[[str, int, int], None] | None = None,
    on_eval: Callable[[str, int, int], None] | None = None,
) -> tuple[dict[str, Path], list[dict]]:
    """Train, evaluate and report; returns the run directories and the new records."""
    from cdmbench.backbones import get_backbone
    from cdmbench.evaluate import EvalPlan, candidates_from_dirs, run_eval, teacher_candidate
    from cdmbench.prompts_io import load_prompt_set
    from cdmbench.results import ResultStore

    run_dirs = train_all(cfg, on_train)
    bb = get_backbone(cfg.backbone, device=cfg.device, settings=cfg.backbone_settings)
    s = bb.settings  # the backbone's evaluation defaults
    prompt_set, prompts = load_prompt_set(s.eval_prompts, backbone=bb)
    per_prompt = cfg.per_prompt or (s.eval_samples_quick if cfg.quick else s.eval_samples)
    cands = [teacher_candidate(bb)] + candidates_from_dirs(list(run_dirs.values()), cfg.device)
    plan = EvalPlan(
        bb,
        cands,
        list(cfg.steps),
        list(cfg.metrics or s.eval_metrics),
        prompts,
        prompt_set,
        per_prompt,
        cfg.seed,
        cfg.samples,
        ResultStore(cfg.results),
        batch_size=s.eval_batch,
        reference=s.fid_reference,
        compile=cfg.compile,
    )
    new = run_eval(plan, on_eval)
    return run_dirs, new


def methods_arg(text: str | None, all_methods: Sequence[str]) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",")) if text else tuple(all_methods)
