"""Atomic file writes and folders, content hashes (nothing half-written is ever trusted), guarded
reads of user files (weights, images), and the 8-bit levels images are saved at."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdmbench.errors import UserError
from cdmbench.locks import pid_alive

if TYPE_CHECKING:
    from torch import Tensor, nn

# what to do about an OSError, by errno (the rest: the system's own words)
_HINTS = {
    errno.ENOSPC: "free some space or choose another path",
    errno.EDQUOT: "free some space or choose another path",
    errno.EFBIG: "the file size limit (ulimit -f) is too small; raise it or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.EACCES: "check the permissions or choose another path",
    errno.EPERM: "check the permissions or choose another path",
    errno.EISDIR: "it is a directory; give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EEXIST: "a part of the path is a file, not a directory; choose another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
}


class UnwritableError(UserError, OSError):
    """An output that cannot be written (full disk, read-only, wrong type of path): a user
    error naming the path, and still an ``OSError`` for callers that only warn."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def os_error_message(e: OSError, path: str | Path | None = None, verb: str = "write") -> str:
    """One line: what could not be done to which file, why, and what to do."""
    where = path if path is not None else (e.filename or "a file")
    why = e.strerror or str(e) or type(e).__name__
    hint = _HINTS.get(e.errno or -1)
    return f"cannot {verb} {where}: {why}" + (f"; {hint}" if hint else "")


def unwritable(e: OSError, path: str | Path) -> UnwritableError:
    err = UnwritableError(os_error_message(e, path))
    err.errno, err.filename = e.errno, str(path)
    return err


@contextlib.contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    The rename makes the write atomic for readers and against a killed process; ``fsync``
    additionally makes it durable across a power loss. An ``OSError`` on the way (a full disk, a read-only folder, a directory at ``path``)
    becomes :class:`UnwritableError` naming ``path``; the temporary file is removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the owner in the name: cleanup removes only temporaries whose writer has died
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent
        )
        os.close(fd)
    except OSError as e:
        raise unwritable(e, path) from e
    tmp = Path(tmp)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
    except UnwritableError:
        raise
    except OSError as e:
        raise unwritable(e, path) from e
    except Exception as e:
        # safetensors reports a failed write (a full disk, ulimit -f) as its own error type
        code = re.search(r"I/O error: .*\(os error (\d+)\)", str(e))
        if code is None:
            raise
        n = int(code.group(1))
        raise unwritable(OSError(n, os.strerror(n)), path) from e
    finally:
        with contextlib.suppress(OSError):
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


def remove_stale_temps(folder: str | Path, recursive: bool = True, prefix: str = "") -> int:
    """Delete temporary files :func:`atomic_path` left behind when a process was killed.

    A temporary file names its writer (pid and host): one whose writer still runs is left
    alone, so any process may clean a folder that others are writing into. ``prefix``
    limits it to the temporaries of files whose names start with it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    pattern = f".{prefix}*.tmp"
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    stale = [p for p in found if p.is_file() and _temp_is_stale(p)]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def check_out_dir(path: str | Path, overwrite: bool = False) -> None:
    """Refuse an output folder :func:`atomic_dir` would refuse, before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a folder; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UserError(f"{path} exists and is not empty; add --overwrite to replace it")


def temp_dir(path: Path) -> Path:
    """A new empty folder ``.<name>.<writer>.XXXX.tmp`` beside ``path``, after removing those
    of writers that died (a live writer's are left alone)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir() and _temp_is_stale(stale):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(
        tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    )


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; rename it to ``path`` if the block
    succeeds, so a folder at ``path`` is always complete.

    An existing non-empty ``path`` is an error unless ``overwrite`` (then it is replaced as a
    whole, never merged into). Temporary folders of writers killed before they finished
    (``.<name>.<writer>.*.tmp`` beside ``path``, the writer dead) are removed first; a live
    writer's are left alone.
    """
    path = Path(path)
    check_out_dir(path, overwrite)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(path)
    except OSError as e:
        raise unwritable(e, path) from e
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the usual folder mode
        if path.is_dir():  # --overwrite: set the old folder aside, rename, then delete it
            old = Path(
                tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
            )
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except UnwritableError:
        raise
    except OSError as e:
        raise unwritable(e, path) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path, what: str = "file", fix: str = "delete it") -> Any:
    """JSON from a user's file; unreadable or malformed is a :class:`UserError` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(os_error_message(e, path, "read") + f"; {fix}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e}); {fix}") from None


def load_state(module: nn.Module, path: str | Path, what: str, fix: str) -> nn.Module:
    """``module`` with the safetensors state dict at ``path``; a file that is not safetensors
    (truncated, pickled) or whose tensors do not fit the module (names, shapes) is a
    :class:`UserError` naming the file and ``fix``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except OSError as e:
        raise UserError(os_error_message(e, path, "read") + f"; {fix}") from None
    except (SafetensorError, ValueError) as e:
        raise UserError(f"{what} {path} is not a readable safetensors file ({e}); {fix}") from None
    return fit_state(module, state, path, what, fix)


def load_torch_file(path: str | Path, what: str, fix: str) -> Any:
    """The tensors of a ``torch.save`` file (``weights_only``: no code runs); a file that is
    missing, truncated or not such a file is a :class:`UserError` naming it and ``fix``."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(os_error_message(e, path, "read") + f"; {fix}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        first = (" ".join(str(e).split()) or type(e).__name__)[:200]
        raise UserError(f"{what} {path} is not a readable weights file ({first}); {fix}") from None


def fit_state(
    module: nn.Module, state: dict, path: str | Path, what: str, fix: str, strict: bool = True
) -> nn.Module:
    """``module.load_state_dict(state)``; tensors that do not fit (names, shapes) are a
    :class:`UserError` naming ``path`` and ``fix``."""
    try:
        module.load_state_dict(state, strict=strict)
    except (RuntimeError, TypeError, AttributeError) as e:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 200 else detail[:200] + "…"
        raise UserError(f"{what} {path} does not fit the model ({detail}); {fix}") from None
    return module


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
