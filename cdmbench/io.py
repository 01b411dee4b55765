"""Atomic file writes and content hashes (nothing half-written is ever trusted), and the 8-bit
levels images are saved at."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdmbench.locks import pid_alive

if TYPE_CHECKING:
    from torch import Tensor


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    The rename makes the write atomic for readers and against a killed process; ``fsync``
    additionally makes it durable across a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the owner in the name: cleanup removes only temporaries whose writer has died
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:32] or "host"


def _owner() -> str:
    """This process as it appears in temporary file names: ``p<pid>@<host>``."""
    return f"p{os.getpid()}@{_host()}"


_OWNED_TEMP = re.compile(r"\.p(\d+)@([^@/]+)\.\w+\.tmp$")
FOREIGN_TEMP_AGE_S = 3600.0  # another host's temporary file untouched this long is stale


def _temp_is_stale(p: Path) -> bool:
    m = _OWNED_TEMP.search(p.name)
    if m is None:  # no owner in the name: written by a version that did not record one
        return True
    pid, host = int(m.group(1)), m.group(2)
    if host == _host():
        return pid != os.getpid() and not pid_alive(pid)
    try:  # another machine's process: its liveness cannot be asked, only its file's age
        return time.time() - p.stat().st_mtime > FOREIGN_TEMP_AGE_S
    except FileNotFoundError:
        return False


def remove_stale_temps(folder: str | Path, recursive: bool = True) -> int:
    """Delete temporary files :func:`atomic_path` left behind when a process was killed.

    A temporary file names its writer (pid and host): one whose writer still runs is left
    alone, so any process may clean a folder that others are writing into.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    stale = [p for p in found if p.is_file() and _temp_is_stale(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def module_sha256(module: Any, salt: str = "") -> str:
    """sha256 of a module's state (names, shapes, dtypes and bytes of every parameter and
    buffer, one tensor at a time), after ``salt``: what the module computes, whatever its
    weights were called or where they were read from."""
    import torch

    h = hashlib.sha256(salt.encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_uint8(images: Tensor) -> Tensor:
    """[B, C, H, W] in [0, 1] -> uint8 [B, C, H, W], the levels the sample PNGs store
    (``round``: nearest, ties to even)."""
    import torch

    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
