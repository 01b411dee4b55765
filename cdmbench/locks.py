"""Locks that let several processes share a folder: a run directory, a sample folder.

``fcntl.flock`` on a lock file beside the folder: the kernel releases a lock when its holder
dies, so a process killed with SIGKILL leaves nothing that needs breaking.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` says which (pid, host, what)."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


_lock_warned: set[str] = set()


@contextlib.contextmanager
def file_lock(
    path: str | Path,
    what: str = "",
    timeout: float | None = None,
    on_wait: Callable[[str], None] | None = None,
    poll: float = 0.1,
) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file, created and removed here).

    ``fcntl.flock``: the kernel releases the lock when its holder dies, so a process killed
    with SIGKILL leaves no lock that needs breaking (its file, if left, is simply taken
    over). The file records its holder (pid, host, ``what``) for the messages of those who
    wait. ``timeout``: seconds to wait (None: as long as it takes), then :class:`LockBusy`;
    ``on_wait(holder)`` is called once if the lock is taken. Same-process reentry is not
    supported: nested holds of one path from one process wait for themselves.

    On file systems without ``flock`` (some NFS and parallel file systems) the block runs
    unlocked, with a one-line warning.
    """
    try:
        import fcntl
    except ImportError:  # not a POSIX system: nothing to lock with
        yield
        return
    path = Path(path)
    made = _missing_parents(path)
    start = time.monotonic()
    told = False
    fd = -1
    try:
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # a parent removed meanwhile by a releasing holder
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                fd = -1
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise LockBusy(path, holder) from None
                if not told and on_wait is not None:
                    on_wait(holder)
                told = True
                time.sleep(poll)
                continue
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                if str(path.parent) not in _lock_warned:
                    _lock_warned.add(str(path.parent))
                    print(
                        f"warning: {path.parent} does not support file locks; concurrent "
                        "processes in it are not kept apart",
                        file=sys.stderr,
                    )
                os.close(fd)
                fd = -1
                yield
                return
            # the holder we waited for removes the file before releasing: a lock on a removed
            # (or since recreated) file locks nothing, so start again on the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
            fd = -1
        os.ftruncate(fd, 0)
        holder = f"pid {os.getpid()} on {socket.gethostname()}" + (f" ({what})" if what else "")
        os.pwrite(fd, (holder + "\n").encode(), 0)
        yield
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still held: a waiter then retries on a fresh file
            os.close(fd)
        for d in made:  # folders created only to hold the lock, if nothing else went in
            with contextlib.suppress(OSError):
                d.rmdir()


def _missing_parents(path: Path) -> list[Path]:
    """The parent folders of ``path`` that do not exist yet, deepest first."""
    out = []
    for d in path.parents:
        if d.exists():
            break
        out.append(d)
    return out


POLL_S = 5.0  # a launch waiting for a lock meets in one broadcast this often


@contextlib.contextmanager
def hold(
    path: str | Path,
    what: str,
    doing: str,
    *,
    busy: str,
    unlockable: str,
    wait_s: float = -1.0,
    rank: int = 0,
    world: int = 1,
    told: set[str] | None = None,
) -> Iterator[None]:
    """Hold the lock ``path`` for this launch: rank 0 takes it, every rank enters and leaves
    together.

    A holder elsewhere is waited for (``wait_s`` seconds; negative: as long as it takes),
    announced once as ``waiting for <holder>, which is <doing>``. Under several processes
    rank 0 tries in rounds of :data:`POLL_S` seconds, each closed by one broadcast of how it
    went, so no rank sits in a collective longer than a round, however long the wait.
    Raises :class:`~cdmbench.errors.UserError` on every rank: ``busy`` (with ``{holder}``)
    when the wait runs out, ``unlockable`` (with ``{why}``) when the lock cannot be taken.
    """
    from cdmbench.distributed import broadcast_from_0
    from cdmbench.errors import UserError

    told = set() if told is None else told

    def waiting(holder: str) -> None:
        if holder not in told:
            told.add(holder)
            print(f"waiting for {holder}, which is {doing}", file=sys.stderr)

    deadline = None if wait_s < 0 else time.monotonic() + wait_s
    held = contextlib.ExitStack()
    while True:
        status: tuple[str, str] = ("held", "")
        if rank == 0:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            step = left if world == 1 or left is not None and left < POLL_S else POLL_S
            try:  # only the taking is guarded: errors of the locked work pass through
                held.enter_context(file_lock(path, what, step, waiting))
            except LockBusy as e:
                out = deadline is not None and time.monotonic() >= deadline
                status = ("gave up" if out else "busy", e.holder)
            except OSError as e:
                status = ("error", e.strerror or type(e).__name__)
        status = broadcast_from_0(status, world)
        if status[0] == "held":
            break
        if status[0] == "gave up":
            raise UserError(busy.format(holder=status[1]))
        if status[0] == "error":
            raise UserError(unlockable.format(why=status[1]))
    with held:
        yield
