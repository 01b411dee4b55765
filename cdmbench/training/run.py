"""A training run on disk: content-keyed directory, resume, export of the student.

runs/<backbone>/<method>-<hash>/
    config.json          resolved configuration, backbone settings included (the hash is over it)
    log.jsonl            loss terms every ``log_every`` iterations
    checkpoint/          everything needed to resume, on any number of processes (hash-verified)
    student.safetensors  the student's EMA weights (LoRA merged in; float32, or bf16:
                         train.export_dtype), written last
    student_raw.safetensors  the raw (non-EMA) student, the generator itself, same format
    student_lora.safetensors  a LoRA run's EMA adapter weights (peft names)
    run.json             what eval needs: method, backbone, config, weights hash; the
                         run's compute ("cost": calls per model, teacher NFEs, FLOPs, wall time)
    samples.png          a grid at the method's step counts
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdmbench.backbones import get_backbone
from cdmbench.backbones.base import Backbone
from cdmbench.config import config_hash, config_key, run_payload
from cdmbench.distributed import barrier, init_distributed
from cdmbench.errors import UserError
from cdmbench.io import (
    UnwritableError,
    atomic_path,
    atomic_write_json,
    load_state,
    read_json,
    remove_stale_temps,
    sha256_file,
)
from cdmbench.locks import hold
from cdmbench.registry import METHODS
from cdmbench.settings import as_dict
from cdmbench.training import checkpoint
from cdmbench.training.checkpoint import Preempted
from cdmbench.training.core import CheckpointError, TrainConfig, Trainer, cpu_state
from cdmbench.training.method import Method

STUDENT_FILE = "student.safetensors"
ADAPTER_FILE = "student_lora.safetensors"
RAW_FILE = "student_raw.safetensors"
WEIGHTS = {"ema": STUDENT_FILE, "raw": RAW_FILE}  # eval's --weights choice -> file


def run_dir_for(out_root: str | Path, payload: dict[str, Any]) -> Path:
    return Path(out_root) / payload["backbone"] / f"{payload['method']}-{config_hash(payload)}"


@dataclass
class RunResult:
    run_dir: Path
    skipped: bool  # an identical finished run already existed
    resumed_from: int  # iteration resumed from (0 for a fresh start)
    seconds: float


def train_run(
    method: Method,
    backbone: Backbone,
    train_cfg: TrainConfig,
    out_root: str | Path = "runs",
    teacher_weights: str | None = None,
    resume: bool | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    sample_steps: tuple[int, ...] = (1, 2, 4),
    recipe: dict[str, Any] | None = None,
    variant_note: str | None = None,
) -> RunResult:
    """Train (or finish, or reuse) the run this configuration names.

    ``resume=None`` continues from a checkpoint when one exists (written by any number of
    processes); ``True`` requires one; ``False`` refuses to touch an existing checkpoint.
    SIGTERM, SIGUSR1 and SIGINT during training checkpoint at the next iteration and raise
    :class:`~cdmbench.training.checkpoint.Preempted` (a ``SystemExit`` with status 143, 138
    or 130): the job can be requeued and continues where it stopped.
    ``recipe``: the recipe the configuration came from (name, version), recorded in
    config.json beside the hashed values. ``variant_note``: added to the variant label in
    run.json ("tuned, compute-matched"), which keeps such runs apart in ``eval`` and reports;
    it is hashed, so such a run has a directory of its own.
    One process trains a run directory at a time: another that starts the same configuration
    waits for it (``train.lock_wait_s``) and then reuses (or continues) its run.
    """
    payload = run_payload(method.name, backbone, train_cfg, method.config, teacher_weights)
    if variant_note:  # a run of its own: never reused as, or by, a run without the note
        payload["variant_note"] = variant_note
    run_dir = run_dir_for(out_root, payload)
    if (run_dir / "run.json").is_file() and (run_dir / STUDENT_FILE).is_file():
        return RunResult(run_dir, True, train_cfg.iters, 0.0)
    rank, world = init_distributed(train_cfg.device, train_cfg.dist_timeout_s)
    with hold(
        run_dir.parent / f".{run_dir.name}.lock",
        "cdmbench train",
        f"training {run_dir}",
        busy=f"{{holder}} is training {run_dir}; rerun when it has finished to reuse its run "
        f"(waited train.lock_wait_s={train_cfg.lock_wait_s:g} s)",
        unlockable=f"cannot lock run directory {run_dir}: {{why}}; choose another --out",
        wait_s=train_cfg.lock_wait_s,
        rank=rank,
        world=world,
    ):
        return _train_locked(
            method,
            backbone,
            train_cfg,
            run_dir,
            payload,
            teacher_weights,
            resume,
            progress,
            sample_steps,
            recipe,
        )


def _train_locked(
    method: Method,
    backbone: Backbone,
    train_cfg: TrainConfig,
    run_dir: Path,
    payload: dict[str, Any],
    teacher_weights: str | None,
    resume: bool | None,
    progress: Callable[[int, dict[str, float]], None] | None,
    sample_steps: tuple[int, ...],
    recipe: dict[str, Any] | None,
) -> RunResult:
    """:func:`train_run` with the run's lock held (by rank 0)."""
    if (run_dir / "run.json").is_file() and (run_dir / STUDENT_FILE).is_file():
        return RunResult(run_dir, True, train_cfg.iters, 0.0)  # finished while we waited
    ckpt = run_dir / "checkpoint"
    has_ckpt = (ckpt / "manifest.json").is_file()
    if resume is True and not has_ckpt:
        raise UserError(
            f"nothing to resume: no checkpoint in {run_dir}; run without --resume to start"
        )
    if resume is False and has_ckpt:
        raise UserError(
            f"{run_dir} has a checkpoint; add --resume to continue it or delete the directory"
        )
    trainer = Trainer(
        backbone, method, train_cfg, run_dir, teacher_weights
    )  # loads weights: fails before any write
    if trainer.rank == 0:  # one writer: another rank's temporary file is not a stale one
        remove_stale_temps(run_dir)  # a killed predecessor's half-written files
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(
                run_dir / "config.json", payload | ({"recipe": recipe} if recipe else {})
            )
        except UnwritableError:
            raise
        except OSError as e:
            raise UserError(
                f"cannot write run directory {run_dir}: {e.strerror}; choose another --out"
            ) from None
    barrier(trainer.world)
    start = 0
    if has_ckpt:
        try:
            trainer.load_checkpoint(ckpt)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        start = trainer.it
    t0 = time.perf_counter()
    try:
        with checkpoint.handle_signals():  # SIGTERM/SIGUSR1/SIGINT: checkpoint, then stop
            trainer.train(progress)
    except Preempted as e:
        if trainer.rank == 0:
            print(
                f"stopped by {signal.Signals(e.signum).name} at iteration {e.it}: checkpoint "
                f"saved in {ckpt}; rerun the same command to continue (exit {e.code})",
                file=sys.stderr,
                flush=True,
            )
        raise
    seconds = time.perf_counter() - t0
    student_updates = sum(
        n for g, n in trainer.updates.items() if trainer.specs[g].model == "student"
    )
    if student_updates == 0:
        raise UserError(
            f"{run_dir}: no update of the student in {trainer.it} iterations "
            f"({trainer.nan_skipped} steps skipped for a non-finite loss): nothing to export; "
            "lower the learning rate or check the settings, then delete the run directory"
        )
    ema = trainer.unsharded("ema")  # every rank: gathers the EMA's shards when sharded
    cost = trainer.train_cost()  # every rank: sums the counts over processes
    raw = trainer.unsharded("student")
    if trainer.rank == 0:
        export_student(trainer, run_dir, payload, seconds, sample_steps, ema, raw, cost)
    return RunResult(run_dir, False, start, seconds)


def export_student(
    trainer: Trainer,
    run_dir: Path,
    payload: dict[str, Any],
    seconds: float,
    sample_steps: tuple[int, ...],
    ema: nn.Module | None = None,
    raw: nn.Module | None = None,
    cost: dict[str, Any] | None = None,
) -> None:
    """Write the raw and the EMA student, the EMA's sample grid and run.json. ``ema``,
    ``raw``: whole (unsharded) models, from :meth:`Trainer.unsharded`; the trainer's own by
    default. ``cost``: the run's compute (:meth:`Trainer.train_cost`, a collective); computed
    here by default. The payload's ``variant_note`` (see :func:`train_run`) ends the run's
    variant label."""
    from safetensors.torch import save_file

    from cdmbench.generate import generate, save_grid

    ema = trainer.ema if ema is None else ema
    raw = trainer.student if raw is None else raw
    cost = trainer.train_cost() if cost is None else cost
    bb, method = trainer.backbone, trainer.method
    adapter = bb.adapter_state(ema)
    if adapter is not None:
        with atomic_path(run_dir / ADAPTER_FILE) as tmp:
            save_file(cpu_state(adapter), str(tmp))
    for model, file in ((raw, RAW_FILE), (ema, STUDENT_FILE)):  # the EMA file last
        state = cpu_state(bb.plain_state(model))
        if trainer.config.export_dtype == "bfloat16":  # eval loads it into the backbone's dtype
            state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state.items()}
        with atomic_path(run_dir / file) as tmp:
            save_file(state, str(tmp))
    prompts = bb.prompts("train")[:10]
    rows = []
    for steps in sample_steps:
        try:
            spec = method.sampler(steps, bb.shift)
        except UserError:  # a step count the method does not sample at
            continue
        rows.append(generate(bb, ema, prompts, [1000 + i for i in range(len(prompts))], spec))
    save_grid(bb.decode(torch.cat(rows)), run_dir / "samples.png", nrow=len(prompts), scale=4)
    atomic_write_json(
        run_dir / "run.json",
        {
            **payload,
            "student_sha256": sha256_file(run_dir / STUDENT_FILE),
            "student_raw_sha256": sha256_file(run_dir / RAW_FILE),
            # how reports group runs: seeds of one configuration share the config key
            "variant": ", ".join(
                x
                for x in (
                    type(method).variant_of(bb.name, method.config),
                    payload.get("variant_note"),
                )
                if x
            ),
            "train_seed": trainer.config.seed,
            "config_key": config_key(payload),
            "iters": trainer.it,
            "updates": trainer.updates,
            "nan_skipped": trainer.nan_skipped,
            "train_seconds_last_session": round(seconds, 2),
            # compute over every session and process (cdmbench.compute)
            "cost": cost,
            "torch": torch.__version__,
            # every setting of the session that finished the run, hashed or not (provenance)
            "backbone_settings_used": as_dict(bb.settings),
        },
    )


@dataclass
class LoadedRun:
    run_dir: Path
    info: dict[str, Any]
    backbone: Backbone
    method: Method
    student: nn.Module


def load_run(
    run_dir: str | Path,
    device: str = "cpu",
    teacher_weights: str | None = None,
    weights: str = "ema",
) -> LoadedRun:
    """Backbone (rebuilt with the run's settings), configured method and student of a
    finished run: its EMA weights, or with ``weights="raw"`` the raw generator's
    (hash-verified either way)."""
    from dataclasses import replace

    run_dir = Path(run_dir)
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise UserError(
            f"{run_dir} is not a finished training run (no run.json); finish it with `cdmbench train`"
        )
    retrain = "retrain the run (delete the run directory, then `cdmbench train`)"
    info = read_json(info_path, "run file", retrain)
    if not isinstance(info, dict):
        raise UserError(f"{info_path} is malformed (not a JSON object); {retrain}")
    updates = info.get("updates")
    if info.get("iters") == 0 or (isinstance(updates, dict) and not any(updates.values())):
        raise UserError(
            f"{run_dir} made no update of the student ({info.get('iters')} iterations, "
            f"{info.get('updates')} updates): there is nothing to evaluate; {retrain}"
        )
    if weights not in WEIGHTS:
        raise UserError(f"unknown student weights '{weights}': use {' or '.join(WEIGHTS)}")
    key = "student_sha256" if weights == "ema" else "student_raw_sha256"
    if weights == "raw" and key not in info:
        raise UserError(
            f"{run_dir} has no raw student weights (trained before they were exported); "
            f"evaluate its EMA weights or {retrain}"
        )
    weights_file = run_dir / WEIGHTS[weights]
    if not weights_file.is_file() or sha256_file(weights_file) != info.get(key):
        raise UserError(
            f"student weights in {run_dir} are missing or corrupt (hash mismatch); {retrain}"
        )
    try:
        name, bb_name, method_config = info["method"], info["backbone"], info["method_config"]
        if not (isinstance(name, str) and isinstance(bb_name, str)):
            raise TypeError("method and backbone must be names")
        method_cls = METHODS.get(name)
        cfg = method_cls.Config()
        mc = {
            k: tuple(v) if isinstance(getattr(cfg, k, None), tuple) else v
            for k, v in method_config.items()
        }
        method = method_cls(replace(cfg, **mc))
        settings = info.get("backbone_settings") or {}
        if not isinstance(settings, dict):
            raise TypeError("backbone_settings must be a table")
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{info_path} is malformed ({type(e).__name__}: {e}); {retrain}") from None
    # the settings the run was trained with (declared defaults for runs that stored none)
    backbone = get_backbone(bb_name, device=device, settings=settings)
    student = backbone.load_teacher(teacher_weights)
    load_state(student, weights_file, "student weights", retrain)
    return LoadedRun(run_dir, info, backbone, method, student.eval())
