"""Checkpoints of the training core, and preemption.

Layout of ``<run>/checkpoint/``:

    manifest.json               the commit point: the latest checkpoint, hashes of its files,
                                and the older checkpoints kept (``train.keep_last``,
                                ``train.keep_every``), each with its files' hashes
    models-XXXXXXXX.safetensors one process: every model's full tensors
    state-XXXXXXXX.pt           one process: optimizer states, counters, RNG states, method state
    step-XXXXXXXX/              several processes: a ``torch.distributed.checkpoint`` (DCP)
                                folder (one ``__<rank>_<n>.distcp`` file per writing rank and
                                ``.metadata``) and ``state.pt``, written by rank 0

Several processes write DCP: each rank writes its own shards of the models (FSDP2 DTensors
as they are, replicated tensors once) and of the AdamW moments, nothing is gathered, and each
rank hashes the files it wrote; rank 0 collects the digests and commits the manifest last
(written to a temporary name and renamed), so a process killed at any moment leaves the
previous manifest naming intact files. Checkpoints the manifest no longer names are removed
after it commits. DCP reshards on load, so a checkpoint resumes on any number of processes,
sharded or replicated; a one-process run writes the single-file format and reads both.

Optimizer states go through DCP as tensors keyed by (group, parameter index, name), with the
scalars (Adam's step counts) and hyper-parameters in ``state.pt``; they are restored with the
optimizer's own ``load_state_dict`` into templates shaped like the parameters. The
``get/set_optimizer_state_dict`` helpers are avoided: they initialise an optimizer that has
not stepped by taking a zero-gradient step, which gives every parameter an Adam step count
and so changes the bias correction of the next real step after a resume.

Random generators: the shared generator and torch's global one are restored. The
per-process generators are restored exactly when the world size is the one that wrote the
checkpoint (a resume is then bitwise the uninterrupted run); on another world size each rank
reseeds its generator from (seed, iteration, rank) (:func:`rank_seed`), deterministically:
the continuation is reproducible, but it is not the run that would have continued.

Integrity: every file is checked against its SHA-256 before anything is loaded; under several
processes each rank checks a share of the files and all agree before loading.

Preemption: :func:`handle_signals` makes SIGTERM, SIGUSR1 and SIGINT request a stop;
:func:`stop_requested` agrees on it across ranks (an all-reduce of the flag each iteration),
and the core then checkpoints at the iteration boundary and raises :class:`Preempted`, whose
exit status is 128 + the signal's number: 143 (SIGTERM), 138 (SIGUSR1, Slurm's
``--signal=USR1@<seconds>`` warning before the time limit), 130 (SIGINT, Ctrl-C; a second
Ctrl-C interrupts at once). Rerunning the same command continues from the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
import shutil
import signal
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from torch import Tensor

from cdmbench.errors import CheckpointError
from cdmbench.io import atomic_path, atomic_write_json, sha256_file

if TYPE_CHECKING:
    from cdmbench.training.core import Trainer

MANIFEST = "manifest.json"
DCP = "dcp"  # manifest "format" of a sharded checkpoint; the single-file one has none
IN_DCP = "dcp"  # placeholder in state.pt for an optimizer tensor stored in the DCP folder
_ITER = re.compile(r"^(?:models|state|step)-(\d{8})")
# what a checkpoint whose files match their hashes but not this run raises on load: a pickle
# that weights_only refuses, a truncated safetensors file, missing keys, other shapes
_UNUSABLE = (
    OSError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    pickle.UnpicklingError,
    SafetensorError,
)


# --------------------------------------------------------------------------------- save
def save(tr: Trainer) -> Path:
    """Write the trainer's checkpoint (a collective under several processes); prune old ones."""
    ckpt = tr.run_dir / "checkpoint"
    entry = _save_single(tr, ckpt) if tr.world == 1 else _save_dcp(tr, ckpt)
    if tr.rank == 0:
        _commit(tr, ckpt, entry)
    if tr.world > 1:
        dist.barrier()  # the manifest is committed before any rank goes on (or exits)
    return ckpt


def _save_single(tr: Trainer, ckpt: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    tensors, other = tr.state()
    ckpt.mkdir(parents=True, exist_ok=True)
    files = {"models": f"models-{tr.it:08d}.safetensors", "state": f"state-{tr.it:08d}.pt"}
    with atomic_path(ckpt / files["models"]) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(ckpt / files["state"]) as tmp:
        torch.save(other, tmp)
    return {"files": files, "sha256": {n: sha256_file(ckpt / n) for n in files.values()}}


def _save_dcp(tr: Trainer, ckpt: Path) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    names = [_fresh_folder(ckpt, tr.it) if tr.rank == 0 else None]
    dist.broadcast_object_list(names, src=0)
    name = names[0]
    folder = ckpt / name
    other = _other_state(tr, dcp_tensors=True)  # a collective (every rank's generator state)
    dcp.save(_dcp_tensors(tr), checkpoint_id=folder)  # returns once every file is written
    if tr.rank == 0:
        with atomic_path(folder / "state.pt") as tmp:
            torch.save(other, tmp)
    dist.barrier()
    mine = {
        f"{name}/{p.name}": sha256_file(p)
        for p in sorted(folder.iterdir())
        if p.is_file() and _writer(p.name, tr.world) == tr.rank
    }
    digests: list[dict[str, str] | None] = [None] * tr.world
    dist.all_gather_object(digests, mine)
    merged = {k: v for d in digests for k, v in (d or {}).items()}
    return {"format": DCP, "world": tr.world, "files": {"dir": name}, "sha256": merged}


def _fresh_folder(ckpt: Path, it: int) -> str:
    """A new DCP folder for iteration ``it``, never one a committed manifest names (a run
    finished but not exported saves its last iteration again); a leftover of a save killed
    before its manifest is removed."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        entries = [manifest, *manifest.get("older", [])]
        committed = {Path(p).parts[0] for e in entries for p in e["sha256"]}
    except (OSError, ValueError, KeyError):
        committed = set()
    name, n = f"step-{it:08d}", 0
    while name in committed:
        n += 1
        name = f"step-{it:08d}-{n}"
    if (ckpt / name).exists():
        shutil.rmtree(ckpt / name)
    (ckpt / name).mkdir(parents=True)
    return name


def _writer(filename: str, world: int) -> int:
    """The rank that wrote (and so hashes) a file of a DCP folder: ``__<rank>_<n>.distcp``
    by its rank, the rest (``.metadata``, ``state.pt``) by rank 0."""
    m = re.match(r"^__(\d+)_", filename)
    return int(m.group(1)) % world if m else 0


def _dcp_tensors(tr: Trainer) -> dict[str, Tensor]:
    """Every model's state and every AdamW moment, as the live tensors (DTensor shards when
    sharded), under flat keys ``models/<model>/<name>`` and ``optims/<group>/<index>/<name>``."""
    out: dict[str, Tensor] = {}
    for name, m in tr.models.items():
        out.update({f"models/{name}/{k}": v for k, v in m.state_dict().items()})
    for g, o in tr.optims.items():
        params = [p for group in o.param_groups for p in group["params"]]
        for i, p in enumerate(params):
            for k, v in o.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.dim() > 0:
                    out[f"optims/{g}/{i}/{k}"] = v
    return out


def _other_state(tr: Trainer, dcp_tensors: bool) -> dict[str, Any]:
    """Counters, RNG states and method state; with ``dcp_tensors`` also the optimizers'
    state dicts with their moment tensors replaced by :data:`IN_DCP` (else, use ``tr.state()``)."""
    optims = {}
    for g, o in tr.optims.items():
        sd = o.state_dict()
        state = {
            i: {
                k: IN_DCP if dcp_tensors and isinstance(v, Tensor) and v.dim() > 0 else v
                for k, v in entry.items()
            }
            for i, entry in sd["state"].items()
        }
        optims[g] = {"state": state, "param_groups": sd["param_groups"]}
    return {
        "it": tr.it,
        "updates": tr.updates,
        "nan_skipped": tr.nan_skipped,
        "optims": optims,
        "world": tr.world,
        "rng": {
            "g": tr._rank_states(),
            "g_shared": tr.g_shared.get_state(),
            "torch": torch.get_rng_state(),
        },
        "method_state": tr.method.state_dict(),
        "method": tr.method.name,
        "backbone": tr.backbone.name,
        "cost": tr.compute.totals(tr.world, tr.device),  # a collective: counts of every rank
    }


def _commit(tr: Trainer, ckpt: Path, entry: dict[str, Any]) -> None:
    """Write the manifest naming ``entry`` and the older checkpoints kept, then remove the rest."""
    entry = {"it": tr.it, **entry}
    older = []
    try:
        prev = json.loads((ckpt / MANIFEST).read_text())
        older = [_entry(prev), *prev.get("older", [])]
    except (OSError, ValueError, KeyError):
        pass  # no previous (or an unreadable) manifest: nothing older is kept
    older = [e for e in older if e["it"] != tr.it]
    kept = keep([tr.it, *(e["it"] for e in older)], tr.config.keep_last, tr.config.keep_every)
    older = [e for e in older if e["it"] in kept]
    writer = {"method": tr.method.name, "backbone": tr.backbone.name}
    key = settings_hash(tr.run_dir)
    atomic_write_json(
        ckpt / MANIFEST,
        {**entry, **writer, **({"settings_hash": key} if key else {}), "older": older},
    )
    names = {
        Path(p).parts[0] for e in (entry, *older) for p in [*e["sha256"], *e["files"].values()]
    }
    for old in ckpt.iterdir():
        if old.name != MANIFEST and old.name not in names and not old.name.startswith("."):
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _entry(manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("it", "format", "world", "files", "sha256")
    return {k: manifest[k] for k in keys if k in manifest}


def keep(its: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The iterations kept among ``its``: the ``keep_last`` latest, and every multiple of
    ``keep_every`` (0: none)."""
    latest = set(sorted(set(its), reverse=True)[: max(keep_last, 1)])
    return latest | {i for i in its if keep_every > 0 and i % keep_every == 0}


# --------------------------------------------------------------------------------- load
def files(ckpt: str | Path) -> dict[str, Path]:
    """The latest checkpoint's files by role: ``{"models", "state"}`` for the single-file
    format, ``{"dir", "state"}`` for DCP."""
    ckpt = Path(ckpt)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if manifest.get("format") == DCP:
        d = ckpt / manifest["files"]["dir"]
        return {"dir": d, "state": d / "state.pt"}
    named = manifest.get("files", {"models": "models.safetensors", "state": "state.pt"})
    return {k: ckpt / v for k, v in named.items()}


def load(tr: Trainer, ckpt: str | Path) -> None:
    """Restore the latest checkpoint in ``ckpt`` into the trainer, whatever the world size
    that wrote it (a collective under several processes), verifying hashes first."""
    ckpt = Path(ckpt)
    manifest = _verified_manifest(tr, ckpt)
    foreign = (
        f"checkpoint {ckpt} was written by another run (method '{manifest.get('method')}' on "
        f"backbone '{manifest.get('backbone')}'"
    )
    if manifest.get("method") != tr.method.name or manifest.get("backbone") != tr.backbone.name:
        raise CheckpointError(
            f"{foreign}), not '{tr.method.name}' on '{tr.backbone.name}'; "
            "delete the checkpoint directory to start over"
        )
    key = settings_hash(tr.run_dir)
    if manifest.get("settings_hash") and key and manifest["settings_hash"] != key:
        raise CheckpointError(
            f"{foreign}, settings {manifest['settings_hash']}, not this run's {key}); "
            "delete the checkpoint directory to start over"
        )
    try:
        paths = files(ckpt)
        other = _load_state(paths["state"])
        if manifest.get("format") == DCP:
            _load_dcp(tr, paths["dir"], other)
        else:
            _load_single(tr, paths["models"], other)
        tr.it, tr.updates, tr.nan_skipped = other["it"], other["updates"], other["nan_skipped"]
        _restore_rng(tr, other)
        tr.method.load_state_dict(other["method_state"])
        tr.compute.load_totals(other.get("cost"))  # absent in older checkpoints: from 0
    except _UNUSABLE as e:
        raise CheckpointError(_unusable(ckpt, e)) from None


def settings_hash(run_dir: Path) -> str | None:
    """The hash of the run's resolved configuration (its config.json, which names the run
    directory), recorded in the manifest so a checkpoint of another configuration is refused;
    None where the run has no readable config.json."""
    from cdmbench.config import config_hash

    try:
        payload = json.loads((Path(run_dir) / "config.json").read_text())
        payload.pop("recipe", None)  # provenance beside the hashed values
        return config_hash(payload)
    except (OSError, ValueError, AttributeError):
        return None


def _load_state(path: Path) -> dict[str, Any]:
    with warnings.catch_warnings():  # a foreign pickle's protocol warning: the error says more
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, weights_only=True)


def _unusable(ckpt: Path, e: BaseException) -> str:
    detail = " ".join(str(e).split())[:200]
    if isinstance(e, pickle.UnpicklingError):  # torch's advice (weights_only=False) is unsafe
        detail = "a pickle holding more than tensors and plain values; it may be tampered with"
    return (
        f"checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {detail}); "
        "delete the checkpoint directory to start over"
    )


def _verified_manifest(tr: Trainer, ckpt: Path) -> dict[str, Any]:
    """The manifest, once every file it names matches its hash (each rank checks a share)."""
    error = None
    manifest: dict[str, Any] = {}
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        digests = manifest["sha256"]
        if manifest.get("format") != DCP and "files" in manifest:
            names = list(manifest["files"].values())
        else:
            names = sorted(digests)
        for i, n in enumerate(names):
            if i % tr.world == tr.rank and sha256_file(ckpt / n) != digests[n]:
                error = (
                    f"checkpoint file {ckpt / n} is corrupt (hash mismatch); "
                    "delete the checkpoint directory to start over"
                )
                break
    except (OSError, ValueError, KeyError, TypeError) as e:
        error = (
            f"checkpoint {ckpt} is unreadable or incomplete ({type(e).__name__}); "
            "delete the checkpoint directory to start over"
        )
    if tr.world > 1:
        errors: list[str | None] = [None] * tr.world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)
    return manifest


def _load_single(tr: Trainer, models: Path, other: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    from cdmbench.training import sharding

    tensors = load_file(str(models))
    for name, m in tr.models.items():
        prefix = f"{name}."
        # every rank read the file: a sharded model keeps its shards
        sharding.load_full_model_state(
            m, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    for g, o in tr.optims.items():
        sharding.load_full_optimizer_state(o, other["optims"][g])


def _load_dcp(tr: Trainer, folder: Path, other: dict[str, Any]) -> None:
    """Load into templates of this run's layout (DCP reshards: any world size, sharded or not)."""
    import torch.distributed.checkpoint as dcp

    models = {name: m.state_dict() for name, m in tr.models.items()}
    target = {f"models/{n}/{k}": v for n, sd in models.items() for k, v in sd.items()}
    optims = {}
    for g, o in tr.optims.items():
        params = [p for group in o.param_groups for p in group["params"]]
        saved = other["optims"][g]
        state = {}
        for i, entry in saved["state"].items():
            state[i] = dict(entry)
            for k, v in entry.items():
                if isinstance(v, str) and v == IN_DCP:
                    state[i][k] = target[f"optims/{g}/{i}/{k}"] = torch.zeros_like(params[int(i)])
        optims[g] = {"state": state, "param_groups": saved["param_groups"]}
    with _one_process_ok():
        dcp.load(target, checkpoint_id=folder)
    for name, m in tr.models.items():
        m.load_state_dict({k: target[f"models/{name}/{k}"] for k in models[name]})
    for g, o in tr.optims.items():
        o.load_state_dict(optims[g])


@contextlib.contextmanager
def _one_process_ok() -> Iterator[None]:
    """Without a process group DCP loads in this process alone, as intended here: no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        yield


def rank_seed(seed: int, it: int, rank: int) -> int:
    """The per-process generator's seed after a resume on another world size: a function of
    (run seed, iteration, rank) only."""
    digest = hashlib.sha256(f"cdmbench-rank-generator/{seed}/{it}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _restore_rng(tr: Trainer, other: dict[str, Any]) -> None:
    states = other["rng"]["g"]
    states = [states] if isinstance(states, Tensor) else states  # one-process checkpoints of 0.1.0
    if len(states) == tr.world:
        tr.g.set_state(states[tr.rank])
    else:
        tr.g.manual_seed(rank_seed(tr.config.seed, tr.it, tr.rank))
    tr.g_shared.set_state(other["rng"]["g_shared"])
    torch.set_rng_state(other["rng"]["torch"])


def read(ckpt: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(manifest, full tensors ``"<model>.<name>"``, other state with full optimizer tensors)
    of the latest checkpoint, in either format, in one process (inspection and tests)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        paths = files(ckpt)
        other = _load_state(paths["state"])
        if manifest.get("format") != DCP:
            return manifest, load_file(str(paths["models"])), other
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with _one_process_ok():
            flat = _load_state_dict_from_keys(checkpoint_id=str(paths["dir"]))
    except _UNUSABLE as e:
        raise CheckpointError(_unusable(ckpt, e)) from None
    tensors = {}
    for key, v in flat.items():
        kind, rest = key.split("/", 1)
        if kind == "models":
            name, k = rest.split("/", 1)
            tensors[f"{name}.{k}"] = v
        else:
            g, i, k = rest.split("/", 2)
            other["optims"][g]["state"][int(i)][k] = v
    return manifest, tensors, other


# --------------------------------------------------------------------------- preemption
_STOP = {"signal": 0}  # the signal received in this process (0: none), set by the handlers
STOP_SIGNALS = tuple(
    getattr(signal, n) for n in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, n)
)


class Preempted(SystemExit):
    """Training stopped on a signal after checkpointing; exit status 128 + the signal."""

    def __init__(self, signum: int, it: int) -> None:
        super().__init__(128 + signum)
        self.signum, self.it = signum, it


def _on_signal(signum: int, frame: Any) -> None:
    if signum == signal.SIGINT and _STOP["signal"] == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    _STOP["signal"] = signum


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """While training: SIGTERM, SIGUSR1 and SIGINT request a checkpoint and a stop at the next
    iteration boundary instead of killing the process (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _STOP["signal"] = 0
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _STOP["signal"] = 0


def stop_requested(world: int, device: torch.device) -> int:
    """The signal any rank received (the largest number when several), 0 for none; a
    collective (a one-element all-reduce) under several processes."""
    if world == 1:
        return _STOP["signal"]
    flag = torch.tensor([_STOP["signal"]], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())
