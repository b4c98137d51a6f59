"""An exclusive lock on a model directory, held while it is written.

Two processes that write the same directory (say, two trainings each adding a task) take turns
instead of interleaving their files. The lock is ``fcntl.flock`` on ``DIR/.lock``: the kernel
drops it when its holder exits, even by SIGKILL, so a crashed writer never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recast.errors import RecastError

LOCK_FILE = ".lock"


class DirectoryLockedError(RecastError, TimeoutError):
    """Another process kept a model directory locked for longer than the caller would wait."""


@contextmanager
def lock_directory(directory: str | os.PathLike[str], timeout: float = 300.0, poll: float = 0.05) -> Iterator[Path]:
    """Hold the exclusive write lock of ``directory`` (created if needed) for the ``with`` block.

    Waits up to ``timeout`` seconds for another writer to finish, then raises
    ``DirectoryLockedError`` naming the holder's process id. The lock file itself is left in place:
    it is empty of meaning once unlocked, and removing it would race with the next writer.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout, poll)
        _record_holder(fd)
        try:
            yield path
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def shared_lock(directory: str | os.PathLike[str], timeout: float = 300.0, poll: float = 0.05) -> Iterator[None]:
    """Hold a shared (reader's) lock on ``directory`` for the ``with`` block: no writer commits meanwhile.

    Readers normally need no lock (:mod:`recast.format.reading`); this is their last resort when
    writers keep committing. Where the lock file cannot be opened (a read-only copy, no such
    folder) nothing can write either, so the block runs without it.
    """
    try:
        fd = os.open(Path(directory) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        fd = -1
    if fd < 0:
        yield
        return
    try:
        _acquire(fd, Path(directory) / LOCK_FILE, timeout, poll, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, path: Path, timeout: float, poll: float, mode: int = fcntl.LOCK_EX) -> None:
    """Poll a non-blocking ``flock`` (exclusive, or ``mode``) until it succeeds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DirectoryLockedError(
                    f"{path}: the model directory has been locked by another writer ({_holder(fd)}) for over "
                    f"{timeout:g} s; wait for it to finish, or stop that process if it hangs"
                ) from None
            time.sleep(poll)


def _record_holder(fd: int) -> None:
    """Write this process's id into the lock file, for the message other writers see.

    Best effort: on a full or failing disk the lock still holds, only the message loses the id.
    """
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass


def _holder(fd: int) -> str:
    """Who holds the lock, as far as the lock file says."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"process {text}" if text.isdigit() else "unknown process"


def is_locked(directory: str | os.PathLike[str]) -> bool:
    """True when some process holds the write lock of ``directory`` right now (never waits)."""
    path = Path(directory) / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
