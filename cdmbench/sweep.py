"""Equal tuning budgets: a seeded random search over each method's declared search space.

Every method declares ``search_space`` (:attr:`cdmbench.training.method.Method.search_space`):
a few ``Config`` settings that matter, each a range holding the paper's value. A sweep of K
trials with seed S is, for every method alike:

- trial 0: the base variant's configuration unchanged (``paper`` by default: the authors'
  hyperparameters transferred to the backbone, so every search includes its authors'
  setting; ``--variant-base tuned`` starts from the tuned one instead);
- trials 1..K-1: the base configuration with the space's settings drawn at random, trial i
  from a generator seeded by (S, method, i), so trial i is the same in a sweep of any K
  (a longer sweep extends a shorter one) and does not depend on the other methods.

Log ranges are drawn log-uniformly, floats are rounded to 3 significant digits (readable,
and the same in JSON), integer ranges are inclusive. Each trial trains a run with training
seed S on the sweep's budget (``--iters``, or the quick budget: 1/5 of the base variant's
iterations, as ``bench --quick``) and is scored on the backbone's validation split, which is
disjoint from the test split reports use: the domain Fréchet distance (``fd_digits``'s
features) of the student's samples at 1, 2 and 4 steps against the val split's real images,
``per_prompt`` samples per prompt from evaluation seed S + 10,000 (never a report's seed).
The objective is the mean FD over those step counts (lower is better); a trial whose
training diverges (a non-finite loss) or whose samples are not finite has no objective and
ranks last.

Each trial is one line of ``RESULTS/sweeps.jsonl`` (appended under a lock, like the records
store): method, backbone, sweep seed, K, trial index, params, budget, run id, FD per step
count, objective, wall time and provenance. Training runs are content-addressed already; a
trial whose line exists (same key: method, backbone, seed, trial, base, budget, scoring and
run id) is neither retrained nor rescored. Trials train with one thread each (in ``workers``
processes on the CPU), so their scores do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cdmbench.errors import UserError
from cdmbench.results import ResultStore, git_revision, now, versions

SWEEPS = "sweeps.jsonl"
KINDS = ("log", "uniform", "int", "choice")
EVAL_SEED_OFFSET = 10_000  # the evaluation seed is S + this: no report uses it
STEPS = (1, 2, 4)  # step counts the objective averages over
PER_PROMPT = 50  # samples per prompt (500 on digits' ten prompts)
MAX_TRIALS = 10_000
REFERENCE = "val"


# ------------------------------------------------------------------------------ spaces
def space_problems(method_cls: type, backbone: str | None = "digits") -> list[str]:
    """What is wrong with a method's search space: names that are not ``Config`` fields,
    malformed ranges, and ranges that miss the paper's value (``Config``'s default, and the
    ``paper`` and ``tuned`` variants' on ``backbone``)."""
    from cdmbench.training.method import config_to_dict

    out: list[str] = []
    space = method_cls.search_space
    names = {f.name for f in fields(method_cls.Config)}
    checks = {"paper default": config_to_dict(method_cls.Config())}
    if backbone is not None:
        for v in ("paper", "tuned"):
            checks[f"{v} on {backbone}"] = config_to_dict(method_cls.default_config(backbone, v))
    for name, spec in space.items():
        where = f"{method_cls.name}.search_space['{name}']"
        if name not in names:
            out.append(f"{where}: not a setting of {method_cls.Config.__name__}")
            continue
        if not isinstance(spec, tuple) or not spec or spec[0] not in KINDS:
            out.append(f"{where}: use (kind, lo, hi) or ('choice', [values]), kind in {KINDS}")
            continue
        if spec[0] == "choice":
            if len(spec) != 2 or not isinstance(spec[1], (list, tuple)) or not spec[1]:
                out.append(f"{where}: a choice is ('choice', [values])")
                continue
        elif len(spec) != 3 or not spec[1] < spec[2] or (spec[0] == "log" and spec[1] <= 0):
            out.append(f"{where}: a range is (kind, lo, hi) with lo < hi (lo > 0 for log)")
            continue
        for label, cfg in checks.items():
            if not contains(spec, cfg[name]):
                out.append(f"{where}: {spec} misses the {label} value {cfg[name]!r}")
    return out


def contains(spec: tuple, value: Any) -> bool:
    """Whether ``value`` lies in the search range ``spec``."""
    if spec[0] == "choice":
        return any(_same(value, c) for c in spec[1])
    if value is None or isinstance(value, (bool, str, tuple, list)):
        return False
    if spec[0] == "int" and int(value) != value:
        return False
    return spec[1] <= value <= spec[2]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def draw(space: dict[str, tuple], rng: np.random.Generator) -> dict[str, Any]:
    """One point of ``space``, drawn in the space's order."""
    out: dict[str, Any] = {}
    for name, spec in space.items():
        kind = spec[0]
        if kind == "choice":
            v = spec[1][int(rng.integers(len(spec[1])))]
            out[name] = list(v) if isinstance(v, tuple) else v
        elif kind == "int":
            out[name] = int(rng.integers(spec[1], spec[2] + 1))
        elif kind == "log":
            u = rng.uniform(math.log(spec[1]), math.log(spec[2]))
            out[name] = min(max(_round(math.exp(u)), spec[1]), spec[2])
        else:
            out[name] = min(max(_round(rng.uniform(spec[1], spec[2])), spec[1]), spec[2])
    return out


def _name_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def trial_params(method_cls: type, backbone: str, seed: int, trial: int, base: str) -> dict:
    """The settings trial ``trial`` of a sweep with ``seed`` sets: the base variant's values
    of the space's settings for trial 0, a draw seeded by (seed, method, trial) otherwise."""
    from cdmbench.training.method import config_to_dict

    space = method_cls.search_space
    if trial == 0:
        cfg = config_to_dict(method_cls.default_config(backbone, base))
        return {k: list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k] for k in space}
    rng = np.random.default_rng([seed, _name_seed(method_cls.name), trial])
    return draw(space, rng)


# ------------------------------------------------------------------------------ store
class SweepStore(ResultStore):
    """``RESULTS/sweeps.jsonl``: one line per trial, appended under a lock."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.path = self.root / SWEEPS

    def lines(self) -> list[dict[str, Any]]:
        """Every well-formed trial line (torn or foreign lines are skipped)."""
        out = []
        if not self.path.is_file():
            return out
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and {"key", "method", "trial"} <= set(rec):
                    out.append(rec)
        return out


# ------------------------------------------------------------------------------ running
@dataclass
class SweepConfig:
    method: str
    backbone: str = "digits"
    trials: int = 8  # K, the same for every method
    seed: int = 0  # S: draws, training seed; evaluation seed S + EVAL_SEED_OFFSET
    iters: int | None = None  # training budget; None: 1/5 of the base variant's (quick)
    base: str = "paper"  # the variant trial 0 is and the others start from
    results: Path = Path("results")
    runs: Path = Path("runs")
    per_prompt: int = PER_PROMPT
    steps: tuple[int, ...] = STEPS
    workers: int = 2  # trials trained in parallel on the CPU (one thread each)
    device: str = "cpu"


def check(cfg: SweepConfig) -> type:
    """The method's class, after checking the sweep's settings (UserError otherwise)."""
    from cdmbench.registry import BACKBONES, METHODS
    from cdmbench.training.core import MAX_SEED
    from cdmbench.training.method import VARIANTS

    cls = METHODS.get(cfg.method)
    BACKBONES.get(cfg.backbone)
    if not cls.search_space:
        raise UserError(f"method '{cfg.method}' declares no search_space; it cannot be swept")
    if not 1 <= cfg.trials <= MAX_TRIALS:
        raise UserError(
            f"bad --trials {cfg.trials}: use 1 to {MAX_TRIALS} (the same K for every method)"
        )
    if not 0 <= cfg.seed <= MAX_SEED - EVAL_SEED_OFFSET:
        raise UserError(f"bad --seed {cfg.seed}: use 0 to {MAX_SEED - EVAL_SEED_OFFSET}")
    if cfg.iters is not None and not 1 <= cfg.iters <= 10_000_000:
        raise UserError(f"bad --iters {cfg.iters}: use a positive number of iterations")
    if cfg.base not in VARIANTS:
        raise UserError(f"bad --variant-base '{cfg.base}': use {' or '.join(VARIANTS)}")
    if not 1 <= cfg.per_prompt <= 100_000:
        raise UserError(f"bad --per-prompt {cfg.per_prompt}: use 1 to 100000")
    if cfg.per_prompt * 10 < 2:
        raise UserError("a Fréchet distance needs at least two samples")
    problems = space_problems(cls, None)
    if problems:
        raise UserError(problems[0])
    return cls


def trial_configs(cfg: SweepConfig, cls: type, trial: int) -> tuple[Any, Any, dict[str, Any]]:
    """(TrainConfig, method config, params) of one trial."""
    from cdmbench.bench import QUICK_FACTOR
    from cdmbench.config import resolve
    from cdmbench.settings import apply

    tc, mc = resolve(cls, cfg.backbone, variant=cfg.base, seed=cfg.seed, device=cfg.device)
    iters = cfg.iters if cfg.iters is not None else max(1, tc.iters // QUICK_FACTOR)
    tc = replace(tc, iters=iters)
    params = trial_params(cls, cfg.backbone, cfg.seed, trial, cfg.base)
    mc = apply(mc, {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}, "method")
    return tc, mc, params


def _key(cfg: SweepConfig, trial: int, tc: Any, run_id: str) -> str:
    what = {
        "method": cfg.method,
        "backbone": cfg.backbone,
        "seed": cfg.seed,
        "trial": trial,
        "base": cfg.base,
        "iters": tc.iters,
        "batch": tc.batch,
        "per_prompt": cfg.per_prompt,
        "steps": list(cfg.steps),
        "reference": REFERENCE,
        "run_id": run_id,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def plan(cfg: SweepConfig) -> list[tuple[int, str, str]]:
    """(trial, key, run dir) of every trial of the sweep."""
    from cdmbench.backbones import get_backbone
    from cdmbench.config import run_payload
    from cdmbench.metrics.digits import domain_judge
    from cdmbench.training.run import run_dir_for

    cls = check(cfg)
    bb = get_backbone(cfg.backbone, device=cfg.device)
    if domain_judge(bb, REFERENCE, device="cpu") is None:
        raise UserError(
            f"backbone '{cfg.backbone}' has no domain classifier and {REFERENCE} split to "
            "score trials on; sweep a backbone that has them (digits)"
        )
    out = []
    for i in range(cfg.trials):
        tc, mc, _ = trial_configs(cfg, cls, i)
        run_dir = run_dir_for(cfg.runs, run_payload(cls.name, bb, tc, mc))
        out.append((i, _key(cfg, i, tc, run_dir.name), str(run_dir)))
    return out


def score_run(run_dir: str | Path, steps: Sequence[int], per_prompt: int, seed: int, device="cpu"):
    """{steps: domain FD against the val split} of a finished run's student."""
    import torch

    from cdmbench.generate import generate, seeds_for
    from cdmbench.metrics.digits import domain_judge, no_domain
    from cdmbench.training.run import load_run

    loaded = load_run(run_dir, device=device)
    bb = loaded.backbone
    judge = domain_judge(bb, reference=REFERENCE, device="cpu")
    if judge is None:
        raise no_domain("cdmbench sweep", bb)
    triples = seeds_for(seed, bb.prompts("train"), per_prompt)
    prompts, seeds = [t[0] for t in triples], [t[2] for t in triples]
    labels = torch.tensor([p.label for p in prompts])
    fd: dict[str, float | None] = {}
    for n in steps:
        lat = generate(bb, loaded.student, prompts, seeds, loaded.method.sampler(n, bb.shift))
        images = bb.decode(lat)
        if not torch.isfinite(images).all():
            fd[str(n)] = None
            continue
        v = judge.score(images.cpu(), labels)["fd_digits"]
        fd[str(n)] = v if math.isfinite(v) else None
    return fd


def run_trial(cfg: SweepConfig, trial: int, key: str, threads: int = 1) -> dict[str, Any]:
    """Train (or reuse) and score one trial; returns its line."""
    import torch

    from cdmbench.backbones import get_backbone
    from cdmbench.errors import NonFiniteLossError
    from cdmbench.training.run import train_run

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cls = check(cfg)
        tc, mc, params = trial_configs(cfg, cls, trial)
        t0 = time.perf_counter()
        error = None
        run_dir: Path | None = None
        try:
            res = train_run(cls(mc), get_backbone(cfg.backbone, device=cfg.device), tc, cfg.runs)
            run_dir = res.run_dir
        except NonFiniteLossError as e:
            error = f"non-finite loss: {e}"
        train_s = time.perf_counter() - t0
        fd: dict[str, float | None] = {str(n): None for n in cfg.steps}
        info: dict[str, Any] = {}
        if run_dir is not None:
            fd = score_run(run_dir, cfg.steps, cfg.per_prompt, cfg.seed + EVAL_SEED_OFFSET)
            info = json.loads((run_dir / "run.json").read_text())
            if any(v is None for v in fd.values()):
                error = "non-finite samples"
        wall_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    values = [v for v in fd.values() if v is not None]
    objective = float(np.mean(values)) if error is None and values else None
    return {
        "key": key,
        "method": cfg.method,
        "backbone": cfg.backbone,
        "seed": cfg.seed,
        "trials": cfg.trials,
        "trial": trial,
        "base": cfg.base,
        "params": params,
        "variant": cls.variant_of(cfg.backbone, mc),
        "train_iters": tc.iters,
        "train_batch": tc.batch,
        "train_seed": tc.seed,
        "eval_seed": cfg.seed + EVAL_SEED_OFFSET,
        "per_prompt": cfg.per_prompt,
        "steps": list(cfg.steps),
        "reference": f"{cfg.backbone} {REFERENCE} split",
        "metric": "fd_digits",
        "fd": fd,
        "objective": objective,
        "error": error,
        "run_id": run_dir.name if run_dir is not None else "",
        "config_key": info.get("config_key", ""),
        "train_s": round(train_s, 3),
        "wall_s": round(wall_s, 3),
        "versions": versions(),
        "git_rev": git_revision(),
        "time": now(),
    }


def _worker(cfg: SweepConfig, trial: int, key: str) -> dict[str, Any]:
    return run_trial(cfg, trial, key, threads=1)


def run_sweep(
    cfg: SweepConfig, on_trial: Callable[[int, int, dict | None], None] | None = None
) -> list[dict[str, Any]]:
    """Run every trial not yet in ``sweeps.jsonl``; returns the sweep's K lines in trial order
    (reused and new). ``on_trial(done, total, line)`` reports progress."""
    store = SweepStore(cfg.results)
    store.check_writable()
    todo = plan(cfg)
    have = {r["key"]: r for r in store.lines()}
    done = {i: have[k] for i, k, _ in todo if k in have}
    total = len(todo)
    if on_trial is not None:
        on_trial(len(done), total, None)
    missing = [(i, k) for i, k, _ in todo if i not in done]

    def finished(line: dict[str, Any]) -> None:
        store.append([line])
        done[line["trial"]] = line
        if on_trial is not None:
            on_trial(len(done), total, line)

    if cfg.device != "cpu" or cfg.workers <= 1 or len(missing) <= 1:
        for i, k in missing:
            finished(run_trial(cfg, i, k, threads=1 if cfg.device == "cpu" else 0))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx) as pool:
            futures = [pool.submit(_worker, cfg, i, k) for i, k in missing]
            for f in as_completed(futures):
                finished(f.result())
    return [done[i] for i in range(total)]


# ------------------------------------------------------------------------------ summary
GROUP = ["backbone", "method", "seed", "base", "train_iters", "per_prompt"]
SUMMARY_COLUMNS = [
    *GROUP,
    "K",
    "failed",
    "best",
    "median",
    "worst",
    "paper",
    "best_trial",
    "best_params",
    "best_run_id",
    "wall_s",
]


def _lines_frame(results_dir: str | Path) -> pd.DataFrame:
    lines = SweepStore(results_dir).lines()
    if not lines:
        return pd.DataFrame(columns=[*GROUP, "trial", "objective", "params", "time"])
    df = pd.DataFrame(lines)
    # the newest line per trial of a sweep (a version bump rescored it)
    df = df.sort_values("time", kind="stable").drop_duplicates([*GROUP, "trial"], keep="last")
    return df.sort_values([*GROUP, "trial"], kind="stable").reset_index(drop=True)


def summary(results_dir: str | Path) -> pd.DataFrame:
    """One row per sweep (backbone, method, sweep seed, base variant, budget, samples): K
    trials, how many failed, the best, median and worst objective (a failed trial counts as
    worst), trial 0's (the base variant's, ``paper`` by default), the best trial and its
    params and run id, and the total wall time."""
    return summarize(_lines_frame(results_dir))


def summarize(lines: pd.DataFrame | list[dict[str, Any]]) -> pd.DataFrame:
    """:func:`summary` of the given trial lines (one sweep's, as :func:`run_sweep` returns)."""
    df = lines if isinstance(lines, pd.DataFrame) else pd.DataFrame(lines)
    if df.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    rows = []
    for key, g in df.groupby(GROUP, sort=True, dropna=False):
        g = g.sort_values("trial", kind="stable")  # ties go to the lowest trial index
        obj = g["objective"].astype(float).fillna(math.inf).to_numpy()
        best = int(np.argmin(obj))
        t0 = g[g["trial"] == 0]["objective"]
        rows.append(
            {
                **dict(zip(GROUP, key, strict=True)),
                "K": len(g),
                "failed": int(np.isinf(obj).sum()),
                "best": float(obj[best]),
                "median": float(np.median(obj)),
                "worst": float(obj.max()),
                "paper": float(t0.iloc[0]) if len(t0) and t0.iloc[0] is not None else math.nan,
                "best_trial": int(g["trial"].iloc[best]),
                "best_params": g["params"].iloc[best],
                "best_run_id": g["run_id"].iloc[best],
                "wall_s": float(g["wall_s"].sum()),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def best_params(
    results_dir: str | Path,
    method: str,
    backbone: str = "digits",
    seed: int | None = None,
    base: str | None = None,
) -> dict[str, Any] | None:
    """The settings of the best trial of ``method``'s sweep on ``backbone``; None when there is
    no such sweep or its best trial failed.

    Trials are grouped into sweeps by (sweep seed, base variant, training iterations, samples
    per prompt); ``seed`` and ``base`` keep only the sweeps with that seed and base variant.
    Of those, the sweep with the most trials K is taken (the one with the newest trial where
    two have the same K, then the first in (seed, base, iters, per_prompt) order), and of its
    trials the one with the lowest objective (the lowest trial index on a tie)."""
    df = _lines_frame(results_dir)
    df = df[(df["method"] == method) & (df["backbone"] == backbone)]
    if seed is not None:
        df = df[df["seed"] == seed]
    if base is not None:
        df = df[df["base"] == base]
    if df.empty:
        return None
    s = summarize(df)
    times = df["time"] if "time" in df.columns else pd.Series("", index=df.index)
    newest = times.fillna("").astype(str).groupby([df[c] for c in GROUP], sort=False).max()
    s["_newest"] = [newest.get(tuple(r[c] for c in GROUP), "") for _, r in s.iterrows()]
    top = s.sort_values(["K", "_newest"], ascending=False, kind="stable").iloc[0]
    if not math.isfinite(top["best"]):
        return None
    return dict(top["best_params"])


def _num(v: float) -> str:
    return "failed" if not math.isfinite(v) else f"{v:.2f}"


def _params_text(p: dict[str, Any]) -> str:
    def one(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:g}"
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return str(v)

    return ", ".join(f"{k}={one(v)}" for k, v in p.items())


TABLE_HEAD = (
    "method",
    "K",
    "budget (iters)",
    "best",
    "median",
    "worst",
    "trial 0",
    "best trial's settings",
    "wall",
)


def table_rows(s: pd.DataFrame) -> list[list[str]]:
    """Cells of the summary table, one row per sweep (see :data:`TABLE_HEAD`)."""
    rows = []
    for _, r in s.iterrows():
        rows.append(
            [
                str(r["method"]),
                f"{r['K']}" + (f" ({r['failed']} failed)" if r["failed"] else ""),
                str(r["train_iters"]),
                _num(r["best"]),
                _num(r["median"]),
                _num(r["worst"]),
                _num(r["paper"]) + (f" ({r['base']})" if r["base"] != "paper" else ""),
                _params_text(r["best_params"]),
                f"{r['wall_s'] / 60:.1f} min",
            ]
        )
    return rows


CAPTION = (
    "Tuning sweeps: seeded random search, the same K trials per method; objective = mean "
    "domain FD at 1, 2 and 4 steps against the validation split (lower is better), which is "
    "disjoint from the test split that results are reported on. Trial 0 is the sweep's base "
    "configuration: the method's paper configuration, or the variant named beside it."
)


def render_markdown(s: pd.DataFrame) -> str:
    """The summary as a markdown table (empty string when there are no sweeps)."""
    if s.empty:
        return ""
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(s)]
    return "\n".join(lines) + "\n"


def render_html(s: pd.DataFrame) -> str:
    """The summary as an HTML table (empty string when there are no sweeps)."""
    from html import escape

    if s.empty:
        return ""
    head = "".join(f"<th>{escape(h)}</th>" for h in TABLE_HEAD)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(s)
    )
    return (
        f"<table><caption>{escape(CAPTION)}</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


__all__ = [
    "SweepConfig",
    "SweepStore",
    "best_params",
    "contains",
    "draw",
    "render_html",
    "render_markdown",
    "run_sweep",
    "space_problems",
    "summarize",
    "summary",
    "trial_params",
]
