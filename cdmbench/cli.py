"""The `cdmbench` command line: list, teacher, sample, train (and, as they land, eval/report/check)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Annotated

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from cdmbench.errors import CheckpointError, NonFiniteLossError, UserError
from cdmbench.registry import BACKBONES, METHODS, METRICS, UnknownNameError

COMPILE_MODES = (
    "default",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)  # torch.compile
CompileOpt = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile every denoiser before evaluating; the "
        "compile time is reported on its own (latency's compile_s).",
    ),
]
CompileModeOpt = Annotated[
    str, typer.Option(help=f"torch.compile mode with --compile: {', '.join(COMPILE_MODES)}.")
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        help="auto (this process's GPU when CUDA is available, else cpu), cpu, cuda or cuda:N."
    ),
]
ConfigOptHelp = typer.Option(
    "--config",
    help="A shipped recipe by name (see `cdmbench recipes`) or a TOML file with \\[train], "
    "\\[method] and \\[backbone] tables.",
)
BackboneSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Backbone setting, e.g. --set backbone.resolution=512 (see its Settings)."
    ),
]

app = typer.Typer(
    name="cdmbench",
    help="Benchmark and evaluation harness for few-step diffusion distillation.\n\n"
    "Distill a teacher with a registered method (cdm, dmd, dmd2, cd), sample it, and compare "
    "students across step counts. Everything runs on the embedded `digits` backbone on a CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

DEBUG = {"on": False}
TABLE_WIDTH = 4096  # columns of output that is not a terminal: no table is cut


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    DEBUG["on"] = debug or bool(os.environ.get("CDMBENCH_DEBUG"))
    # a log or CI (stdout not a terminal, COLUMNS unset) gets whole tables, not 80 columns
    out.width = TABLE_WIDTH if not out.is_terminal and "COLUMNS" not in os.environ else None


# ----------------------------------------------------------------------------- list
@app.command("list")
def list_cmd(
    what: Annotated[str, typer.Argument(help="methods, backbones or metrics")] = "methods",
) -> None:
    """List registered methods, backbones or metrics with a one-line description."""
    registries = {"methods": METHODS, "backbones": BACKBONES, "metrics": METRICS}
    if what not in registries:
        from cdmbench.registry import suggest

        close = suggest(what, list(registries))
        hint = f" — did you mean '{close}'?" if close else ""
        raise UserError(f"cannot list '{what}'{hint} (methods, backbones, metrics)")
    reg = registries[what]
    table = Table(title=f"cdmbench {what}")
    table.add_column("name", style="bold cyan")
    table.add_column("description")
    for name in reg.names():
        table.add_row(name, reg.describe(name))
    out.print(table)


# --------------------------------------------------------------------------- teacher
@app.command()
def teacher(
    backbone: Annotated[
        str, typer.Option(help="Backbone whose teacher to train (one that trains its own).")
    ] = "digits",
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Where to write the safetensors (default: runs/teacher/BACKBONE)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of both trainings.")] = 0,
    iters: Annotated[int, typer.Option(help="Teacher iterations.")] = 6000,
    epochs: Annotated[int, typer.Option(help="Classifier epochs.")] = 60,
) -> None:
    """Reproduce a backbone's shipped teacher (and classifier) where it trains its own: digits
    (seeded; minutes on 2 CPU cores).

    The package already ships both checkpoints; this command exists to rebuild them. Use the
    result with `cdmbench train ... --teacher-weights OUT/digits_teacher.safetensors`.
    """
    from cdmbench.backbones import get_backbone
    from cdmbench.settings import MAX_COUNT, check_option
    from cdmbench.training.core import TrainConfig

    check_option("--seed", seed, TrainConfig, "seed")
    check_option("--iters", iters, TrainConfig, "iters")
    check_option("--epochs", epochs, ge=1, le=MAX_COUNT)
    cls = BACKBONES.get(backbone)
    if not cls.trains_teacher:
        raise UserError(
            f"backbone '{backbone}' loads a pretrained teacher; it trains none of its own"
        )
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bb = get_backbone(backbone)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        console=console,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, it: int, total: int, loss: float) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total, loss=loss)
            bar.update(tasks[what], completed=it + 1, loss=loss)

        summary = bb.train_teacher_assets(
            out_dir or Path("runs/teacher") / backbone,
            seed=seed,
            iters=iters,
            epochs=epochs,
            progress=progress,
        )
    out.print(summary)


def _backbone(
    name: str,
    sets: list[str] | None,
    device: str = "cpu",
    config: str | None = None,
    only_backbone: bool = True,
):
    """The named backbone built with its settings from ``--config`` [backbone] and ``--set
    backbone.KEY=VALUE`` (``only_backbone``: other sections are an error)."""
    from cdmbench.backbones import get_backbone
    from cdmbench.config import backbone_settings

    settings = backbone_settings(BACKBONES.get(name), config, sets, only_backbone=only_backbone)
    return get_backbone(name, device=device, settings=settings)


def _pipeline_weights(
    teacher_weights: str | None, sets: list[str] | None
) -> tuple[str | None, list[str] | None]:
    """``--teacher-weights DIR`` naming a whole diffusers pipeline (a folder with
    model_index.json) is ``--set backbone.weights=DIR``: every component comes from DIR,
    none from the hub. With ``backbone.weights`` also set, DIR replaces the transformer only."""
    if teacher_weights is None or any(
        s.split("=", 1)[0].strip() == "backbone.weights" for s in sets or []
    ):
        return teacher_weights, sets
    if (Path(teacher_weights).expanduser() / "model_index.json").is_file():
        return None, [*(sets or []), f"backbone.weights={teacher_weights}"]
    return teacher_weights, sets


def _method_backbone(
    method: str | None, backbone: str | None, config: str | None
) -> tuple[str, str, object]:
    """(method, backbone, recipe) from the command line and a recipe's [recipe] table: a
    value given on both must agree; the method is required from one of them."""
    from cdmbench.recipes import load

    recipe = load(config) if config else None
    for what, given in (("METHOD", method), ("--backbone", backbone)):
        named = getattr(recipe, "method" if what == "METHOD" else "backbone", None)
        if given is not None and named is not None and given != named:
            raise UserError(
                f"{what} '{given}' disagrees with recipe '{recipe.name}' ({named}); "
                f"leave {what} out or choose another recipe"
            )
    method = method or getattr(recipe, "method", None)
    if method is None:
        raise UserError(
            "no method: give METHOD (see `cdmbench list methods`) or --config RECIPE "
            "(see `cdmbench recipes`)"
        )
    return method, backbone or getattr(recipe, "backbone", None) or "digits", recipe


# ---------------------------------------------------------------------------- sample
@app.command()
def sample(
    backbone: Annotated[str, typer.Option(help="Backbone of the teacher.")] = "digits",
    run: Annotated[
        Path | None, typer.Option(help="A training run directory: sample its student.")
    ] = None,
    steps: Annotated[
        str, typer.Option(help="Comma-separated step counts, one grid row block each.")
    ] = "1,2,4,50",
    guidance: Annotated[
        float | None, typer.Option(help="CFG scale (teacher default if unset; students use 1).")
    ] = None,
    per_prompt: Annotated[int, typer.Option(help="Samples per prompt.")] = 2,
    seed: Annotated[int, typer.Option(help="Run seed (per-sample seeds derive from it).")] = 0,
    out_path: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("samples.png"),
    teacher_weights: Annotated[
        str | None, typer.Option(help="Teacher weights (default: shipped/hub).")
    ] = None,
    set_: BackboneSetOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Write an image grid: one row block per step count, one column per prompt."""
    import torch

    from cdmbench.backbones.base import BackboneSettings
    from cdmbench.config import parse_steps
    from cdmbench.distributed import resolve_device
    from cdmbench.settings import check_option
    from cdmbench.training.core import TrainConfig

    check_option("--seed", seed, TrainConfig, "seed")
    check_option("--per-prompt", per_prompt, BackboneSettings, "eval_samples")
    check_option("--guidance", guidance, BackboneSettings, "teacher_guidance")
    device = resolve_device(device)
    from cdmbench.generate import SamplerSpec, generate, save_grid, seeds_for

    step_list = parse_steps(steps)
    if run is not None:
        from cdmbench.training.run import load_run

        if set_:
            raise UserError(
                "--set with --run: a run's backbone settings are those it was trained with"
            )
        loaded = load_run(run, device=device, teacher_weights=teacher_weights)
        bb, model = loaded.backbone, loaded.student
        spec_for = lambda n: loaded.method.sampler(n, bb.shift)  # noqa: E731
    else:
        teacher_weights, set_ = _pipeline_weights(teacher_weights, set_)
        bb = _backbone(backbone, set_, device)
        model = bb.load_teacher(teacher_weights)
        w = bb.default_teacher_guidance if guidance is None else guidance
        spec_for = lambda n: SamplerSpec(bb.schedule(n), guidance=w)  # noqa: E731
    prompts = bb.prompts("train")
    triples = seeds_for(seed, prompts, per_prompt)
    ordered = sorted(
        triples, key=lambda t: (t[1], prompts.index(t[0]))
    )  # rows of one sample per prompt
    images = []
    for n in step_list:
        lat = generate(bb, model, [t[0] for t in ordered], [t[2] for t in ordered], spec_for(n))
        images.append(bb.decode(lat))
    save_grid(
        torch.cat(images), out_path, nrow=len(prompts), scale=6 if bb.latent_shape[-1] <= 16 else 1
    )
    out.print(
        f"wrote {out_path}: rows = steps {step_list} x {per_prompt} samples, columns = {len(prompts)} prompts"
    )


# ----------------------------------------------------------------------------- train
@app.command()
def train(
    method: Annotated[
        str | None,
        typer.Argument(
            help="Distillation method (see `cdmbench list methods`); may be left out when "
            "--config names a recipe, and must agree with it otherwise."
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            help="Backbone (see `cdmbench list backbones`; default: the recipe's, else digits)."
        ),
    ] = None,
    iters: Annotated[
        int | None, typer.Option(help="Training iterations (method's backbone default if unset).")
    ] = None,
    batch: Annotated[int | None, typer.Option(help="Batch size per process.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the run.")] = 0,
    variant: Annotated[
        str,
        typer.Option(
            help="Defaults to start from: tuned (the backbone's tuned settings, where it has "
            "them) or paper (the authors' hyperparameters, transferred to the backbone)."
        ),
    ] = "tuned",
    config: Annotated[str | None, ConfigOptHelp] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help=("Override, e.g. --set method.update_ratio=3 or --set backbone.resolution=512."),
        ),
    ] = None,
    out_root: Annotated[Path, typer.Option("--out", help="Root of run directories.")] = Path(
        "runs"
    ),
    resume: Annotated[
        bool, typer.Option("--resume", help="Require and continue an existing checkpoint.")
    ] = False,
    on_nan: Annotated[
        str,
        typer.Option(help="On a non-finite loss: stop (keep last checkpoint) or skip the step."),
    ] = "stop",
    teacher_weights: Annotated[
        str | None,
        typer.Option(
            help="Teacher weights (default: shipped/hub); a diffusers pipeline folder is "
            "--set backbone.weights=FOLDER."
        ),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Distill the backbone's teacher into a few-step student with METHOD.

    `--config cdm-sd3` trains a shipped recipe (`cdmbench recipes`), method and backbone
    included. The run directory is named by a hash of the resolved configuration: the same
    command again reuses a finished run and continues an interrupted one from its last
    checkpoint.
    """
    from cdmbench.config import resolve
    from cdmbench.distributed import resolve_device
    from cdmbench.settings import check_option
    from cdmbench.training.core import TrainConfig
    from cdmbench.training.run import train_run

    for flag, value, name in (("--iters", iters, "iters"), ("--batch", batch, "batch")):
        check_option(flag, value, TrainConfig, name)
    check_option("--seed", seed, TrainConfig, "seed")
    method, backbone, recipe = _method_backbone(method, backbone, config)
    device = resolve_device(device)
    method_cls = METHODS.get(method)
    teacher_weights, set_ = _pipeline_weights(teacher_weights, set_)
    bb_obj = _backbone(backbone, set_, device, config, only_backbone=False)
    bb_obj.warn_prompt_overlap()
    if on_nan not in ("stop", "skip"):
        raise UserError(f"bad --on-nan '{on_nan}': use stop or skip")
    train_cfg, method_cfg = resolve(
        method_cls,
        backbone,
        config,
        set_,
        variant=variant,
        iters=iters,
        batch=batch,
        seed=seed,
        on_nan=on_nan,
        device=device,
    )
    m = method_cls(method_cfg)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(
        TextColumn(f"[bold]{method}[/] on {backbone}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[terms]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("train", total=train_cfg.iters, terms="")
        latest: dict[str, float] = {}

        def progress(it: int, logs: dict[str, float]) -> None:
            latest.update((k, v) for k, v in logs.items() if not k.endswith("grad_norm"))
            bar.update(
                task, completed=it, terms=" ".join(f"{k}={v:.3g}" for k, v in latest.items())
            )

        result = train_run(
            m,
            bb_obj,
            train_cfg,
            out_root,
            teacher_weights,
            resume=True if resume else None,
            progress=progress,
            recipe=recipe.record() if recipe else None,
        )
    if result.skipped:
        out.print(f"already trained: {result.run_dir}")
    else:
        how = f"resumed at iteration {result.resumed_from}" if result.resumed_from else "trained"
        out.print(f"{how} in {result.seconds:.1f}s: {result.run_dir}")


# ------------------------------------------------------------------------------ eval
@app.command("eval")
def eval_cmd(
    backbone: Annotated[
        str, typer.Option(help="Backbone (see `cdmbench list backbones`).")
    ] = "digits",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated methods and/or 'teacher' "
            "(default: every trained run of the backbone plus the teacher)."
        ),
    ] = None,
    steps: Annotated[str, typer.Option(help="Comma-separated step counts.")] = "1,2,4",
    metrics: Annotated[
        str | None,
        typer.Option(help="Comma-separated metrics (default: the backbone's eval_metrics)."),
    ] = None,
    prompts: Annotated[
        str | None,
        typer.Option(
            help="Prompt set name (digits, general, default) or a prompt file "
            "(default: the backbone's eval_prompts)."
        ),
    ] = None,
    num_samples: Annotated[
        int | None, typer.Option(help="Samples per prompt (default: the backbone's eval_samples).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed; per-sample seeds derive from it.")] = 0,
    run_seeds: Annotated[
        bool,
        typer.Option(
            "--run-seeds",
            help="Evaluate each student at its own training seed and the teacher at each of "
            "those seeds, as `bench --seeds` does (instead of every model at --seed).",
        ),
    ] = False,
    runs: Annotated[Path, typer.Option(help="Root of training run directories.")] = Path("runs"),
    samples: Annotated[
        Path, typer.Option(help="Where generated samples are kept (content-keyed).")
    ] = Path("runs/samples"),
    results: Annotated[Path, typer.Option(help="Results directory (records.jsonl).")] = Path(
        "results"
    ),
    batch_size: Annotated[
        int | None, typer.Option(help="Generation batch size (default: the backbone's eval_batch).")
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option(
            help="Reference images for FID (a folder); default: the backbone's fid_reference, "
            "else its real data."
        ),
    ] = None,
    teacher_weights: Annotated[
        str | None, typer.Option(help="Teacher weights (default: shipped/hub).")
    ] = None,
    device: DeviceOpt = "auto",
    compile_: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    recompute: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated metrics to compute again although "
            "recorded, e.g. latency on another machine."
        ),
    ] = None,
    dist_timeout: Annotated[
        float,
        typer.Option(
            help="Seconds a process waits for the others at a collective (several processes: "
            "rank 0 combines the scores and computes reference statistics while the others wait)."
        ),
    ] = 7200.0,
    set_: BackboneSetOpt = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated evaluation protocols (see `cdmbench protocols`), each a "
            "(prompt set -> metrics) pair that fixes prompts, subset, samples per prompt, "
            "reference, resize/crop and metrics."
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(help="A protocol's input file or folder, NAME=PATH (repeatable)."),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="Where protocol inputs are found under their default paths.")
    ] = Path("data"),
    limit: Annotated[
        int | None,
        typer.Option(
            help="Evaluate N prompts: the N of smallest sha256 rank of their ids (a protocol's "
            "seed, else 0), the same every run; a smaller N gives a subset of a larger one."
        ),
    ] = None,
    n_ref: Annotated[
        int | None,
        typer.Option(help="At most N reference images, a deterministic subset (as --limit)."),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            help="Students' weights: 'ema' (the exported EMA) or 'raw' (the generator itself; "
            "recorded under the run id + '-raw')."
        ),
    ] = "ema",
) -> None:
    """Generate with every student and the teacher at each step count, score, and append records.

    Samples are kept as PNGs with a manifest under --samples, keyed by content: a rerun
    reuses them, an interrupted run regenerates only what is missing, and metrics already
    recorded for a sample set are not recomputed (unless named in --recompute). Every
    prompt set, metric and reference is checked before anything is generated.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cdmbench.backbones.base import BackboneSettings
    from cdmbench.config import parse_steps
    from cdmbench.distributed import init_distributed
    from cdmbench.evaluate import EvalPlan, run_candidates, run_eval, teacher_candidate
    from cdmbench.protocols import eval_pairs
    from cdmbench.results import ResultStore
    from cdmbench.settings import MAX_COUNT, check_option
    from cdmbench.training.core import TrainConfig

    step_list = parse_steps(steps)
    check_option("--num-samples", num_samples, BackboneSettings, "eval_samples")
    check_option("--batch-size", batch_size, BackboneSettings, "eval_batch")
    check_option("--seed", seed, TrainConfig, "seed")
    check_option("--dist-timeout", dist_timeout, TrainConfig, "dist_timeout_s")
    check_option("--limit", limit, ge=1, le=MAX_COUNT)
    check_option("--n-ref", n_ref, ge=2, le=MAX_COUNT)
    if weights not in ("ema", "raw"):
        raise UserError(f"unknown --weights '{weights}': use ema or raw")
    mode = _compile_mode(compile_, compile_mode)
    teacher_weights, set_ = _pipeline_weights(teacher_weights, set_)
    from cdmbench.distributed import resolve_device

    device = resolve_device(device)
    bb = _backbone(backbone, set_, device)
    defaults = bb.settings
    wanted = [m.strip() for m in methods.split(",")] if methods else None
    for m in wanted or []:
        if m != "teacher":
            METHODS.entry(m)
    pairs = eval_pairs(
        bb,
        protocol,
        prompts=prompts,
        metrics=metrics,
        num_samples=num_samples,
        reference=reference,
        data=data,
        data_dir=data_dir,
        limit=limit,
        n_ref=n_ref,
    )  # every pair checked (metrics registered, inputs and reference there) before generating
    metric_names = list(dict.fromkeys(m for p in pairs for m in p.metrics))
    again = tuple(m.strip() for m in recompute.split(",")) if recompute else ()
    for m in again:
        METRICS.entry(m)
        if m not in metric_names:
            raise UserError(
                f"--recompute {m}: not among the metrics of this run ({', '.join(metric_names)}); "
                f"add it to --metrics"
            )
    for pair in pairs:
        bb.warn_prompt_overlap(pair.prompts)
    rank, world = init_distributed(device, dist_timeout)
    cands = (
        []
        if wanted is not None and "teacher" not in wanted
        else [teacher_candidate(bb, teacher_weights)]
    )
    students = run_candidates(
        runs, bb, [m for m in wanted if m != "teacher"] if wanted else None, device, weights
    )
    batch_size = batch_size or defaults.eval_batch
    # (eval seed, models): every model at --seed, or each student at its training seed
    groups: dict[int, list] = {seed: cands + students}
    if run_seeds:
        groups = {}
        for c in students:
            groups.setdefault(int(c.provenance.get("train_seed") or 0), []).append(c)
        groups = {s: cands + groups.get(s, []) for s in sorted(groups) or [seed]}
    plans = [
        EvalPlan(
            bb,
            models,
            step_list,
            pair.metrics,
            pair.prompts,
            pair.prompt_set,
            pair.per_prompt,
            eval_seed,
            samples,
            ResultStore(results),
            batch_size,
            reference=pair.reference,
            compile=mode,
            recompute=tuple(m for m in again if m in pair.metrics),
        )
        for eval_seed, models in groups.items()
        for pair in pairs
    ]
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=rank != 0,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total or None)
            bar.update(tasks[label], completed=done)

        done = [(plan, run_eval(plan, progress, rank, world)) for plan in plans]
    if rank == 0:
        for plan, new in done:
            _print_records(new, plan)


def _compile_mode(on: bool, mode: str) -> str | None:
    if mode not in COMPILE_MODES:
        raise UserError(f"unknown --compile-mode '{mode}'; use one of {', '.join(COMPILE_MODES)}")
    return mode if on else None


def _print_records(new: list[dict], plan) -> None:
    from cdmbench.report import header

    if not new:
        out.print(
            f"nothing new to compute: every requested number is already in {plan.results.path}"
        )
        return
    metrics = list(dict.fromkeys(r["metric"] for r in new))
    table = Table(
        title=f"cdmbench eval — {plan.backbone.name}, {plan.per_prompt} samples/prompt, seed {plan.seed}"
    )
    table.add_column("model")
    table.add_column("steps", justify="right")
    for m in metrics:
        table.add_column(
            header(m, next(r["higher_is_better"] for r in new if r["metric"] == m)), justify="right"
        )
    rows: dict[tuple[str, int], dict[str, float]] = {}
    for r in new:
        rows.setdefault((r["method"], r["steps"]), {})[r["metric"]] = r["value"]
    for (model, n), vals in rows.items():
        table.add_row(model, str(n), *[f"{vals[m]:.4g}" if m in vals else "" for m in metrics])
    out.print(table)
    out.print(f"{len(new)} records appended to {plan.results.path}")


# ---------------------------------------------------------------------------- export
@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A finished training run directory.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory to write (diffusers save_pretrained layout).")
    ],
    steps: Annotated[
        int, typer.Option(help="Step count whose schedule the exported scheduler carries.")
    ] = 4,
    teacher_weights: Annotated[
        str | None, typer.Option(help="Teacher weights (default: shipped/hub).")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out folder as a whole.")
    ] = False,
) -> None:
    """Export a student so plain diffusers loads it (StableDiffusion3Pipeline.from_pretrained(OUT)).

    The exact post-shift schedule goes to cdmbench_schedule.json; pass its pipeline_sigmas as
    `sigmas=` and guidance_scale=1 when sampling with diffusers. The folder is written beside
    --out and renamed when complete; a non-empty --out is replaced only with --overwrite.
    """
    from cdmbench.io import atomic_dir, check_out_dir
    from cdmbench.settings import MAX_STEPS, check_option
    from cdmbench.training.run import ADAPTER_FILE, load_run

    check_option("--steps", steps, ge=1, le=MAX_STEPS)
    check_out_dir(out_dir, overwrite)  # before loading the run: that takes a while
    r = load_run(run, teacher_weights=teacher_weights)
    spec = r.method.sampler(steps, r.backbone.shift)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        r.backbone.export(r.student, tmp, spec.sigmas, stochastic=spec.stochastic)
        if (r.run_dir / ADAPTER_FILE).is_file():  # a LoRA run: its adapter, for load_lora_weights
            from safetensors.torch import load_file

            r.backbone.export_adapter(load_file(str(r.run_dir / ADAPTER_FILE)), tmp)
    out.print(f"wrote {out_dir} ({r.info['method']} student, {steps}-step schedule {spec.sigmas})")


# ---------------------------------------------------------------------------- report
@app.command()
def report(
    results: Annotated[Path, typer.Option(help="Results directory (records.jsonl).")] = Path(
        "results"
    ),
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Where to write report.{md,csv,tex,html} (default: the results directory).",
        ),
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="Only this backbone.")] = None,
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated methods (and/or teacher).")
    ] = None,
    metrics: Annotated[
        str | None, typer.Option(help="Comma-separated metric values, e.g. fd_digits,recall.")
    ] = None,
    latest: Annotated[
        bool, typer.Option("--latest/--all", help="Newest record per cell, or every run.")
    ] = True,
    samples_per_cell: Annotated[
        int, typer.Option(help="Images per grid cell in the HTML page (0: no grids).")
    ] = 10,
) -> None:
    """Pivot the results (method x steps, one column per metric) into markdown, CSV, LaTeX and HTML.

    The HTML page is self-contained (plots and sample grids embedded) and opens in any browser.
    """
    from cdmbench.report import build_report, render_rich
    from cdmbench.settings import check_option

    check_option("--samples-per-cell", samples_per_cell, ge=0, le=1000)
    outs = build_report(
        results,
        out_dir or results,
        backbone=backbone,
        methods=methods,
        metrics=metrics,
        latest=latest,
        samples_per_cell=samples_per_cell,
    )
    out.print(render_rich(outs.table, title=f"cdmbench report — {outs.n_records} records"))
    for w in outs.warnings:
        console.print(f"[yellow]warning:[/] {_escape(w)}", highlight=False)
    out.print("wrote " + ", ".join(str(p) for p in outs.files))


# ----------------------------------------------------------------------------- check
class _CheckCommand(TyperCommand):
    """`check`, whose help lists the default tolerances the metrics declare, read only when the
    help is shown: reading them imports every metric module, and torch with them."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from cdmbench.check import tolerance_help

        self.help = (self.help or "").replace("{tolerances}", tolerance_help())
        super().format_help(ctx, formatter)


@app.command(cls=_CheckCommand)
def check(
    baseline: Annotated[
        Path, typer.Option(help="Baseline CSV (backbone, method, steps, metric, value, ...).")
    ] = Path("results/baseline/digits.csv"),
    results: Annotated[Path, typer.Option(help="Results directory to check.")] = Path("results"),
    backbone: Annotated[str | None, typer.Option(help="Only this backbone.")] = None,
    tolerance: Annotated[
        list[str] | None,
        typer.Option(
            help="Per-metric tolerance, e.g. fd_digits=10% or prompt_acc=0.01 (absolute)."
        ),
    ] = None,
    write_baseline: Annotated[
        bool,
        typer.Option(
            "--write-baseline",
            help="Write the baseline from the current results instead of checking.",
        ),
    ] = False,
    only_changes: Annotated[bool, typer.Option(help="Show only rows that are not 'ok'.")] = False,
    spread_k: Annotated[
        float,
        typer.Option(
            help=(
                "Where cells have several seeds, allow a change of up to this many standard "
                "errors of the difference of the means when that exceeds the tolerance (0: off)."
            )
        ),
    ] = 2.0,
) -> None:
    """Compare the latest results with a baseline; exit 1 on a regression beyond tolerance.

    Each metric's direction decides what is worse. Exit status: 0 pass, 1 regression or missing
    row, 2 bad input.

    Default tolerances, as the metrics declare them: {tolerances}
    """
    from cdmbench.check import check as run_check
    from cdmbench.check import write_baseline as do_write

    if write_baseline:
        df = do_write(results, baseline, backbone)
        out.print(f"wrote {len(df)} baseline rows to {baseline}")
        return
    from cdmbench.config import parse_pairs

    tols = parse_pairs(tolerance, "--tolerance", "use METRIC=VALUE, e.g. fd_digits=10%")
    res = run_check(results, baseline, tols or None, backbone, spread_k)
    out.print(res.render_rich(only_changes=only_changes))
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {_escape(w)}", highlight=False)
    out.print(res.summary())
    raise typer.Exit(res.exit_code)


# ----------------------------------------------------------------------------- bench
@app.command()
def bench(
    backbone: Annotated[str, typer.Option(help="Backbone.")] = "digits",
    methods: Annotated[
        str | None, typer.Option(help="Comma-separated methods (default: all built-in).")
    ] = None,
    steps: Annotated[str, typer.Option(help="Step counts to evaluate.")] = "1,2,4",
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help=(
                "CI budget: 1/5 of the training iterations, the backbone's eval_samples_quick samples "
                "per prompt."
            ),
        ),
    ] = False,
    seeds: Annotated[
        str,
        typer.Option(
            help=(
                "Comma-separated training seeds, e.g. 0,1,2: every method is trained once per "
                "seed and evaluated with the same seed; the report shows mean ± 95 % interval."
            )
        ),
    ] = "0",
    variants: Annotated[
        str,
        typer.Option(
            help=(
                "Comma-separated variants to train each method in: tuned (the backbone's "
                "defaults), paper (the authors' hyperparameters), or both."
            )
        ),
    ] = "tuned",
    runs: Annotated[Path, typer.Option(help="Root of training run directories.")] = Path("runs"),
    samples: Annotated[Path, typer.Option(help="Where generated samples are kept.")] = Path(
        "runs/samples"
    ),
    results: Annotated[
        Path, typer.Option(help="Results directory; the report is written there too.")
    ] = Path("results"),
    workers: Annotated[
        int, typer.Option(help="Methods trained in parallel on CPU (one thread each).")
    ] = 2,
    iters: Annotated[
        int | None, typer.Option(help="Override every method's training iterations.")
    ] = None,
    match_compute: Annotated[
        bool,
        typer.Option(
            "--match-compute",
            help=(
                "Also train every method and variant at the cheapest one's full-budget training "
                "FLOPs (its recorded cost, teacher data included), at every seed, and evaluate "
                "them: the report's compute-matched table. They show as "
                "'METHOD (VARIANT, compute-matched)'; a baseline written from such results "
                "expects them."
            ),
        ),
    ] = False,
    num_samples: Annotated[
        int | None,
        typer.Option(
            help="Samples per prompt (default: the backbone's eval_samples, or eval_samples_quick)."
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(help="Comma-separated metrics (default: the backbone's eval_metrics)."),
    ] = None,
    device: DeviceOpt = "auto",
    compile_: CompileOpt = False,
    compile_mode: CompileModeOpt = "default",
    set_: BackboneSetOpt = None,
) -> None:
    """The main job: train every method (default budgets), evaluate at 1, 2, 4 steps, write the report.

    The shipped teacher is reused. Every stage is content-keyed: a second run reuses what is
    finished, and an interrupted run continues where it stopped.
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cdmbench.backbones.base import BackboneSettings
    from cdmbench.bench import BenchConfig, methods_arg, parse_seeds, parse_variants, run_bench
    from cdmbench.config import backbone_settings, parse_steps
    from cdmbench.distributed import resolve_device
    from cdmbench.report import build_report, render_rich
    from cdmbench.settings import as_dict, check_option
    from cdmbench.training.core import TrainConfig

    seed_list = parse_seeds(seeds)
    variant_list = parse_variants(variants)
    check_option("--iters", iters, TrainConfig, "iters")
    check_option("--num-samples", num_samples, BackboneSettings, "eval_samples")
    check_option("--workers", workers, ge=1, le=1024)
    mode = _compile_mode(compile_, compile_mode)
    device = resolve_device(device)
    settings = backbone_settings(BACKBONES.get(backbone), None, set_, only_backbone=True)
    ms = methods_arg(methods, ("cdm", "dmd", "dmd2", "cd"))
    for m in ms:
        METHODS.entry(m)
    metric_names = tuple(m.strip() for m in metrics.split(",")) if metrics else None
    for m in metric_names or ():
        METRICS.entry(m)
    cfg = BenchConfig(
        backbone=backbone,
        methods=ms,
        steps=tuple(parse_steps(steps)),
        quick=quick,
        seeds=seed_list,
        variants=variant_list,
        runs=runs,
        samples=samples,
        results=results,
        workers=workers,
        device=device,
        iters=iters,
        per_prompt=num_samples,
        metrics=metric_names,
        compile=mode,
        backbone_settings=as_dict(settings),
        match_compute=match_compute,
    )
    t0 = time.perf_counter()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, int] = {}

        def on(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total or None)
            bar.update(tasks[label], completed=done, total=total or None)

        run_dirs, new = run_bench(cfg, on_train=lambda u, i, n: on(f"train {u}", i, n), on_eval=on)
    outs = build_report(results, results, backbone=backbone)
    out.print(
        render_rich(outs.table, title=f"cdmbench bench — {backbone}{' (quick)' if quick else ''}")
    )
    took = f"{time.perf_counter() - t0:.0f}s"
    if new:
        out.print(f"{len(new)} new records; report: {outs.html} ({took})")
    else:
        out.print(
            f"nothing new: every result of this bench was already recorded in {results} "
            f"({outs.n_records} records in the report); report rewritten: {outs.html} ({took})"
        )


# ----------------------------------------------------------------------------- sweep
@app.command()
def sweep(
    method: Annotated[str, typer.Argument(help="Method to tune (see `cdmbench list methods`).")],
    backbone: Annotated[str, typer.Option(help="Backbone (one with a val split: digits).")] = (
        "digits"
    ),
    trials: Annotated[
        int, typer.Option(help="K: trials, the same for every method (trial 0 is the base).")
    ] = 8,
    seed: Annotated[
        int,
        typer.Option(help="S: seeds the draws and training; evaluation uses S + 10000."),
    ] = 0,
    iters: Annotated[
        int | None,
        typer.Option(
            help="Training iterations per trial (default: 1/5 of the base's, as --quick)."
        ),
    ] = None,
    variant_base: Annotated[
        str,
        typer.Option(
            help="Trial 0 and the settings outside the search space: paper (the authors' "
            "hyperparameters) or tuned."
        ),
    ] = "paper",
    per_prompt: Annotated[
        int, typer.Option(help="Validation samples per prompt and step count.")
    ] = 50,
    workers: Annotated[
        int, typer.Option(help="Trials trained in parallel on CPU (one thread each).")
    ] = 2,
    results: Annotated[
        Path, typer.Option(help="Results directory; trials go to sweeps.jsonl there.")
    ] = Path("results"),
    runs: Annotated[Path, typer.Option(help="Root of training run directories.")] = Path("runs"),
    device: DeviceOpt = "auto",
) -> None:
    """Tune METHOD by seeded random search over its declared search space, scored on the
    validation split (never the test split that reports use).

    Trial 0 is the base variant's configuration (the paper's by default, so every search
    includes its authors' setting); trials 1..K-1 draw the space's settings from a generator
    seeded by (seed, method, trial), so the same command gives the same trials and scores, and
    a larger K extends a smaller one. Each trial trains on the sweep's budget and is scored
    by the domain FD against the val split at 1, 2 and 4 steps; the objective is their mean
    (lower is better). Each trial is a line of RESULTS/sweeps.jsonl; a rerun reuses finished
    trials. Use the same --trials for every method.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cdmbench.distributed import resolve_device
    from cdmbench.sweep import SweepConfig, plan, render_markdown, run_sweep, summarize

    if not 1 <= workers <= 1024:
        raise UserError(f"bad --workers {workers}: use 1 to 1024")
    cfg = SweepConfig(
        method=method,
        backbone=backbone,
        trials=trials,
        seed=seed,
        iters=iters,
        base=variant_base,
        results=results,
        runs=runs,
        per_prompt=per_prompt,
        workers=workers,
        device=resolve_device(device),
    )
    plan(cfg)  # every check before the progress bar
    with Progress(
        TextColumn(f"sweep [bold]{method}[/] on {backbone}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
    ) as bar:
        task = bar.add_task("trials", total=trials, last="")

        def on_trial(done: int, total: int, line: dict | None) -> None:
            last = ""
            if line is not None:
                obj = line["objective"]
                last = f"trial {line['trial']}: " + (
                    f"{obj:.2f}" if obj is not None else line["error"]
                )
            bar.update(task, completed=done, total=total, last=last)

        lines = run_sweep(cfg, on_trial)
    for line in lines:
        obj = line["objective"]
        score = f"{obj:.2f}" if obj is not None else f"failed ({line['error']})"
        params = ", ".join(f"{k}={v}" for k, v in line["params"].items())
        out.print(f"trial {line['trial']}: {score}  {params}", highlight=False, markup=False)
    out.print(render_markdown(summarize(lines)), highlight=False, markup=False)
    out.print(f"{len(lines)} trials in {results / 'sweeps.jsonl'}")


# --------------------------------------------------------------------------- recipes
@app.command()
def recipes() -> None:
    """List the shipped training recipes: `cdmbench train --config NAME` runs one."""
    from cdmbench.recipes import shipped

    table = Table(title="cdmbench recipes")
    for col in ("name", "method", "backbone", "version", "description"):
        table.add_column(col, style="bold cyan" if col == "name" else None)
    for r in shipped():
        table.add_row(r.name, r.method or "", r.backbone or "", str(r.version), r.description)
    out.print(table)


# ------------------------------------------------------------------------- protocols
@app.command()
def protocols() -> None:
    """List the shipped evaluation protocols: `cdmbench eval --protocol NAME` runs one."""
    from cdmbench.protocols import shipped

    table = Table(title="cdmbench protocols")
    cols = ("name", "version", "metrics", "samples", "inputs (--data NAME=PATH)", "description")
    for col in cols:
        table.add_column(col, style="bold cyan" if col == "name" else None)
    for p in shipped():
        inputs = ", ".join(f"{i.name} ({i.path})" for i in p.inputs.values()) or "none"
        table.add_row(
            p.name,
            str(p.version),
            ", ".join(p.metrics),
            str(p.samples_per_prompt),
            inputs,
            p.description,
        )
    out.print(table)


# ------------------------------------------------------------------------------ plan
@app.command()
def plan(
    method: Annotated[
        str | None,
        typer.Argument(help="Distillation method; may be left out when --config names a recipe."),
    ] = None,
    backbone: Annotated[
        str | None, typer.Option(help="Backbone (default: the recipe's, else sd3).")
    ] = None,
    config: Annotated[str | None, ConfigOptHelp] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override, e.g. --set backbone.gradient_checkpointing=false."),
    ] = None,
    gpus: Annotated[int, typer.Option(help="Processes, one GPU each.")] = 8,
    gpu_memory: Annotated[float, typer.Option(help="Memory of one GPU, in GB (1e9 bytes).")] = 80.0,
    cuda_context_gb: Annotated[
        float | None,
        typer.Option(help="Per-GPU CUDA context and cuBLAS/cuDNN workspaces, GB [0.8]."),
    ] = None,
    nccl_gb: Annotated[
        float | None, typer.Option(help="Per-GPU NCCL buffers with several GPUs, GB [0.6].")
    ] = None,
    fragmentation: Annotated[
        float | None,
        typer.Option(help="Caching-allocator slack, a fraction of per-step memory [0.1]."),
    ] = None,
) -> None:
    """What each GPU holds when a configuration trains, whether it fits, and what would.

    Builds every model on the meta device (nothing is loaded) and prints per-rank weights,
    gradients, optimizer states, buffers and activations (from per-token figures measured
    per backbone); then the largest per-GPU batch that fits and, on one GPU, the gradient
    accumulation and offloading that make the configuration fit.
    """
    from cdmbench.config import backbone_settings, resolve
    from cdmbench.plan import (
        GB,
        Overheads,
        build_architecture,
        estimate,
        fmt_gb,
        largest_batch,
        remedies,
    )
    from cdmbench.settings import check_option

    check_option("--gpus", gpus, ge=1, le=1_000_000)
    check_option("--gpu-memory", gpu_memory, gt=0, le=1e6)  # NaN and inf refused too
    check_option("--cuda-context-gb", cuda_context_gb, ge=0, le=1e6)
    check_option("--nccl-gb", nccl_gb, ge=0, le=1e6)
    check_option("--fragmentation", fragmentation, ge=0, le=100)
    given = {"cuda_context_gb": cuda_context_gb, "nccl_gb": nccl_gb, "fragmentation": fragmentation}
    given = {k: v for k, v in given.items() if v is not None}
    method, backbone, recipe = _method_backbone(method, backbone or None, config)
    if backbone == "digits" and (recipe is None or recipe.backbone is None):
        backbone = "sd3"
    method_cls, bb_cls = METHODS.get(method), BACKBONES.get(backbone)
    settings = backbone_settings(bb_cls, config, set_, only_backbone=False)
    train_cfg, _ = resolve(method_cls, backbone, config, set_)
    arch = build_architecture(bb_cls, settings, device="cuda")
    accum = getattr(train_cfg, "grad_accum", 1)
    kw = dict(
        gpus=gpus,
        shard=train_cfg.shard,
        checkpointing=bool(getattr(settings, "gradient_checkpointing", False)),
        optimizer=getattr(train_cfg, "optimizer", "adamw"),
        overheads=Overheads(**given),
    )
    offload = bool(getattr(settings, "offload_frozen", False))
    cap = gpu_memory * GB
    p = estimate(arch, method_cls, train_cfg.batch, grad_accum=accum, offload_frozen=offload, **kw)
    img, txt = p.tokens
    title = f"cdmbench plan — {method} on {backbone}" + (
        f" (recipe {recipe.name} v{recipe.version})" if recipe else ""
    )
    out.print(title)
    table = Table()
    table.add_column("per GPU")
    table.add_column("GB", justify="right")
    for what, b in p.rows.items():
        table.add_row(what, fmt_gb(b))
    table.add_row("[bold]total[/]", f"[bold]{fmt_gb(p.total)}[/]")
    out.print(table)
    out.print(
        f"{gpus} GPU(s) x {gpu_memory:g} GB, {'FSDP2-sharded' if p.sharded else 'replicated'}, "
        f"gradient checkpointing {'on' if p.checkpointing else 'off'}, "
        f"batch {p.micro_batch} per GPU x {accum} accumulation step(s), "
        f"{img} image + {txt} text tokens, {p.optimizer}"
        + (", frozen models offloaded" if offload else "")
    )
    fits = p.total <= cap
    best = largest_batch(
        lambda b: estimate(arch, method_cls, b, offload_frozen=offload, **kw).total <= cap
    )
    out.print(
        f"{'fits' if fits else 'does not fit'}: {fmt_gb(p.total)} of {gpu_memory:g} GB per GPU; "
        f"largest batch per GPU that fits: {best}"
    )
    if fits or gpus != 1:
        return
    target = p.micro_batch * accum

    def plan_fn(micro: int, k: int, off: bool, opt: str, cached: bool = False):
        kw_opt = kw | {"optimizer": opt}
        a = dataclasses.replace(arch, encoders_cached=True) if cached else arch
        return estimate(a, method_cls, micro, grad_accum=k, offload_frozen=off, **kw_opt)

    # embeddings cached on disk: a lever where the backbone has the setting and it is off
    disk = hasattr(settings, "embed_cache") and not arch.encoders_cached
    found = remedies(plan_fn, target, cap, kw["optimizer"], disk_cache=disk)
    if not found:
        least = plan_fn(1, target, True, "adamw8bit", disk).total
        out.print(
            f"nothing makes it fit one {gpu_memory:g} GB GPU: batch 1 with {target} accumulation "
            f"steps, the frozen models offloaded and 8-bit AdamW still needs {fmt_gb(least)} GB; "
            "use more GPUs (FSDP2 shards the models)"
        )
        return
    for r in found:
        sets = " ".join(f"--set {x}" for x in r.sets(kw["optimizer"]))
        out.print(
            f"fits one GPU at {fmt_gb(r.plan.total)} GB with the same {target} samples per "
            f"update: {sets}"
        )


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    """Entry point. Exit status: 0 done; 1 ``check`` found a regression; 2 a user error (bad
    input, an unusable file, a full or read-only disk), one line on stderr naming what to fix;
    3 an internal error (a bug: ``--debug`` shows its traceback); 130/143 interrupted by
    Ctrl-C/SIGTERM."""
    import logging

    # diffusers imports bitsandbytes when it is installed (the adam8bit extra), which warns on
    # every start about an optional 4-bit CPU kernel that cdmbench never uses
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        rc = app(args=argv, standalone_mode=False)
        if rc == 130:  # a KeyboardInterrupt that typer caught (and returns as its exit status)
            _interrupted()
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except (
        UserError,
        UnknownNameError,
        CheckpointError,
        NonFiniteLossError,
        FileNotFoundError,
    ) as e:
        _fail(e, str(e))
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        if isinstance(e, _click_errors("Exit")):
            sys.exit(e.exit_code)
        if isinstance(e, _click_errors("ClickException")):  # one line, as every user error
            from rich.markup import escape

            hint = ""
            if isinstance(e, _click_errors("UsageError")) and e.ctx is not None:
                hint = f" (see `{e.ctx.command_path} --help`)"
            msg = " ".join(e.format_message().split())
            console.print(
                f"[bold red]error:[/] {escape(msg)}{hint}", highlight=False, soft_wrap=True
            )
            sys.exit(2)
        if isinstance(e, _click_errors("Abort")):  # click's name for a KeyboardInterrupt
            _interrupted()
        user = _environment_error(e)
        if user is not None:
            _fail(e, user)
        if DEBUG["on"]:
            raise
        import traceback

        where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
        from rich.markup import escape

        line = escape(" ".join(str(e).split())[:300])
        console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {line}{at} — a bug in cdmbench; "
            "rerun with --debug for the traceback and report it",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(3)


def _escape(text: str) -> str:
    """``text`` shown as is by rich (a path or message may hold "[...]")."""
    from rich.markup import escape

    return escape(text)


def _click_errors(name: str) -> tuple[type, ...]:
    """click's exception class ``name``, from click and from the copy newer typer releases
    carry as ``typer._click`` (the commands raise that one there)."""
    import importlib

    found = []
    for module in ("click.exceptions", "typer._click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _fail(e: BaseException, msg: str) -> None:
    """A user error: one line on stderr, exit status 2 (``--debug``: the traceback)."""
    if DEBUG["on"]:
        raise e
    msg = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    from rich.markup import escape  # a message may hold "[train]": not markup

    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _interrupted() -> None:
    console.print(
        "interrupted (Ctrl-C): finished work is kept; rerun the same command to continue",
        highlight=False,
    )
    sys.exit(130)


def _environment_error(e: Exception) -> str | None:
    """The one-line message for a failure the user's files or machine cause (a file that
    cannot be read or written, an undecodable file, no CUDA, out of memory); None for a bug."""
    import json

    from cdmbench.config import tomllib
    from cdmbench.io import os_error_message

    if isinstance(e, OSError):
        return os_error_message(e, verb="read or write") if e.filename else f"{e}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
    if isinstance(e, json.JSONDecodeError | tomllib.TOMLDecodeError):
        return f"a JSON or TOML file is malformed ({e}); fix or delete it"
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(e, Image.DecompressionBombError):
        return f"an image is too large to decode safely ({e}); remove it"
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        SafetensorError = ()
    if isinstance(e, SafetensorError):
        return f"a safetensors file is unreadable ({e}); delete or replace it"
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return "out of memory on the GPU; use a smaller --batch/--batch-size or another device"
    text = str(e)
    if isinstance(e, AssertionError | RuntimeError) and (
        "Torch not compiled with CUDA" in text
        or "no CUDA GPUs are available" in text
        or "Found no NVIDIA driver" in text
    ):
        return f"CUDA is not available on this machine ({text.splitlines()[0]}); use --device cpu"
    return None


if __name__ == "__main__":
    main()
