"""Evaluation: generate with students and the teacher at each step count, score, record.

    model + sampler spec + prompt set + seed  --generate-->  samples/<backbone>/<name>-<steps>-<key>/
        manifest.jsonl (prompt id, prompt, index, seed, file) + meta.json (schedule, checkpoint)
        one PNG per sample, written atomically
    samples --metrics--> result records (cdmbench.results)

The sample folder is keyed by content (checkpoint hash, post-shift schedule, update rule,
guidance, prompt set, seed, samples per prompt): rerunning reuses what exists, an interrupted
run regenerates only the missing PNGs, and a record whose (sample key, metric, metric config)
is already stored is not recomputed. Under several processes each rank generates its share
of the missing samples (sample i goes to rank i % world), PNGs encoded in a thread pool; every
rank scores its share of the set's chunks (:mod:`cdmbench.scoring`: streamed, cached per chunk,
combined exactly on rank 0), and rank 0 writes the records. Metrics that are neither feature,
per-sample nor per-prompt metrics (the domain measures, latency, plugins with only ``compute``)
run on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cdmbench import flow
from cdmbench.backbones.base import Backbone
from cdmbench.config import config_hash
from cdmbench.distributed import barrier
from cdmbench.errors import UserError
from cdmbench.generate import SamplerSpec, generate
from cdmbench.io import (
    atomic_path,
    atomic_write_json,
    remove_stale_temps,
    sha256_file,
    to_uint8,
)
from cdmbench.locks import hold
from cdmbench.metrics.base import EvalSet, Metric
from cdmbench.metrics.features import default_threads, thread_pool
from cdmbench.metrics.latency import make_timer
from cdmbench.prompts_io import Prompt
from cdmbench.registry import METRICS
from cdmbench.results import Record, ResultStore, make_record
from cdmbench.scoring import read_pngs, score_sample_set, sharded
from cdmbench.settings import as_dict


@dataclass
class Candidate:
    """One model to evaluate: a student run or the teacher."""

    name: str  # method name, or "teacher"
    run_id: str
    checkpoint: str  # content hash of the weights
    model: nn.Module
    sampler: Callable[[int], SamplerSpec]
    compile_s: float | None = None  # torch.compile time of its denoiser, when compiled
    weights: str = "ema"  # a student's weights: "ema" or "raw" (the generator itself)
    # what its records carry about the training run: variant, train_seed, config_key,
    # train_cost (from run.json; the teacher's defaults otherwise)
    provenance: dict[str, Any] = field(default_factory=dict)

    def record_fields(self) -> dict[str, Any]:
        """The record fields that place this model in a report's cells; a student's raw
        weights are a model of their own (variant "... raw weights", their own config key)."""
        p = self.provenance
        variant, key = str(p.get("variant") or ""), str(p.get("config_key") or self.run_id)
        if self.weights == "raw":
            variant = f"{variant}, raw weights" if variant else "raw weights"
            key = f"{key}-raw"
        return {
            "variant": variant,
            "train_seed": p.get("train_seed"),
            "config_key": key,
            "train_cost": dict(p.get("cost") or {}),
        }


def compile_candidate(
    backbone: Backbone,
    cand: Candidate,
    prompts: Sequence[Prompt],
    batch_sizes: Sequence[int],
    mode: str | None = None,
) -> float:
    """Compile the candidate's denoiser in place (``torch.compile``) and return the compile time.

    The model is compiled with ``nn.Module.compile`` (same object, same weights, same state
    dict), then warmed up by sampling one step at each batch size it will see: the generation
    batch, and 1 for latency. Dynamo recompiles on a second batch size with the batch dimension
    dynamic, so a partial last batch costs no third compile. The compile time is the warm-up's
    wall time minus that of the same calls once compiled, so latency and generation are timed
    on compiled code only. Students of one architecture share compiled code: the second
    candidate's compile time is near zero.
    """
    cand.model.compile(mode=mode)
    spec = cand.sampler(1)
    cuda = str(backbone.device).startswith("cuda")

    def warm() -> float:
        t0 = time.perf_counter()
        for b in dict.fromkeys(batch_sizes):
            ps = [prompts[i % len(prompts)] for i in range(b)]
            generate(backbone, cand.model, ps, list(range(b)), spec, batch_size=b)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    first = warm()
    cand.compile_s = max(0.0, first - warm())
    return cand.compile_s


def teacher_candidate(backbone: Backbone, weights: str | None = None) -> Candidate:
    """The backbone's teacher at its reference guidance, named by its weights' identity."""
    tid = backbone.teacher_id(weights)
    model = backbone.load_teacher(weights)
    w = backbone.default_teacher_guidance
    return Candidate(
        "teacher",
        f"teacher-{tid.split(':')[-1][:12]}",
        tid,
        model,
        lambda n: SamplerSpec(flow.uniform_schedule(n, backbone.shift), guidance=w),
    )


def run_candidates(
    runs_root: str | Path,
    backbone: Backbone,
    methods: Sequence[str] | None = None,
    device: str = "cpu",
    weights: str = "ema",
) -> list[Candidate]:
    """The finished runs under ``runs_root/<backbone>`` trained with this backbone's settings
    (those that change results): per method and variant, every seed of its newest
    configuration (run.json ``config_key``; a run without one is a configuration of its own).
    ``weights``: as in :func:`candidates_from_dirs`."""
    root = Path(runs_root) / backbone.name
    mine = backbone.run_settings()
    # (method, variant) -> (config key, [(training seed, run dir)]) of the newest
    # configuration, by mtime
    newest: dict[tuple[str, str], tuple[str, list[tuple[int, Path]]]] = {}
    for info in (
        sorted(root.glob("*/run.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    ):
        method = info.parent.name.rsplit("-", 1)[0]
        if methods is not None and method not in methods:
            continue
        stored = _run_info(info)
        if stored is None or _run_settings(backbone, stored) != mine:
            continue
        variant = str(stored.get("variant") or "")
        key = str(stored.get("config_key") or info.parent.name)
        seed = stored.get("train_seed", (stored.get("train") or {}).get("seed", 0))
        run = (seed if isinstance(seed, int) else 0, info.parent)
        have = newest.get((method, variant))
        if have is not None and have[0] == key:
            have[1].append(run)
        else:
            newest[(method, variant)] = (key, [run])
    if methods is not None:
        found = {m for m, _ in newest}
        missing = [m for m in methods if m != "teacher" and m not in found]
        if missing:
            raise UserError(
                f"no finished run of {', '.join(missing)} on {backbone.name} with "
                f"these backbone settings under {runs_root}; train it first: "
                f"cdmbench train {missing[0]} --backbone {backbone.name}"
            )
    dirs = [d for k in sorted(newest) for _, d in sorted(newest[k][1])]
    return candidates_from_dirs(dirs, device, weights)


def _run_info(run_json: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(run_json.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info if isinstance(info, dict) else None


def _run_settings(backbone: Backbone, stored: dict[str, Any]) -> dict[str, Any] | None:
    """The hashed backbone settings a finished run (its run.json) was trained with (None if
    unreadable)."""
    try:
        settings = stored.get("backbone_settings") or {}
        return as_dict(type(backbone).make_settings(settings), hashed_only=True)
    except (UserError, TypeError, AttributeError):
        return None


def candidates_from_dirs(
    run_dirs: Sequence[Path], device: str = "cpu", weights: str = "ema"
) -> list[Candidate]:
    """Candidates for the given finished run directories (weights hash-verified).

    ``weights``: the students' EMA weights ("ema") or their raw generators ("raw"); a raw
    candidate's run id ends in "-raw" and its checkpoint is the raw file's hash, so its
    samples and records are apart from the EMA's."""
    from cdmbench.training.run import load_run

    out = []
    for run_dir in run_dirs:
        r = load_run(run_dir, device=device, weights=weights)
        raw = weights == "raw"
        out.append(
            Candidate(
                r.info["method"],
                Path(run_dir).name + ("-raw" if raw else ""),
                "sha256:" + r.info["student_raw_sha256" if raw else "student_sha256"][:16],
                r.student,
                lambda n, r=r: r.method.sampler(n, r.backbone.shift),
                weights=weights,
                provenance={
                    k: r.info[k]
                    for k in ("variant", "train_seed", "config_key", "cost")
                    if k in r.info
                },
            )
        )
    return out


def _samples_at(cand: Candidate, steps: int, rank: int) -> bool:
    """Whether ``cand`` samples at ``steps``; if not (a one-step-only method), says so."""
    try:
        cand.sampler(steps)
    except UserError as e:
        if rank == 0:
            print(f"note: {cand.run_id} skipped at {steps} steps: {e}", file=sys.stderr)
        return False
    return True


# --------------------------------------------------------------------------- generation
def sample_key(
    backbone: Backbone,
    cand: Candidate,
    spec: SamplerSpec,
    prompt_set: str,
    seed: int,
    per_prompt: int,
) -> str:
    key = {
        "backbone": backbone.name,
        "checkpoint": cand.checkpoint,
        "sigmas": spec.sigmas,
        "stochastic": spec.stochastic,
        "guidance": spec.guidance,
        "prompts": prompt_set,
        "seed": seed,
        "per_prompt": per_prompt,
    }
    if (
        cand.compile_s is not None
    ):  # compiled kernels round differently: their samples are their own
        key["compiled"] = True
    return config_hash(key)


@dataclass
class SampleSet:
    folder: Path
    key: str
    prompts: list[Prompt]  # one per sample, in manifest order
    files: list[str]
    generated: int  # how many PNGs this call wrote


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path, fsync=False) as tmp:
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")


def sample_folder(
    backbone: Backbone,
    cand: Candidate,
    steps: int,
    prompt_set: str,
    seed: int,
    per_prompt: int,
    root: Path,
) -> tuple[SamplerSpec, str, Path]:
    """The sampler, content key and folder of a sample set."""
    spec = cand.sampler(steps)
    key = sample_key(backbone, cand, spec, prompt_set, seed, per_prompt)
    return spec, key, root / backbone.name / f"{cand.name}-{steps}-{key}"


def ensure_samples(
    backbone: Backbone,
    cand: Candidate,
    steps: int,
    prompts: Sequence[Prompt],
    prompt_set: str,
    seed: int,
    per_prompt: int,
    root: Path,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
    on_progress: Callable[[int], None] | None = None,
) -> SampleSet:
    """Generate whatever PNGs of this sample set are missing; return the set."""
    spec, key, folder = sample_folder(backbone, cand, steps, prompt_set, seed, per_prompt, root)
    entries = [(p, i, flow.sample_seed(seed, p.id, i)) for p in prompts for i in range(per_prompt)]
    files = [f"{p.id}-{i:05d}.png" for p, i, _ in entries]
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder, recursive=False)  # a killed predecessor's half-written PNGs
        atomic_write_json(
            folder / "meta.json",
            {
                "backbone": backbone.name,
                "model": cand.name,
                "run_id": cand.run_id,
                "checkpoint": cand.checkpoint,
                "steps": steps,
                "schedule": spec.sigmas,
                "stochastic": spec.stochastic,
                "guidance": spec.guidance,
                "prompt_set": prompt_set,
                "seed": seed,
                "per_prompt": per_prompt,
                "key": key,
                "compiled": cand.compile_s is not None,
            },
        )
        verified = verify_samples(folder, files)  # damaged or unverifiable PNGs are deleted
        _write_manifest(folder, entries, files, verified)
    barrier(world)
    todo = [
        k for k in range(len(entries)) if k % world == rank and not (folder / files[k]).is_file()
    ]
    done_before = len(entries) - len(todo)
    if on_progress is not None and done_before:
        on_progress(done_before)
    pool = thread_pool("png", default_threads())
    writing: list = []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        lat = generate(
            backbone,
            cand.model,
            [entries[k][0] for k in chunk],
            [entries[k][2] for k in chunk],
            spec,
            batch_size=batch_size,
        )
        images = to_uint8(backbone.decode(lat)).permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, C]
        # encoded by a thread pool (zlib and Pillow release the GIL) while the next batch
        # generates; at most one batch waits to be written
        for w in writing:
            w.result()
        writing = [
            pool.submit(_write_png, folder / files[k], img)
            for k, img in zip(chunk, images, strict=True)
        ]
        if on_progress is not None:
            on_progress(len(chunk))
    for w in writing:
        w.result()
    barrier(world)
    if rank == 0 and (todo or world > 1):  # record the new PNGs' sizes and hashes
        # only those generated now (by any rank, each written whole and renamed into place
        # before the barrier): the others were verified above
        new = [f for f in files if f not in verified]
        verified.update(verify_samples(folder, new, fresh=set(new)))
        _write_manifest(folder, entries, files, verified)
    barrier(world)
    return SampleSet(folder, key, [e[0] for e in entries], files, len(todo))


MANIFEST = "manifest.jsonl"
MAX_SAMPLE_PIXELS = 64 * 1024 * 1024  # a sample PNG larger than this is not decoded


def _write_manifest(
    folder: Path,
    entries: Sequence[tuple[Prompt, int, int]],
    files: Sequence[str],
    verified: dict[str, tuple[int, str]],
) -> None:
    """manifest.jsonl: one line per sample (prompt id, prompt, index, seed, file) and, for the
    PNGs written and checked, their size in bytes and sha256 (what reuse verifies)."""
    lines = []
    for (p, i, s), f in zip(entries, files, strict=True):
        e = {"prompt_id": p.id, "prompt": p.text, "index": i, "seed": s, "file": f}
        if f in verified:
            e["bytes"], e["sha256"] = verified[f]
        lines.append(json.dumps(e) + "\n")
    text = "".join(lines)
    path = folder / MANIFEST
    if not path.is_file() or path.read_text(encoding="utf-8", errors="replace") != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def recorded_hashes(folder: Path) -> dict[str, tuple[int, str]]:
    """file -> (bytes, sha256) from the folder's manifest; lines that are not such a record
    (an older manifest, a damaged or hostile one) record nothing."""
    out: dict[str, tuple[int, str]] = {}
    try:
        text = (folder / MANIFEST).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if not isinstance(e, dict):
            continue
        f, n, h = e.get("file"), e.get("bytes"), e.get("sha256")
        if (
            isinstance(f, str)
            and type(n) is int
            and isinstance(h, str)
            and len(h) == 64
            and all(c in "0123456789abcdef" for c in h)
        ):
            out[f] = (n, h)
    return out


def _png_ok(path: Path) -> bool:
    """Whether ``path`` decodes whole as an image of at most :data:`MAX_SAMPLE_PIXELS`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_SAMPLE_PIXELS:
                return False
            im.load()
        return True
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def verify_samples(
    folder: Path, files: Sequence[str], fresh: set[str] = frozenset()
) -> dict[str, tuple[int, str]]:
    """Check the folder's PNGs before reuse: a PNG whose size or sha256 differs from its
    manifest record, or that has no record and does not decode, is deleted (and so
    regenerated); ``fresh``: PNGs this process has just written, hashed but not decoded.
    Returns file -> (bytes, sha256) of the PNGs kept."""
    import warnings

    recorded = recorded_hashes(folder)

    def check(f: str) -> tuple[int, str] | None:
        path = folder / f
        try:
            size = path.stat().st_size
            if f in recorded and recorded[f][0] != size:
                return None
            digest = sha256_file(path)
        except OSError:
            return None
        if f in recorded:
            return (size, digest) if recorded[f][1] == digest else None
        return (size, digest) if f in fresh or _png_ok(path) else None

    present = [f for f in files if (folder / f).is_file()]
    found = list(thread_pool("png", default_threads()).map(check, present))
    bad = [f for f, r in zip(present, found, strict=True) if r is None]
    for f in bad:
        (folder / f).unlink(missing_ok=True)
    if bad:
        warnings.warn(
            f"{folder}: {len(bad)} damaged sample PNG(s) (e.g. {bad[0]}) deleted; regenerating",
            RuntimeWarning,
            stacklevel=3,
        )
    return {f: r for f, r in zip(present, found, strict=True) if r is not None}


def load_images(sset: SampleSet) -> torch.Tensor:
    """uint8 [N, C, H, W] from the set's PNGs, in manifest order (for metrics that need the
    whole set at once; the sharded driver streams chunks instead)."""
    return read_pngs(sset.folder, sset.files)


# ------------------------------------------------------------------------------ driver
@dataclass
class EvalPlan:
    backbone: Backbone
    candidates: list[Candidate]
    steps: list[int]
    metrics: list[str]
    prompts: list[Prompt]
    prompt_set: str
    per_prompt: int
    seed: int
    samples_root: Path
    results: ResultStore
    batch_size: int = 256
    teacher_default: bool = True  # also evaluate the teacher at its default step count
    reference: str = ""
    cache_dir: Path = Path(".cdmbench/cache")
    compile: str | None = None  # torch.compile mode ("default", "max-autotune", ...); None: eager
    recompute: tuple[
        str, ...
    ] = ()  # metrics computed again even where a record exists (e.g. latency)
    score_chunk: int = 256  # images per scoring chunk: the unit of sharding, caching, memory


def build_metrics(names: Sequence[str], backbone: Backbone) -> dict[str, Metric]:
    """The named metrics, each checked against ``backbone`` before any work."""
    out = {}
    for name in names:
        m = METRICS.get(name)()
        m.check(backbone)
        out[name] = m
    return out


def run_eval(
    plan: EvalPlan,
    progress: Callable[[str, int, int], None] | None = None,
    rank: int = 0,
    world: int = 1,
) -> list[Record]:
    """Generate missing samples, compute missing metrics, append records; returns new records.

    Each sample set is generated, scored and recorded under its folder's lock (rank 0 holds
    it): an eval started beside another waits for a set the other is working on, then finds
    its samples and records, as if it had run after it.
    """
    with contextlib.ExitStack() as held:
        return _run_eval(plan, progress, rank, world, held)


def _run_eval(
    plan: EvalPlan,
    progress: Callable[[str, int, int], None] | None,
    rank: int,
    world: int,
    held: contextlib.ExitStack,
) -> list[Record]:
    bb = plan.backbone
    metrics = build_metrics(plan.metrics, bb)
    for name, m in metrics.items():  # before any generation
        why = m.too_few(len(plan.prompts), plan.per_prompt)
        if why is not None:
            raise UserError(
                f"{name} cannot score {len(plan.prompts)} prompt(s) x {plan.per_prompt} "
                f"sample(s): it needs {why}"
            )
    if rank == 0:
        plan.results.check_writable()
    told: set[str] = set()  # processes this one has said it waits for
    jobs: list[tuple[Candidate, int]] = [
        (c, n) for c in plan.candidates for n in plan.steps if _samples_at(c, n, rank)
    ]
    if plan.teacher_default:
        jobs += [
            (c, bb.default_teacher_steps)
            for c in plan.candidates
            if c.name == "teacher" and bb.default_teacher_steps not in plan.steps
        ]
    new: list[Record] = []
    total = len(plan.prompts) * plan.per_prompt
    if plan.compile is not None:
        for cand in plan.candidates:
            what = f"{cand.name}: torch.compile"
            if progress is not None:
                progress(what, 0, 1)
            mode = None if plan.compile == "default" else plan.compile
            compile_candidate(bb, cand, plan.prompts, [min(plan.batch_size, total), 1], mode)
            if progress is not None:
                progress(f"{what} ({cand.compile_s:.1f} s)", 1, 1)
    for cand, steps in jobs:
        label = f"{cand.name} @ {steps} step{'s' if steps > 1 else ''}"
        counter = {"n": 0}

        def on_progress(k: int, label=label, counter=counter) -> None:
            counter["n"] += k
            if progress is not None:
                progress(label, counter["n"], total)

        held.close()  # the previous sample set's lock
        _, _, folder = sample_folder(
            bb, cand, steps, plan.prompt_set, plan.seed, plan.per_prompt, plan.samples_root
        )
        held.enter_context(
            hold(
                folder.parent / f".{folder.name}.lock",
                "cdmbench eval",
                f"evaluating {folder}",
                busy="{holder} is evaluating " + str(folder),
                unlockable=f"cannot lock sample folder {folder}: {{why}}; choose another --samples",
                rank=rank,
                world=world,
                told=told,
            )
        )
        sset = ensure_samples(
            bb,
            cand,
            steps,
            plan.prompts,
            plan.prompt_set,
            plan.seed,
            plan.per_prompt,
            plan.samples_root,
            plan.batch_size,
            rank,
            world,
            on_progress,
        )
        spec = cand.sampler(steps)
        # read under the lock by every rank after the barriers above (rank 0 appended the
        # previous set's records before them), so that all ranks agree on what to score; a
        # process that held the lock before this one may have recorded this set meanwhile
        done = plan.results.done_keys()
        todo: dict[str, tuple[Metric, str, dict[str, Any]]] = {}  # name -> metric, hash, timing
        for name, metric in metrics.items():
            # compiled and eager timings are different numbers: the mode keys and labels them
            timing = (
                {"compile": plan.compile}
                if cand.compile_s is not None and "timer" in metric.needs
                else {}
            )
            # the same sample set scored against another reference set is another number
            ref = (
                {"reference_set": plan.reference}
                if plan.reference and "reference" in metric.needs
                else {}
            )
            mhash = config_hash(
                {"metric": name, **metric.config(), "device": str(bb.device), **timing, **ref}
            )
            if (sset.key, name, mhash) not in done or name in plan.recompute:
                todo[name] = (metric, mhash, timing)
        data = EvalSet(
            images=torch.empty(0, dtype=torch.uint8),
            prompts=sset.prompts,
            backbone=bb,
            reference=plan.reference,
            cache_dir=plan.cache_dir,
            eval_batch=plan.batch_size,
            extra={} if cand.compile_s is None else {"compile_s": cand.compile_s},
        )
        computed: dict[str, dict[str, float]] = {}
        spread = {n: m for n, (m, _, _) in todo.items() if sharded(m)}
        if spread:  # every rank scores its chunks; rank 0 combines
            what = f"{label}: {', '.join(spread)} (this rank's share)"

            def on_scored(k: int, n: int, what=what) -> None:
                if progress is not None:
                    progress(what, k, n)

            computed = score_sample_set(
                sset.folder,
                sset.key,
                sset.files,
                sset.prompts,
                spread,
                data,
                plan.score_chunk,
                rank,
                world,
                on_scored if rank == 0 else None,
            )
        if rank != 0:
            continue
        for name, (metric, mhash, timing) in todo.items():
            if name not in computed:  # the whole set at once, on rank 0
                if "images" in metric.needs and data.images.numel() == 0:
                    data.images = load_images(sset)
                data.timer = (
                    make_timer(bb, cand.model, spec, plan.prompts)
                    if "timer" in metric.needs
                    else None
                )
                if progress is not None:
                    progress(f"{label}: {name}", 0, 1)
                computed[name] = metric.compute(data)
                if progress is not None:
                    progress(f"{label}: {name}", 1, 1)
            values = computed[name]
            recs = [
                make_record(
                    run_id=cand.run_id,
                    backbone=bb.name,
                    method=cand.name,
                    checkpoint=cand.checkpoint,
                    steps=steps,
                    schedule=spec.sigmas,
                    stochastic=spec.stochastic,
                    guidance=spec.guidance,
                    prompt_set=plan.prompt_set,
                    n_samples=len(sset.files),
                    metric=vname,
                    value=float(v),
                    higher_is_better=metric.values[vname].higher_is_better
                    if vname in metric.values
                    else False,
                    metric_name=name,
                    metric_config={**metric.run_config(), **timing},
                    metric_config_hash=mhash,
                    seed=plan.seed,
                    device=_device_name(bb.device),
                    dtype=str(bb.dtype).replace("torch.", ""),
                    eval_key=sset.key,
                    samples=str(sset.folder),
                    **cand.record_fields(),
                )
                for vname, v in values.items()
            ]
            plan.results.append(recs)
            new.extend(recs)
    return new


def _device_name(device) -> str:
    d = str(device)
    if d.startswith("cuda") and torch.cuda.is_available():
        return f"{d} ({torch.cuda.get_device_name(torch.device(d))})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
