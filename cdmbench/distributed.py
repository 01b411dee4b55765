"""Several processes, one per device, as ``accelerate launch`` or ``torchrun`` start them.

The launcher's environment names each process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``);
a plain ``python`` run is rank 0 of a world of 1 and never touches ``torch.distributed``.
Training and evaluation both join the process group here.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from cdmbench.errors import UserError

T = TypeVar("T")


def rank_world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(spec: str | None = "auto") -> str:
    """The device a command runs on: ``auto`` is this process's local GPU (``cuda:LOCAL_RANK``)
    when CUDA is available, else ``cpu``; an explicit device must exist here. Anything else
    is a one-line :class:`UserError`.

    Every command that runs a network resolves ``--device`` here; the device never enters a
    run's hash.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return f"cuda:{local % torch.cuda.device_count()}"
        return "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise UserError(f"device '{spec}' is not supported: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(
            f"device '{spec}' is not available: this machine has no usable CUDA GPU; "
            "use --device cpu (or auto)"
        )
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise UserError(
            f"device '{spec}' does not exist: this machine has {n} CUDA device(s), "
            f"cuda:0 to cuda:{n - 1}"
        )
    return text


def init_distributed(device: str, timeout_s: float = 7200.0) -> tuple[int, int]:
    """Join the launcher's process group; on GPU each process takes its local device, so
    that "cuda" names a different GPU in every process (NCCL and FSDP2 need that).

    ``timeout_s``: how long a collective waits for the slowest process before failing the
    run. The default is evaluation's, where one rank may score metrics while the others wait;
    training passes ``train.dist_timeout_s``."""
    rank, world = rank_world()
    dev = torch.device(device)
    if world > 1 and dev.type == "cuda" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local if dev.index is None else dev.index)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "gloo" if dev.type == "cpu" else "nccl", timeout=timedelta(seconds=timeout_s)
        )
    return rank, world


def active(world: int) -> bool:
    """Whether collectives are to be run: several processes and a joined process group."""
    return world > 1 and dist.is_available() and dist.is_initialized()


def barrier(world: int) -> None:
    """Wait for every process (nothing to wait for in a one-process run)."""
    if world > 1:
        dist.barrier()


def broadcast_from_0(obj: T, world: int) -> T:
    """Rank 0's ``obj`` on every rank (a picklable value; as is in a one-process run)."""
    if world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
